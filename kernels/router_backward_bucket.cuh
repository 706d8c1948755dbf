// SPDX-License-Identifier: Apache-2.0
// Router backward, one bucket's launch (router_backward_launch.h): the warp-per-token kernel (its staging, the score
// paths compiled in, the post-top-k softmax from its routed octets) and the instance the launch's score path, dtype and
// alignment pick, or router_backward_routed (router_backward_routed.cu). Included by the
// kernels/router_backward_g<G>x<NS>.cu files alone, each for its bucket's entry (an anonymous namespace: each its own
// copy of the device code, and each instance compiled in one of them).
#pragma once

#include <atomic>
#include <cfloat>

#include "kernels/router.h"
#include "kernels/router_backward_launch.h"
#include "kernels/router_common.cuh"
#include "kernels/router_lane_map.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// ---- staging: the next tile's rows land in shared memory while this tile computes ----------------
// Taken from 2 octets a lane (E > 256; launch_bucket) when E % 8 == 0 and grad_probs, saved / logits (16 bytes) and a
// bytemap (8 bytes) are aligned: a warp's tile (its 32 / G tokens) is then one contiguous, aligned range of each
// tensor, which its lanes copy in 16-byte pieces in order (cp.async: every load instruction covers 512 contiguous
// bytes, whatever lane owns the octets), into the same row layout in the warp's part of shared memory.
// Each lane then reads its own octets back. The warp copies tile i + 1 into the bytes it has just
// read tile i from: __syncwarp after cp.async.wait_all publishes the copies to every lane, and
// __syncwarp after the reads orders them before the next copies. A bitmap row (E / 8 bytes, any
// alignment) is read a tile ahead into registers instead, a byte per lane and slot.
template <int NS>
__host__ __device__ constexpr int stage_elems() {  // the most elements of one tensor a warp's tile holds
  return kWarpSize * 8 * NS;
}

template <int NS>
size_t stage_bytes(bool bytemap) {  // grad_probs (fp32), saved or logits (up to 4 bytes), bytemap
  constexpr int kWarps = kBucketThreads / kWarpSize;
  return static_cast<size_t>(kWarps) * stage_elems<NS>() * (4 + 4 + (bytemap ? 1 : 0));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// bytes (a multiple of `kPiece`) from src to dst by the warp's lanes in order.
template <int kPiece>
__device__ __forceinline__ void warp_copy_async(char* dst, const char* src, int bytes, int lane) {
  for (int c = lane * kPiece; c < bytes; c += kWarpSize * kPiece) {
    if constexpr (kPiece == 16)
      cp_async16(dst + c, src + c);
    else
      cp_async8(dst + c, src + c);
  }
}

// ---- kSparse: an octet loaded only where `on` (else read as 0), as load_octet_f32 / load_raw_t otherwise -----------
__device__ __forceinline__ void load_octet_f32_if(const float* ptr, int n, bool vec, bool on, float* x) {
  if (vec && n == 8) {
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
    if (on) {
      a = __ldg(reinterpret_cast<const float4*>(ptr));
      b = __ldg(reinterpret_cast<const float4*>(ptr) + 1);
    }
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
    load_octet_f32(ptr, on ? n : 0, vec, x);
  }
}
template <bool kF32>
__device__ __forceinline__ void load_raw_if(
    const void* base, DType dt, int64_t off, int n, bool vec, bool on, RawOctet& r) {
  if (vec && n == 8) {
    r.a = r.b = make_uint4(0u, 0u, 0u, 0u);
    if (on) {
      const uint4* ptr = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + off * (kF32 ? 4 : 2));
      r.a = __ldg(ptr);
      if (kF32) r.b = __ldg(ptr + 1);
    }
  } else {
    load_raw_t<kF32>(base, dt, off, on ? n : 0, vec, r);
  }
}

// ---- score paths compiled in: the hot recompute paths get kernels whose flags are constants ----------
// (kAny reads them from the parameters.) The recompute at one octet a lane is bound by instruction issue
// (bench/NOTES.md): the flag tests and the parameters reloaded inside the tile loop are part of its count.
// The post-top-k softmax (TE's default), from either tensor, reads its routed octets alone (kSparse below) or takes
// router_backward_routed (router_backward_routed.cu; launch_bucket).
enum class BwdSpec : int {
  kAny = 0,
  kPostSoftmaxRecompute = 1,  // top-k, post-top-k softmax, from the logits
  kPreSoftmaxRecompute = 2,   // top-k, softmax over all experts before the top-k, from the logits
  kSigmoidNormRecompute = 3,  // top-k, sigmoid normalised over the k > 1 routed, from the logits
  kPostSoftmaxSaved = 4,      // top-k, post-top-k softmax, from the saved tensor
};
constexpr bool post_softmax_spec(BwdSpec s) {
  return s == BwdSpec::kPostSoftmaxRecompute || s == BwdSpec::kPostSoftmaxSaved;
}

// The post-top-k softmax's backward reads only the octets that hold a routed expert (kSparse in the bucket kernel):
// its gradient is 0 at every other expert, and only the routed enter the softmax's statistics and the dot product, so
// an octet without one loads neither grad_probs nor saved / logits (the values it would have held are never used:
// the same bits). A warp's map bits are read a tile ahead. The bytes the benchmark's backward floor counts
// (bench/NOTES.md): at E = 512, k = 8 about 1.6 KB a token instead of 4.1.

// A kernel's score path: its spec's constants, or the parameters' (kAny), by `if constexpr` as in
// router_topk_spec.cuh. (Here the any-path kernels differ from before the specs anyway: the one-round normalised
// sigmoid at one octet a lane, the saved-tensor test made once.)
template <BwdSpec kSpec>
__device__ __forceinline__ ScorePath spec_path(const RouterBackwardParams& p) {
  // {aux, softmax, pre, post, norm}
  if constexpr (kSpec == BwdSpec::kAny) return score_path(p);
  if constexpr (post_softmax_spec(kSpec)) return kPostSoftmaxPath;
  if constexpr (kSpec == BwdSpec::kPreSoftmaxRecompute) return ScorePath{false, true, true, false, false};
  return ScorePath{false, false, false, false, true};
}
template <BwdSpec kSpec>
__device__ __forceinline__ ScoreFn spec_fn(const RouterBackwardParams& p) {
  if constexpr (kSpec == BwdSpec::kAny) return p.score_fn;
  return kSpec == BwdSpec::kSigmoidNormRecompute ? ScoreFn::kSigmoid : ScoreFn::kSoftmax;
}
template <BwdSpec kSpec>
__device__ __forceinline__ bool spec_saved(const RouterBackwardParams& p) {  // every spec but one recomputes
  if constexpr (kSpec == BwdSpec::kAny) return p.saved != nullptr;
  return kSpec == BwdSpec::kPostSoftmaxSaved;
}

// The spec kernels also fix the logits' type (bf16 when not fp32; with the saved tensor, grad_logits' type); fp16
// logits take kAny.
BwdSpec spec_of(const RouterBackwardParams& p) {
  if (p.mode != RouterMode::kTopk || p.logits_dtype == DType::kF16) return BwdSpec::kAny;
  const ScorePath s = score_path(p);
  if (p.saved != nullptr) return s.post ? BwdSpec::kPostSoftmaxSaved : BwdSpec::kAny;
  if (s.post) return BwdSpec::kPostSoftmaxRecompute;
  if (s.pre) return BwdSpec::kPreSoftmaxRecompute;
  if (p.score_fn == ScoreFn::kSigmoid && s.norm) return BwdSpec::kSigmoidNormRecompute;
  return BwdSpec::kAny;
}

template <int N>
constexpr int min_blocks() {
  return N <= 8 ? 4 : (N <= 16 ? 3 : (N <= 32 ? 2 : 1));
}

template <int G, int NS, bool kF32, bool kStaged, BwdSpec kSpec>
__global__ void __launch_bounds__(kBucketThreads, min_blocks<8 * NS>())
    router_backward_bucket(const RouterBackwardParams p, const int64_t num_tiles) {
  dependent_start();  // BITEP_LAUNCH_PDL (a no-op in a plain launch): nothing read or written before it
  constexpr int N = 8 * NS;
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  using Mask = typename std::conditional<(N > 32), unsigned long long, uint32_t>::type;
  constexpr bool kSparse = post_softmax_spec(kSpec) && !kStaged;  // a staged kernel copies whole rows

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sl = lane % G, tl = lane / G;
  const int E = p.num_experts;
  constexpr bool kKnown = kSpec != BwdSpec::kAny;
  const DType dt = kKnown && !kF32 ? DType::kBF16 : p.logits_dtype;
  const ScoreFn fn = spec_fn<kSpec>(p);
  const ScorePath path = spec_path<kSpec>(p);
  const bool aux = path.aux, softmax = path.softmax, pre = path.pre, norm = path.norm;
  const bool saved = spec_saved<kSpec>(p);
  // The sigmoid recompute's per-element exp and division for the routed only, by for_each_masked rounds
  // (a token's k routed among a lane's N): its picks and puts cost 2 N selects a round, so up to 16
  // elements a lane. (The softmax's exp alone does not pay for the selects: measured, bench/NOTES.md.)
  const bool routed_rounds = N <= 16 && !aux;
  const bool bitmap = p.map_format == MapFormat::kBitmap;
  const int map_row = bitmap ? map_bytes_of(E) : E;
  const int esize = dt == DType::kF32 ? 4 : 2;
  const float scale = p.scaling_factor;

  extern __shared__ uint4 stage_smem[];  // 16-byte aligned
  char* const stage_g = reinterpret_cast<char*>(stage_smem) + static_cast<size_t>(warp) * stage_elems<NS>() * 8;
  char* const stage_a = stage_g + stage_elems<NS>() * 4;
  char* const stage_m = reinterpret_cast<char*>(stage_smem) + static_cast<size_t>(kWarps) * stage_elems<NS>() * 8 +
                        static_cast<size_t>(warp) * stage_elems<NS>();
  const bool bytemap = !aux && !bitmap;
  const int in_size = saved ? 4 : esize;
  const char* const in_base = saved ? reinterpret_cast<const char*>(p.saved) : static_cast<const char*>(p.logits);
  uint32_t next_bits[NS] = {};  // bitmap: the staged tile's map bytes

  // Stages tile `tile`: its rows of grad_probs, saved / logits and a bytemap (kStaged only).
  auto stage_tile = [&](int64_t tile) {
    const int64_t t0 = tile * kTokensPerWarp;
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTokensPerWarp), p.num_tokens - t0));
    const int elems = rows * E;
    warp_copy_async<16>(stage_g, reinterpret_cast<const char*>(p.grad_probs + t0 * E), elems * 4, lane);
    warp_copy_async<16>(stage_a, in_base + t0 * E * in_size, elems * in_size, lane);
    if (bytemap) warp_copy_async<8>(stage_m, reinterpret_cast<const char*>(p.routing_map + t0 * E), elems, lane);
    cp_async_commit();
    if (bitmap) {
#pragma unroll
      for (int s = 0; s < NS; ++s)
        next_bits[s] = tl < rows && (s * G + sl) * 8 < E ? __ldg(p.routing_map + (t0 + tl) * map_row + s * G + sl) : 0u;
    }
  };

  const LaneMap<G, NS> lane_map(p, lane);
  [[maybe_unused]] uint2 map_next[kSparse ? NS : 1];  // kSparse: the next tile's map (the octets' loads wait for it)

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (kStaged && first < num_tiles) stage_tile(first);
  if constexpr (kSparse) lane_map.fetch(first * kTokensPerWarp + tl, map_next);
  for (int64_t tile = first; tile < num_tiles; tile += stride) {
    const int64_t t = tile * kTokensPerWarp + tl;
    const bool tv = t < p.num_tokens;
    const int64_t row = t * E;

    int nval[NS];
    Mask valid = 0, routed = 0;
    float g[N], a[N];  // a: the forward's activation (sigmoid output, softmax output), or the logits
    if constexpr (kStaged) {
      cp_async_wait_all();
      __syncwarp();
      uint32_t bits[NS];
      RawOctet raw[NS];  // decoded after the next tile is staged: 16-bit octets hold 4 registers, not 8
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int e0 = (s * G + sl) * 8;
        nval[s] = tv && e0 < E ? 8 : 0;  // E % 8 == 0
        if (nval[s] == 0) {
#pragma unroll
          for (int i = 0; i < 8; ++i) g[8 * s + i] = 0.0f;
          raw[s].a = raw[s].b = make_uint4(0u, 0u, 0u, 0u);
          bits[s] = 0u;
          continue;
        }
        const int off = tl * E + e0;
        const float4 g0 = *reinterpret_cast<const float4*>(stage_g + off * 4);
        const float4 g1 = *reinterpret_cast<const float4*>(stage_g + off * 4 + 16);
        g[8 * s] = g0.x, g[8 * s + 1] = g0.y, g[8 * s + 2] = g0.z, g[8 * s + 3] = g0.w;
        g[8 * s + 4] = g1.x, g[8 * s + 5] = g1.y, g[8 * s + 6] = g1.z, g[8 * s + 7] = g1.w;
        raw[s].a = *reinterpret_cast<const uint4*>(stage_a + off * in_size);
        raw[s].b = in_size == 4 ? *reinterpret_cast<const uint4*>(stage_a + off * 4 + 16) : make_uint4(0u, 0u, 0u, 0u);
        if (bytemap) {
          bits[s] = bytemap_octet_bits(*reinterpret_cast<const uint2*>(stage_m + off));
        } else {
          bits[s] = next_bits[s];
        }
      }
      __syncwarp();
      if (tile + stride < num_tiles) stage_tile(tile + stride);
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (saved)
          decode_raw(DType::kF32, raw[s], a + 8 * s);
        else
          decode_raw_t<kF32>(dt, raw[s], a + 8 * s);
        const uint32_t vb = nval[s] == 8 ? 0xffu : 0u;
        valid |= static_cast<Mask>(vb) << (8 * s);
        routed |= static_cast<Mask>(aux ? vb : (bits[s] & vb)) << (8 * s);
      }
      if (!saved) {
        if (pre) {
          seg_softmax<G, N, true, true>(a, valid);
        } else if (softmax) {
          seg_softmax<G, N, true>(a, routed);
        }
      }
    } else if constexpr (kSparse) {
      uint2 map_raw[NS];
#pragma unroll
      for (int s = 0; s < NS; ++s) map_raw[s] = map_next[s];
      lane_map.fetch(t + stride * kTokensPerWarp, map_next);
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int n = lane_map.octet_n(t, s);
        nval[s] = n;
        valid |= static_cast<Mask>((1u << n) - 1u) << (8 * s);
        routed |= static_cast<Mask>(lane_map.bits(t, s, map_raw[s])) << (8 * s);
      }
      const bool gvec = tv && aligned16(p.grad_probs + row);
      const bool avec =
          tv && (saved ? aligned16(p.saved + row) : aligned16(static_cast<const char*>(p.logits) + row * esize));
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const bool on = ((routed >> (8 * s)) & 0xffu) != 0;
        const int64_t off = row + (s * G + sl) * 8;
        load_octet_f32_if(p.grad_probs + off, nval[s], gvec, on, g + 8 * s);
        if (saved) {
          load_octet_f32_if(p.saved + off, nval[s], avec, on, a + 8 * s);
        } else {
          RawOctet r;
          load_raw_if<kF32>(p.logits, dt, off, nval[s], avec, on, r);
          decode_raw_t<kF32>(dt, r, a + 8 * s);
        }
      }
      // The recompute's softmax: below, after grad_probs is scaled (kPostSoftmaxRecompute).
    } else {
      // The map read inline, not through LaneMap: its one pointer for both formats and its bits() recomputing the
      // octet's count made these kernels up to 5% slower (H200, pre-top-k E = 64: median 1.027x; bench/NOTES.md).
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int e0 = (s * G + sl) * 8;
        const int n = tv ? min(max(E - e0, 0), 8) : 0;
        nval[s] = n;
        const uint32_t vb = (1u << n) - 1u;
        valid |= static_cast<Mask>(vb) << (8 * s);
        uint32_t rb = vb;
        if (!aux && n > 0) {
          if (bitmap) {
            rb = __ldg(p.routing_map + t * map_row + (s * G + sl)) & vb;  // pad bits ignored
          } else {
            const uint8_t* m = p.routing_map + row + e0;
            rb = 0u;
            if (n == 8 && (reinterpret_cast<uintptr_t>(m) & 7u) == 0) {
              rb = bytemap_octet_bits(__ldg(reinterpret_cast<const uint2*>(m)));
            } else {
#pragma unroll
              for (int b = 0; b < 8; ++b)
                if (b < n) rb |= static_cast<uint32_t>(__ldg(m + b) != 0) << b;
            }
          }
        }
        routed |= static_cast<Mask>(rb) << (8 * s);
      }

      {
        const bool vec = tv && aligned16(p.grad_probs + row);
#pragma unroll
        for (int s = 0; s < NS; ++s) load_octet_f32(p.grad_probs + row + (s * G + sl) * 8, nval[s], vec, g + 8 * s);
      }
      if (saved) {
        const bool vec = tv && aligned16(p.saved + row);
#pragma unroll
        for (int s = 0; s < NS; ++s) load_octet_f32(p.saved + row + (s * G + sl) * 8, nval[s], vec, a + 8 * s);
      } else {
        const bool vec = tv && aligned16(static_cast<const char*>(p.logits) + row * esize);
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          RawOctet r;
          load_raw_t<kF32>(p.logits, dt, row + (s * G + sl) * 8, nval[s], vec, r);
          decode_raw_t<kF32>(dt, r, a + 8 * s);
        }
        if (pre) {
          seg_softmax<G, N, true, true>(a, valid);
        } else if (softmax) {
          seg_softmax<G, N, true>(a, routed);
        }
      }
    }
    // Now: softmax: a = softmax output; sqrtsoftplus: a = x (y = sqrtsoftplus(x)); sigmoid: a = y from the
    // saved tensor, a = x when recomputing (the derivative is then taken from x, without cancellation).
    const bool sig_x = fn == ScoreFn::kSigmoid && !saved;

    if (!aux) {
#pragma unroll
      for (int i = 0; i < N; ++i) g[i] = ((routed >> i) & 1) ? __fmul_rn(g[i], scale) : 0.0f;
    }
    if constexpr (kSpec == BwdSpec::kPostSoftmaxRecompute) {
      // The post-top-k softmax from the logits, its sum and the dot product in one butterfly: with e = exp(x - c) of
      // the routed, S = sum e and D = sum e g, the gradient is (e / S) (g - D / S) for any shift c: the two sums'
      // shuffles are independent. The exps of every element, as the dense kernel (taking those of the routed
      // octets alone, a test per octet and element, measured slower: H200, bf16 recompute, T = 65536: E = 128 24.8
      // against 22.8 us, E = 512 76.0 / 74.3), by the hardware's ex2 (__expf: 2 instructions, not expf's 8; this
      // kernel is bound by instruction issue, and 7 of a lane's 8 exps are of unrouted elements): within 2 +
      // 1.2 |x - c| ulps.
      // fp32 logits: c = the routed maximum (a butterfly before the sums), so the large probabilities within a few
      // ulps, the any-path kernel's gradient within the tolerance tests/gpu/router_gpu_test.h holds both to.
      // bf16 logits (v27): first c = 0, no maximum: a token whose S lands in [2^-64, 2^64] (its routed maximum within
      // about +-44) and whose D is finite keeps it; its exps' error, up to ~55 ulps (2^-18) at |x| = 44, is far below
      // the bf16 gradient's rounding (2^-9). Only where some token of the warp falls outside (large logits, NaN, a
      // token without a routed expert: S = 0) does the warp take the maximum's pass too, and those tokens alone keep
      // its values.
      auto exps = [&](float c, float* e, float& s, float& d) {
        s = 0.0f, d = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float x = __expf(a[i] - c);  // every element's (no branch), then a select
          e[i] = ((routed >> i) & 1) ? x : 0.0f;
          s = __fadd_rn(s, e[i]);
          d = fmaf(e[i], g[i], d);
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) {
          const float so = __shfl_xor_sync(kFullMask, s, o), dq = __shfl_xor_sync(kFullMask, d, o);
          s = __fadd_rn(s, so);
          d = __fadd_rn(d, dq);
        }
      };
      auto shifted = [&](float* e, float& s, float& d) {
        float m = -INFINITY;
#pragma unroll
        for (int i = 0; i < N; ++i)
          if ((routed >> i) & 1) m = fmaxf(m, a[i]);
        exps(seg_max_f32<G>(m), e, s, d);
      };
      float e[N], s, d, r;
      if constexpr (kF32) {
        shifted(e, s, d);
        r = __frcp_rn(s);
      } else {
        exps(0.0f, e, s, d);
        // NaN: false; D checked too (e up to 2^64 here, against 1 shifted: a grad_probs past ~2^64 could overflow)
        const bool in_range = s >= 0x1p-64f && s <= 0x1p64f && fabsf(d) <= FLT_MAX;
        r = __fdividef(1.0f, s);  // within 2 ulps in that range
        if (!__all_sync(kFullMask, in_range)) {
          float e2[N], s2, d2;
          shifted(e2, s2, d2);
          if (!in_range) {  // the token's segment alike: its S is the segment's
#pragma unroll
            for (int i = 0; i < N; ++i) e[i] = e2[i];
            s = s2, d = d2, r = __frcp_rn(s2);
          }
        }
      }
      const float dot = __fmul_rn(d, r);
      // Unrouted: +0 (and a token without a routed expert has s = 0: no product with its reciprocal is kept).
#pragma unroll
      for (int i = 0; i < N; ++i)
        g[i] = ((routed >> i) & 1) ? __fmul_rn(__fmul_rn(e[i], r), __fsub_rn(g[i], dot)) : 0.0f;
    } else if (N <= 8 && norm && routed_rounds && sig_x) {
      // The sigmoid recompute, normalised (one octet a lane: its sigmoid' row costs 8 registers, and at two
      // octets the staged kernel spilled): one round a routed element gives y = sigmoid(x), for the sum and
      // the dot, and sigmoid'(x) from one exp: t = exp(-|x|), r = 1 / (1 + t), y = r (x >= 0) or t r,
      // sigmoid' = t r r (sigmoid_grad_f's form: no cancellation); then g = (g / d - dot / d^2) sigmoid'(x)
      // with g / d as g (1 / d). Each within a few ulps of the per-element form (tests/gpu tolerance).
      float s = 0.0f, dot = 0.0f, sg[N];
#pragma unroll
      for (int i = 0; i < N; ++i) sg[i] = 0.0f;
      for_each_masked(routed, [&](int i, bool act) {
        const float x = pick<N>(a, i);
        const float t = expf(-fabsf(x)), r = __frcp_rn(__fadd_rn(1.0f, t)), tr = __fmul_rn(t, r);
        const float y = x >= 0.0f ? r : tr;
        if (act) {
          s = __fadd_rn(s, y);
          dot = __fadd_rn(dot, __fmul_rn(pick<N>(g, i), y));
        }
        put<N>(sg, i, act, __fmul_rn(tr, r));
      });
      s = seg_sum_f32<G>(s);
      dot = seg_sum_f32<G>(dot);
      const float d = __fadd_rn(s, kNormEpsilon);
      const float rd = __frcp_rn(d), q = dot / __fmul_rn(d, d);
      // The unrouted keep g = +0 times sigmoid'(x): +0, or NaN for a NaN x (as the per-element form).
#pragma unroll
      for (int i = 0; i < N; ++i)
        g[i] = ((routed >> i) & 1) ? __fmul_rn(__fsub_rn(__fmul_rn(g[i], rd), q), sg[i])
                                   : (a[i] != a[i] ? __fmul_rn(0.0f, a[i]) : 0.0f);
    } else {
      if (norm) {  // backward of y / (sum_routed y + eps)
        float s = 0.0f, dot = 0.0f;
        if (routed_rounds && sig_x) {  // y = sigmoid(x) of the routed only, in the same order
          for_each_masked(routed, [&](int i, bool act) {
            const float y = sigmoid_f(pick<N>(a, i));
            if (act) {
              s = __fadd_rn(s, y);
              dot = __fadd_rn(dot, __fmul_rn(pick<N>(g, i), y));
            }
          });
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i)
            if ((routed >> i) & 1) {
              const float y = fn == ScoreFn::kSigmoid ? (sig_x ? sigmoid_f(a[i]) : a[i]) : sqrtsoftplus_f(a[i]);
              s = __fadd_rn(s, y);
              dot = __fadd_rn(dot, __fmul_rn(g[i], y));
            }
        }
        s = seg_sum_f32<G>(s);
        dot = seg_sum_f32<G>(dot);
        const float d = __fadd_rn(s, kNormEpsilon);
        const float dd = __fmul_rn(d, d);
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = ((routed >> i) & 1) ? __fsub_rn(g[i] / d, dot / dd) : 0.0f;
      }
      if (softmax) {
        const Mask on = pre ? valid : routed;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i)
          if ((on >> i) & 1) dot = __fadd_rn(dot, __fmul_rn(g[i], a[i]));
        dot = seg_sum_f32<G>(dot);
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = ((on >> i) & 1) ? __fmul_rn(a[i], __fsub_rn(g[i], dot)) : 0.0f;
      } else if (routed_rounds && sig_x) {
        // The routed: g sigmoid'(x), a round each. The others hold g = +0, and 0 sigmoid'(x) is +0 but for
        // a NaN x (sigmoid' is finite and >= 0 elsewhere), where the dense product gives NaN: kept.
        for_each_masked(routed, [&](int i, bool act) {
          const float sg = sigmoid_grad_f(pick<N>(a, i));
          put<N>(g, i, act, __fmul_rn(pick<N>(g, i), sg));
        });
#pragma unroll
        for (int i = 0; i < N; ++i)
          if (!((routed >> i) & 1) && a[i] != a[i]) g[i] = __fmul_rn(g[i], a[i]);
      } else if (fn == ScoreFn::kSigmoid) {
#pragma unroll
        for (int i = 0; i < N; ++i)
          g[i] = __fmul_rn(g[i], sig_x ? sigmoid_grad_f(a[i]) : __fmul_rn(a[i], __fsub_rn(1.0f, a[i])));
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          g[i] = __fmul_rn(g[i], sqrtsoftplus_grad_f(a[i]));
        }
      }
    }

    const bool vec = tv && aligned16(static_cast<char*>(p.grad_logits) + row * esize);
#pragma unroll
    for (int s = 0; s < NS; ++s)
      if (nval[s] > 0) store_octet_t<kF32>(p.grad_logits, dt, row + (s * G + sl) * 8, nval[s], vec, g + 8 * s);
  }
}

template <int G, int NS, bool kF32, bool kStaged, BwdSpec kSpec>
cudaError_t launch_bucket_t(const RouterBackwardParams& p, cudaStream_t stream) {
  static std::atomic<int> occupancy[2] = {{0}, {0}};  // [bytemap]: its staging area is larger
  constexpr int kTokensPerWarp = kWarpSize / G;
  constexpr int kWarps = kBucketThreads / kWarpSize;
  auto kernel = router_backward_bucket<G, NS, kF32, kStaged, kSpec>;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const bool bytemap = p.mode != RouterMode::kAuxScores && p.map_format == MapFormat::kBytemap;
  const size_t smem = kStaged ? stage_bytes<NS>(bytemap) : 0;
  if (smem > 48 * 1024) {
    err = raise_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    if (err != cudaSuccess) return err;
  }
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(kernel), kBucketThreads, &occupancy[bytemap], smem);
  const int64_t tiles = (p.num_tokens + kTokensPerWarp - 1) / kTokensPerWarp;
  return launch_maybe_dependent(p.pdl, kernel, dim3(persistent_grid(tiles, kWarps, sms, per_sm)), dim3(kBucketThreads),
                                smem, stream, p, tiles);
}

// The staged kernel's conditions (see "staging" above), and its staging area within what a block may
// opt in to on this device (else the register kernel: a card with less shared memory still runs).
template <int NS>
bool stageable(const RouterBackwardParams& p) {
  auto aligned = [](const void* ptr, uintptr_t a) { return (reinterpret_cast<uintptr_t>(ptr) & (a - 1)) == 0; };
  const bool aux = p.mode == RouterMode::kAuxScores;
  int optin = 0;
  if (smem_optin_bytes(&optin) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return p.num_experts % 8 == 0 && aligned(p.grad_probs, 16) &&
         aligned(p.saved != nullptr ? static_cast<const void*>(p.saved) : p.logits, 16) &&
         (aux || p.map_format != MapFormat::kBytemap || aligned(p.routing_map, 8)) &&
         stage_bytes<NS>(!aux && p.map_format == MapFormat::kBytemap) <= static_cast<size_t>(optin);
}

template <int G, int NS, bool kStaged, BwdSpec kSpec>
cudaError_t launch_dtype(const RouterBackwardParams& p, cudaStream_t stream) {
  return p.logits_dtype == DType::kF32 ? launch_bucket_t<G, NS, true, kStaged, kSpec>(p, stream)
                                       : launch_bucket_t<G, NS, false, kStaged, kSpec>(p, stream);
}

// The post-top-k softmax (TE's default) from 8 lanes a token (E > 32), either tensor: router_backward_routed from 4
// octets a lane (E > 512), and from 2 (E > 256) for the recompute; else the bucket kernel that reads the routed
// octets alone (kSparse). H200, T = 65536, bitmap, against the kernels before (bench/NOTES.md, router v17): E = 2048
// bf16 recompute 152 against 283 us (the staged dense kernel), saved 162 against 221; E = 512 bf16 recompute 48.3
// against 73.7, saved 49.0 against 48.3 (not taken); E = 256 bf16 recompute 37.7 against 38.6 but fp32 48.0 against
// 42.6, saved 33.3 against 30.6; E <= 128 1.03-1.23x slower.
// The rest: staged from 2 octets a lane (E > 256): there the registers allow 1-3 blocks per SM, too few warps to keep
// the loads in flight. At one octet (4 blocks) the copies' instructions cost more than they hide. The other recompute
// score paths have kernels of their own (BwdSpec) at one octet a lane from 8 lanes a token.
template <int G, int NS>
cudaError_t launch_bucket(const RouterBackwardParams& p, cudaStream_t stream) {
  const BwdSpec spec = G >= 8 && p.spec_kernels ? spec_of(p) : BwdSpec::kAny;
  t_backward_kernel = 0;
  if constexpr (G >= 8) {
    if (post_softmax_spec(spec)) {
      const bool saved = spec == BwdSpec::kPostSoftmaxSaved;
      if constexpr (NS == 1) {
        return saved ? launch_dtype<G, NS, false, BwdSpec::kPostSoftmaxSaved>(p, stream)
                     : launch_dtype<G, NS, false, BwdSpec::kPostSoftmaxRecompute>(p, stream);
      } else {
        if constexpr (NS == 2) {
          if (saved) return launch_dtype<G, NS, false, BwdSpec::kPostSoftmaxSaved>(p, stream);
        }
        t_backward_kernel = 1;
        return launch_router_backward_routed(p, stream);
      }
    }
  }
  if constexpr (NS >= 2) {
    if (stageable<NS>(p)) return launch_dtype<G, NS, true, BwdSpec::kAny>(p, stream);
  } else if constexpr (G >= 8) {
    if (spec == BwdSpec::kPreSoftmaxRecompute)
      return launch_dtype<G, NS, false, BwdSpec::kPreSoftmaxRecompute>(p, stream);
    if (spec == BwdSpec::kSigmoidNormRecompute)
      return launch_dtype<G, NS, false, BwdSpec::kSigmoidNormRecompute>(p, stream);
  }
  return launch_dtype<G, NS, false, BwdSpec::kAny>(p, stream);
}

}  // namespace
}  // namespace bitep::kernels
