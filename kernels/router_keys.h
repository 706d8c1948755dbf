// SPDX-License-Identifier: Apache-2.0
// A lane's selection keys in the warp-per-token router (kernels/router_topk_select.cuh): the cache of its best keys and
// the set of its keys it has won, from its last won key and its number of wins. Plain C++ that compiles for the
// host too, so tests/unit/router_keys_test.cc checks these against a brute-force top-k without a GPU.
#pragma once

#include <cstdint>

#include "kernels/router_params.h"  // BITEP_HOST_DEVICE

namespace bitep::kernels::router_keys {

BITEP_HOST_DEVICE inline int popcount(uint32_t m) {
#if defined(__CUDA_ARCH__)
  return __popc(m);
#else
  return __builtin_popcount(m);
#endif
}
BITEP_HOST_DEVICE inline int popcount(unsigned long long m) {
#if defined(__CUDA_ARCH__)
  return __popcll(m);
#else
  return __builtin_popcountll(m);
#endif
}

// ck = the C largest of a lane's N keys key[p] for which keep(p) holds, descending, equal keys kept as many
// times as they occur; key 0 ("no candidate") fills what is left. A min / max insertion network: two
// instructions a cache entry a key, no register positions.
template <int N, int C, class Keep>
BITEP_HOST_DEVICE inline void top_where(const uint32_t* key, Keep keep, uint32_t (&ck)[C]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int c = 0; c < C; ++c) ck[c] = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int p = 0; p < N; ++p) {
    uint32_t kk = keep(p) ? key[p] : 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < C; ++c) {
      const uint32_t lo = ck[c] < kk ? ck[c] : kk;
      ck[c] = ck[c] < kk ? kk : ck[c];
      kk = lo;
    }
  }
}

// The C largest keys outside `skip` (bit p: key p).
template <int N, int C, class Mask>
BITEP_HOST_DEVICE inline void top_keys(const uint32_t* key, Mask skip, uint32_t (&ck)[C]) {
  top_where<N, C>(
      key, [skip](int p) { return ((skip >> p) & 1) == 0; }, ck);
}

// The C largest keys below `below` (the packed bf16 keys, unique: a lane's wins are its keys from its last win up).
template <int N, int C>
BITEP_HOST_DEVICE inline void top_below(const uint32_t* key, uint32_t below, uint32_t (&ck)[C]) {
  top_where<N, C>(
      key, [key, below](int p) { return key[p] < below; }, ck);
}

// The positions (bit p: key p) of a lane's `wins` best keys in selection order (key descending, then the
// lower position), the last of which is `last`: every key above `last`, then the keys equal to it from the
// lowest position until there are `wins`. Equal keys inside a lane at the cut are rare: a loop then. Empty
// when `wins` is 0.
template <int N, class Mask>
BITEP_HOST_DEVICE inline Mask won_mask(const uint32_t* key, uint32_t last, int wins) {
  Mask m = 0;
  if (wins == 0) return m;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int p = 0; p < N; ++p) m |= key[p] >= last ? static_cast<Mask>(1u) << p : static_cast<Mask>(0);
  int extra = popcount(m) - wins;
  for (int p = N - 1; p >= 0 && extra > 0; --p)
    if (key[p] == last) m &= ~(static_cast<Mask>(1u) << p), --extra;
  return m;
}

// Rounds without the cache's refill (DeepSeek-V3's and the normalised sigmoid's first rounds,
// kernels/router_topk_kernel.cuh): a lane that has won all C of its cached keys (wins == C) sits the later rounds out.
// Whether it could have won one of them: an unwon copy of its last won key `last`, or its best key below `last` at
// least the last round's maximum `gm_last` (every round after its last win had a maximum at least gm_last, so a key
// below gm_last would have won none). False for a lane that did not run dry.
template <int N>
BITEP_HOST_DEVICE inline bool sat_out_lost(const uint32_t* key, uint32_t last, int wins, int C, uint32_t gm_last) {
  int at_least = 0;
  uint32_t next = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int p = 0; p < N; ++p) {
    at_least += key[p] >= last ? 1 : 0;
    next = key[p] < last && key[p] > next ? key[p] : next;
  }
  return wins == C && (at_least > wins || (next != 0u && next >= gm_last));
}

}  // namespace bitep::kernels::router_keys
