// SPDX-License-Identifier: Apache-2.0
// The environment switches (BITEP_LSA, BITEP_SPLIT_MIN_BYTES, ...: tuning and A/B knobs that README and
// bench/NOTES.md name). Callers that decide per call read a switch once into a function-local static, but
// for BITEP_ROUTER_SPEC and BITEP_ROUTER_TWO_OCTETS_MIN, read per call so a test compares the router's kernels in one
// process (src/router.cc).
#pragma once

#include <cstdlib>
#include <cstring>

namespace bitep {

// Whether the environment variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// The environment variable `name` as a whole decimal integer in [lo, hi]; `fallback` when it is unset, empty,
// not a whole number or out of range.
inline int env_int(const char* name, int lo, int hi, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return end != nullptr && *end == '\0' && n >= lo && n <= hi ? static_cast<int>(n) : fallback;
}

}  // namespace bitep
