// SPDX-License-Identifier: Apache-2.0
// The cuda backend of examples/moe_layer: router, dispatch and combine by bitep on the GPU (NCCL between
// ranks), the experts as two cuBLAS GEMMs per local expert with a GELU kernel between them.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mpi.h>

#include <cstdio>

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
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t blas;
  CUBLAS_OK(cublasCreate(&blas));
  CUBLAS_OK(cublasSetStream(blas, stream));

  const int L = p.E / p.nranks;
  // Inputs and weights on the device (the weights as bf16).
  std::vector<uint16_t> w1(p.w1.size()), w2(p.w2.size());
  for (size_t i = 0; i < w1.size(); ++i) w1[i] = float_to_bf16(p.w1[i]);
  for (size_t i = 0; i < w2.size(); ++i) w2[i] = float_to_bf16(p.w2[i]);
  DevBuf d_logits, d_x, d_map, d_w, d_w1, d_w2, d_out, d_h, d_a, d_y;
  CUDA_OK(d_logits.reserve(4 * p.logits.size() + 4));
  CUDA_OK(d_x.reserve(2 * p.x.size() + 2));
  CUDA_OK(d_map.reserve(p.T * ((p.E + 7) / 8) + 1));
  CUDA_OK(d_w.reserve(4 * p.T * p.k + 4));
  CUDA_OK(d_w1.reserve(2 * w1.size()));
  CUDA_OK(d_w2.reserve(2 * w2.size()));
  CUDA_OK(d_out.reserve(2 * p.T * p.H + 2));
  CUDA_OK(cudaMemcpy(d_logits.ptr, p.logits.data(), 4 * p.logits.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_x.ptr, p.x.data(), 2 * p.x.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_w1.ptr, w1.data(), 2 * w1.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_w2.ptr, w2.data(), 2 * w2.size(), cudaMemcpyHostToDevice));

  bitepGroupConfig_t gc = BITEP_GROUP_CONFIG_INIT;
  gc.backend = bitepBackendCuda;
  gc.num_experts = p.E;
  gc.topk = p.k;
  gc.hidden = p.H;
  gc.dtype = bitepBfloat16;
  gc.expert_alignment = kAlignment;
  gc.timeout_s = 120;
  gc.device = local;
  bitepGroup_t group = nullptr;
  BITEP_OK(bitepGroupCreateMpi(MPI_COMM_WORLD, &gc, &group));
  bitepRouterConfig_t rc = BITEP_ROUTER_CONFIG_INIT;
  rc.num_experts = p.E;
  rc.topk = p.k;
  const float one = 1.0f, zero = 0.0f;
  const bitepStream_t bs = reinterpret_cast<bitepStream_t>(stream);
  for (int it = 0; it < opts.iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    bitepRouterForwardArgs_t ra = BITEP_ROUTER_FWD_ARGS_INIT;
    ra.num_tokens = p.T;
    ra.logits = d_logits.ptr;
    ra.routing_map = d_map.ptr;
    ra.map_format = bitepMapBitmapU8;
    ra.topk_weights = static_cast<float*>(d_w.ptr);
    BITEP_OK(bitepRouterForward(bitepBackendCuda, &rc, &ra, bs));
    CUDA_OK(cudaStreamSynchronize(stream));
    const double t1 = MPI_Wtime();
    bitepDispatchArgs_t da = BITEP_DISPATCH_ARGS_INIT;
    da.num_tokens = p.T;
    da.x = d_x.ptr;
    da.routing_map = d_map.ptr;
    da.map_format = bitepMapBitmapU8;
    da.topk_weights = static_cast<const float*>(d_w.ptr);
    bitepHandle_t handle = nullptr;
    BITEP_OK(bitepDispatch(group, &da, bs, &handle));
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
    BITEP_OK(bitepHandleDestroy(handle));
    t->router += (t1 - t0) / opts.iters;
    t->dispatch += (t2 - t1) / opts.iters;
    t->experts += (t3 - t2) / opts.iters;
    t->combine += (t4 - t3) / opts.iters;
  }
  out->resize(p.T * p.H);
  CUDA_OK(cudaMemcpy(out->data(), d_out.ptr, 2 * out->size(), cudaMemcpyDeviceToHost));
  BITEP_OK(bitepGroupDestroy(group));
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
  return 0;
}
