// SPDX-License-Identifier: Apache-2.0
// Router backward of the post-top-k softmax (TE's default) from its routed experts, either tensor: the kernel
// router_backward_bucket.cuh's launch_bucket takes from 4 octets a lane (E > 512), and from 2 (E > 256) for the
// recompute.
#include <atomic>

#include "kernels/router.h"
#include "kernels/router_common.cuh"
#include "kernels/router_lane_map.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// ---- the post-top-k softmax's backward from its routed experts (either tensor) ----------------------------------
// The kSparse bucket kernel still takes every element slot of a lane (N of them) through the softmax, the dot product
// and the gradient; here each routed expert's values are loaded, and its exp, product and gradient taken, once, by
// one lane (bf16 recompute at E = 2048, k = 32: 64 exps a lane a token there, 1 here). Taken from 4 octets a lane, and
// from 2 for the recompute (launch_bucket): at one octet a lane the gather costs more than the N = 8 element slots it
// saves, and at two the saved mode's 16 (no exps) about what it saves (measured: bench/NOTES.md, router v17).
//
// The gather: each lane (as an owner) counts its routed elements; a scan over the token's segment gives each its first
// place; the owners write their experts there (shared memory, ascending within an owner), and lane j of the segment
// takes the segment's j-th: K <= G routed experts a token (k <= 32 at G = 32).
// The sums keep the per-element kernels' order, so the any-path kernel's bits: each owner adds its own routed
// elements' terms in element order, fetched back from the lanes that computed them (a shuffle a round, as many rounds
// as the warp's busiest owner has routed elements), then the segment's butterfly. The maximum is that of the same
// values (fmaxf, NaN ignored; +0 and -0 give the same differences). The owners write their octets as zeros, then the
// routed values go over them after a __syncwarp, which orders a warp's memory accesses.
// A tile where some token has more than G routed experts is taken an octet at a time (by_octets: passes over a lane's
// octets in the same order of operations, the loads again from L1 / L2).
// Blocks per SM it is held to: 3 (80 registers; ptxas took 128 at NS = 2 unbounded), 2 at NS = 8 (up to 122 there,
// 28 bytes spilled at 80), 4 for the bf16 recompute at NS = 2 (64 registers, 40 bytes spilled; H200, T = 65536
// E = 512: 48.2 against 50.7 us at 3, and 0.90-0.92x at T = 4096 and 16384; fp32 at 4 spilled 160 bytes and was
// 1.16-1.20x slower, the saved mode there 0.98-1.00x). BITEP_ROUTER_BWD_ROUTED_BLOCKS (a tuning build) sets it for
// every instance.
template <int NS, bool kF32, bool kSaved>
constexpr int routed_min_blocks() {
#ifdef BITEP_ROUTER_BWD_ROUTED_BLOCKS
  return BITEP_ROUTER_BWD_ROUTED_BLOCKS;
#else
  return NS >= 8 ? 2 : (NS == 2 && !kF32 && !kSaved ? 4 : 3);
#endif
}

template <int G, int NS, bool kF32, bool kSaved>
__global__ void __launch_bounds__(kBucketThreads, routed_min_blocks<NS, kF32, kSaved>())
    router_backward_routed(const RouterBackwardParams p, const int64_t num_tiles) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  using Mask = typename std::conditional<(8 * NS > 32), unsigned long long, uint32_t>::type;
  __shared__ int gather_smem[kWarps][kWarpSize];  // a tile's routed experts, token segment after segment

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sl = lane % G, tl = lane / G;
  const int E = p.num_experts;
  const DType dt = kF32 ? DType::kF32 : DType::kBF16;
  const int esize = kF32 ? 4 : 2;
  const float scale = p.scaling_factor;
  const LaneMap<G, NS> lane_map(p, lane);
  int* const gather = gather_smem[warp];

  // The owners' terms summed as the per-element kernels do: each owner's own in element order, then the butterfly.
  auto owner_sum = [&](float v, int c, int first, int rounds) {
    float s = 0.0f;
    for (int q = 0; q < rounds; ++q) {
      const float u = __shfl_sync(kFullMask, v, first + q, G);
      if (q < c) s = __fadd_rn(s, u);
    }
    return seg_sum_f32<G>(s);
  };

  // A tile with more than G routed experts in a token: a lane's octets one at a time.
  auto by_octets = [&](int64_t t, Mask routed) {
    const int64_t row = t * E;
    const bool tv = t < p.num_tokens;
    const bool gvec = tv && aligned16(p.grad_probs + row);
    const bool avec =
        tv && (kSaved ? aligned16(p.saved + row) : aligned16(static_cast<const char*>(p.logits) + row * esize));
    auto octet_in = [&](int s, float* x) {
      const int64_t off = row + (s * G + sl) * 8;
      if constexpr (kSaved) {
        load_octet_f32(p.saved + off, lane_map.octet_n(t, s), avec, x);
      } else {
        RawOctet r;
        load_raw_t<kF32>(p.logits, dt, off, lane_map.octet_n(t, s), avec, r);
        decode_raw_t<kF32>(dt, r, x);
      }
    };
    auto bits = [&](int s) { return static_cast<uint32_t>(routed >> (8 * s)) & 0xffu; };
    auto each_routed_input = [&](auto f) {  // f(x) for each routed element's saved / logit value, in element order
#pragma unroll 1
      for (int s = 0; s < NS; ++s) {
        const uint32_t rb = bits(s);
        if (rb == 0) continue;
        float x[8];
        octet_in(s, x);
#pragma unroll
        for (int b = 0; b < 8; ++b)
          if ((rb >> b) & 1) f(x[b]);
      }
    };
    float m = -INFINITY, r = 1.0f;
    if constexpr (!kSaved) {
      each_routed_input([&](float x) { m = fmaxf(m, x); });
      m = seg_max_f32<G>(m);
      float sum = 0.0f;
      each_routed_input([&](float x) { sum = __fadd_rn(sum, expf(x - m)); });
      r = __frcp_rn(seg_sum_f32<G>(sum));
    }
    auto act = [&](float x) { return kSaved ? x : __fmul_rn(expf(x - m), r); };
    float dot = 0.0f;
#pragma unroll 1
    for (int s = 0; s < NS; ++s) {
      const uint32_t rb = bits(s);
      if (rb == 0) continue;
      float x[8], g[8];
      octet_in(s, x);
      load_octet_f32(p.grad_probs + row + (s * G + sl) * 8, lane_map.octet_n(t, s), gvec, g);
#pragma unroll
      for (int b = 0; b < 8; ++b)
        if ((rb >> b) & 1) dot = __fadd_rn(dot, __fmul_rn(__fmul_rn(g[b], scale), act(x[b])));
    }
    dot = seg_sum_f32<G>(dot);
    const bool ovec = tv && aligned16(static_cast<char*>(p.grad_logits) + row * esize);
#pragma unroll 1
    for (int s = 0; s < NS; ++s) {
      const int n = lane_map.octet_n(t, s);
      if (n == 0) continue;
      const uint32_t rb = bits(s);
      float x[8], g[8];  // g: then the octet's gradient
      if (rb != 0) {
        octet_in(s, x);
        load_octet_f32(p.grad_probs + row + (s * G + sl) * 8, n, gvec, g);
      }
#pragma unroll
      for (int b = 0; b < 8; ++b)
        g[b] = (rb >> b) & 1 ? __fmul_rn(act(x[b]), __fsub_rn(__fmul_rn(g[b], scale), dot)) : 0.0f;
      store_octet_t<kF32>(p.grad_logits, dt, row + (s * G + sl) * 8, n, ovec, g);
    }
  };

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  uint2 map_next[NS];
  lane_map.fetch(first * kTokensPerWarp + tl, map_next);
  for (int64_t tile = first; tile < num_tiles; tile += stride) {
    const int64_t t = tile * kTokensPerWarp + tl;
    Mask routed = 0;
#pragma unroll
    for (int s = 0; s < NS; ++s) routed |= static_cast<Mask>(lane_map.bits(t, s, map_next[s])) << (8 * s);
    lane_map.fetch(t + stride * kTokensPerWarp, map_next);
    const int c =
        sizeof(Mask) == 8 ? __popcll(static_cast<unsigned long long>(routed)) : __popc(static_cast<uint32_t>(routed));
    int incl = c;
#pragma unroll
    for (int d = 1; d < G; d <<= 1) {
      const int y = __shfl_up_sync(kFullMask, incl, d, G);
      if (sl >= d) incl += y;
    }
    const int K = __shfl_sync(kFullMask, incl, G - 1, G);  // the token's routed experts
    const int before = incl - c;
    if (!__all_sync(kFullMask, K <= G)) {
      by_octets(t, routed);
      continue;
    }
    const int rounds = static_cast<int>(seg_max_u32<kWarpSize>(static_cast<uint32_t>(c)));
    __syncwarp();  // the previous tile's reads of `gather` before these writes
    Mask left = routed;
    for (int q = 0; q < rounds; ++q) {
      if (q < c) {
        const int i = sizeof(Mask) == 8 ? __ffsll(static_cast<long long>(left)) - 1 : __ffs(static_cast<int>(left)) - 1;
        gather[tl * G + before + q] = (i >> 3) * 8 * G + sl * 8 + (i & 7);
        left &= left - 1;
      }
    }
    __syncwarp();
    const bool has = sl < K;
    const int e = has ? gather[lane] : 0;
    const int64_t row = t * E;
    float g = 0.0f, a = 0.0f;  // a: the forward's softmax output at e (the logit, until recomputed)
    if (has) {
      g = __ldg(p.grad_probs + row + e);
      a = kSaved ? __ldg(p.saved + row + e) : load_one(p.logits, dt, row + e);
    }
    if constexpr (!kSaved) {
      const float m = seg_max_f32<G>(has ? a : -INFINITY);
      const float ex = expf(a - m);
      a = __fmul_rn(ex, __frcp_rn(owner_sum(ex, c, before, rounds)));
    }
    const float gs = __fmul_rn(g, scale);
    const float dot = owner_sum(__fmul_rn(gs, a), c, before, rounds);
    const bool ovec = t < p.num_tokens && aligned16(static_cast<char*>(p.grad_logits) + row * esize);
    const float zero[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int n = lane_map.octet_n(t, s);
      if (n > 0) store_octet_t<kF32>(p.grad_logits, dt, row + (s * G + sl) * 8, n, ovec, zero);
    }
    __syncwarp();  // the zeros before the routed values over them
    if (has) store_one(p.grad_logits, dt, row + e, __fmul_rn(a, __fsub_rn(gs, dot)));
  }
}

template <int G, int NS, bool kF32, bool kSaved>
cudaError_t launch_t(const RouterBackwardParams& p, cudaStream_t stream) {
  static std::atomic<int> occupancy{0};
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  auto kernel = router_backward_routed<G, NS, kF32, kSaved>;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), kBucketThreads, &occupancy);
  const int64_t tiles = (p.num_tokens + kTokensPerWarp - 1) / kTokensPerWarp;
  return launch_maybe_dependent(p.pdl, kernel, dim3(persistent_grid(tiles, kWarps, sms, per_sm)), dim3(kBucketThreads),
                                0, stream, p, tiles);
}

}  // namespace

// The shapes launch_bucket gives it: the recompute from 2 octets a lane, the saved mode from 4 (at 2 it takes the
// kSparse bucket kernel, so no instance of it is compiled here); else cudaErrorInvalidValue.
cudaError_t launch_router_backward_routed(const RouterBackwardParams& p, cudaStream_t stream) {
  return with_bucket(bucket_of(p.num_experts), [&](auto g, auto ns) {
    constexpr int G = decltype(g)::value, NS = decltype(ns)::value;
    if constexpr (NS >= 2) {
      const bool f32 = p.logits_dtype == DType::kF32;
      if (p.saved == nullptr)
        return f32 ? launch_t<G, NS, true, false>(p, stream) : launch_t<G, NS, false, false>(p, stream);
      if constexpr (NS >= 4)
        return f32 ? launch_t<G, NS, true, true>(p, stream) : launch_t<G, NS, false, true>(p, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace bitep::kernels
