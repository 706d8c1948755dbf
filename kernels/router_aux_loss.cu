// SPDX-License-Identifier: Apache-2.0
// Aux loss (kernels/router.h): loss = C * sum_e tokens_per_expert[e] * sum_t probs[t, e], C =
// aux_loss_scale(), and its gradient grad_probs[t, e] = C * grad_loss * tokens_per_expert[e].
//
// The forward is deterministic without float atomics and without scratch memory: one thread block
// cluster (16 blocks where the device allows a non-portable cluster, else 8; 1 block before sm_90)
// reads probs once; every thread accumulates a fixed set of elements in a fixed order in fp64, each
// block reduces its threads in a fixed tree, and block 0 adds the blocks' partials in rank order
// through distributed shared memory. Same device, same shapes: bit-identical results run to run.
#include <cooperative_groups.h>

#include "kernels/router.h"
#include "kernels/router_common.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;
namespace cg = cooperative_groups;

[[maybe_unused]] constexpr char kName[] = "router_aux_loss";
constexpr int kLossThreads = 1024;
constexpr int kGradThreads = 256;

// Column tracker over a flat [T, E] index that advances by a fixed stride: col = i % E without a
// division per step (stride % E < E, so one conditional subtraction).
struct Column {
  int col, step, num;
  __device__ Column(int64_t i, int64_t stride, int E)
      : col(static_cast<int>(i % E)), step(static_cast<int>(stride % E)), num(E) {}
  __device__ __forceinline__ void advance() {
    col += step;
    if (col >= num) col -= num;
  }
};

__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double r = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) r += __shfl_xor_sync(kFullMask, r, d);
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kLossThreads) aux_loss_forward_kernel(const float* __restrict__ probs,
                                                                        const int32_t* __restrict__ tokens_per_expert,
                                                                        int64_t n,
                                                                        int E,
                                                                        float scale,
                                                                        float* loss) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  __shared__ double scratch[32];
  __shared__ double partial;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  int64_t done = 0;
  if (aligned16(probs) && E >= 1) {  // float4 over the flat array, then the n % 4 tail
    const int64_t nv = n / 4;
    Column c0(4 * gtid, 4 * threads, E), c1(4 * gtid + 1, 4 * threads, E), c2(4 * gtid + 2, 4 * threads, E),
        c3(4 * gtid + 3, 4 * threads, E);
    const float4* p4 = reinterpret_cast<const float4*>(probs);
    for (int64_t i = gtid; i < nv; i += threads) {
      const float4 q = __ldg(p4 + i);
      acc += static_cast<double>(q.x) * __ldg(tokens_per_expert + c0.col);
      acc += static_cast<double>(q.y) * __ldg(tokens_per_expert + c1.col);
      acc += static_cast<double>(q.z) * __ldg(tokens_per_expert + c2.col);
      acc += static_cast<double>(q.w) * __ldg(tokens_per_expert + c3.col);
      c0.advance(), c1.advance(), c2.advance(), c3.advance();
    }
    done = 4 * nv;
  }
  {
    Column c(done + gtid, threads, E);
    for (int64_t i = done + gtid; i < n; i += threads) {
      acc += static_cast<double>(__ldg(probs + i)) * __ldg(tokens_per_expert + c.col);
      c.advance();
    }
  }
  const double block_total = block_sum_f64(acc, scratch);
  if (threadIdx.x == 0) partial = block_total;
  double total = block_total;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.x > 1) {  // launched as one cluster: block 0 adds the partials in rank order
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    if (cluster.block_rank() == 0 && threadIdx.x == 0) {
      total = 0.0;
      for (unsigned r = 0; r < cluster.num_blocks(); ++r) total += *cluster.map_shared_rank(&partial, r);
    }
    cluster.sync();  // keep every block's shared memory alive until block 0 has read it
  }
#endif
  if (blockIdx.x == 0 && threadIdx.x == 0) loss[0] = static_cast<float>(total * static_cast<double>(scale));
}

__global__ void __launch_bounds__(kGradThreads) aux_loss_backward_kernel(float* __restrict__ grad,
                                                                         const int32_t* __restrict__ tokens_per_expert,
                                                                         const float* __restrict__ grad_loss,
                                                                         int64_t n,
                                                                         int E,
                                                                         float scale) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  const float c = __fmul_rn(scale, __ldg(grad_loss));
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto value = [&](int col) { return __fmul_rn(c, static_cast<float>(__ldg(tokens_per_expert + col))); };
  int64_t done = 0;
  if (aligned16(grad)) {
    const int64_t nv = n / 4;
    Column c0(4 * gtid, 4 * threads, E), c1(4 * gtid + 1, 4 * threads, E), c2(4 * gtid + 2, 4 * threads, E),
        c3(4 * gtid + 3, 4 * threads, E);
    float4* g4 = reinterpret_cast<float4*>(grad);
    for (int64_t i = gtid; i < nv; i += threads) {
      g4[i] = make_float4(value(c0.col), value(c1.col), value(c2.col), value(c3.col));
      c0.advance(), c1.advance(), c2.advance(), c3.advance();
    }
    done = 4 * nv;
  }
  Column cc(done + gtid, threads, E);
  for (int64_t i = done + gtid; i < n; i += threads) {
    grad[i] = value(cc.col);
    cc.advance();
  }
}

// Blocks of the loss cluster on this device (cached): 16 if a non-portable cluster of 16 fits, else 8;
// 1 without clusters.
int loss_blocks() {
  static std::atomic<int> cache[kMaxCachedDevices];
  int blocks = 1;
  const cudaError_t err = cached_per_device(
      cache,
      [](int dev, int* out) {
        int major = 0;
        *out = 1;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9) {
          *out = 8;
          if (cudaFuncSetAttribute(aux_loss_forward_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
              cudaSuccess) {
            cudaLaunchConfig_t cfg = {};
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = 16, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
            cfg.gridDim = dim3(16), cfg.blockDim = dim3(kLossThreads), cfg.attrs = attr, cfg.numAttrs = 1;
            int clusters = 0;
            if (cudaOccupancyMaxActiveClusters(&clusters, aux_loss_forward_kernel, &cfg) == cudaSuccess && clusters > 0)
              *out = 16;
          }
        }
        (void)cudaGetLastError();
        return cudaSuccess;
      },
      &blocks);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return blocks;
}

}  // namespace

// T = 0 still writes the loss (0): src/router.cc passes an empty forward through to the backend.
cudaError_t launch_aux_loss_forward(const AuxLossParams& p, cudaStream_t stream) {
  const int64_t n = p.num_tokens > 0 ? p.num_tokens * p.num_experts : 0;
  const float scale = aux_loss_scale(p);
  const int blocks = loss_blocks();
  if (blocks == 1)
    return launch_maybe_dependent(p.pdl, aux_loss_forward_kernel, dim3(1), dim3(kLossThreads), 0, stream, p.probs,
                                  p.tokens_per_expert, n, p.num_experts, scale, p.loss);
  // A cluster: sm_90+, where the dependent launch is too.
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = blocks, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  attr[1] = dependent_launch_attribute();
  cfg.gridDim = dim3(blocks), cfg.blockDim = dim3(kLossThreads), cfg.dynamicSmemBytes = 0, cfg.stream = stream;
  cfg.attrs = attr, cfg.numAttrs = p.pdl ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, aux_loss_forward_kernel, p.probs, p.tokens_per_expert, n, p.num_experts, scale,
                            p.loss);
}

cudaError_t launch_aux_loss_backward(const AuxLossParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return cudaSuccess;
  const int64_t n = p.num_tokens * p.num_experts;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const unsigned grid = persistent_grid((n + 3) / 4, kGradThreads, sms, 8);
  return launch_maybe_dependent(p.pdl, aux_loss_backward_kernel, dim3(grid), dim3(kGradThreads), 0, stream,
                                p.grad_probs, p.tokens_per_expert, p.grad_loss, n, p.num_experts, aux_loss_scale(p));
}

}  // namespace bitep::kernels
