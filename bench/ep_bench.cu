// SPDX-License-Identifier: Apache-2.0
// ep_bench: bitep dispatch / combine across the GPUs of an MPI job, against the ceilings measured in the
// same run on the same bytes:
//   (a) NCCL's own all-to-all: one grouped ncclSend/ncclRecv of exactly the per-peer bytes the dispatch
//       sent (and, for combine, returned);
//   (b) the GPU-to-GPU copy ceiling: cudaMemcpyAsync into a cudaIpc-mapped buffer of rank 0 from rank 1
//       (fallback when IPC is unavailable: a 256 MiB ncclSend/ncclRecv pair); the JSON says which;
//   (c) the baseline pipeline of bench/baseline (top-k indices -> conversion kernel -> bytemap -> per-expert
//       copies -> count exchange -> all-to-all -> expert-major sort, and back).
// End to end: router + dispatch + combine, bitmap path against the baseline.
//
// Inputs: bf16 tokens; router = bitepRouterForward (softmax after top-k, so a token's weights sum to 1)
// writing BITMAP_U8 + compact weights (bitep) or [T, k] indices + weights (baseline); uniform logits or
// skewed (experts 0..3 hot). Correctness in every run, in the first (untimed) and the last (timed) iteration of each
// timed loop: received rows (payload, source order, counts against the router's own per-rank counts), the
// expert-major view, pad rows, and combine with identity experts must return, bit for bit, x (baseline: one fp32
// sum, one rounding) or the value bitep's documented order gives (its per-rank partials travel in bf16:
// epbench::check_combine). The last iteration's checks run after its events, so they are not timed; they check
// the rows the pool's reused blocks hold once warm. The end-to-end loops poison the router's outputs (map and
// weights) and out before a checked iteration, and check the map and weights against the router's first call's.
// Placement (first iteration), on the
// host: every rank regenerates every source rank's routing (inputs are a function of (seed, rank, token), the
// router is bit-reproducible) and checks its layout against the documented one: the receive order (row headers),
// recv_map and recv_weights bit for bit, each recv_expert_rows entry at its exact row of its expert's block,
// expert_counts and the aligned expert_offsets (epbench::check_placement). --self-test-checks then corrupts host
// copies of the layout (a map bit, two entries of different experts swapped, a weight by one ulp), one at a time,
// and requires the placement check to catch each. Any wrong row or missed corruption makes the exit code non-zero.
//
// L2: before each timed call that starts from the inputs (dispatch, low-latency dispatch, end to end, each NCCL
// all-to-all, the baseline) a buffer of twice the L2 is written on the stream and waited for, outside the timed
// events, so that the call reads x, map and weights from memory, not from the L2 the previous iteration left them
// in (--no-l2-flush: not; the JSON's l2_flush and the table's header say which).
//
// Table (nccl-tests style): size = bytes each rank's dispatch moves (self chunk included; avg over ranks),
// count = rows, time = slowest rank's median; algbw = size / time, busbw = algbw * (W - 1) / W.
// Memory, per rank (min / avg / max over the ranks; the JSON's group_bytes, caller_bytes and memory_ratio are the
// largest rank's): group_bytes (bitepGroupMemoryBytes) and its ratio to (rows sent, own included, + rows
// received) x H x 2. --caller-buffers passes bitepDispatch exact-capacity recv_x / expert_x of the bench's own
// (sized by one untimed dispatch, whose pool blocks are then trimmed: bitepGroupTrimMemory), so group_bytes is the
// library's memory alone and caller_bytes the buffers' (the ranks' agreement on their capacities then adds a
// second, two-word exchange to every dispatch at W > 1).
// --expert-major-only times dispatches with args.expert_major_only = 1 (no rank-major rows; with --caller-buffers
// an expert_x alone); the first iteration checks them against a dispatch with both views, bit for bit, and their
// layout's placement with that dispatch's row headers.
// --rank-major-only times dispatches with args.rank_major_only = 1 (no expert-major rows; with --caller-buffers a
// recv_x alone): the first iteration checks their rank-major rows, positions and offsets against a dispatch with
// both views, bit for bit, and the combines take that dispatch's expert-major rows (copied into a buffer of the
// bench's, the identity experts' output) as y.
// Usage: mpirun -np <W> ep_bench [--quick] [--json PATH] [--iters N] [--warmup N] [--tokens a,b,..]
//                                [--routing uniform|skewed|both] [--no-baseline] [--caller-buffers]
//                                [--expert-major-only | --rank-major-only] [--self-test-checks] [--no-l2-flush]
//                                [--no-nccl]
// --no-nccl (implied by BITEP_CUDA_TRANSPORT=ipc, where ranks may share a GPU and NCCL would refuse them): no NCCL
// communicator of the bench's, so no (a), (b) or (c); bitep's calls are timed and checked as always.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "bench/baseline/baseline.h"
#include "bench/ep_bench.h"
#include "bench/ep_bench_report.h"
#include "bitep/bitep.h"
#include "bitep/bitep_mpi.h"

namespace {

int g_rank = 0;

[[noreturn]] void die(const char* what, const char* detail) {
  std::fprintf(stderr, "ep_bench rank %d: %s: %s\n", g_rank, what, detail);
  MPI_Abort(MPI_COMM_WORLD, 2);
  std::exit(2);
}
#define CK(x)                                               \
  do {                                                      \
    cudaError_t e_ = (x);                                   \
    if (e_ != cudaSuccess) die(#x, cudaGetErrorString(e_)); \
  } while (0)
#define NK(x)                                               \
  do {                                                      \
    ncclResult_t r_ = (x);                                  \
    if (r_ != ncclSuccess) die(#x, ncclGetErrorString(r_)); \
  } while (0)
#define BK(x)                                             \
  do {                                                    \
    bitepResult_t r_ = (x);                               \
    if (r_ != bitepSuccess) die(#x, bitepGetLastError()); \
  } while (0)

struct Options {
  bool quick = false, baseline = true, caller_buffers = false, expert_major_only = false, rank_major_only = false;
  bool self_test_checks = false, l2_flush = true, nccl = true;
  std::string json;
  int iters = 20, warmup = 5;
  std::vector<int64_t> tokens = {128, 512, 2048, 4096, 8192, 16384};
  std::vector<bool> skews = {false, true};
};

Options parse(int argc, char** argv) {
  Options o;
  bool tokens_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after", a.c_str());
      return argv[++i];
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-baseline") {
      o.baseline = false;
    } else if (a == "--no-nccl") {
      o.nccl = false;
    } else if (a == "--caller-buffers") {
      o.caller_buffers = true;
    } else if (a == "--expert-major-only") {
      o.expert_major_only = true;
    } else if (a == "--rank-major-only") {
      o.rank_major_only = true;
    } else if (a == "--self-test-checks") {
      o.self_test_checks = true;
    } else if (a == "--no-l2-flush") {
      o.l2_flush = false;
    } else if (a == "--json") {
      o.json = next();
    } else if (a == "--iters") {
      o.iters = std::max(1, std::atoi(next().c_str()));
    } else if (a == "--warmup") {
      o.warmup = std::max(0, std::atoi(next().c_str()));
    } else if (a == "--tokens") {
      o.tokens.clear();
      tokens_given = true;
      std::string s = next();
      for (size_t p = 0; p < s.size();) {
        const size_t q = s.find(',', p);
        o.tokens.push_back(std::atoll(s.substr(p, q - p).c_str()));
        p = q == std::string::npos ? s.size() : q + 1;
      }
    } else if (a == "--routing") {
      const std::string r = next();
      o.skews = r == "uniform"  ? std::vector<bool>{false}
                : r == "skewed" ? std::vector<bool>{true}
                                : std::vector<bool>{false, true};
    } else {
      die("unknown argument (see the usage in bench/ep_bench.cu)", a.c_str());
    }
  }
  if (o.quick) {
    if (!tokens_given) o.tokens = {128, 4096};
    o.skews = {false};
    o.iters = std::min(o.iters, 5);
    o.warmup = std::min(o.warmup, 2);
  }
  o.warmup = std::max(o.warmup, 1);  // the first iteration's checks (placement among them) run untimed
  if (o.expert_major_only && o.rank_major_only) die("--expert-major-only and --rank-major-only", "pick one view");
  const char* transport = std::getenv("BITEP_CUDA_TRANSPORT");
  if (transport != nullptr && std::strcmp(transport, "ipc") == 0) o.nccl = false;
  if (!o.nccl) o.baseline = false;  // the baseline pipeline runs over NCCL
  return o;
}

struct Events {
  cudaEvent_t e[4];
  Events() {
    for (cudaEvent_t& x : e) CK(cudaEventCreate(&x));
  }
  ~Events() {
    for (cudaEvent_t& x : e) cudaEventDestroy(x);
  }
  float us(int a, int b) const {
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e[a], e[b]));
    return ms * 1000.0f;
  }
};

double median(std::vector<float> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

template <class T>
T* dalloc(size_t n) {
  T* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return p;
}

// One grouped ncclSend/ncclRecv with the given per-peer bytes (self skipped).
void nccl_a2a(ncclComm_t comm,
              int W,
              int rank,
              const char* send,
              const std::vector<int64_t>& sb,
              char* recv,
              const std::vector<int64_t>& rb,
              cudaStream_t s) {
  int64_t so = 0, ro = 0;
  NK(ncclGroupStart());
  for (int p = 0; p < W; ++p) {
    if (p != rank && sb[p] > 0) NK(ncclSend(send + so, sb[p], ncclUint8, p, comm, s));
    if (p != rank && rb[p] > 0) NK(ncclRecv(recv + ro, rb[p], ncclUint8, p, comm, s));
    so += sb[p], ro += rb[p];
  }
  NK(ncclGroupEnd());
}

// GPU-to-GPU copy ceiling between ranks 1 -> 0 (GB/s, the same on every rank) and how it was measured.
double measure_p2p(ncclComm_t comm, int W, int rank, cudaStream_t s, std::string* method) {
  if (W < 2) {
    *method = "none (W = 1)";
    return 0;
  }
  const size_t bytes = size_t(256) << 20;
  double gbps = 0;
  int ipc_ok = 0;
  char* buf = dalloc<char>(bytes);
  Events ev;
  cudaIpcMemHandle_t handle{};
  if (rank == 0) CK(cudaIpcGetMemHandle(&handle, buf));
  MPI_Bcast(&handle, sizeof(handle), MPI_BYTE, 0, MPI_COMM_WORLD);
  void* peer = nullptr;
  if (rank == 1) {
    ipc_ok = cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess) == cudaSuccess;
    (void)cudaGetLastError();
    if (ipc_ok) {
      for (int i = 0; i < 2; ++i) CK(cudaMemcpyAsync(peer, buf, bytes, cudaMemcpyDeviceToDevice, s));
      CK(cudaEventRecord(ev.e[0], s));
      for (int i = 0; i < 10; ++i) CK(cudaMemcpyAsync(peer, buf, bytes, cudaMemcpyDeviceToDevice, s));
      CK(cudaEventRecord(ev.e[1], s));
      CK(cudaStreamSynchronize(s));
      gbps = 10.0 * bytes / (ev.us(0, 1) * 1e3);
      CK(cudaIpcCloseMemHandle(peer));
    }
  }
  MPI_Bcast(&ipc_ok, 1, MPI_INT, 1, MPI_COMM_WORLD);
  if (ipc_ok) {
    *method = "cudaMemcpyAsync into a cudaIpc-mapped buffer, rank 1 -> rank 0, 256 MiB";
  } else {
    *method = "ncclSend/ncclRecv pair, rank 0 -> rank 1, 256 MiB (cudaIpc unavailable)";
    for (int i = 0; i < 12; ++i) {
      if (i == 2) CK(cudaEventRecord(ev.e[0], s));
      NK(ncclGroupStart());
      if (rank == 0) NK(ncclSend(buf, bytes, ncclUint8, 1, comm, s));
      if (rank == 1) NK(ncclRecv(buf, bytes, ncclUint8, 0, comm, s));
      NK(ncclGroupEnd());
    }
    CK(cudaEventRecord(ev.e[1], s));
    CK(cudaStreamSynchronize(s));
    if (rank == 1) gbps = 10.0 * bytes / (ev.us(0, 1) * 1e3);
  }
  MPI_Bcast(&gbps, 1, MPI_DOUBLE, 1, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  CK(cudaFree(buf));
  return gbps;
}

// What this rank must receive: each source rank's routing regenerated here as the bench computes its own (ra, with
// that rank's logits in buffers of its own), T tokens on every rank.
epbench::ExpectedRows expected_rows(const bitepRouterConfig_t& rc,
                                    bitepRouterForwardArgs_t ra,
                                    int W,
                                    int rank,
                                    uint64_t seed,
                                    bool skewed,
                                    cudaStream_t s) {
  const int64_t T = ra.num_tokens;
  const int E = rc.num_experts, k = rc.topk, EB = (E + 7) / 8;
  float* logits = dalloc<float>(T * E);
  uint8_t* map = dalloc<uint8_t>(T * EB);
  float* w = dalloc<float>(T * k);
  int32_t* rank_counts = dalloc<int32_t>(W);
  ra.logits = logits, ra.routing_map = map, ra.topk_weights = w, ra.rank_counts = rank_counts;
  std::vector<uint8_t> hmap(T * EB);
  std::vector<float> hw(T * k);
  epbench::ExpectedRows e;
  for (int src = 0; src < W; ++src) {
    epbench::gen_logits(logits, T, E, src, seed, skewed, s);
    CK(cudaGetLastError());
    BK(bitepRouterForward(bitepBackendCuda, &rc, &ra, reinterpret_cast<bitepStream_t>(s)));
    CK(cudaMemcpyAsync(hmap.data(), map, hmap.size(), cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(hw.data(), w, 4 * hw.size(), cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    epbench::append_expected_rows(&e, hmap.data(), hw.data(), T, E, k, W, src, rank);
  }
  for (void* p :
       {static_cast<void*>(logits), static_cast<void*>(map), static_cast<void*>(w), static_cast<void*>(rank_counts)})
    CK(cudaFree(p));
  return e;
}

// lay's layout on the host, with the origin headers of the first 3 elements of header_rows rows of recv_x [., H]
// (lay's own, or with --expert-major-only those of a both-views dispatch: the same receive order).
epbench::Placement download_placement(
    const bitepDispatchLayout_t& lay, const void* recv_x, int64_t header_rows, int H, int alignment, cudaStream_t s) {
  epbench::Placement p;
  const int L = lay.num_local_experts, KL = lay.max_row_experts, MB = (L + 7) / 8;
  const int64_t R = lay.num_recv_rows;
  p.L = L, p.KL = KL, p.alignment = alignment, p.R = R, p.num_expert_rows = lay.num_expert_rows;
  p.headers.resize(3 * header_rows);
  p.map.resize(R * MB);
  p.rows.resize(R * KL);
  p.offsets.resize(L + 1);
  p.counts.resize(L);
  if (lay.recv_weights != nullptr) p.weights.resize(R * KL);
  if (header_rows > 0)
    CK(cudaMemcpy2DAsync(p.headers.data(), 6, recv_x, size_t(H) * 2, 6, header_rows, cudaMemcpyDeviceToHost, s));
  if (R > 0) {
    CK(cudaMemcpyAsync(p.map.data(), lay.recv_map, p.map.size(), cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(p.rows.data(), lay.recv_expert_rows, 4 * p.rows.size(), cudaMemcpyDeviceToHost, s));
    if (lay.recv_weights != nullptr)
      CK(cudaMemcpyAsync(p.weights.data(), lay.recv_weights, 4 * p.weights.size(), cudaMemcpyDeviceToHost, s));
  }
  CK(cudaMemcpyAsync(p.offsets.data(), lay.expert_offsets, 4 * (L + 1), cudaMemcpyDeviceToHost, s));
  CK(cudaMemcpyAsync(p.counts.data(), lay.expert_counts, 4 * L, cudaMemcpyDeviceToHost, s));
  CK(cudaStreamSynchronize(s));
  return p;
}

// --self-test-checks: each corruption of a copy of p must raise the placement check's count above p's own (clean).
// One line per corruption; returns the number missed.
int self_test_placement(const epbench::ExpectedRows& e, const epbench::Placement& p, int64_t clean, const char* where) {
  if (p.R == 0) {
    std::printf("# %s: self-test of the placement check skipped: no received rows\n", where);
    return 0;
  }
  int missed = 0;
  for (const epbench::Corruption& c : epbench::corrupt_placement(e, p)) {
    if (!c.applied) {
      std::printf("# %s: self-test: %s: skipped (this layout cannot hold it)\n", where, c.what);
    } else if (c.wrong > clean) {
      std::printf("# %s: self-test: %s: caught (%lld wrong)\n", where, c.what, static_cast<long long>(c.wrong));
    } else {
      std::fprintf(stderr, "# %s: self-test: %s: NOT caught by the placement check\n", where, c.what);
      ++missed;
    }
  }
  return missed;
}

struct Shape {
  int H, E, k;
};

// Rows with T up to this also time bitepDispatchLowLatency and its combine (the decode sizes).
constexpr int kLowLatencyTokens = 512;

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int W = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &W);
  const int rank = g_rank;
  const Options opt = parse(argc, argv);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int local = 0, ndev = 0;
  MPI_Comm_rank(node, &local);
  CK(cudaGetDeviceCount(&ndev));
  const int device = local % ndev;
  CK(cudaSetDevice(device));
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  bitepStream_t bstream = reinterpret_cast<bitepStream_t>(stream);

  // The bench's own communicator: (a) and the baseline.
  ncclComm_t comm = nullptr;
  if (opt.nccl) {
    ncclUniqueId id;
    if (rank == 0) NK(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    NK(ncclCommInitRank(&comm, W, id, rank));
  }

  Report report(W, rank);
  if (comm != nullptr)
    report.p2p_gbps = measure_p2p(comm, W, rank, stream, &report.p2p_method);
  else
    report.p2p_method = "not measured: --no-nccl, no NCCL all-to-all or baseline either (their columns are 0)";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, device));
  report.card = prop.name;
  // The L2 flush before each timed call that starts from the inputs: twice the L2 written, its byte alternating so
  // that no write is skipped as a repeat. Waited for before the ranks' barrier, so that the timed call still starts
  // on an idle stream, its launch not hidden behind the flush.
  const size_t l2_bytes = opt.l2_flush ? 2 * static_cast<size_t>(prop.l2CacheSize) : 0;
  char* l2_buf = l2_bytes > 0 ? dalloc<char>(l2_bytes) : nullptr;
  int l2_byte = 0;
  auto flush_l2 = [&] {
    if (l2_buf == nullptr) return;
    l2_byte ^= 1;
    CK(cudaMemsetAsync(l2_buf, l2_byte, l2_bytes, stream));
    CK(cudaStreamSynchronize(stream));
  };
  report.l2_flush = l2_buf != nullptr;

  const std::vector<Shape> shapes = opt.quick ? std::vector<Shape>{{7168, 256, 8}, {2048, 128, 8}}
                                              : std::vector<Shape>{{7168, 256, 8}, {4096, 64, 6}, {2048, 128, 8}};
  Events ev;
  for (const Shape& sh : shapes) {
    if (sh.E % W != 0) {
      if (rank == 0) std::printf("# skipped H=%d E=%d k=%d: E %% W != 0 (W = %d)\n", sh.H, sh.E, sh.k, W);
      continue;
    }
    const int L = sh.E / W, KL = std::min(sh.k, L), MB = (L + 7) / 8;
    const int64_t row_total = int64_t(sh.H) * 2 + MB + 4 * KL;  // bytes of one dispatched row
    bitepGroupConfig_t gc = BITEP_GROUP_CONFIG_INIT;
    gc.num_experts = sh.E;
    gc.topk = sh.k;
    gc.hidden = sh.H;
    gc.dtype = bitepBfloat16;
    gc.expert_alignment = 16;
    gc.timeout_s = 120;
    gc.device = device;
    gc.low_latency_max_tokens = kLowLatencyTokens;
    bitepGroup_t group;
    BK(bitepGroupCreateMpi(MPI_COMM_WORLD, &gc, &group));
    bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
    rc.num_experts = sh.E;
    rc.topk = sh.k;
    rc.score_function = bitepScoreSoftmax;
    std::unique_ptr<baseline::Pipeline> base;
    if (opt.baseline) base = std::make_unique<baseline::Pipeline>(comm, W, rank, sh.E, sh.k, sh.H, stream);
    report.table_header(sh.H, sh.E, sh.k);

    for (bool skewed : opt.skews)
      for (int64_t T : opt.tokens) {
        Record rec;
        rec.T = T, rec.H = sh.H, rec.E = sh.E, rec.k = sh.k, rec.routing = skewed ? "skewed" : "uniform";
        float* logits = dalloc<float>(T * sh.E);
        uint8_t* map = dalloc<uint8_t>(T * (sh.E / 8 + 1));
        float* w = dalloc<float>(T * sh.k);
        float* w_idx = dalloc<float>(T * sh.k);
        int32_t* idx = dalloc<int32_t>(T * sh.k);
        int32_t* rank_counts = dalloc<int32_t>(W);
        __nv_bfloat16* x = dalloc<__nv_bfloat16>(T * sh.H);
        __nv_bfloat16* out = dalloc<__nv_bfloat16>(T * sh.H);
        // One counter per check, so that a failure says which one.
        enum {
          kRecvRows,
          kExpertMajor,
          kPadRows,
          kCombine,
          kBaseRows,
          kBaseCombine,
          kLowLatencyRows,
          kLowLatencyCombine,
          kLowLatencyGraph,
          kLowLatencyGraphStep,
          kEndToEnd,
          kBaseEndToEnd,
          kPlacement,
          kSelfTest,
          kChecks
        };
        static const char* const kCheckNames[kChecks] = {"recv rows",
                                                         "expert-major",
                                                         "pad rows",
                                                         "combine",
                                                         "baseline rows",
                                                         "baseline combine",
                                                         "low-latency expert-major (vs bitepDispatch's)",
                                                         "low-latency combine",
                                                         "low-latency in CUDA graphs (combine of the first and last "
                                                         "launch)",
                                                         "decode step in one CUDA graph (router + low-latency "
                                                         "dispatch + combine; first and last launch)",
                                                         "end to end (router + dispatch + combine; first and last "
                                                         "iteration)",
                                                         "baseline end to end (router + pipeline; first and last "
                                                         "iteration)",
                                                         "placement (host: receive order, map, weights, positions, "
                                                         "counts, offsets)",
                                                         "self-test: corruptions the placement check missed"};
        int* wrong = dalloc<int>(kChecks);
        int64_t host_checks[kChecks] = {};  // the checks that run on the host (placement, self-test)
        int64_t* src_off = dalloc<int64_t>(W + 1);
        CK(cudaMemsetAsync(wrong, 0, sizeof(int) * kChecks, stream));
        const uint64_t seed = 1234 + (skewed ? 1 : 0);
        epbench::gen_logits(logits, T, sh.E, rank, seed, skewed, stream);
        epbench::gen_x(x, T, sh.H, rank, stream);
        CK(cudaGetLastError());

        bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;  // bitmap + compact weights (+ rank counts)
        ra.num_tokens = T;
        ra.logits = logits;
        ra.routing_map = map;
        ra.map_format = bitepMapBitmapU8;
        ra.topk_weights = w;
        ra.num_ranks = W;
        ra.rank_counts = rank_counts;
        bitepRouterForwardArgs_t ri = BITEP_ROUTER_FWD_ARGS_INIT;  // baseline: indices + weights, no map
        ri.num_tokens = T;
        ri.logits = logits;
        ri.topk_weights = w_idx;
        ri.topk_indices = idx;
        BK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bstream));
        BK(bitepRouterForward(bitepBackendCuda, &rc, &ri, bstream));
        // The router's outputs as these first calls wrote them (the router is bit-reproducible): the end-to-end loops'
        // routers must write the same bits, checked after their poisoned iterations.
        const size_t map_bytes = T * ((sh.E + 7) / 8), w_bytes = sizeof(float) * T * sh.k;
        uint8_t* map_ref = dalloc<uint8_t>(map_bytes);
        float* w_ref = dalloc<float>(T * sh.k);
        float* w_idx_ref = dalloc<float>(T * sh.k);
        CK(cudaMemcpyAsync(map_ref, map, map_bytes, cudaMemcpyDeviceToDevice, stream));
        CK(cudaMemcpyAsync(w_ref, w, w_bytes, cudaMemcpyDeviceToDevice, stream));
        CK(cudaMemcpyAsync(w_idx_ref, w_idx, w_bytes, cudaMemcpyDeviceToDevice, stream));
        // What each rank must receive from each source, from the router's own epilogue.
        std::vector<int32_t> to_rank(W), expect(W);
        CK(cudaMemcpyAsync(to_rank.data(), rank_counts, 4 * W, cudaMemcpyDeviceToHost, stream));
        CK(cudaStreamSynchronize(stream));
        MPI_Alltoall(to_rank.data(), 1, MPI_INT, expect.data(), 1, MPI_INT, MPI_COMM_WORLD);
        int64_t host_wrong = 0;

        bitepDispatchArgs_t da = BITEP_DISPATCH_ARGS_INIT;
        da.num_tokens = T;
        da.x = x;
        da.routing_map = map;
        da.map_format = bitepMapBitmapU8;
        da.topk_weights = w;
        const bitepDispatchArgs_t dll = da;    // the low-latency dispatch: its rows live in the handle
        const bitepDispatchArgs_t dboth = da;  // both views: the reference of --expert-major-only
        da.expert_major_only = opt.expert_major_only ? 1 : 0;
        da.rank_major_only = opt.rank_major_only ? 1 : 0;
        rec.expert_major_only = opt.expert_major_only;
        rec.rank_major_only = opt.rank_major_only;
        void* caller_recv = nullptr;
        void* caller_expert = nullptr;
        void* y_rows = nullptr;  // --rank-major-only: the combines' expert-major y
        int64_t caller_bytes = 0, traffic_bytes = 0;
        if (opt.caller_buffers) {
          // Exact capacities from one untimed dispatch from the pool (the routing is the same every iteration);
          // its blocks are trimmed so that group_bytes counts the library's memory alone.
          bitepHandle_t h0;
          BK(bitepDispatch(group, &da, bstream, &h0));
          bitepDispatchLayout_t l0;
          BK(bitepHandleGetLayout(h0, &l0));
          const int64_t R = l0.num_recv_rows, N = l0.num_expert_rows, row = int64_t(sh.H) * 2;
          BK(bitepHandleDestroy(h0));
          CK(cudaStreamSynchronize(stream));
          BK(bitepGroupTrimMemory(group, nullptr));
          if (R > 0 && !opt.expert_major_only)
            caller_recv = dalloc<char>(R * row), da.recv_x = caller_recv, da.recv_x_capacity = R;
          if (N > 0 && !opt.rank_major_only)
            caller_expert = dalloc<char>(N * row), da.expert_x = caller_expert, da.expert_x_capacity = N;
          caller_bytes = ((opt.expert_major_only ? 0 : R) + (opt.rank_major_only ? 0 : N)) * row;
        }
        bitepCombineArgs_t ca = BITEP_COMBINE_ARGS_INIT;
        ca.layout = bitepLayoutExpertMajor;
        ca.weighted = 1;
        ca.out = out;
        // Each checked iteration's out poisoned first (0xff: NaN), before its events: its check reads that
        // combine's rows, not an earlier one's.
        auto poison_out = [&] { CK(cudaMemsetAsync(out, 0xff, sizeof(__nv_bfloat16) * T * sh.H, stream)); };
        // The end-to-end loops': out, and the router's map (all ones) and weights (NaN).
        auto poison_router_outputs = [&] {
          poison_out();
          CK(cudaMemsetAsync(map, 0xff, map_bytes, stream));
          CK(cudaMemsetAsync(w, 0xff, w_bytes, stream));
        };
        // bytes of a against ref, as 16-bit words (check_equal's; the bench's shapes give map rows of even bytes).
        auto check_bytes = [&](const void* a, const void* ref, size_t bytes, int which) {
          epbench::check_equal(static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(ref),
                               static_cast<int64_t>(bytes / 2), wrong + which, stream);
        };
        // After a poisoned end-to-end iteration: its combine through identity experts, and the router's map and
        // weights against its first call's bits.
        auto check_router_step = [&](int which) {
          epbench::check_combine(out, x, map, w, T, sh.H, sh.E, sh.k, W, wrong + which, stream);
          check_bytes(map, map_ref, map_bytes, which);
          check_bytes(w, w_ref, w_bytes, which);
          CK(cudaGetLastError());
          CK(cudaStreamSynchronize(stream));
        };
        // A one-view dispatch's positions and expert offsets against a both-views dispatch's (ref), on the device: the
        // int32 words compared as pairs of 16-bit words.
        auto check_numbering = [&](const bitepDispatchLayout_t& lay, const bitepDispatchLayout_t& ref) {
          epbench::check_equal(reinterpret_cast<const __nv_bfloat16*>(lay.recv_expert_rows),
                               reinterpret_cast<const __nv_bfloat16*>(ref.recv_expert_rows),
                               2 * std::min(ref.num_recv_rows, lay.num_recv_rows) * ref.max_row_experts,
                               wrong + kExpertMajor, stream);
          epbench::check_equal(reinterpret_cast<const __nv_bfloat16*>(lay.expert_offsets),
                               reinterpret_cast<const __nv_bfloat16*>(ref.expert_offsets), 2 * (L + 1),
                               wrong + kExpertMajor, stream);
        };
        // The last timed iteration's dispatch, after its combine (which leaves the handle's rows as they are): its
        // counts against the router's, and the views it has checked as iteration 0's both-views reference was (the
        // expert-major rows against the rank-major ones where it has both; its combine checks them otherwise).
        auto check_last_rows = [&](const bitepDispatchLayout_t& lay) {
          for (int p = 0; p < W; ++p)
            if (lay.recv_counts_host[p] != expect[p]) ++host_wrong;
          const auto* rx = static_cast<const __nv_bfloat16*>(lay.recv_x);
          const auto* exx = static_cast<const __nv_bfloat16*>(lay.expert_x);
          if (rx != nullptr)
            epbench::check_recv_rows(rx, lay.num_recv_rows, sh.H, src_off, W, wrong + kRecvRows, stream);
          if (rx != nullptr && exx != nullptr)
            epbench::check_expert_major(rx, exx, lay.recv_expert_rows, lay.recv_map, lay.recv_weights,
                                        lay.num_recv_rows, lay.max_row_experts, MB, sh.H, wrong + kExpertMajor, stream);
          if (exx != nullptr)
            epbench::check_pad_rows(exx, lay.expert_offsets, lay.expert_counts, L, sh.H, wrong + kPadRows, stream);
        };
        std::vector<int64_t> send_b(W), recv_b(W), send_c(W), recv_c(W);  // a2a bytes: dispatch, combine
        std::vector<float> t_disp, t_comb, t_e2e, t_a2a, t_a2a_c, t_bd, t_bc, t_be2e;
        const int last_it = opt.warmup + opt.iters - 1;  // each timed loop's last iteration is checked too
        for (int it = 0; it < opt.warmup + opt.iters; ++it) {
          const bool timed = it >= opt.warmup;
          const bool check = it == 0 || it == last_it;
          if (check) poison_out();  // before the flush: the poison leaves nothing in L2
          flush_l2();
          MPI_Barrier(MPI_COMM_WORLD);
          bitepHandle_t h;
          CK(cudaEventRecord(ev.e[0], stream));
          BK(bitepDispatch(group, &da, bstream, &h));
          CK(cudaEventRecord(ev.e[1], stream));
          bitepDispatchLayout_t lay;
          BK(bitepHandleGetLayout(h, &lay));
          if (it == 0) {  // correctness of the dispatch (untimed: warm-up), and the byte counts of this routing
            std::vector<int64_t> off(W + 1, 0);
            rec.cross_bytes = rec.size_bytes = rec.rows = rec.combine_bytes = 0;
            for (int p = 0; p < W; ++p) {
              off[p + 1] = off[p] + lay.recv_counts_host[p];
              if (lay.recv_counts_host[p] != expect[p]) ++host_wrong;
              send_b[p] = p == rank ? 0 : lay.send_counts_host[p] * row_total;
              recv_b[p] = p == rank ? 0 : lay.recv_counts_host[p] * row_total;
              send_c[p] = p == rank ? 0 : lay.recv_counts_host[p] * int64_t(sh.H) * 2;
              recv_c[p] = p == rank ? 0 : lay.send_counts_host[p] * int64_t(sh.H) * 2;
              rec.cross_bytes += send_b[p];
              rec.combine_bytes += send_c[p];
              rec.size_bytes += lay.send_counts_host[p] * row_total;
              rec.rows += lay.send_counts_host[p];
              traffic_bytes += (lay.send_counts_host[p] + lay.recv_counts_host[p]) * int64_t(sh.H) * 2;
            }
            CK(cudaMemcpyAsync(src_off, off.data(), 8 * (W + 1), cudaMemcpyHostToDevice, stream));
            // One view only: the checks run on a dispatch with both views, and this one's rows, positions and
            // counts must equal it bit for bit.
            bitepHandle_t href = nullptr;
            bitepDispatchLayout_t ref = lay;
            if (opt.expert_major_only || opt.rank_major_only) {
              if (opt.expert_major_only && lay.recv_x != nullptr) ++host_wrong;
              if (opt.rank_major_only && lay.expert_x != nullptr) ++host_wrong;
              BK(bitepDispatch(group, &dboth, bstream, &href));
              BK(bitepHandleGetLayout(href, &ref));
              if (ref.num_recv_rows != lay.num_recv_rows || ref.num_expert_rows != lay.num_expert_rows) ++host_wrong;
              if (opt.expert_major_only) {
                const int64_t n = std::min(ref.num_expert_rows, lay.num_expert_rows);
                epbench::check_equal(static_cast<const __nv_bfloat16*>(lay.expert_x),
                                     static_cast<const __nv_bfloat16*>(ref.expert_x), n * sh.H, wrong + kExpertMajor,
                                     stream);
              } else {
                const int64_t n = std::min(ref.num_recv_rows, lay.num_recv_rows);
                epbench::check_equal(static_cast<const __nv_bfloat16*>(lay.recv_x),
                                     static_cast<const __nv_bfloat16*>(ref.recv_x), n * sh.H, wrong + kRecvRows,
                                     stream);
                const int64_t y_bytes = ref.num_expert_rows * int64_t(sh.H) * 2;
                if (y_rows == nullptr) y_rows = dalloc<char>(y_bytes);
                CK(cudaMemcpyAsync(y_rows, ref.expert_x, y_bytes, cudaMemcpyDeviceToDevice, stream));
              }
              check_numbering(lay, ref);
            }
            const __nv_bfloat16* rx = static_cast<const __nv_bfloat16*>(ref.recv_x);
            const __nv_bfloat16* exx = static_cast<const __nv_bfloat16*>(ref.expert_x);
            epbench::check_recv_rows(rx, ref.num_recv_rows, sh.H, src_off, W, wrong + kRecvRows, stream);
            epbench::check_expert_major(rx, exx, ref.recv_expert_rows, ref.recv_map, ref.recv_weights,
                                        ref.num_recv_rows, ref.max_row_experts, MB, sh.H, wrong + kExpertMajor, stream);
            epbench::check_pad_rows(exx, ref.expert_offsets, ref.expert_counts, L, sh.H, wrong + kPadRows, stream);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
            // Placement, on the host: this dispatch's layout (with ref's row headers) against the rows every source's
            // routing, regenerated here, sends this rank.
            const epbench::ExpectedRows expected = expected_rows(rc, ra, W, rank, seed, skewed, stream);
            const epbench::Placement got =
                download_placement(lay, ref.recv_x, ref.num_recv_rows, sh.H, gc.expert_alignment, stream);
            const int64_t placement_wrong = epbench::check_placement(expected, got);
            host_checks[kPlacement] += placement_wrong;
            if (opt.self_test_checks) {
              char where[128];
              std::snprintf(where, sizeof(where), "rank %d T=%lld H=%d E=%d k=%d %s", rank, static_cast<long long>(T),
                            sh.H, sh.E, sh.k, rec.routing.c_str());
              host_checks[kSelfTest] += self_test_placement(expected, got, placement_wrong, where);
            }
            if (href != nullptr) {
              // The reference's blocks (its recv_x among them) leave the pool, so that group_bytes counts what the
              // expert-major-only dispatches hold (the warm-up iterations re-fill the pool before the timed ones).
              BK(bitepHandleDestroy(href));
              CK(cudaStreamSynchronize(stream));
              BK(bitepGroupTrimMemory(group, nullptr));
            }
            CK(cudaEventRecord(ev.e[1], stream));
          }
          ca.y = opt.rank_major_only ? y_rows : lay.expert_x;  // identity experts
          BK(bitepCombine(group, h, &ca, bstream));
          CK(cudaEventRecord(ev.e[2], stream));
          CK(cudaStreamSynchronize(stream));
          if (timed) t_disp.push_back(ev.us(0, 1)), t_comb.push_back(ev.us(1, 2));
          if (check) {  // combine through identity experts: x up to the bf16 partials' rounding, bit for bit
            epbench::check_combine(out, x, map, w, T, sh.H, sh.E, sh.k, W, wrong + kCombine, stream);
            if (it != 0) check_last_rows(lay);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
          }
          BK(bitepHandleDestroy(h));
        }
        // The same dispatch with args.rank_major_only (what an all-to-all moves: no expert-major rows), timed the same
        // way beside the both-views one, so that its ratio to the NCCL all-to-all of the same bytes comes from one run;
        // its first iteration's rows, positions and offsets checked against a both-views dispatch, bit for bit. Not in
        // --expert-major-only / --rank-major-only runs, whose timed dispatches are one view already.
        std::vector<float> t_rmo;
        rec.rank_major = !opt.expert_major_only && !opt.rank_major_only;
        bitepDispatchArgs_t drm = dboth;
        drm.rank_major_only = 1;
        for (int it = 0; rec.rank_major && it < opt.warmup + opt.iters; ++it) {
          flush_l2();
          MPI_Barrier(MPI_COMM_WORLD);
          bitepHandle_t h;
          CK(cudaEventRecord(ev.e[0], stream));
          BK(bitepDispatch(group, &drm, bstream, &h));
          CK(cudaEventRecord(ev.e[1], stream));
          CK(cudaStreamSynchronize(stream));
          if (it >= opt.warmup) t_rmo.push_back(ev.us(0, 1));
          if (it != 0 && it == last_it) {
            bitepDispatchLayout_t lay;
            BK(bitepHandleGetLayout(h, &lay));
            check_last_rows(lay);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
          }
          if (it == 0) {
            bitepDispatchLayout_t lay, ref;
            BK(bitepHandleGetLayout(h, &lay));
            bitepHandle_t href;
            BK(bitepDispatch(group, &dboth, bstream, &href));
            BK(bitepHandleGetLayout(href, &ref));
            if (lay.expert_x != nullptr || lay.num_recv_rows != ref.num_recv_rows ||
                lay.num_expert_rows != ref.num_expert_rows)
              ++host_wrong;
            const int64_t n = std::min(lay.num_recv_rows, ref.num_recv_rows);
            epbench::check_equal(static_cast<const __nv_bfloat16*>(lay.recv_x),
                                 static_cast<const __nv_bfloat16*>(ref.recv_x), n * sh.H, wrong + kRecvRows, stream);
            check_numbering(lay, ref);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
            BK(bitepHandleDestroy(href));
          }
          BK(bitepHandleDestroy(h));
        }
        // Low latency: bitepDispatchLowLatency and its combine; its rows checked against bitepDispatch's (counts,
        // offsets and the expert-major rows, bit for bit) and its combine as the regular one's.
        std::vector<float> t_lld, t_llc;
        rec.ll = T <= kLowLatencyTokens;
        for (int it = 0; rec.ll && it < opt.warmup + opt.iters; ++it) {
          if (it == 0 || it == last_it) poison_out();
          flush_l2();
          MPI_Barrier(MPI_COMM_WORLD);
          bitepHandle_t h;
          CK(cudaEventRecord(ev.e[0], stream));
          BK(bitepDispatchLowLatency(group, &dll, bstream, &h));
          CK(cudaEventRecord(ev.e[1], stream));
          bitepDispatchLayout_t lay;
          BK(bitepHandleGetLayout(h, &lay));
          ca.y = lay.expert_x;  // identity experts (a low-latency handle: its own rows)
          BK(bitepCombine(group, h, &ca, bstream));
          CK(cudaEventRecord(ev.e[2], stream));
          CK(cudaStreamSynchronize(stream));
          if (it >= opt.warmup) t_lld.push_back(ev.us(0, 1)), t_llc.push_back(ev.us(1, 2));
          if (it != 0 && it == last_it) {
            epbench::check_combine(out, x, map, w, T, sh.H, sh.E, sh.k, W, wrong + kLowLatencyCombine, stream);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
          }
          if (it == 0) {
            epbench::check_combine(out, x, map, w, T, sh.H, sh.E, sh.k, W, wrong + kLowLatencyCombine, stream);
            bitepHandle_t h0;
            BK(bitepDispatch(group, opt.rank_major_only ? &dboth : &da, bstream, &h0));  // its expert rows compared
            bitepDispatchLayout_t l0;
            BK(bitepHandleGetLayout(h0, &l0));
            std::vector<int32_t> c0(2 * L + 1), c1(2 * L + 1);
            CK(cudaMemcpyAsync(c0.data(), l0.expert_counts, 4 * L, cudaMemcpyDeviceToHost, stream));
            CK(cudaMemcpyAsync(c0.data() + L, l0.expert_offsets, 4 * (L + 1), cudaMemcpyDeviceToHost, stream));
            CK(cudaMemcpyAsync(c1.data(), lay.expert_counts, 4 * L, cudaMemcpyDeviceToHost, stream));
            CK(cudaMemcpyAsync(c1.data() + L, lay.expert_offsets, 4 * (L + 1), cudaMemcpyDeviceToHost, stream));
            epbench::check_equal(static_cast<const __nv_bfloat16*>(lay.expert_x),
                                 static_cast<const __nv_bfloat16*>(l0.expert_x), l0.num_expert_rows * sh.H,
                                 wrong + kLowLatencyRows, stream);
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(stream));
            if (c0 != c1 || lay.num_expert_rows < l0.num_expert_rows) ++host_wrong;
            BK(bitepHandleDestroy(h0));
          }
          BK(bitepHandleDestroy(h));
        }
        // The same calls captured into two CUDA graphs (the dispatch; its combine) and launched, where the group
        // says they can be: no host work per call. The combine of the first and the last launch checked as above.
        std::vector<float> t_lgd, t_lgc;
        int capturable = 0;
        BK(bitepGroupLowLatencyCapturable(group, &capturable));
        rec.ll_graph = rec.ll && capturable == 1;
        cudaGraph_t gd = nullptr, gc2 = nullptr;
        cudaGraphExec_t xd = nullptr, xc = nullptr;
        bitepHandle_t h = nullptr;
        if (rec.ll_graph) {
          // A capture that fails counts as wrong on this rank, and no rank launches (a launch's barrier would wait
          // for the ranks without a graph); the other rows go on.
          bool ok = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
          const bitepResult_t rd = ok ? bitepDispatchLowLatency(group, &dll, bstream, &h) : bitepSuccess;
          const std::string why_d = rd != bitepSuccess ? bitepGetLastError() : "";
          ok = cudaStreamEndCapture(stream, &gd) == cudaSuccess && ok && rd == bitepSuccess;
          bitepDispatchLayout_t lay{};
          if (ok) ok = bitepHandleGetLayout(h, &lay) == bitepSuccess;
          ca.y = lay.expert_x;  // identity experts (a low-latency handle: its own rows)
          bitepResult_t rc2 = bitepSuccess;
          if (ok) {
            ok = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
            rc2 = ok ? bitepCombine(group, h, &ca, bstream) : bitepSuccess;
            ok = cudaStreamEndCapture(stream, &gc2) == cudaSuccess && ok && rc2 == bitepSuccess;
          }
          const std::string why_c = rc2 != bitepSuccess ? bitepGetLastError() : "";
          ok =
              ok && cudaGraphInstantiate(&xd, gd, 0) == cudaSuccess && cudaGraphInstantiate(&xc, gc2, 0) == cudaSuccess;
          if (!ok) {
            (void)cudaGetLastError();
            std::fprintf(stderr,
                         "ep_bench rank %d T=%lld: the low-latency calls did not capture into CUDA graphs%s%s%s%s\n",
                         rank, static_cast<long long>(T), why_d.empty() ? "" : ": ", why_d.c_str(),
                         why_c.empty() ? "" : ": ", why_c.c_str());
            ++host_checks[kLowLatencyGraph];
          }
          int all_ok = ok ? 1 : 0;
          MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
          rec.ll_graph = all_ok == 1;
        }
        // A decode step in one graph: the router (map and weights from the logits), the low-latency dispatch and its
        // combine. The map and weights are poisoned with the output before each checked launch, so the check fails
        // unless the graph's router wrote them.
        cudaGraph_t ge = nullptr;
        cudaGraphExec_t xe = nullptr;
        bitepHandle_t he = nullptr;
        rec.ll_graph_step = rec.ll_graph;
        if (rec.ll_graph_step) {
          bool ok = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
          bitepResult_t r = bitepSuccess;
          if (ok) {
            r = bitepRouterForward(bitepBackendCuda, &rc, &ra, bstream);
            if (r == bitepSuccess) r = bitepDispatchLowLatency(group, &dll, bstream, &he);
            bitepDispatchLayout_t le{};
            if (r == bitepSuccess) r = bitepHandleGetLayout(he, &le);
            bitepCombineArgs_t ce = ca;
            ce.y = le.expert_x;  // identity experts
            if (r == bitepSuccess) r = bitepCombine(group, he, &ce, bstream);
          }
          const std::string why = r != bitepSuccess ? bitepGetLastError() : "";
          ok = cudaStreamEndCapture(stream, &ge) == cudaSuccess && ok && r == bitepSuccess &&
               cudaGraphInstantiate(&xe, ge, 0) == cudaSuccess;
          if (!ok) {
            (void)cudaGetLastError();
            std::fprintf(stderr, "ep_bench rank %d T=%lld: the decode step did not capture into a CUDA graph%s%s\n",
                         rank, static_cast<long long>(T), why.empty() ? "" : ": ", why.c_str());
            ++host_checks[kLowLatencyGraphStep];
          }
          int all_ok = ok ? 1 : 0;
          MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
          rec.ll_graph_step = all_ok == 1;
        }
        if (rec.ll_graph) {
          for (int it = 0; it < opt.warmup + opt.iters; ++it) {
            const bool check = it == 0 || it == opt.warmup + opt.iters - 1;
            if (check) poison_out();
            flush_l2();
            MPI_Barrier(MPI_COMM_WORLD);
            CK(cudaEventRecord(ev.e[0], stream));
            CK(cudaGraphLaunch(xd, stream));
            CK(cudaEventRecord(ev.e[1], stream));
            CK(cudaGraphLaunch(xc, stream));
            CK(cudaEventRecord(ev.e[2], stream));
            CK(cudaStreamSynchronize(stream));
            if (it >= opt.warmup) t_lgd.push_back(ev.us(0, 1)), t_lgc.push_back(ev.us(1, 2));
            if (check) {
              epbench::check_combine(out, x, map, w, T, sh.H, sh.E, sh.k, W, wrong + kLowLatencyGraph, stream);
              CK(cudaGetLastError());
              CK(cudaStreamSynchronize(stream));
            }
          }
        }
        std::vector<float> t_lge;
        for (int it = 0; rec.ll_graph_step && it < opt.warmup + opt.iters; ++it) {
          const bool check = it == 0 || it == opt.warmup + opt.iters - 1;
          if (check) poison_router_outputs();
          flush_l2();
          MPI_Barrier(MPI_COMM_WORLD);
          CK(cudaEventRecord(ev.e[0], stream));
          CK(cudaGraphLaunch(xe, stream));
          CK(cudaEventRecord(ev.e[1], stream));
          CK(cudaStreamSynchronize(stream));
          if (it >= opt.warmup) t_lge.push_back(ev.us(0, 1));
          if (check) check_router_step(kLowLatencyGraphStep);
        }
        if (xe != nullptr) CK(cudaGraphExecDestroy(xe));
        if (ge != nullptr) CK(cudaGraphDestroy(ge));
        if (he != nullptr) BK(bitepHandleDestroy(he));
        if (xd != nullptr) CK(cudaGraphExecDestroy(xd));
        if (xc != nullptr) CK(cudaGraphExecDestroy(xc));
        if (gd != nullptr) CK(cudaGraphDestroy(gd));
        if (gc2 != nullptr) CK(cudaGraphDestroy(gc2));
        if (h != nullptr) BK(bitepHandleDestroy(h));  // waits for the device: the graphs' launches are not tracked
        // End to end: router + dispatch + combine. Before a checked iteration the router's outputs and out are
        // poisoned (a map row of all ones, NaN weights and rows); after it, the map and weights must be the router's
        // first call's bits, and the combine's output what they give.
        for (int it = 0; it < opt.warmup + opt.iters; ++it) {
          const bool check = it == 0 || it == last_it;
          if (check) poison_router_outputs();
          flush_l2();
          MPI_Barrier(MPI_COMM_WORLD);
          bitepHandle_t h;
          CK(cudaEventRecord(ev.e[0], stream));
          BK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bstream));
          BK(bitepDispatch(group, &da, bstream, &h));
          bitepDispatchLayout_t lay;
          BK(bitepHandleGetLayout(h, &lay));
          ca.y = opt.rank_major_only ? y_rows : lay.expert_x;  // the same routing every iteration
          BK(bitepCombine(group, h, &ca, bstream));
          CK(cudaEventRecord(ev.e[1], stream));
          CK(cudaStreamSynchronize(stream));
          if (it >= opt.warmup) t_e2e.push_back(ev.us(0, 1));
          if (check) check_router_step(kEndToEnd);
          BK(bitepHandleDestroy(h));
        }
        // (a) NCCL all-to-all of the same per-peer bytes, both directions.
        if (comm != nullptr) {
          int64_t sb = 0, rb = 0;
          for (int p = 0; p < W; ++p) sb += std::max(send_b[p], send_c[p]), rb += std::max(recv_b[p], recv_c[p]);
          char* sbuf = dalloc<char>(sb);
          char* rbuf = dalloc<char>(rb);
          for (int it = 0; it < opt.warmup + opt.iters; ++it) {
            flush_l2();
            MPI_Barrier(MPI_COMM_WORLD);
            CK(cudaEventRecord(ev.e[0], stream));
            nccl_a2a(comm, W, rank, sbuf, send_b, rbuf, recv_b, stream);
            CK(cudaEventRecord(ev.e[1], stream));
            CK(cudaStreamSynchronize(stream));
            flush_l2();
            MPI_Barrier(MPI_COMM_WORLD);
            CK(cudaEventRecord(ev.e[2], stream));
            nccl_a2a(comm, W, rank, sbuf, send_c, rbuf, recv_c, stream);
            CK(cudaEventRecord(ev.e[3], stream));
            CK(cudaStreamSynchronize(stream));
            if (it >= opt.warmup) t_a2a.push_back(ev.us(0, 1)), t_a2a_c.push_back(ev.us(2, 3));
          }
          CK(cudaFree(sbuf));
          CK(cudaFree(rbuf));
        }
        // (c) the baseline pipeline, alone and end to end, each checked in its first and last iteration; end to end,
        // its router's weights are poisoned (NaN) first and must be the first call's bits after.
        if (opt.baseline) {
          for (int it = 0; it < 2 * (opt.warmup + opt.iters); ++it) {
            const bool e2e = it >= opt.warmup + opt.iters;
            const int j = e2e ? it - opt.warmup - opt.iters : it;
            const bool check = j == 0 || j == last_it;
            if (check) poison_out();
            if (check && e2e) CK(cudaMemsetAsync(w_idx, 0xff, sizeof(float) * T * sh.k, stream));
            flush_l2();
            MPI_Barrier(MPI_COMM_WORLD);
            CK(cudaEventRecord(ev.e[0], stream));
            if (e2e) BK(bitepRouterForward(bitepBackendCuda, &rc, &ri, bstream));
            if (!base->dispatch(idx, x, T)) die("baseline dispatch", base->error());
            CK(cudaEventRecord(ev.e[1], stream));
            if (!base->combine(base->expert_x(), w_idx, out)) die("baseline combine", base->error());
            CK(cudaEventRecord(ev.e[2], stream));
            CK(cudaStreamSynchronize(stream));
            if (j >= opt.warmup) {
              if (e2e)
                t_be2e.push_back(ev.us(0, 2));
              else
                t_bd.push_back(ev.us(0, 1)), t_bc.push_back(ev.us(1, 2));
            }
            if (check) {
              if (it == 0) rec.baseline_cross_bytes = base->cross_bytes();
              epbench::check_rows_payload(base->expert_x(), base->num_expert_rows(), sh.H, wrong + kBaseRows, stream);
              epbench::check_equal(out, x, T * sh.H, wrong + (e2e ? kBaseEndToEnd : kBaseCombine), stream);
              if (e2e) check_bytes(w_idx, w_idx_ref, w_bytes, kBaseEndToEnd);
              CK(cudaGetLastError());
              CK(cudaStreamSynchronize(stream));
            }
          }
        }
        int dev_wrongs[kChecks] = {};
        int64_t check_wrong = 0;
        CK(cudaMemcpy(dev_wrongs, wrong, sizeof(dev_wrongs), cudaMemcpyDeviceToHost));
        for (int c = 0; c < kChecks; ++c) {
          const int64_t n = dev_wrongs[c] + host_checks[c];
          check_wrong += n;
          if (n != 0)
            std::fprintf(stderr, "# rank %d T=%lld H=%d E=%d k=%d %s: %lld wrong (check: %s)\n", rank,
                         static_cast<long long>(T), sh.H, sh.E, sh.k, rec.routing.c_str(), static_cast<long long>(n),
                         kCheckNames[c]);
        }
        if (host_wrong != 0)
          std::fprintf(stderr, "# rank %d T=%lld: %lld receive counts differ from the router's rank counts\n", rank,
                       static_cast<long long>(T), static_cast<long long>(host_wrong));
        size_t group_bytes = 0;
        BK(bitepGroupMemoryBytes(group, &group_bytes));
        rec.dispatch = report.over_ranks(median(t_disp));
        rec.combine = report.over_ranks(median(t_comb));
        rec.e2e = report.over_ranks(median(t_e2e));
        if (rec.rank_major) rec.dispatch_rank_major = report.over_ranks(median(t_rmo));
        if (rec.ll) {
          rec.ll_dispatch = report.over_ranks(median(t_lld));
          rec.ll_combine = report.over_ranks(median(t_llc));
          if (rec.ll_graph) {
            rec.ll_graph_dispatch = report.over_ranks(median(t_lgd));
            rec.ll_graph_combine = report.over_ranks(median(t_lgc));
          }
          if (rec.ll_graph_step) rec.ll_graph_step_time = report.over_ranks(median(t_lge));
        }
        rec.nccl_a2a = report.over_ranks(median(t_a2a));
        rec.nccl_a2a_combine = report.over_ranks(median(t_a2a_c));
        rec.baseline_dispatch = report.over_ranks(median(t_bd));
        rec.baseline_combine = report.over_ranks(median(t_bc));
        rec.baseline_e2e = report.over_ranks(median(t_be2e));
        report.finish(&rec, host_wrong + check_wrong, static_cast<int64_t>(group_bytes), caller_bytes, traffic_bytes);
        report.add(rec);
        for (void* p :
             {static_cast<void*>(logits), static_cast<void*>(map), static_cast<void*>(w), static_cast<void*>(w_idx),
              static_cast<void*>(idx), static_cast<void*>(rank_counts), static_cast<void*>(x), static_cast<void*>(out),
              static_cast<void*>(wrong), static_cast<void*>(src_off), caller_recv, caller_expert, y_rows,
              static_cast<void*>(map_ref), static_cast<void*>(w_ref), static_cast<void*>(w_idx_ref)})
          if (p != nullptr) CK(cudaFree(p));
      }
    BK(bitepGroupDestroy(group));
  }
  CK(cudaFree(l2_buf));
  const int64_t total_wrong = report.total_wrong();
  if (!opt.json.empty()) report.write_json(opt.json);
  if (comm != nullptr) ncclCommDestroy(comm);
  CK(cudaStreamDestroy(stream));
  MPI_Comm_free(&node);
  MPI_Finalize();
  return total_wrong == 0 ? 0 : 1;
}
