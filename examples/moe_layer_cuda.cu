// SPDX-License-Identifier: Apache-2.0
// The cuda backend of examples/moe_layer: router, dispatch and combine by bitep on the GPU (NCCL between
// ranks), the experts as two cuBLAS GEMMs per local expert with a GELU kernel between them.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <type_traits>

#include "bitep/bitep.hpp"
#include "bitep/bitep_mpi.h"
#include "moe_layer.h"

namespace {

constexpr int kAlignment = 8;

__global__ void gelu_to_bf16(const float* in, __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = in[i];
    out[i] = __float2bfloat16_rn(0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v))));
  }
}

// The decode path's experts: expert_counts and expert_offsets of a low-latency dispatch live on the device, so the
// FFN of every local expert runs as one kernel over the expert-major rows, a block a row (small H and F: the row and
// its activation in shared memory). Rows past the experts' end and pad rows are not read by the combine and are left
// alone. y = W2_e gelu(W1_e x): fp32 sums, the activation rounded to bf16 as the GEMM path stores it.
__global__ void expert_ffn_rows(const __nv_bfloat16* x,
                                const int32_t* counts,
                                const int32_t* offsets,
                                int L,
                                int first_expert,
                                const __nv_bfloat16* w1,
                                const __nv_bfloat16* w2,
                                int H,
                                int F,
                                __nv_bfloat16* y,
                                int64_t rows) {
  extern __shared__ float smem[];
  float* xs = smem;
  float* as = smem + H;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t end = offsets[L];
  for (int64_t r = blockIdx.x; r < rows && r < end; r += gridDim.x) {
    int lo = 0, hi = L;  // the expert whose block holds r: the last l with offsets[l] <= r
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (offsets[mid] <= r)
        lo = mid;
      else
        hi = mid;
    }
    if (r >= offsets[lo] + counts[lo]) continue;  // a pad row
    __syncthreads();                              // the previous row's xs and as are read
    for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = __bfloat162float(x[r * H + i]);
    __syncthreads();
    const __nv_bfloat16* w1e = w1 + static_cast<int64_t>(first_expert + lo) * F * H;
    const __nv_bfloat16* w2e = w2 + static_cast<int64_t>(first_expert + lo) * H * F;
    for (int f = warp; f < F; f += warps) {
      float acc = 0.0f;
      for (int i = lane; i < H; i += 32) acc += __bfloat162float(w1e[static_cast<int64_t>(f) * H + i]) * xs[i];
      for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0)
        as[f] = __bfloat162float(
            __float2bfloat16_rn(0.5f * acc * (1.0f + tanhf(0.7978845608f * (acc + 0.044715f * acc * acc * acc)))));
    }
    __syncthreads();
    for (int j = warp; j < H; j += warps) {
      float acc = 0.0f;
      for (int f = lane; f < F; f += 32) acc += __bfloat162float(w2e[static_cast<int64_t>(j) * F + f]) * as[f];
      for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) y[r * H + j] = __float2bfloat16_rn(acc);
    }
  }
}

// Device buffer that grows (never shrinks) across iterations.
struct DevBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~DevBuf() {
    if (ptr) cudaFree(ptr);
  }
  cudaError_t reserve(size_t n) {
    if (n <= bytes) return cudaSuccess;
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    cudaError_t e = cudaMalloc(&ptr, n);
    if (e == cudaSuccess) bytes = n;
    return e;
  }
};

// Owners of what a C create call made, so that early returns release it too. The success path keeps reporting the
// destroys it checked before: it takes the object back with release() and destroys it through CUDA_OK or BITEP_OK.
// (bitep::Handle has no release(); its destroy() reports by exception, which this file does not use.)
template <auto Destroy>
struct Destroyer {
  template <typename P>
  void operator()(P p) const {
    (void)Destroy(p);
  }
};
template <typename P, auto Destroy>
using Owner = std::unique_ptr<std::remove_pointer_t<P>, Destroyer<Destroy>>;
using HandleOwner = Owner<bitepHandle_t, bitepHandleDestroy>;

// Waits for the stream when it goes out of scope: declared after the group and the buffers, it runs before they are
// freed, so no work still queued on an error path reads freed memory.
struct StreamDrain {
  cudaStream_t stream;
  ~StreamDrain() { (void)cudaStreamSynchronize(stream); }
};

}  // namespace

#define CUDA_OK(call)                                                                           \
  do {                                                                                          \
    const cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "[rank %d] %s failed: %s\n", p.rank, #call, cudaGetErrorString(e_)); \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)
#define CUBLAS_OK(call)                                                                 \
  do {                                                                                  \
    const cublasStatus_t s_ = (call);                                                   \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                  \
      std::fprintf(stderr, "[rank %d] %s failed: status %d\n", p.rank, #call, (int)s_); \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

int run_cuda(const Options& opts, const Problem& p, std::vector<uint16_t>* out, Timings* t) {
  // One GPU per rank: the rank's index on its node. Every rank must have one, or all skip together.
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local = 0, ndev = 0;
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  if (cudaGetDeviceCount(&ndev) != cudaSuccess) ndev = 0;
  int have = local < ndev ? 1 : 0, all_have = 0;
  MPI_Allreduce(&have, &all_have, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_have) {
    if (p.rank == 0)
      std::printf(
          "moe_layer: SKIPPED --backend cuda: some rank has no GPU of its own (this rank sees %d; run at "
          "most one rank per GPU)\n",
          ndev);
    return 2;
  }
  CUDA_OK(cudaSetDevice(local));
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Owner<cudaStream_t, cudaStreamDestroy> stream_owner(stream);
  cublasHandle_t blas = nullptr;
  CUBLAS_OK(cublasCreate(&blas));
  const Owner<cublasHandle_t, cublasDestroy> blas_owner(blas);
  CUBLAS_OK(cublasSetStream(blas, stream));

  const int L = p.E / p.nranks;
  // Inputs and weights on the device (the weights as bf16).
  std::vector<uint16_t> w1(p.w1.size()), w2(p.w2.size());
  for (size_t i = 0; i < w1.size(); ++i) w1[i] = float_to_bf16(p.w1[i]);
  for (size_t i = 0; i < w2.size(); ++i) w2[i] = float_to_bf16(p.w2[i]);
  DevBuf d_logits, d_x, d_map, d_w, d_w1, d_w2, d_out, d_h, d_a, d_y;
  bitep::Group group_owner;  // owns the group once created; declared before the drain, so drained before it goes
  const StreamDrain drain{stream};
  CUDA_OK(d_logits.reserve(4 * p.logits.size() + 4));
  CUDA_OK(d_x.reserve(2 * p.x.size() + 2));
  CUDA_OK(d_map.reserve(p.T * ((p.E + 7) / 8) + 1));
  CUDA_OK(d_w.reserve(4 * p.T * p.k + 4));
  CUDA_OK(d_w1.reserve(2 * w1.size()));
  CUDA_OK(d_w2.reserve(2 * w2.size()));
  CUDA_OK(d_out.reserve(2 * p.T * p.H + 2));
  // The uploads on the stream that reads them: a cudaMemcpy from pageable memory may return before its data reaches
  // the device, and it is ordered with the legacy stream only, not with a non-blocking one.
  CUDA_OK(cudaMemcpyAsync(d_logits.ptr, p.logits.data(), 4 * p.logits.size(), cudaMemcpyHostToDevice, stream));
  CUDA_OK(cudaMemcpyAsync(d_x.ptr, p.x.data(), 2 * p.x.size(), cudaMemcpyHostToDevice, stream));
  CUDA_OK(cudaMemcpyAsync(d_w1.ptr, w1.data(), 2 * w1.size(), cudaMemcpyHostToDevice, stream));
  CUDA_OK(cudaMemcpyAsync(d_w2.ptr, w2.data(), 2 * w2.size(), cudaMemcpyHostToDevice, stream));
  CUDA_OK(cudaStreamSynchronize(stream));

  bitepGroupConfig_t gc = BITEP_GROUP_CONFIG_INIT;
  gc.backend = bitepBackendCuda;
  gc.num_experts = p.E;
  gc.topk = p.k;
  gc.hidden = p.H;
  gc.dtype = bitepBfloat16;
  gc.expert_alignment = kAlignment;
  gc.timeout_s = 120;
  gc.device = local;
  gc.low_latency_max_tokens = opts.low_latency ? static_cast<int>(p.T > 0 ? p.T : 1) : 0;
  bitepGroup_t group = nullptr;
  BITEP_OK(bitepGroupCreateMpi(MPI_COMM_WORLD, &gc, &group));
  group_owner = bitep::Group(group);
  bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
  rc.num_experts = p.E;
  rc.topk = p.k;
  const float one = 1.0f, zero = 0.0f;
  const bitepStream_t bs = reinterpret_cast<bitepStream_t>(stream);
  // The router's bitmap and compact weights, read by the dispatch: the same buffers every iteration.
  bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;
  ra.num_tokens = p.T;
  ra.logits = d_logits.ptr;
  ra.routing_map = d_map.ptr;
  ra.map_format = bitepMapBitmapU8;
  ra.topk_weights = static_cast<float*>(d_w.ptr);
  bitepDispatchArgs_t da = BITEP_DISPATCH_ARGS_INIT;
  da.num_tokens = p.T;
  da.x = d_x.ptr;
  da.routing_map = d_map.ptr;
  da.map_format = bitepMapBitmapU8;
  da.topk_weights = static_cast<const float*>(d_w.ptr);
  if (opts.low_latency) {
    // The decode path: one step = router -> bitepDispatchLowLatency -> the experts' kernel -> bitepCombine, with no
    // host wait inside; with --graph captured once and launched per iteration.
    // The y buffer is sized from a first call (a capture may not allocate): a capturable group's low-latency handles
    // have a fixed capacity of expert rows, the same for every call. A group without a peer window runs bitepDispatch
    // instead, whose rows follow the routing: there y grows before a call that needs more (never inside a capture).
    {
      bitepHandle_t h0 = nullptr;
      BITEP_OK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bs));
      BITEP_OK(bitepDispatchLowLatency(group, &da, bs, &h0));
      HandleOwner h0_owner(h0);
      bitepDispatchLayout_t lo;
      BITEP_OK(bitepHandleGetLayout(h0, &lo));
      CUDA_OK(d_y.reserve(2 * lo.num_expert_rows * p.H + 2));
      CUDA_OK(cudaStreamSynchronize(stream));
      BITEP_OK(bitepHandleDestroy(h0_owner.release()));
    }
    // Enqueues the experts and the combine of handle h (stage boundaries for the timings when sync).
    auto experts_and_combine = [&](bitepHandle_t h, bool sync, double* t_experts) -> int {
      bitepDispatchLayout_t lo;
      BITEP_OK(bitepHandleGetLayout(h, &lo));
      const size_t y_bytes = 2 * static_cast<size_t>(lo.num_expert_rows) * p.H + 2;
      if (y_bytes > d_y.bytes) {
        if (!sync) {  // inside the capture: a capturable group's capacity is fixed, so this is a defect
          std::fprintf(stderr, "rank %d: %lld expert rows in a capture, past the y buffer's %zu bytes\n", p.rank,
                       static_cast<long long>(lo.num_expert_rows), d_y.bytes);
          return 1;
        }
        CUDA_OK(d_y.reserve(y_bytes));
      }
      const double t0 = MPI_Wtime();
      if (lo.num_expert_rows > 0) {
        const int grid = static_cast<int>(lo.num_expert_rows < 4096 ? lo.num_expert_rows : 4096);
        expert_ffn_rows<<<grid, 256, 4 * (p.H + p.F), stream>>>(
            static_cast<const __nv_bfloat16*>(lo.expert_x), lo.expert_counts, lo.expert_offsets, L, p.rank * L,
            static_cast<const __nv_bfloat16*>(d_w1.ptr), static_cast<const __nv_bfloat16*>(d_w2.ptr), p.H, p.F,
            static_cast<__nv_bfloat16*>(d_y.ptr), lo.num_expert_rows);
        CUDA_OK(cudaGetLastError());
      }
      if (sync) {
        CUDA_OK(cudaStreamSynchronize(stream));
        *t_experts = MPI_Wtime() - t0;
      }
      bitepCombineArgs_t ca = BITEP_COMBINE_ARGS_INIT;
      ca.y = d_y.ptr;
      ca.weighted = 1;
      ca.out = d_out.ptr;
      BITEP_OK(bitepCombine(group, h, &ca, bs));
      return 0;
    };
    // Other inputs for every launch but the last (the logits and tokens negated), so that the checked output shows
    // each step routes and moves what the buffers hold when it runs.
    std::vector<float> logits_alt(p.logits.size());
    std::vector<uint16_t> x_alt(p.x.size());
    for (size_t i = 0; i < logits_alt.size(); ++i) logits_alt[i] = -p.logits[i];
    for (size_t i = 0; i < x_alt.size(); ++i) x_alt[i] = static_cast<uint16_t>(p.x[i] ^ 0x8000u);
    auto upload = [&](bool last) -> int {
      CUDA_OK(cudaMemcpyAsync(d_logits.ptr, last ? p.logits.data() : logits_alt.data(), 4 * p.logits.size(),
                              cudaMemcpyHostToDevice, stream));
      CUDA_OK(
          cudaMemcpyAsync(d_x.ptr, last ? p.x.data() : x_alt.data(), 2 * p.x.size(), cudaMemcpyHostToDevice, stream));
      CUDA_OK(cudaStreamSynchronize(stream));
      return 0;
    };
    if (!opts.graph) {
      for (int it = 0; it < opts.iters; ++it) {
        if (upload(it == opts.iters - 1)) return 1;
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        BITEP_OK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bs));
        CUDA_OK(cudaStreamSynchronize(stream));
        const double t1 = MPI_Wtime();
        bitepHandle_t h = nullptr;
        BITEP_OK(bitepDispatchLowLatency(group, &da, bs, &h));
        HandleOwner h_owner(h);
        CUDA_OK(cudaStreamSynchronize(stream));
        const double t2 = MPI_Wtime();
        double t_experts = 0;
        if (experts_and_combine(h, true, &t_experts)) return 1;
        CUDA_OK(cudaStreamSynchronize(stream));
        const double t4 = MPI_Wtime();
        BITEP_OK(bitepHandleDestroy(h_owner.release()));
        t->router += (t1 - t0) / opts.iters;
        t->dispatch += (t2 - t1) / opts.iters;
        t->experts += t_experts / opts.iters;
        t->combine += (t4 - t2 - t_experts) / opts.iters;
      }
    } else {
      int capturable = 0, all_capturable = 0;
      BITEP_OK(bitepGroupLowLatencyCapturable(group, &capturable));
      MPI_Allreduce(&capturable, &all_capturable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
      if (!all_capturable) {
        if (p.rank == 0)
          std::printf(
              "moe_layer: SKIPPED --graph: this group's low-latency calls run bitepDispatch (no peer window, "
              "BITEP_LSA=0, or a shape the receive kernel does not take), which no CUDA graph can hold\n");
        BITEP_OK(bitepGroupDestroy(group_owner.release()));
        return 2;
      }
      bitepHandle_t h = nullptr;  // the graph's: destroyed after it
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      const bitepResult_t rr = bitepRouterForward(bitepBackendCuda, &rc, &ra, bs);
      const bitepResult_t rd = rr == bitepSuccess ? bitepDispatchLowLatency(group, &da, bs, &h) : rr;
      double unused = 0;
      const int rx = rd == bitepSuccess ? experts_and_combine(h, false, &unused) : 1;
      const cudaError_t re = cudaStreamEndCapture(stream, &graph);
      // Destroyed in reverse: the exec and the graph before the handle whose buffers they use.
      HandleOwner h_owner(h);
      Owner<cudaGraph_t, cudaGraphDestroy> graph_owner(graph);
      BITEP_OK(rr);
      BITEP_OK(rd);
      if (rx) return 1;
      CUDA_OK(re);
      CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
      Owner<cudaGraphExec_t, cudaGraphExecDestroy> exec_owner(exec);
      for (int it = 0; it < opts.iters; ++it) {
        if (upload(it == opts.iters - 1)) return 1;
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        t->step += (MPI_Wtime() - t0) / opts.iters;
      }
      CUDA_OK(cudaGraphExecDestroy(exec_owner.release()));
      CUDA_OK(cudaGraphDestroy(graph_owner.release()));
      // Waits for the device: the library does not see the graph's launches.
      BITEP_OK(bitepHandleDestroy(h_owner.release()));
    }
    out->resize(p.T * p.H);
    CUDA_OK(cudaMemcpy(out->data(), d_out.ptr, 2 * out->size(), cudaMemcpyDeviceToHost));
    BITEP_OK(bitepGroupDestroy(group_owner.release()));
    return 0;
  }
  for (int it = 0; it < opts.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    BITEP_OK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bs));
    CUDA_OK(cudaStreamSynchronize(stream));
    const double t1 = MPI_Wtime();
    bitepHandle_t handle = nullptr;
    BITEP_OK(bitepDispatch(group, &da, bs, &handle));
    HandleOwner handle_owner(handle);
    bitepDispatchLayout_t lo;
    BITEP_OK(bitepHandleGetLayout(handle, &lo));
    CUDA_OK(cudaStreamSynchronize(stream));
    const double t2 = MPI_Wtime();
    const int64_t N = lo.num_expert_rows;
    CUDA_OK(d_h.reserve(4 * N * p.F + 4));
    CUDA_OK(d_a.reserve(2 * N * p.F + 2));
    CUDA_OK(d_y.reserve(2 * N * p.H + 2));
    int64_t off = 0;
    for (int l = 0; l < L; ++l) {
      const int m = static_cast<int>(lo.expert_counts_host[l]);
      const int e = p.rank * L + l;
      if (m > 0) {
        const char* xl = static_cast<const char*>(lo.expert_x) + 2 * off * p.H;
        float* hl = static_cast<float*>(d_h.ptr) + off * p.F;
        __nv_bfloat16* al = static_cast<__nv_bfloat16*>(d_a.ptr) + off * p.F;
        char* yl = static_cast<char*>(d_y.ptr) + 2 * off * p.H;
        const char* w1e = static_cast<const char*>(d_w1.ptr) + 2 * static_cast<size_t>(e) * p.F * p.H;
        const char* w2e = static_cast<const char*>(d_w2.ptr) + 2 * static_cast<size_t>(e) * p.H * p.F;
        // Row-major h[m, F] = x[m, H] W1^T: column-major h^T = W1 x^T.
        CUBLAS_OK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, p.F, m, p.H, &one, w1e, CUDA_R_16BF, p.H, xl,
                               CUDA_R_16BF, p.H, &zero, hl, CUDA_R_32F, p.F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        const int64_t n = static_cast<int64_t>(m) * p.F;
        gelu_to_bf16<<<static_cast<int>((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096), 256, 0, stream>>>(hl, al, n);
        CUDA_OK(cudaGetLastError());
        // Row-major y[m, H] = a[m, F] W2^T.
        CUBLAS_OK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, p.H, m, p.F, &one, w2e, CUDA_R_16BF, p.F, al,
                               CUDA_R_16BF, p.F, &zero, yl, CUDA_R_16BF, p.H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      off += (lo.expert_counts_host[l] + kAlignment - 1) / kAlignment * kAlignment;
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    const double t3 = MPI_Wtime();
    bitepCombineArgs_t ca = BITEP_COMBINE_ARGS_INIT;
    ca.y = d_y.ptr;
    ca.weighted = 1;
    ca.out = d_out.ptr;
    BITEP_OK(bitepCombine(group, handle, &ca, bs));
    CUDA_OK(cudaStreamSynchronize(stream));
    const double t4 = MPI_Wtime();
    BITEP_OK(bitepHandleDestroy(handle_owner.release()));
    t->router += (t1 - t0) / opts.iters;
    t->dispatch += (t2 - t1) / opts.iters;
    t->experts += (t3 - t2) / opts.iters;
    t->combine += (t4 - t3) / opts.iters;
  }
  out->resize(p.T * p.H);
  CUDA_OK(cudaMemcpy(out->data(), d_out.ptr, 2 * out->size(), cudaMemcpyDeviceToHost));
  BITEP_OK(bitepGroupDestroy(group_owner.release()));
  return 0;
}
