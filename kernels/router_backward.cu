// SPDX-License-Identifier: Apache-2.0
// Router backward (kernels/router.h): grad_probs -> grad_logits, from the forward's saved fp32 tensor
// (TE-compatible) or recomputed from the logits (recompute mode: reads 2 bytes per expert instead of
// 4 for bf16 logits). Top-k router and aux-loss scores. Formulas: src/host/router_host.cc.
//
// E <= 2048: the forward's warp-per-token layout (router_common.cuh), so the recomputed softmax is the any-path
// forward's, bit for bit (seg_softmax, branch-free, on the same lanes); the forward's post-top-k softmax kernels
// (E 33-2048, router_topk_kernel.cuh's holders) sum in round order, within a few ulps of it. The bucket kernel's
// post-top-k softmax recompute at one octet a lane (E 33-256) takes its exps by __expf, its sum and dot product in one
// butterfly, and for bf16 logits no maximum where the logits allow: within the gradient tolerance of the any-path
// kernel's. Each bucket's entry (router_backward_launch.h) and its instances are compiled in a
// kernels/router_backward_g<G>x<NS>.cu of their own (router_backward_bucket.cuh); the post-top-k softmax from 2 octets
// a lane: router_backward_routed.cu.
// Larger E: one block per token, with the generic forward's block reductions (below).
#include "kernels/router.h"
#include "kernels/router_backward_launch.h"
#include "kernels/router_common.cuh"

namespace bitep::kernels {

namespace router_detail {
thread_local int t_backward_kernel = -2;
}  // namespace router_detail

namespace {

using namespace router_detail;

constexpr int kGenericThreads = 256;

// One block per token (E > 2048); the reductions are the generic forward's (router_generic.cu).
__global__ void __launch_bounds__(kGenericThreads) router_backward_generic(const RouterBackwardParams p) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  __shared__ float scratch[32];
  const int E = p.num_experts;
  const DType dt = p.logits_dtype;
  const ScoreFn fn = p.score_fn;
  const ScorePath path = score_path(p);
  const bool aux = path.aux, softmax = path.softmax, pre = path.pre, norm = path.norm;
  const bool bitmap = p.map_format == MapFormat::kBitmap;
  const int map_row = bitmap ? map_bytes_of(E) : E;
  const float scale = p.scaling_factor;

  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    const int64_t row = t * E;
    auto routed = [&](int e) {
      if (aux) return true;
      if (bitmap) return ((__ldg(p.routing_map + t * map_row + e / 8) >> (e % 8)) & 1) != 0;
      return __ldg(p.routing_map + row + e) != 0;
    };
    auto x_of = [&](int e) { return p.saved != nullptr ? __ldg(p.saved + row + e) : load_one(p.logits, dt, row + e); };
    float mx = 0.0f, sum = 1.0f;
    if (p.saved == nullptr && softmax) {  // the forward's softmax statistics (all experts, or the routed)
      float m = -INFINITY;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (pre || routed(e)) m = fmaxf(m, x_of(e));
      mx = block_max_f32(m, scratch);
      float s = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (pre || routed(e)) s = __fadd_rn(s, softmax_exp(x_of(e), mx, pre));
      sum = block_sum_f32(s, scratch);
    }
    auto act = [&](int e) {  // sigmoid: y; sqrtsoftplus: x; softmax: the probability
      const float v = x_of(e);
      if (p.saved != nullptr) return v;
      if (fn == ScoreFn::kSigmoid) return sigmoid_f(v);
      if (softmax) return (pre || routed(e)) ? softmax_exp(v, mx, pre) / sum : -INFINITY;
      return v;
    };
    auto y_of = [&](float a) { return fn == ScoreFn::kSigmoid ? a : sqrtsoftplus_f(a); };
    auto g0 = [&](int e) {
      const float g = __ldg(p.grad_probs + row + e);
      return aux ? g : (routed(e) ? __fmul_rn(g, scale) : 0.0f);
    };
    float d = 1.0f, dd = 1.0f, ndot = 0.0f;
    if (norm) {
      float s = 0.0f, dot = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (routed(e)) {
          const float y = y_of(act(e));
          s = __fadd_rn(s, y);
          dot = __fadd_rn(dot, __fmul_rn(g0(e), y));
        }
      d = __fadd_rn(block_sum_f32(s, scratch), kNormEpsilon);
      ndot = block_sum_f32(dot, scratch);
      dd = __fmul_rn(d, d);
    }
    auto g1 = [&](int e) {
      if (!norm) return g0(e);
      return routed(e) ? __fsub_rn(g0(e) / d, ndot / dd) : 0.0f;
    };
    float sdot = 0.0f;
    if (softmax) {
      float dot = 0.0f;
      for (int e = threadIdx.x; e < E; e += blockDim.x)
        if (pre || routed(e)) dot = __fadd_rn(dot, __fmul_rn(g1(e), act(e)));
      sdot = block_sum_f32(dot, scratch);
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      float g = g1(e);
      const float a = act(e);
      if (softmax) {
        g = (pre || routed(e)) ? __fmul_rn(a, __fsub_rn(g, sdot)) : 0.0f;
      } else if (fn == ScoreFn::kSigmoid) {
        g = __fmul_rn(g, p.saved == nullptr ? sigmoid_grad_f(x_of(e)) : __fmul_rn(a, __fsub_rn(1.0f, a)));
      } else {
        g = __fmul_rn(g, sqrtsoftplus_grad_f(a));
      }
      store_one(p.grad_logits, dt, row + e, g);
    }
  }
}

}  // namespace

cudaError_t launch_router_backward(const RouterBackwardParams& p, cudaStream_t stream) {
  t_backward_kernel = -2;
  if (p.num_tokens <= 0) return cudaSuccess;
  const int bucket = bucket_of(p.num_experts);
  if (bucket >= 0)
    return with_bucket(
        bucket, [&](auto g, auto ns) { return launch_backward<decltype(g)::value, decltype(ns)::value>(p, stream); });
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t want = static_cast<int64_t>(sms) * 8;
  const unsigned grid = static_cast<unsigned>(p.num_tokens < want ? p.num_tokens : want);
  t_backward_kernel = -1;
  return launch_maybe_dependent(p.pdl, router_backward_generic, dim3(grid), dim3(kGenericThreads), 0, stream, p);
}

int last_router_backward_kernel() { return router_detail::t_backward_kernel; }

}  // namespace bitep::kernels
