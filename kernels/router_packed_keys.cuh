// SPDX-License-Identifier: Apache-2.0
// The bf16 post-top-k softmax kernels' selection keys ("packed", kernels/router_topk_kernel.cuh): a bf16 value's
// selection key has 16 significant bits (its top half), so the low half carries 0xffff - expert and every key
// of a row is unique, ordered as the selection order (value, then the lower expert; NaN lowest: top half 0,
// still above kKeyNone = 0). A round is then one max reduction whose result names its expert: no ballot, no tie
// path, no register positions; a lane's wins are its best keys in order, so its cache refills from the keys below
// its last win.
// Device-only; tests/gpu/router_packed_keys_test.cu checks the two forms against each other on every bf16 value.
#pragma once

#include <cstdint>

#include "kernels/router_common.cuh"

namespace bitep::kernels::router_detail {

// packed_key_lo(v, 0xffff - expert): the packed key of the value v (a bf16 value widened to fp32) for that
// expert. Straight-line (no branch for the NaN test: a select).
__device__ __forceinline__ uint32_t packed_key_lo(float v, uint32_t lo) {
  const uint32_t k = key_bits(__float_as_uint(__fadd_rn(v, 0.0f)));  // -0 -> +0 first
  return (v != v ? 0u : (k & 0xffff0000u)) | lo;
}

// The keys of two bf16 values straight from their bits (w: the lower element in the low half), the same keys as
// packed_key_lo of their values: each half's order-preserving flip (negative: every bit; positive: the sign bit)
// with the sign replicated over its half by one byte permute, after +-0 become +0 and NaN becomes 0xffff (whose
// flip is 0) by two bf16x2 compares. About 4.5 instructions a key where the fp32 form takes about 9 with the
// widening.
__device__ __forceinline__ void packed_keys_bf16x2(uint32_t w, uint32_t lo0, uint32_t lo1, uint32_t& k0, uint32_t& k1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900  // bf16x2 compares need sm_90: the fp32 form
  k0 = packed_key_lo(__uint_as_float(w << 16), lo0);
  k1 = packed_key_lo(__uint_as_float(w & 0xffff0000u), lo1);
#else
  uint32_t zero, nan, sign;
  asm("set.eq.u32.bf16x2 %0, %1, %2;" : "=r"(zero) : "r"(w), "r"(0u));
  asm("set.nan.u32.bf16x2 %0, %1, %1;" : "=r"(nan) : "r"(w));
  const uint32_t c = (w & ~zero) | nan;
  asm("prmt.b32 %0, %1, 0, 0xBB99;" : "=r"(sign) : "r"(c));  // bytes 1, 1, 3, 3 with their sign replicated
  const uint32_t k = c ^ (sign | 0x80008000u);
  k0 = (k << 16) | lo0;
  k1 = (k & 0xffff0000u) | lo1;
#endif
}

// Bit i set where key[i] >= bound (N <= 32; bound > 0): a carry chain, two instructions a key (key + (2^32 - bound)
// carries out exactly where key >= bound, and addc shifts the carry in), where the compare, select and add took three.
// An addition's carry, not a subtraction's: with sub.cc's flag taken as a borrow (key < bound) every checked row's map
// came out wrong on the GPU (bench/NOTES.md, "Router v39"); tests/gpu/router_packed_keys_test.cu checks this form at
// every bound.
template <int N>
__device__ __forceinline__ uint32_t keys_at_least(const uint32_t* key, uint32_t bound) {
  static_assert(N <= 32, "one 32-bit mask");
  const uint32_t neg = 0u - bound;
  uint32_t m = 0u;
#pragma unroll
  for (int i = N - 1; i >= 0; --i)
    asm("{\n\t.reg .u32 t;\n\tadd.cc.u32 t, %1, %2;\n\taddc.u32 %0, %3, %3;\n\t}"
        : "=r"(m)
        : "r"(key[i]), "r"(neg), "r"(m));
  return m;
}

__device__ __forceinline__ int packed_expert(uint32_t k) { return static_cast<int>(0xffffu - (k & 0xffffu)); }
__device__ __forceinline__ float packed_value(uint32_t k) {
  const uint32_t h = k >> 16;
  if (h == 0u) return __uint_as_float(0x7fc00000u);
  return __uint_as_float(((h & 0x8000u) ? (h & 0x7fffu) : (~h & 0xffffu)) << 16);
}

}  // namespace bitep::kernels::router_detail
