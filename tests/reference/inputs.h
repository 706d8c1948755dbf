// SPDX-License-Identifier: Apache-2.0
// Deterministic inputs for the tests and benchmarks: a value is a pure function of its (seed, index),
// on the host and, under nvcc, on the device, so any rank, kernel or checker can recompute it.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BITEP_REF_HD __host__ __device__
#else
#define BITEP_REF_HD
#endif

namespace bitep::ref {

// splitmix64's finaliser: a well-mixed 64-bit hash of x.
BITEP_REF_HD inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A standard normal value for (seed, i) (Box-Muller over two mixed uniforms). Host only.
inline float gauss(uint64_t seed, uint64_t i) {
  const uint64_t a = mix(seed * 0x100000001b3ull + i), b = mix(a);
  const double u1 = ((a >> 11) + 0.5) * (1.0 / 9007199254740992.0), u2 = (b >> 11) * (1.0 / 9007199254740992.0);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

}  // namespace bitep::ref

#undef BITEP_REF_HD
