// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the router kernels (the forward's router_topk_*.cu, router_generic.cu, the backward's
// router_backward*.cu, router_aux_loss.cu): selection keys, score functions, the lane layout of a row, octet loads and
// stores, segment reductions, cached device properties. Internal to the kernels: the launcher contract
// is kernels/router.h.
//
// Lane layout of the warp-per-token kernels ("bucket" kernels): a segment of G lanes (G in 1..32, a
// power of two) owns one token; 32 / G tokens share a warp. The row is cut into octets of 8 experts;
// octet o lives in lane o % G of the segment, slot o / G, so each lane holds NS slots = 8 * NS experts
// in registers (element p = 8 * slot + bit). The octet is a whole BITMAP_U8 byte, so a lane writes its
// map bytes from registers, and loads its octet with one 16-byte load (bf16 / fp16) or two (fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels/device_info.cuh"
#include "kernels/router_params.h"

namespace bitep::kernels::router_detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kBucketThreads = 256;      // threads per block of the warp-per-token kernels
constexpr int kMaxBucketExperts = 2048;  // larger E takes the generic block-per-token kernels
constexpr int kMaxBucketTopk = 64;       // larger k too (its rounds grow with k; the generic cost does not)
constexpr int kNumBuckets = 9;

// Selection key: a uint32 whose unsigned order is the selection order of the fp32 value. -0 == +0;
// every NaN maps to 1, below -inf (0x007fffff); 0 is kept for "not a candidate". Ties between equal
// keys go to the lower expert index, which the reductions take care of.
constexpr uint32_t kKeyNone = 0u;
constexpr uint32_t kKeyNaN = 1u;

// ---- host: device properties (kernels/device_info.cuh), occupancy ---------------------------------

using kernels::persistent_grid;
using kernels::sm_count;
using kernels::smem_optin_bytes;

// Resident blocks per SM of `kernel` at `threads` threads and `smem` bytes of dynamic shared memory;
// cached by the caller in `cache` (one per kernel instantiation and smem size). Only sizes the
// persistent grid, never correctness.
inline int blocks_per_sm(const void* kernel, int threads, std::atomic<int>* cache, size_t smem = 0) {
  int c = cache->load(std::memory_order_relaxed);
  if (c > 0) return c;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  cache->store(n, std::memory_order_relaxed);
  return n;
}

// The buckets' shapes: lanes a token (G) and octets a lane (NS). One octet a lane up to 256 experts; above, 32 lanes of
// 2, 4 or 8 octets.
constexpr int kBucketLanes[kNumBuckets] = {1, 2, 4, 8, 16, 32, 32, 32, 32};
constexpr int kBucketSlots[kNumBuckets] = {1, 1, 1, 1, 1, 1, 2, 4, 8};

// Bucket of the warp-per-token kernels for E experts: the first whose G NS octets hold E's; -1: the generic kernel.
inline int bucket_of(int num_experts) {
  if (num_experts > kMaxBucketExperts) return -1;
  const int octets = (num_experts + 7) / 8;
  for (int b = 0; b < kNumBuckets; ++b)
    if (octets <= kBucketLanes[b] * kBucketSlots[b]) return b;
  return -1;
}
static_assert(kBucketLanes[kNumBuckets - 1] * kBucketSlots[kNumBuckets - 1] * 8 == kMaxBucketExperts,
              "the last bucket holds kMaxBucketExperts");

// Calls f(std::integral_constant<int, G>{}, std::integral_constant<int, NS>{}) for the bucket's shape,
// so each launcher instantiates its kernel per bucket from one table. An invalid bucket: cudaErrorInvalidValue.
template <typename F, int... B>
cudaError_t with_bucket_of(int bucket, F&& f, std::integer_sequence<int, B...>) {
  cudaError_t err = cudaErrorInvalidValue;
  (void)((bucket == B ? (err = f(std::integral_constant<int, kBucketLanes[B]>{},
                                 std::integral_constant<int, kBucketSlots[B]>{}),
                         true)
                      : false) ||
         ...);
  return err;
}
template <typename F>
cudaError_t with_bucket(int bucket, F&& f) {
  return with_bucket_of(bucket, std::forward<F>(f), std::make_integer_sequence<int, kNumBuckets>{});
}

// BITMAP_U8 bytes of a row of n bits (router_params.h's bitmap_bytes, callable on the device).
__host__ __device__ constexpr int map_bytes_of(int n) { return (n + 7) / 8; }

// ---- device: keys and score functions -----------------------------------------------------------

// The order-preserving flip of a float's bits (not NaN, not -0): the sign decides between flipping every bit and
// setting the top one.
__device__ __forceinline__ uint32_t key_bits(uint32_t u) {
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
// Branch-free (a select per case, no divergent region per element): v + 0 turns -0 into +0 (round to nearest), NaN
// gives kKeyNaN.
__device__ __forceinline__ uint32_t select_key(float v) {
  const uint32_t k = key_bits(__float_as_uint(__fadd_rn(v, 0.0f)));
  return v != v ? kKeyNaN : k;
}
// select_key for a v that is never -0 (the sigmoid's 1 / y is +0 at least, and such a v plus a bias is -0 only if both
// are): the same key without the + 0. The pre-top-k softmax's e / sum takes pre_softmax_key, below.
__device__ __forceinline__ uint32_t select_key_nz(float v) {
  const uint32_t k = key_bits(__float_as_uint(v));
  return v != v ? kKeyNaN : k;
}

// The pre-top-k softmax's key of a probability p = e / sum: its bits with the top one set, one instruction where
// select_key_nz takes four. p is +0 at least, or NaN, and then every p of the row is (a NaN e makes the sum NaN;
// without one the sum is finite and at least 1, the maximum's e), so a NaN row's keys are all one key, as
// select_key_nz's kKeyNaN are: the same selection (the lowest experts), and the other rows' keys are select_key_nz's.
// H100, router v67b (with v67a): the pre-top-k compact outputs 0.87-0.91x at E = 256, 0.91-0.95x at E = 64
// (bench/NOTES.md).
__device__ __forceinline__ uint32_t pre_softmax_key(float p) { return __float_as_uint(p) | 0x80000000u; }
// The probability of a pre_softmax_key: its bits less the top one (kKeyNone, a key the group steps cleared, reads +0).
__device__ __forceinline__ float pre_softmax_value(uint32_t k) { return __uint_as_float(k & 0x7fffffffu); }

// The fp32 value of a key (NaN for kKeyNaN; +0 for both zeros). Exact for every other key.
__device__ __forceinline__ float key_value(uint32_t k) {
  if (k == kKeyNaN) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The host reference's formulas, in the same fp32 operations (no contraction: no a * b + c here).
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
// sigmoid_f of each of n values, the bits of sigmoid_f: 1 / y with y = 1 + exp(-x) is the correctly rounded
// reciprocal, which the compiler forms as a hardware approximation and one Newton step behind a test of y's exponent
// (subnormal, past 2^126, inf or NaN: a slow path), for each value. Here y >= 1, so one test covers the n values (y
// below 2^126, NaN failing it) and the fast form runs without a branch each; any value out of range takes the
// division for all n. BITEP_ROUTER_SIGMOID_BATCH=0 (a tuning build) keeps sigmoid_f.
#ifndef BITEP_ROUTER_SIGMOID_BATCH
#define BITEP_ROUTER_SIGMOID_BATCH 1
#endif
template <int n>
__device__ __forceinline__ void sigmoid_n(float* v) {
  if constexpr (BITEP_ROUTER_SIGMOID_BATCH == 0) {
#pragma unroll
    for (int i = 0; i < n; ++i) v[i] = sigmoid_f(v[i]);
  } else {
    bool fast = true;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      v[i] = 1.0f + expf(-v[i]);  // as sigmoid_f writes it (the compiler fuses expf's last product with the add)
      fast = fast && v[i] < 0x1p126f;
    }
    if (fast) {
#pragma unroll
      for (int i = 0; i < n; ++i) {
        float r;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v[i]));
        v[i] = __fmaf_rn(r, __fmaf_rn(-v[i], r, 1.0f), r);
      }
    } else {
#pragma unroll
      for (int i = 0; i < n; ++i) v[i] = 1.0f / v[i];
    }
  }
}
// sigmoid'(x) = s (1 - s) from x, as t / (1 + t)^2 with t = exp(-|x|): no cancellation in 1 - s, so a
// few ulps relative for any x (s (1 - s) from a rounded s loses all digits of 1 - s as s -> 1).
__device__ __forceinline__ float sigmoid_grad_f(float x) {
  const float t = expf(-fabsf(x)), u = __fadd_rn(1.0f, t);
  return t / __fmul_rn(u, u);
}
// exp(x - m) for the pre-top-k softmax (over all experts; m their maximum), as 2^((x - m) log2e) by PTX
// ex2.approx.ftz.f32 (2 ulps): one MUFU.EX2 an element. exp2f (ex2.approx.f32) adds its subnormal steps, a test and two
// scaled products (the E = 64 k = 6 bf16 instance's SASS 6912 -> 6808 lines for its 32 MUFU.EX2); expf a range
// reduction by two fmas and the scale. H200, router v29 (exp2f over expf): the bf16 E = 256 forward 1.7-3.3% faster at
// T >= 16384; H100, router v67a (the ftz form over exp2f): compact outputs 0.975-0.985x, TE-compatible rows even
// (bench/NOTES.md). The product's rounding adds 2^-24 |x - m| log2e to the exponent: a few ulps for the large
// probabilities, a relative error growing with |x - m| for the small ones (2^-18 at x - m = -40, where e is 4e-18), far
// below 1e-6 of the row's norm. An e below FLT_MIN (x - m below about -87.3) is 0, and the host backend takes it as 0
// too (src/host/router_host.cc, softmax_inplace): such probabilities tie at 0, the lower experts first, where the fp64
// definition still ranks them. inf - inf and NaN give NaN as expf's do. Every kernel takes the pre-top-k softmax's exps
// here, so they give a row the same bits. The post-top-k softmax (k exps a token) keeps expf: exp2f measured 1.5%
// slower in the fp32 backward's routed kernel, and nothing faster elsewhere (H200, bench/NOTES.md router v29).
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float softmax_exp(float x, float m) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(__fmul_rn(__fsub_rn(x, m), kLog2e)));
  return e;
}
// A softmax's exp by that rule: the pre-top-k softmax's by softmax_exp, the post-top-k one's by expf.
__device__ __forceinline__ float softmax_exp(float x, float m, bool pre) {
  return pre ? softmax_exp(x, m) : expf(x - m);
}
__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sqrtsoftplus_f(float x) { return sqrtf(softplus_f(x)); }
// d/dx sqrt(softplus(x)) = sigmoid(x) / (2 sqrt(softplus(x))). Below x = -20, softplus(x) is e^x within e^x / 2 and
// 1 + e^x is 1 in fp32, so the derivative is e^(x / 2) / 2 to fp32 rounding: finite down to x = -inf (0), where the
// quotient is 0 / 0 (NaN) once e^x underflows (x < -104) and loses bits in the subnormals before. A NaN x stays NaN.
// The host backend's sqrtsoftplus_gradf is this function.
__device__ __forceinline__ float sqrtsoftplus_grad_f(float x) {
  if (x < kSqrtSoftplusTail) return __fmul_rn(0.5f, expf(__fmul_rn(0.5f, x)));
  return sigmoid_f(x) / __fmul_rn(2.0f, sqrtsoftplus_f(x));
}

// ---- device: loads and stores of one octet (8 consecutive experts of a row) ------------------------

__device__ __forceinline__ float half_bits_to_float(uint32_t h, DType dt) {
  return dt == DType::kBF16 ? __uint_as_float(h << 16)
                            : __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}

// One octet as loaded, before conversion: fp32 in a (experts 0-3) and b (4-7); 16-bit types in a.
struct RawOctet {
  uint4 a, b;
};

// r = base[off .. off + 8) of dtype dt; elements at or past n (0 <= n <= 8) read as 0. vec: base + off is
// 16-byte aligned (then a full octet is one 16-byte load for bf16 / fp16, two for fp32).
__device__ __forceinline__ void load_raw(const void* base, DType dt, int64_t off, int n, bool vec, RawOctet& r) {
  if (dt == DType::kF32) {
    const float* ptr = static_cast<const float*>(base) + off;
    if (vec && n == 8) {
      r.a = __ldg(reinterpret_cast<const uint4*>(ptr));
      r.b = __ldg(reinterpret_cast<const uint4*>(ptr) + 1);
    } else {
      uint32_t w[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i] = i < n ? __float_as_uint(__ldg(ptr + i)) : 0u;
      r.a = make_uint4(w[0], w[1], w[2], w[3]);
      r.b = make_uint4(w[4], w[5], w[6], w[7]);
    }
    return;
  }
  const unsigned short* ptr = static_cast<const unsigned short*>(base) + off;
  if (vec && n == 8) {
    r.a = __ldg(reinterpret_cast<const uint4*>(ptr));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = 2 * i < n ? __ldg(ptr + 2 * i) : 0u;
      const uint32_t hi = 2 * i + 1 < n ? __ldg(ptr + 2 * i + 1) : 0u;
      w[i] = lo | (hi << 16);
    }
    r.a = make_uint4(w[0], w[1], w[2], w[3]);
  }
  r.b = make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ void decode_raw(DType dt, const RawOctet& r, float* x) {
  if (dt == DType::kF32) {
    x[0] = __uint_as_float(r.a.x), x[1] = __uint_as_float(r.a.y), x[2] = __uint_as_float(r.a.z);
    x[3] = __uint_as_float(r.a.w), x[4] = __uint_as_float(r.b.x), x[5] = __uint_as_float(r.b.y);
    x[6] = __uint_as_float(r.b.z), x[7] = __uint_as_float(r.b.w);
    return;
  }
  const uint32_t w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = half_bits_to_float(w[i] & 0xffffu, dt);
    x[2 * i + 1] = half_bits_to_float(w[i] >> 16, dt);
  }
}

// The same with the width fixed at compile time (kF32: dt == kF32; else bf16 or fp16): a 16-bit octet
// keeps only r.a live.
template <bool kF32>
__device__ __forceinline__ void load_raw_t(const void* base, DType dt, int64_t off, int n, bool vec, RawOctet& r) {
  load_raw(base, kF32 ? DType::kF32 : (dt == DType::kF32 ? DType::kBF16 : dt), off, n, vec, r);
}
template <bool kF32>
__device__ __forceinline__ void decode_raw_t(DType dt, const RawOctet& r, float* x) {
  decode_raw(kF32 ? DType::kF32 : (dt == DType::kF32 ? DType::kBF16 : dt), r, x);
}

// x[0..8) = base[off .. off + 8) of dtype dt as fp32 (load_raw's rules).
__device__ __forceinline__ void load_octet(const void* base, DType dt, int64_t off, int n, bool vec, float* x) {
  RawOctet r;
  load_raw(base, dt, off, n, vec, r);
  decode_raw(dt, r, x);
}

// fp32 only (bias, grad_probs, saved).
__device__ __forceinline__ void load_octet_f32(const float* ptr, int n, bool vec, float* x) {
  load_octet(ptr, DType::kF32, 0, n, vec, x);
}

__device__ __forceinline__ void store_octet_f32(float* ptr, int n, bool vec, const float* v) {
  if (vec && n == 8) {
    reinterpret_cast<float4*>(ptr)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(ptr)[1] = make_float4(v[4], v[5], v[6], v[7]);
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < n) ptr[i] = v[i];
}

__device__ __forceinline__ uint32_t float_to_half_bits(float v, DType dt) {
  return dt == DType::kBF16 ? static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)))
                            : static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v)));
}

// base[off .. off + n) = v[0..n) in dtype dt (round to nearest even).
__device__ __forceinline__ void store_octet(void* base, DType dt, int64_t off, int n, bool vec, const float* v) {
  if (dt == DType::kF32) {
    store_octet_f32(static_cast<float*>(base) + off, n, vec, v);
    return;
  }
  unsigned short* ptr = static_cast<unsigned short*>(base) + off;
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = float_to_half_bits(v[i], dt);
  if (vec && n == 8) {
    *reinterpret_cast<uint4*>(ptr) =
        make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < n) ptr[i] = static_cast<unsigned short>(h[i]);
}

template <bool kF32>
__device__ __forceinline__ void store_octet_t(void* base, DType dt, int64_t off, int n, bool vec, const float* v) {
  store_octet(base, kF32 ? DType::kF32 : (dt == DType::kF32 ? DType::kBF16 : dt), off, n, vec, v);
}

__host__ __device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

__device__ __forceinline__ float load_one(const void* base, DType dt, int64_t i) {
  if (dt == DType::kF32) return __ldg(static_cast<const float*>(base) + i);
  return half_bits_to_float(__ldg(static_cast<const unsigned short*>(base) + i), dt);
}

__device__ __forceinline__ void store_one(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::kF32)
    static_cast<float*>(base)[i] = v;
  else
    static_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(float_to_half_bits(v, dt));
}

// ---- device: reductions over a segment of G lanes (G a power of two, segments aligned) -------------
// Butterflies: every lane of the segment ends with the same value, combined in the same fixed order.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kHasRedux = true;  // redux.sync: a whole-warp integer reduction in one instruction
#else
constexpr bool kHasRedux = false;
#endif

template <int G>
__device__ __forceinline__ uint32_t seg_max_u32(uint32_t v) {
  if constexpr (G == 32 && kHasRedux) {
    return __reduce_max_sync(kFullMask, v);
  } else if constexpr (G == 16 && kHasRedux) {
    // Two whole-warp reductions, each fed by one half (0 is the identity of an unsigned max): 2
    // instructions and two selects instead of 4 shuffle + max steps.
    const bool hi = (threadIdx.x & 16) != 0;
    const uint32_t lo_max = __reduce_max_sync(kFullMask, hi ? 0u : v);
    const uint32_t hi_max = __reduce_max_sync(kFullMask, hi ? v : 0u);
    return hi ? hi_max : lo_max;
  } else {
#pragma unroll
    for (int d = G / 2; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, d));
    return v;
  }
}

template <int G>
__device__ __forceinline__ int seg_min_i32(int v) {
  if constexpr (G == 32 && kHasRedux) {
    return __reduce_min_sync(kFullMask, v);
  } else {
#pragma unroll
    for (int d = G / 2; d > 0; d >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, d));
    return v;
  }
}

template <int G>
__device__ __forceinline__ float seg_sum_f32(float v) {
#pragma unroll
  for (int d = G / 2; d > 0; d >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

template <int G>
__device__ __forceinline__ float seg_max_f32(float v) {
#pragma unroll
  for (int d = G / 2; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Bits of the lanes below this one (%lanemask_lt), and of the lanes of this lane's segment of G.
__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}
template <int G>
__device__ __forceinline__ uint32_t segment_lanes() {
  // G & 31: the branch not taken at G = 32 must not shift a 32-bit value by 32 either.
  return G == 32 ? kFullMask : ((1u << (G & 31)) - 1u) << ((threadIdx.x & 31) & ~(G - 1));
}

// Inclusive prefix sum over the segment (lane order).
template <int G>
__device__ __forceinline__ int seg_scan_i32(int v, int seg_lane) {
#pragma unroll
  for (int d = 1; d < G; d <<= 1) {
    const int y = __shfl_up_sync(kFullMask, v, d, G);
    if (seg_lane >= d) v += y;
  }
  return v;
}

// Same over aligned groups of q lanes (q a power of two <= 32, the same q in every lane).
__device__ __forceinline__ uint32_t group_max_u32(uint32_t v, int q) {
  for (int d = q >> 1; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}
__device__ __forceinline__ int group_min_i32(int v, int q) {
  for (int d = q >> 1; d > 0; d >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Softmax over the elements of v selected by `mask` (bit p = element p), in place, the host's formula
// up to the last step: m = max (NaN ignored), e = exp(v - m) (kPre: softmax_exp), v = e * (1 / sum(e)) (the host
// divides).
// The sum is lane-local in element order, then a butterfly over the segment: the any-path forward and
// the backward call this same code on the same layout, so the saved tensor and its recomputation are
// bit-identical there (the post-top-k softmax forward kernels sum in round order instead: router_topk_kernel.cuh,
// the holders). Elements outside the mask are unchanged.
// kDense: no branch per element: every element's exp is taken (independent chains the scheduler
// interleaves; the backward's recompute, 2-6% faster there) and the unmasked ones are left out of the
// sum by a select; the masked elements see the same operations in the same order (s + 0 == s for the
// s >= 0 here), so the same bits. Unmasked elements then come out unspecified.
// seg_softmax_max: the same from the segment's maximum over the mask, m, given by the caller (the
// forward's top-k knows it: its first winner); an m that gives the same v - m for every masked element
// as the fmaxf reduction's (an equal value; for +0 and -0 either) gives the same bits.
template <int G, int N, bool kDense = false, bool kPre = false, class Mask>
__device__ __forceinline__ void seg_softmax_max(float* v, Mask mask, float m) {
  auto ex = [m](float x) { return softmax_exp(x, m, kPre); };
  float s = 0.0f;
#pragma unroll
  for (int p = 0; p < N; ++p) {
    if (kDense) {
      v[p] = ex(v[p]);
      s = __fadd_rn(s, ((mask >> p) & 1) ? v[p] : 0.0f);
    } else if ((mask >> p) & 1) {
      v[p] = ex(v[p]);
      s = __fadd_rn(s, v[p]);
    }
  }
  s = seg_sum_f32<G>(s);
  // One reciprocal, then products: within 1 ulp of e / sum, and no division per element (5% of the
  // forward at E = 256 softmax, H200).
  const float r = __frcp_rn(s);
#pragma unroll
  for (int p = 0; p < N; ++p)
    if (kDense || ((mask >> p) & 1)) v[p] = __fmul_rn(v[p], r);
}
template <int G, int N, bool kDense = false, bool kPre = false, class Mask>
__device__ __forceinline__ void seg_softmax(float* v, Mask mask) {
  float m = -INFINITY;
#pragma unroll
  for (int p = 0; p < N; ++p)
    if ((mask >> p) & 1) m = fmaxf(m, v[p]);
  seg_softmax_max<G, N, kDense, kPre>(v, mask, seg_max_f32<G>(m));
}

// Rounds over the elements of a lane's mask, lowest first: round r hands every lane its r-th masked
// element (i, act = true) or nothing (act = false); as many rounds as the warp's busiest lane needs
// (called by the whole warp). For sparse masks (a token's k routed experts among a lane's N): the
// per-element work runs once a round instead of once per element slot. v[i] is read and written by
// selects (pick / put), so the row stays in registers.
template <class Mask, class F>
__device__ __forceinline__ void for_each_masked(Mask mask, F f) {
  Mask left = mask;
  while (__any_sync(kFullMask, left != 0)) {
    const bool act = left != 0;
    int i = 0;
    if constexpr (sizeof(Mask) == 8)
      i = act ? __ffsll(static_cast<long long>(left)) - 1 : 0;
    else
      i = act ? __ffs(static_cast<int>(left)) - 1 : 0;
    f(i, act);
    left &= left - 1;  // 0 stays 0
  }
}
template <int N>
__device__ __forceinline__ float pick(const float* v, int i) {
  float x = v[0];
#pragma unroll
  for (int p = 1; p < N; ++p) x = i == p ? v[p] : x;
  return x;
}
template <int N>
__device__ __forceinline__ void put(float* v, int i, bool act, float x) {
#pragma unroll
  for (int p = 0; p < N; ++p) v[p] = act && i == p ? x : v[p];
}

// ---- device: block-wide reductions (generic kernels; blockDim.x a multiple of 32, <= 1024) ---------
// Fixed order: thread-local (strided), then warp butterflies, then the warp results in warp order.
// `scratch` holds 32 words; the trailing barrier makes it reusable at once.

__device__ __forceinline__ float warp_sum_f32(float v) { return seg_sum_f32<32>(v); }
__device__ __forceinline__ float warp_max_f32(float v) { return seg_max_f32<32>(v); }

__device__ __forceinline__ float block_sum_f32(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_f32(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nw ? scratch[lane] : 0.0f;
  r = warp_sum_f32(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max_f32(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max_f32(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nw ? scratch[lane] : -INFINITY;
  r = warp_max_f32(r);
  __syncthreads();
  return r;
}

// Exclusive prefix sum over the threads of the block (thread order).
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int inc = seg_scan_i32<32>(v, lane);
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += scratch[w];
  (void)nw;
  __syncthreads();
  return before + inc - v;
}

}  // namespace bitep::kernels::router_detail

namespace bitep::kernels {
// The generic (block-per-token) forward: any E, any k, any group layout. router_topk.cu sends here what
// the warp-per-token kernels do not take.
cudaError_t launch_router_forward_generic(const RouterForwardParams& p, cudaStream_t stream);
}  // namespace bitep::kernels
