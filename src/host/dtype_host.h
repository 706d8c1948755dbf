// SPDX-License-Identifier: Apache-2.0
// bf16 / fp16 <-> fp32 on the host, round-to-nearest-even, bit-exact with CUDA's __float2bfloat16_rn
// and __float2half_rn (NaN stays NaN).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/router_params.h"

namespace bitep::host {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {               // half subnormal or zero: value = a_float * 2^24 rounded
    if (a < 0x33000000u) return sign;  // below half the smallest subnormal
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (112 - e) + ... chosen so that result = m >> shift
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float load_as_float(const void* base, kernels::DType dt, int64_t i) {
  switch (dt) {
    case kernels::DType::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case kernels::DType::kF16:
      return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

inline void store_from_float(void* base, kernels::DType dt, int64_t i, float v) {
  switch (dt) {
    case kernels::DType::kBF16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
      break;
    case kernels::DType::kF16:
      static_cast<uint16_t*>(base)[i] = float_to_half(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
      break;
  }
}

inline int dtype_bytes(kernels::DType dt) { return dt == kernels::DType::kF32 ? 4 : 2; }

}  // namespace bitep::host
