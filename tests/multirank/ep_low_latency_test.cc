// SPDX-License-Identifier: Apache-2.0
// bitepDispatchLowLatency against bitepDispatch on the same group and inputs, over the scenario grid: the
// expert counts and offsets against what every rank must receive, the expert-major rows bit for bit, and the
// combines (weighted and not) bit for bit, twice (both slot parities) and with two handles of different inputs in
// flight combined in reverse order, each against its own input; on the cuda backend also captured into a CUDA graph and
// launched several times (run_graphs). Host backend always (the regular dispatch underneath); the cuda backend where
// there is one GPU per rank (the low-latency window's kernels where the ranks share an NVLink domain). EpCudaGraph: a
// decode step (router, low-latency dispatch, combine) in one CUDA graph against the same calls made one by one. Then
// the argument errors, alike on every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tests/multirank/ep_checks.h"

#ifdef BITEP_MULTIRANK_CUDA
#include <cuda_runtime.h>
#endif

namespace ept {
namespace {

// Memory of the backend under test: host vectors, or device buffers.
class Mem {
 public:
  explicit Mem(bool cuda) : cuda_(cuda) {}
  Mem(const Mem&) = delete;
  Mem& operator=(const Mem&) = delete;
  ~Mem() {
#ifdef BITEP_MULTIRANK_CUDA
    for (void* p : dev_) cudaFree(p);
#endif
  }
  // A copy of `bytes` of host memory in backend memory (never null).
  void* put(const void* src, size_t bytes) {
    if (!cuda_) {
      host_.emplace_back(static_cast<const uint8_t*>(src), static_cast<const uint8_t*>(src) + bytes);
      host_.back().push_back(0);
      return host_.back().data();
    }
#ifdef BITEP_MULTIRANK_CUDA
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, bytes ? bytes : 1), cudaSuccess);
    if (bytes) EXPECT_EQ(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    dev_.push_back(p);
    return p;
#else
    return nullptr;
#endif
  }
  template <typename T>
  std::vector<T> get(const void* p, size_t n) const {
    std::vector<T> v(n);
    if (n == 0) return v;
    if (!cuda_) {
      std::memcpy(v.data(), p, n * sizeof(T));
      return v;
    }
#ifdef BITEP_MULTIRANK_CUDA
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
#endif
    return v;
  }

 private:
  bool cuda_;
  std::vector<std::vector<uint8_t>> host_;
  std::vector<void*> dev_;
};

int64_t max_tokens(const std::vector<Input>& world) {
  int64_t c = 1;
  for (const Input& in : world) c = std::max(c, in.T);
  return c;
}

// The expert counts and offsets of a layout (backend memory), and its rows [0, offsets[L]) on the host.
struct Experts {
  std::vector<int32_t> counts, offsets;
  std::vector<uint8_t> x;
};

Experts experts_of(const Mem& mem, const Spec& s, const bitepDispatchLayout_t& lo) {
  Experts e;
  const int L = lo.num_local_experts;
  e.counts = mem.get<int32_t>(lo.expert_counts, L);
  e.offsets = mem.get<int32_t>(lo.expert_offsets, L + 1);
  e.x = mem.get<uint8_t>(lo.expert_x, static_cast<size_t>(e.offsets[L]) * s.H * dsize(s.dtype));
  return e;
}

// The toy experts' outputs over `rows` expert-major rows (rows past offsets[L] poison).
std::vector<uint8_t> toy_outputs(const Spec& s, int W, int rank, const Experts& e, int64_t rows) {
  bitepDispatchLayout_t lo{};
  lo.num_local_experts = static_cast<int>(e.counts.size());
  lo.num_expert_rows = rows;
  std::vector<uint8_t> x(static_cast<size_t>(rows) * s.H * dsize(s.dtype), 0);
  std::copy(e.x.begin(), e.x.end(), x.begin());
  lo.expert_x = x.data();
  lo.expert_counts = e.counts.data();
  lo.expert_offsets = e.offsets.data();
  return toy_expert_outputs(s, W, rank, lo);
}

std::vector<uint8_t> run_combine(Mem& mem,
                                 bitepGroup_t g,
                                 bitepHandle_t h,
                                 const std::vector<uint8_t>& y,
                                 int weighted,
                                 int64_t T,
                                 const Spec& s,
                                 bitepStream_t stream) {
  const size_t bytes = static_cast<size_t>(T) * s.H * dsize(s.dtype);
  std::vector<uint8_t> canary(bytes + 1, 0xcd);
  void* out = mem.put(canary.data(), canary.size());
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  c.y = mem.put(y.data(), y.size());
  c.weighted = weighted;
  c.out = out;
  EXPECT_EQ(bitepCombine(g, h, &c, stream), bitepSuccess) << bitepGetLastError();
  std::vector<uint8_t> got = mem.get<uint8_t>(out, bytes + 1);
  EXPECT_EQ(got[bytes], 0xcd) << "bitepCombine wrote past out";
  got.pop_back();
  return got;
}

#ifdef BITEP_MULTIRANK_CUDA
// A capture on a stream of its own, ended (and its graph destroyed) on every return path.
class Capture {
 public:
  Capture() {
    EXPECT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    EXPECT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
    open_ = true;
  }
  ~Capture() {
    (void)end();
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
    cudaStreamDestroy(stream_);
  }
  Capture(const Capture&) = delete;
  Capture& operator=(const Capture&) = delete;
  bitepStream_t stream() const { return reinterpret_cast<bitepStream_t>(stream_); }
  // The capture's status now, for the failure messages: 1 active, 2 invalidated (by the last calls).
  int status() const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(stream_, &st) == cudaSuccess ? static_cast<int>(st) : -1;
  }
  // Ends the capture: its status (a call that broke the capture makes it fail).
  cudaError_t end() {
    if (!open_) return cudaSuccess;
    open_ = false;
    const cudaError_t err = cudaStreamEndCapture(stream_, &graph_);
    (void)cudaGetLastError();  // a failed end would otherwise show up as the next launch's error
    return err;
  }
  // Ends the capture and instantiates the graph.
  bool instantiate() { return end() == cudaSuccess && cudaGraphInstantiate(&exec_, graph_, 0) == cudaSuccess; }
  cudaError_t launch() {
    const cudaError_t err = cudaGraphLaunch(exec_, stream_);
    return err != cudaSuccess ? err : cudaStreamSynchronize(stream_);
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  bool open_ = false;
};

// A capture refusal: the first says why (bitepNotSupported, naming the capture). A refused call is this rank's
// alone (the peers are not told), so at W > 1 it leaves the group unusable (src/ep/collective.h failed_alone): every
// call after the first refusal says so. *refused: a call was refused before.
void expect_capture_refused(bitepResult_t r, const char* call, bool* refused) {
  const std::string err = bitepGetLastError();
  if (world_size() > 1 && *refused) {
    EXPECT_EQ(r, bitepInvalidUsage) << call << ": " << err;
    EXPECT_NE(err.find("unusable"), std::string::npos) << call << ": " << err;
  } else {
    EXPECT_EQ(r, bitepNotSupported) << call << ": " << err;
    EXPECT_NE(err.find("capturing a CUDA graph"), std::string::npos) << call << ": " << err;
  }
  *refused = true;
}

// bitepDispatch and the combine of its handle refuse a capturing stream, and leave the capture intact.
void check_capture_refusals(
    Mem& mem, bitepGroup_t g, bitepHandle_t regular, const bitepDispatchArgs_t& a, size_t out_bytes, bool* refused) {
  std::vector<uint8_t> out(out_bytes + 1);
  // Before the capture: an allocation would break it.
  void* dev_out = mem.put(out.data(), out.size());
  void* dev_y = mem.put(out.data(), out.size());
  HandleGuard h;  // destroyed after the capture ended
  Capture cap;
  EXPECT_EQ(cap.status(), 1) << "the capture did not start";
  expect_capture_refused(bitepDispatch(g, &a, cap.stream(), &h.h), "bitepDispatch", refused);
  EXPECT_EQ(cap.status(), 1) << "the capture is not active after the refused bitepDispatch";
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  c.y = dev_y;  // not read: the call is refused
  c.layout = bitepLayoutRankMajor;
  c.out = dev_out;
  expect_capture_refused(bitepCombine(g, regular, &c, cap.stream()), "bitepCombine", refused);
  EXPECT_EQ(cap.status(), 1) << "the capture is not active after the refused bitepCombine";
  EXPECT_EQ(cap.end(), cudaSuccess) << "a refused call broke the capture";
}

// CUDA graphs. Where the group says its low-latency calls are capturable, one graph holds a low-latency dispatch
// and its combine (weighted where the spec has weights); it is launched four times, with calls made one by one
// between the launches (a dispatch alone: one barrier, so the next launch meets the other slot parity; a dispatch
// and its combine; nothing), and every launch must give bitepDispatch's expert counts, offsets and rows and
// bitepCombine's output. The handle's counts and rows and the output are poisoned before each launch, so a launch
// that moved nothing fails. Where the group says not, capturing the low-latency dispatch returns bitepNotSupported,
// naming the capture, and leaves the capture intact. Everywhere, last (at W > 1 a refusal leaves the group unusable):
// bitepDispatch and the combine of its handle refuse a capturing stream alike.
void run_graphs(Mem& mem,
                bitepGroup_t g,
                bitepHandle_t regular,
                const bitepDispatchArgs_t& a,
                const Spec& s,
                int64_t T,
                const Experts& e0,
                const std::vector<uint8_t>& want,
                int weighted,
                bool must_capture) {
  const int W = world_size(), rank = world_rank();
  const size_t row = s.H * dsize(s.dtype), out_bytes = static_cast<size_t>(T) * row;
  bool refused = false;
  int capturable = -1;
  ASSERT_EQ(bitepGroupLowLatencyCapturable(g, &capturable), bitepSuccess) << bitepGetLastError();
  if (must_capture) ASSERT_EQ(capturable, 1) << "a one-rank cuda group's low-latency calls run on the device";
  // The y of the toy experts, over the rows of a low-latency handle (the fixed capacity where the calls run on the
  // device, which a captured dispatch has too).
  HandleGuard eager;
  ASSERT_EQ(bitepDispatchLowLatency(g, &a, nullptr, &eager.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t elo;
  ASSERT_EQ(bitepHandleGetLayout(eager.h, &elo), bitepSuccess);
  if (capturable == 1) {
    EXPECT_EQ(elo.num_expert_rows, static_cast<int64_t>(W) * max_tokens(make_world(s, W)) * elo.max_row_experts +
                                       int64_t{s.L} * (s.align - 1))
        << "bitepGroupLowLatencyCapturable says 1, but the dispatch did not take the device path";
  }
  const std::vector<uint8_t> y = toy_outputs(s, W, rank, experts_of(mem, s, elo), elo.num_expert_rows);
  void* dev_y = mem.put(y.data(), y.size());
  std::vector<uint8_t> canary(out_bytes + 1, 0xcd);
  void* dev_out = mem.put(canary.data(), canary.size());
  HandleGuard h;  // destroyed after the capture ended (the destroy waits for the device)
  Capture cap;
  const bitepResult_t r = bitepDispatchLowLatency(g, &a, cap.stream(), &h.h);
  if (capturable != 1) {
    expect_capture_refused(r, "bitepDispatchLowLatency", &refused);
    EXPECT_EQ(cap.end(), cudaSuccess) << "a refused call broke the capture";
    check_capture_refusals(mem, g, regular, a, out_bytes, &refused);
    return;
  }
  ASSERT_EQ(r, bitepSuccess) << bitepGetLastError() << " (capture status " << cap.status() << ")";
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  c.y = dev_y;
  c.weighted = weighted;
  c.out = dev_out;
  ASSERT_EQ(bitepCombine(g, h.h, &c, cap.stream()), bitepSuccess) << bitepGetLastError();
  ASSERT_TRUE(cap.instantiate()) << "capture of a low-latency dispatch and its combine failed";
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  ASSERT_EQ(lo.num_expert_rows, elo.num_expert_rows);
  const int L = s.L;
  for (int launch = 0; launch < 4; ++launch) {
    SCOPED_TRACE("graph launch " + std::to_string(launch));
    ASSERT_EQ(cudaMemset(lo.expert_x, 0xff, static_cast<size_t>(lo.num_expert_rows) * row), cudaSuccess);
    ASSERT_EQ(cudaMemset(const_cast<int32_t*>(lo.expert_counts), 0xff, sizeof(int32_t) * L), cudaSuccess);
    ASSERT_EQ(cudaMemset(dev_out, 0xcd, out_bytes), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cap.launch(), cudaSuccess);
    const Experts e = experts_of(mem, s, lo);
    EXPECT_EQ(e.counts, e0.counts) << "expert counts, rank " << rank;
    EXPECT_EQ(e.offsets, e0.offsets) << "expert offsets, rank " << rank;
    EXPECT_TRUE(e.x == e0.x) << "expert-major rows differ from bitepDispatch's on rank " << rank;
    std::vector<uint8_t> got = mem.get<uint8_t>(dev_out, out_bytes + 1);
    EXPECT_EQ(got[out_bytes], 0xcd) << "the graph's combine wrote past out";
    got.pop_back();
    EXPECT_TRUE(got == want) << (weighted ? "weighted " : "") << "combine differs from bitepCombine's on rank " << rank;
    // Calls made one by one between the launches.
    if (launch == 0 || launch == 1) {
      HandleGuard between;
      ASSERT_EQ(bitepDispatchLowLatency(g, &a, nullptr, &between.h), bitepSuccess) << bitepGetLastError();
      if (launch == 1) {
        EXPECT_TRUE(run_combine(mem, g, between.h, y, weighted, T, s, nullptr) == want)
            << "a combine made between graph launches differs from bitepCombine's on rank " << rank;
      }
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }
  EXPECT_EQ(bitepHandleDestroy(h.h), bitepSuccess) << bitepGetLastError();
  h.h = nullptr;
  check_capture_refusals(mem, g, regular, a, out_bytes, &refused);  // last: at W > 1 they leave the group unusable
}

// A decode step in one CUDA graph, as a serving stack captures it: bitepRouterForward (bitmap and compact weights from
// fp32 logits) -> bitepDispatchLowLatency -> bitepCombine (identity experts: y is the handle's expert_x), captured once
// and launched four times, new logits and tokens copied into the captured buffers before each launch. Every launch's
// map, weights and output must equal the same step made one by one (the router into buffers of its own, bitepDispatch,
// bitepCombine of its expert-major rows) bit for bit; the graph's map, weights and output are poisoned first. An
// eager low-latency dispatch after launches 0 and 2 moves the next launch to the other slot parity (a launch's two
// barriers keep it).
struct DecodeShape {
  const char* name;
  int L, k, H, align;
  int64_t (*tokens)(int rank);
};

float hash_uniform(uint64_t a, uint64_t b, uint64_t c) {  // in [-1, 1)
  uint64_t z = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull ^ c;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

void run_decode_step_graph(const DecodeShape& d, int device) {
  const int W = world_size(), rank = world_rank();
  const int E = d.L * W, k = std::min(d.k, E);
  int64_t max_t = 1;
  for (int r = 0; r < W; ++r) max_t = std::max(max_t, d.tokens(r));
  const int64_t T = d.tokens(rank);
  Spec s;
  s.L = d.L;
  s.k = k;
  s.H = d.H;
  s.align = d.align;
  bitepGroupConfig_t c = group_config(s, W);
  c.backend = bitepBackendCuda;
  c.device = device;
  c.low_latency_max_tokens = static_cast<int>(max_t);
  GroupGuard g;
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepSuccess) << bitepGetLastError();
  int capturable = -1;
  ASSERT_EQ(bitepGroupLowLatencyCapturable(g.g, &capturable), bitepSuccess) << bitepGetLastError();
  if (capturable != 1) GTEST_SKIP() << "this group's low-latency calls run bitepDispatch (no device path to capture)";

  Mem mem(true);
  const size_t map_bytes = static_cast<size_t>(T) * ((E + 7) / 8), w_bytes = sizeof(float) * T * k;
  const size_t x_bytes = static_cast<size_t>(T) * d.H * 2;
  std::vector<uint8_t> zeros(std::max(x_bytes, sizeof(float) * T * E) + 1, 0);
  void* logits = mem.put(zeros.data(), sizeof(float) * T * E);
  void* x = mem.put(zeros.data(), x_bytes);
  void* map = mem.put(zeros.data(), map_bytes);
  void* w = mem.put(zeros.data(), w_bytes);
  void* out = mem.put(zeros.data(), x_bytes);
  void* map_ref = mem.put(zeros.data(), map_bytes);
  void* w_ref = mem.put(zeros.data(), w_bytes);
  void* out_ref = mem.put(zeros.data(), x_bytes);
  bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
  rc.num_experts = E;
  rc.topk = k;
  bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;
  ra.num_tokens = T;
  ra.logits = logits;
  ra.routing_map = map;
  ra.map_format = bitepMapBitmapU8;
  ra.topk_weights = static_cast<float*>(w);
  bitepRouterForwardArgs_t ra_ref = ra;
  ra_ref.routing_map = map_ref;
  ra_ref.topk_weights = static_cast<float*>(w_ref);
  bitepDispatchArgs_t a = BITEP_DISPATCH_ARGS_INIT;
  a.num_tokens = T;
  a.x = x;
  a.routing_map = map;
  a.map_format = bitepMapBitmapU8;
  a.topk_weights = static_cast<const float*>(w);
  bitepDispatchArgs_t a_ref = a;
  a_ref.routing_map = map_ref;
  a_ref.topk_weights = static_cast<const float*>(w_ref);
  bitepCombineArgs_t ca = BITEP_COMBINE_ARGS_INIT;
  ca.layout = bitepLayoutExpertMajor;
  ca.weighted = 1;
  ca.out = out;

  HandleGuard h;  // destroyed after the graph (the destroy waits for the device)
  Capture cap;
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &rc, &ra, cap.stream()), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepDispatchLowLatency(g.g, &a, cap.stream(), &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  ca.y = lo.expert_x;
  ASSERT_EQ(bitepCombine(g.g, h.h, &ca, cap.stream()), bitepSuccess) << bitepGetLastError();
  ASSERT_TRUE(cap.instantiate()) << "capture of router + low-latency dispatch + combine failed (status " << cap.status()
                                 << ")";
  for (int launch = 0; launch < 4; ++launch) {
    SCOPED_TRACE("graph launch " + std::to_string(launch));
    std::vector<float> lg(static_cast<size_t>(T) * E);
    for (size_t i = 0; i < lg.size(); ++i) lg[i] = 3.0f * hash_uniform(launch, rank, i);
    std::vector<uint8_t> xs(x_bytes);
    for (int64_t i = 0; i < T * d.H; ++i) store(bitepBfloat16, xs.data(), i, hash_uniform(launch + 100, rank, i));
    if (T > 0) {
      ASSERT_EQ(cudaMemcpy(logits, lg.data(), sizeof(float) * lg.size(), cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(x, xs.data(), x_bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
    // The step made one by one.
    ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &rc, &ra_ref, nullptr), bitepSuccess) << bitepGetLastError();
    {
      HandleGuard r;
      ASSERT_EQ(bitepDispatch(g.g, &a_ref, nullptr, &r.h), bitepSuccess) << bitepGetLastError();
      bitepDispatchLayout_t rlo;
      ASSERT_EQ(bitepHandleGetLayout(r.h, &rlo), bitepSuccess);
      bitepCombineArgs_t cr = ca;
      cr.y = rlo.expert_x;
      cr.out = out_ref;
      ASSERT_EQ(bitepCombine(g.g, r.h, &cr, nullptr), bitepSuccess) << bitepGetLastError();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
    ASSERT_EQ(cudaMemset(map, 0xff, map_bytes), cudaSuccess);
    ASSERT_EQ(cudaMemset(w, 0xff, w_bytes), cudaSuccess);
    ASSERT_EQ(cudaMemset(out, 0xff, x_bytes), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cap.launch(), cudaSuccess);
    EXPECT_TRUE(mem.get<uint8_t>(map, map_bytes) == mem.get<uint8_t>(map_ref, map_bytes))
        << "the graph's routing map differs from the router's, rank " << rank;
    EXPECT_TRUE(mem.get<uint8_t>(w, w_bytes) == mem.get<uint8_t>(w_ref, w_bytes))
        << "the graph's weights differ from the router's, rank " << rank;
    const std::vector<uint8_t> got = mem.get<uint8_t>(out, x_bytes), want = mem.get<uint8_t>(out_ref, x_bytes);
    EXPECT_TRUE(got == want) << "the graph's combine differs from bitepDispatch + bitepCombine's, rank " << rank;
    bool moved = T == 0;  // the identity experts' weighted sum of a token is not all zero (a check that can fail)
    for (size_t i = 0; i < want.size() && !moved; ++i) moved = want[i] != 0;
    EXPECT_TRUE(moved) << "the reference output is all zero, rank " << rank;
    if (launch == 0 || launch == 2) {
      HandleGuard between;
      ASSERT_EQ(bitepDispatchLowLatency(g.g, &a_ref, nullptr, &between.h), bitepSuccess) << bitepGetLastError();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }
}

const DecodeShape kDecodeShapes[] = {
    {"L8_k4_H64", 8, 4, 64, 1, [](int r) { return int64_t{40} + 9 * r; }},
    {"L5_k3_H24_align4_rank1_empty", 5, 3, 24, 4, [](int r) { return r == 1 ? int64_t{0} : int64_t{17} + 4 * r; }},
    {"L32_k8_H128_align16", 32, 8, 128, 16, [](int r) { return int64_t{128} - 5 * r; }},
};

TEST(EpCudaGraph, DecodeStepRouterDispatchCombine) {
  int device = 0;
  std::string why;
  if (!gpu_per_rank(&device, &why)) GTEST_SKIP() << why;
  ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
  for (const DecodeShape& d : kDecodeShapes) {
    SCOPED_TRACE(d.name);
    run_decode_step_graph(d, device);
    if (HasFatalFailure() || IsSkipped()) return;
  }
}
#endif

// One input of the low-latency tests, with the regular dispatch of it and its combines, which the low-latency calls of
// it must match.
struct LowLatencyInput {
  Spec spec;
  std::vector<Input> world;
  bitepDispatchArgs_t args;  // backend memory
  HandleGuard regular;
  Experts e0;
  std::vector<std::vector<uint8_t>> want_out;  // [weighted]
};

// The input of spec s into `in` (its world made before), its regular dispatch and combines (checked against the
// reference combine on the host backend).
void prepare_input(Mem& mem, bitepGroup_t g, bool cuda, bitepStream_t stream, LowLatencyInput* in) {
  const Spec& s = in->spec;
  const int W = world_size(), rank = world_rank();
  const Input& mine = in->world[rank];
  bitepDispatchArgs_t& a = in->args;
  a = dispatch_args(s, mine);
  a.x = mem.put(mine.x.data(), mine.x.size());
  a.routing_map = mem.put(mine.map.data(), mine.map.size());
  if (a.probs) a.probs = static_cast<const float*>(mem.put(mine.probs.data(), 4 * mine.probs.size()));
  if (a.topk_weights) a.topk_weights = static_cast<const float*>(mem.put(mine.topk.data(), 4 * mine.topk.size()));
  ASSERT_EQ(bitepDispatch(g, &a, stream, &in->regular.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo0;
  ASSERT_EQ(bitepHandleGetLayout(in->regular.h, &lo0), bitepSuccess);
  in->e0 = experts_of(mem, s, lo0);
  const Expected want = expected_receive(s, W, rank, in->world);
  for (int l = 0; l < s.L; ++l) ASSERT_EQ(in->e0.counts[l], want.expert_counts[l]) << "regular dispatch, expert " << l;
  const std::vector<uint8_t> y0 = toy_outputs(s, W, rank, in->e0, lo0.num_expert_rows);
  const int weighted = s.weights != Weights::kNone;
  for (int w = 0; w <= weighted; ++w)
    in->want_out.push_back(run_combine(mem, g, in->regular.h, y0, w, mine.T, s, stream));
  if (!cuda)
    for (int w = 0; w <= weighted; ++w)
      expect_values(s, in->want_out[w], reference_combine(s, W, rank, mine, w != 0), w ? "weighted out" : "out");
}

void run_low_latency(const Spec& s, bool cuda, int device) {
  const int W = world_size(), rank = world_rank();
  // Two inputs: the spec's (A), and another (B: another seed, so other rows, experts and weights, and one token fewer
  // on rank 0 where it has two or more), for the two handles in flight below.
  LowLatencyInput A, B;
  A.spec = s;
  B.spec = s;
  B.spec.seed = s.seed + 7919;
  B.spec.tokens = [t = s.tokens](int r, int w) { return r == 0 && t(r, w) >= 2 ? t(r, w) - 1 : t(r, w); };
  A.world = make_world(A.spec, W);
  B.world = make_world(B.spec, W);
  bitepGroupConfig_t c = group_config(s, W);
  c.low_latency_max_tokens = static_cast<int>(std::max(max_tokens(A.world), max_tokens(B.world)));
  if (cuda) {
    c.backend = bitepBackendCuda;
    c.device = device;
  }
  GroupGuard g;
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepSuccess) << bitepGetLastError();
  Mem mem(cuda);
  bitepStream_t stream = nullptr;
  ASSERT_NO_FATAL_FAILURE(prepare_input(mem, g.g, cuda, stream, &A));
  ASSERT_NO_FATAL_FAILURE(prepare_input(mem, g.g, cuda, stream, &B));
  const int L = s.L;
  const int weighted = s.weights != Weights::kNone;

  // One low-latency dispatch of input `in` and its combines, checked against the regular ones of the same input.
  const char* lsa = std::getenv("BITEP_LSA");
  const bool lsa_off = lsa != nullptr && std::string(lsa) == "0";
  auto check = [&](bitepHandle_t h, const LowLatencyInput& in, const std::string& what) {
    SCOPED_TRACE(what);
    bitepDispatchLayout_t lo;
    ASSERT_EQ(bitepHandleGetLayout(h, &lo), bitepSuccess);
    EXPECT_EQ(lo.num_recv_rows, 0);
    EXPECT_EQ(lo.recv_x, nullptr);
    EXPECT_EQ(lo.recv_map, nullptr);
    EXPECT_EQ(lo.recv_weights, nullptr);
    EXPECT_EQ(lo.recv_expert_rows, nullptr);
    EXPECT_EQ(lo.expert_counts_host, nullptr);
    EXPECT_EQ(lo.recv_counts_host, nullptr);
    EXPECT_EQ(lo.send_counts_host, nullptr);
    EXPECT_EQ(lo.num_local_experts, L);
    const Experts e = experts_of(mem, in.spec, lo);
    EXPECT_EQ(e.counts, in.e0.counts) << "expert counts, rank " << rank;
    EXPECT_EQ(e.offsets, in.e0.offsets) << "expert offsets, rank " << rank;
    EXPECT_GE(lo.num_expert_rows, e.offsets[L]);
    if (cuda && W == 1 && !lsa_off) {  // the fast path over the rank's own window: its fixed capacity
      const int64_t KL = std::min(c.topk, L);
      EXPECT_EQ(lo.num_expert_rows,
                static_cast<int64_t>(c.low_latency_max_tokens) * KL + int64_t{L} * (c.expert_alignment - 1))
          << "a one-rank cuda group did not take the low-latency kernels";
    }
    EXPECT_TRUE(e.x == in.e0.x) << "expert-major rows differ from bitepDispatch's on rank " << rank;
    const std::vector<uint8_t> y = toy_outputs(in.spec, W, rank, e, lo.num_expert_rows);
    for (int w = 0; w <= weighted; ++w)
      EXPECT_TRUE(run_combine(mem, g.g, h, y, w, in.world[rank].T, in.spec, stream) == in.want_out[w])
          << (w ? "weighted " : "") << "combine differs from bitepCombine's on rank " << rank;
  };
  for (int round = 0; round < 2; ++round) {
    HandleGuard h;
    ASSERT_EQ(bitepDispatchLowLatency(g.g, &A.args, stream, &h.h), bitepSuccess) << bitepGetLastError();
    check(h.h, A, round == 0 ? "first low-latency dispatch" : "second low-latency dispatch");
  }
  // Two in flight, of different inputs, combined in reverse order (the later one first); twice, A then B and B then
  // A, so that each input passes through both slot parities. Each handle is checked against its own input's regular
  // dispatch: a combine that read the other handle's state, or the other parity's slots, gives the other's values.
  for (int pair = 0; pair < 2; ++pair) {
    const LowLatencyInput& first = pair == 0 ? A : B;
    const LowLatencyInput& second = pair == 0 ? B : A;
    const std::string names = pair == 0 ? " (A then B)" : " (B then A)";
    HandleGuard h1, h2;
    ASSERT_EQ(bitepDispatchLowLatency(g.g, &first.args, stream, &h1.h), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(bitepDispatchLowLatency(g.g, &second.args, stream, &h2.h), bitepSuccess) << bitepGetLastError();
    check(h2.h, second, "second of two in flight" + names);
    check(h1.h, first, "first of two in flight" + names);
  }
#ifdef BITEP_MULTIRANK_CUDA
  if (cuda) {
    SCOPED_TRACE("CUDA graphs");
    run_graphs(mem, g.g, A.regular.h, A.args, s, A.world[rank].T, A.e0, A.want_out[weighted], weighted,
               W == 1 && !lsa_off);
  }
#endif
}

class EpLowLatency : public testing::TestWithParam<Spec> {};

TEST_P(EpLowLatency, MatchesDispatchHost) { run_low_latency(GetParam(), false, -1); }

TEST_P(EpLowLatency, MatchesDispatchCuda) {
#ifdef BITEP_MULTIRANK_CUDA
  int device = 0;
  std::string why;
  if (!gpu_per_rank(&device, &why)) GTEST_SKIP() << why;
  ASSERT_EQ(cudaSetDevice(device), cudaSuccess);
  run_low_latency(GetParam(), true, device);
#else
  GTEST_SKIP() << "this bitep was built without CUDA: the cuda backend test needs a CUDA build and one GPU per rank";
#endif
}

INSTANTIATE_TEST_SUITE_P(EpLowLatency,
                         EpLowLatency,
                         testing::ValuesIn(spec_grid()),
                         [](const testing::TestParamInfo<Spec>& info) { return info.param.name; });

// Wide local maps: slices of 4, 8 and 16 bytes (the receive kernel loads them a word, two words and four
// words at a time), of 38 and 65 bytes (two and three chunks of 256 experts, loaded by halves and by bytes),
// and more tokens than one tile of 256 (up to 1100: five tiles, so the send's rank blocks carry every earlier
// tile's counts).
std::vector<Spec> wide_specs() {
  std::vector<Spec> v;
  auto add = [&](const char* name, int L, int k, int64_t T, auto&& tweak) {
    Spec s;
    s.name = name;
    s.L = L;
    s.k = k;
    s.tokens = [T](int r, int) { return T + 7 * r; };
    tweak(s);
    v.push_back(s);
  };
  add("L32_k6", 32, 6, 40, [](Spec&) {});
  add("L64_k8_300_tokens", 64, 8, 300, [](Spec& s) { s.H = 16; });
  add("L128_k8_hot_expert", 128, 8, 270, [](Spec& s) {
    s.route = Route::kHotExpert;
    s.target = 77;
  });
  add("L128_k8_dense_fp32", 128, 8, 33, [](Spec& s) {
    s.weights = Weights::kDense;
    s.dtype = bitepFloat32;
  });
  add("L300_k9_fp16", 300, 9, 60, [](Spec& s) { s.dtype = bitepFloat16; });
  add("L520_k5_align4", 520, 5, 50, [](Spec& s) { s.align = 4; });
  add("L16_k4_1100_tokens", 16, 4, 1100, [](Spec&) {});
  return v;
}

INSTANTIATE_TEST_SUITE_P(EpLowLatencyWide,
                         EpLowLatency,
                         testing::ValuesIn(wide_specs()),
                         [](const testing::TestParamInfo<Spec>& info) { return info.param.name; });

// Argument errors on every rank alike (host backend: every rank returns one).
TEST(EpLowLatencyErrors, ArgumentsAndUsage) {
  const int W = world_size(), rank = world_rank();
  Spec s;
  const std::vector<Input> world = make_world(s, W);
  const Input& in = world[rank];
  bitepDispatchArgs_t a = dispatch_args(s, in);
  HandleGuard h;
  {
    GroupGuard g;  // no low-latency dispatches
    ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(bitepDispatchLowLatency(g.g, &a, nullptr, &h.h), bitepInvalidUsage);
    EXPECT_NE(std::string(bitepGetLastError()).find("low_latency_max_tokens = 0"), std::string::npos)
        << bitepGetLastError();
    EXPECT_EQ(h.h, nullptr);
  }
  bitepGroupConfig_t c = group_config(s, W);
  for (int bad : {-1, 65537}) {
    c.low_latency_max_tokens = bad;
    GroupGuard g;
    EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepInvalidArgument);
    EXPECT_NE(std::string(bitepGetLastError()).find("config->low_latency_max_tokens is"), std::string::npos)
        << bitepGetLastError();
  }
  if (W > 1) {
    c.low_latency_max_tokens = 4 + (rank == 0);
    GroupGuard g;
    EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepInvalidArgument);
    EXPECT_NE(std::string(bitepGetLastError()).find("config->low_latency_max_tokens differs"), std::string::npos)
        << bitepGetLastError();
  }
  // Every rank has 5 + 3 * rank tokens: a capacity of 2 is too small everywhere.
  c.low_latency_max_tokens = 2;
  GroupGuard g;
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g.g), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(bitepDispatchLowLatency(g.g, &a, nullptr, &h.h), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->num_tokens is"), std::string::npos) << bitepGetLastError();
  EXPECT_EQ(h.h, nullptr);
  GroupGuard g2;
  c.low_latency_max_tokens = static_cast<int>(max_tokens(world));
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g2.g), bitepSuccess) << bitepGetLastError();
  std::vector<uint8_t> recv(64 * s.H * dsize(s.dtype));
  bitepDispatchArgs_t with_buffers = a;
  with_buffers.recv_x = recv.data();
  with_buffers.recv_x_capacity = 64;
  EXPECT_EQ(bitepDispatchLowLatency(g2.g, &with_buffers, nullptr, &h.h), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->recv_x"), std::string::npos) << bitepGetLastError();
  bitepDispatchArgs_t rank_major = a;
  rank_major.rank_major_only = 1;
  EXPECT_EQ(bitepDispatchLowLatency(g2.g, &rank_major, nullptr, &h.h), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->rank_major_only is 1"), std::string::npos)
      << bitepGetLastError();
  EXPECT_EQ(h.h, nullptr);
  // The host backend's low-latency calls run bitepDispatch: no CUDA graph can hold them.
  int capturable = -1;
  EXPECT_EQ(bitepGroupLowLatencyCapturable(g2.g, &capturable), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(capturable, 0);
  EXPECT_EQ(bitepGroupLowLatencyCapturable(g2.g, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("capturable is NULL"), std::string::npos) << bitepGetLastError();
  capturable = -1;
  EXPECT_NE(bitepGroupLowLatencyCapturable(nullptr, &capturable), bitepSuccess);
  EXPECT_EQ(capturable, 0);
  // A good handle: no rank-major combine, no backward.
  ASSERT_EQ(bitepDispatchLowLatency(g2.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  std::vector<uint8_t> y(std::max<int64_t>(lo.num_expert_rows, 1) * s.H * dsize(s.dtype), 0);
  std::vector<uint8_t> out(std::max<int64_t>(in.T, 1) * s.H * dsize(s.dtype), 0);
  bitepCombineArgs_t cc = BITEP_COMBINE_ARGS_INIT;
  cc.y = y.data();
  cc.layout = bitepLayoutRankMajor;
  cc.weighted = 0;
  cc.out = out.data();
  EXPECT_EQ(bitepCombine(g2.g, h.h, &cc, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("bitepLayoutRankMajor"), std::string::npos) << bitepGetLastError();
  EXPECT_EQ(bitepDispatchBackward(g2.g, h.h, y.data(), bitepLayoutExpertMajor, out.data(), nullptr), bitepNotSupported);
  bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
  b.grad_out = out.data();
  b.grad_y = y.data();
  EXPECT_EQ(bitepCombineBackward(g2.g, h.h, &b, nullptr), bitepNotSupported);
  EXPECT_NE(std::string(bitepGetLastError()).find("bitepDispatchLowLatency"), std::string::npos) << bitepGetLastError();
  const int32_t* sources = reinterpret_cast<const int32_t*>(&b);  // must come back NULL
  EXPECT_EQ(bitepHandleGetExpertSources(g2.g, h.h, nullptr, &sources), bitepInvalidUsage);
  EXPECT_NE(std::string(bitepGetLastError()).find("bitepDispatchLowLatency"), std::string::npos) << bitepGetLastError();
  EXPECT_EQ(sources, nullptr);
  // The handle still combines (expert-major).
  cc.layout = bitepLayoutExpertMajor;
  EXPECT_EQ(bitepCombine(g2.g, h.h, &cc, nullptr), bitepSuccess) << bitepGetLastError();
}

}  // namespace
}  // namespace ept
