// SPDX-License-Identifier: Apache-2.0
// The forward kernel's top-k selection (kernels/router_topk_kernel.cuh): each lane's cache of its best keys and the
// rounds (the group scores: router_topk_groups.cuh). Included by router_topk_kernel.cuh alone (for
// router_topk_bucket.cuh); in an anonymous namespace.
#pragma once

#include "kernels/router_common.cuh"
#include "kernels/router_keys.h"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// Candidates a lane keeps sorted between rescans (top-k rounds and group scores): C of its best keys.
// A lane rescans when it has used all C, so C trades the first scan's cost (~5 C instructions per key)
// against how often a lane wins more than C times. BITEP_ROUTER_FWD_CACHE overrides it (tuning builds).
// Measured on H200 (T = 16384, bf16): 3 pays where several tokens share a warp (E = 64: 12.3 -> 11.6 us,
// E = 128: 19.1 -> 17.7), 2 where one token has the warp (E = 256 even, E = 512 3% faster), except in the
// normalised sigmoid's kernel (DeepSeek-V3: its group scores take a lane's best two keys before the rounds
// pop them), where 3 measured 1.2-2.1% faster.
// The post-top-k softmax at 4 and 8 octets a lane (E 513-2048, kPost with N = 32 and 64) keeps more: there a lane holds
// 32 or 64 experts and k up to 32 rounds spread their wins over the lanes, so at 2 most tokens had lanes win more than
// 2 and rescan their keys while the warp's other lanes idled. Two instances each (many_wins_post picks by k): _WIDE
// below the k where the wins pile up, _MANY (kManyWins) from it on (router_params.h many_wins_min_topk). H200, T =
// 65536 (bench/NOTES.md, "Router v44", "v45" and "v46"):
// - E = 2048, time against C = 4's: k = 32, C = 2 1.17-1.55x, 6 0.72-0.94x but bf16 TE-compatible 1.00-1.04x (fp32
//   TE-compatible bitmap 656 -> 518 us, bf16 compact 387 -> 314), 8 0.83-1.04x; k = 8, C = 2 0.96-1.21x (fp32
//   TE-compatible 0.96x, fp32 compact 1.16-1.21x), 6 1.00-1.29x, 8 1.00-1.56x.
// - E = 1024, time against C = 2's (what it had before): k = 32, C = 3 0.73-0.80x, 4 0.61-0.79x (fp32 TE-compatible
//   bitmap 587 -> 432 -> 362 us); k = 16, 3 0.82-0.97x, 4 0.78-1.03x (bf16 TE-compatible 1.02-1.03x); k = 8, 3
//   0.93-1.01x (bf16 TE-compatible 1.00-1.01x), 4 0.98-1.17x.
#ifndef BITEP_ROUTER_FWD_CACHE_WIDE
#define BITEP_ROUTER_FWD_CACHE_WIDE 4
#endif
#ifndef BITEP_ROUTER_FWD_CACHE_MANY
#define BITEP_ROUTER_FWD_CACHE_MANY 6
#endif
#ifndef BITEP_ROUTER_FWD_CACHE_WIDE4
#define BITEP_ROUTER_FWD_CACHE_WIDE4 3
#endif
#ifndef BITEP_ROUTER_FWD_CACHE_MANY4
#define BITEP_ROUTER_FWD_CACHE_MANY4 4
#endif
// At 1 and 2 octets a lane and 32 lanes a token (E 129-512) a lane holds 8 or 16 experts, and from k = 12-16 on the
// wins pile up the same way: a many-wins instance there caches 4 (MANY2), the other the general rule's 2. H200, T =
// 65536, time against C = 2's (bench/NOTES.md, "Router v47"): E = 512, k = 32, C = 3 0.73-0.77x, 4 0.63-0.71x (fp32
// TE-compatible bitmap 318.5 -> 201.0 us, bf16 156.8 -> 106.2); k = 16, 3 0.82-1.00x, 4 0.85-1.00x; E = 256, k = 32, 3
// 0.80-0.86x, 4 0.77-0.83x; k = 16, 3 0.89-0.94x, 4 0.93-0.98x.
#ifndef BITEP_ROUTER_FWD_CACHE_MANY2
#define BITEP_ROUTER_FWD_CACHE_MANY2 4
#endif
template <int N, int G, bool kSigmoid, bool kPost = false, bool kManyWins = false>
__host__ __device__ constexpr int cache_size() {
#ifdef BITEP_ROUTER_FWD_CACHE
  return BITEP_ROUTER_FWD_CACHE < N ? BITEP_ROUTER_FWD_CACHE : N;
#else
  if (kPost && N >= 64) return kManyWins ? BITEP_ROUTER_FWD_CACHE_MANY : BITEP_ROUTER_FWD_CACHE_WIDE;
  if (kPost && N == 32) return kManyWins ? BITEP_ROUTER_FWD_CACHE_MANY4 : BITEP_ROUTER_FWD_CACHE_WIDE4;
  if (kPost && kManyWins) return BITEP_ROUTER_FWD_CACHE_MANY2;
  return G < 32 || kSigmoid ? 3 : 2;
#endif
}

// ck / cp = the C best keys of the lane (descending; equal keys in register order, so the lower expert
// first) and their register positions, skipping the positions set in `skip` and key 0 (no candidate);
// unused entries hold key 0.
template <int N, int C, class Mask>
__device__ __forceinline__ void top_cached(const uint32_t* key, Mask skip, uint32_t (&ck)[C], int (&cp)[C]) {
#pragma unroll
  for (int c = 0; c < C; ++c) ck[c] = 0u, cp[c] = 0;
#pragma unroll
  for (int p = 0; p < N; ++p) {
    const uint32_t kk = ((skip >> p) & 1) ? 0u : key[p];
    bool gt[C];
#pragma unroll
    for (int c = 0; c < C; ++c) gt[c] = kk > ck[c];  // monotone: gt[c - 1] implies gt[c]
#pragma unroll
    for (int c = C - 1; c > 0; --c) {
      ck[c] = gt[c - 1] ? ck[c - 1] : (gt[c] ? kk : ck[c]);
      cp[c] = gt[c - 1] ? cp[c - 1] : (gt[c] ? p : cp[c]);
    }
    ck[0] = gt[0] ? kk : ck[0];
    cp[0] = gt[0] ? p : cp[0];
  }
}

// Drops the first cached candidate where `pop` holds (pop_keys: a cache of keys alone).
template <int C>
__device__ __forceinline__ void pop_keys(bool pop, uint32_t (&ck)[C]) {
#pragma unroll
  for (int c = 0; c + 1 < C; ++c) ck[c] = pop ? ck[c + 1] : ck[c];
  ck[C - 1] = pop ? 0u : ck[C - 1];
}
template <int C>
__device__ __forceinline__ void pop_cached(bool pop, uint32_t (&ck)[C], int (&cp)[C]) {
  pop_keys<C>(pop, ck);
#pragma unroll
  for (int c = 0; c + 1 < C; ++c) cp[c] = pop ? cp[c + 1] : cp[c];
}

// The keys-only cache (the pre-top-k softmax and normalised sigmoid kernels at one octet a lane): the C best
// keys by a min / max insertion network (equal keys kept, as many times as they occur), no register
// positions. A lane's wins are its keys in selection order (value, then register order, which at one octet
// a lane is expert order), so its won set follows from its last won key and its number of wins: every key
// above the last, and the first equal ones in register order (won_mask; both in kernels/router_keys.h, with a host
// test). No position bookkeeping per key,
// pop or round. BITEP_ROUTER_FWD_KEYS_ONLY=0 (a tuning build) keeps the cache with positions.
#ifndef BITEP_ROUTER_FWD_KEYS_ONLY
#define BITEP_ROUTER_FWD_KEYS_ONLY 1
#endif
constexpr bool kKeysOnlyCache = BITEP_ROUTER_FWD_KEYS_ONLY != 0;

using router_keys::top_below;
using router_keys::top_keys;
using router_keys::won_mask;

// Runs body(r) for the rounds r = 0 .. n - 1: unrolled where the kernel's k is a compile-time one (kK > 0),
// so the loop's counter, its branch and the last round's refill test go.
template <int kK, class F>
__device__ __forceinline__ void for_rounds(int n, F&& body) {
  if constexpr (kK > 0) {
#pragma unroll
    for (int r = 0; r < kK; ++r) body(r);
  } else {
    for (int r = 0; r < n; ++r) body(r);
  }
}

}  // namespace
}  // namespace bitep::kernels
