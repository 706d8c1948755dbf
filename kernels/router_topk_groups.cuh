// SPDX-License-Identifier: Apache-2.0
// The forward kernel's group-limited routing (kernels/router_topk_kernel.cuh, steps 3 and 3b): a group scores the sum
// of its best per_group selection keys, in selection order from 0.0f, and only the best group_topk groups' experts stay
// candidates; the others' keys become kKeyNone, and the lane's cache of its best keys (router_topk_select.cuh) is
// filled again from those left. Groups of a power of two of octets (step 3), and groups of any width at one octet a
// lane (step 3b). Included by router_topk_kernel.cuh alone (for router_topk_bucket.cuh); in an anonymous
// namespace.
#pragma once

#include <climits>

#include "kernels/router_common.cuh"
#include "kernels/router_keys.h"
#include "kernels/router_topk_select.cuh"
#include "kernels/router_topk_spec.cuh"

namespace bitep::kernels {
namespace {

using namespace router_detail;

// A group's score when it sums its best one or two keys (DeepSeek-V3: k / group_topk = 2): each lane
// brings its own two best keys of the group's slot (a0 >= a1; kKeyNone for none) and a butterfly over the
// group's q aligned lanes merges pairs (the best two of two sorted pairs: 2 shuffles and 3 min / max a
// step), no ballot and no pops. The best two of the multiset of keys, summed from 0.0f in selection order
// (equal keys have equal values): the bits of the rounds it replaces. BITEP_ROUTER_GROUP_PAIRS=0 (a tuning
// build) keeps the rounds.
#ifndef BITEP_ROUTER_GROUP_PAIRS
#define BITEP_ROUTER_GROUP_PAIRS 1
#endif
constexpr bool kGroupPairs = BITEP_ROUTER_GROUP_PAIRS != 0;

// The best two keys (a0 >= a1) of the pairs (a0, a1) and (b0, b1).
__device__ __forceinline__ void pair_merge(uint32_t& a0, uint32_t& a1, uint32_t b0, uint32_t b1) {
  const uint32_t lo = min(a0, b0);
  a0 = max(a0, b0);
  a1 = max(max(a1, b1), lo);
}

__device__ __forceinline__ float group_pair_sum(uint32_t a0, uint32_t a1, int q, int per_group) {
  for (int d = 1; d < q; d <<= 1)
    pair_merge(a0, a1, __shfl_xor_sync(kFullMask, a0, d), __shfl_xor_sync(kFullMask, a1, d));
  const float s = __fadd_rn(0.0f, key_value(a0));
  return per_group == 2 ? __fadd_rn(s, key_value(a1)) : s;
}

// Step 3: groups of q octets, q a power of two up to the segment's G lanes (a group: q aligned lanes of one slot).
// key: the lane's N = 8 NS keys; ck / cp: its cache (cp unused where kKeysOnly), which it reads at one slot a lane and
// fills again otherwise; nval: each slot's experts (0: no group score). lane: the lane in the warp, sl in its segment
// of G lanes (seg: the segment's lanes).
template <int G, int NS, int C, bool kV3, bool kKeysOnly, class Mask, class Params, class Layout>
__device__ __forceinline__ void keep_groups_of_octets(uint32_t (&key)[8 * NS],
                                                      uint32_t (&ck)[C],
                                                      int (&cp)[C],
                                                      const int (&nval)[NS],
                                                      const Params& p,
                                                      const Layout& lay,
                                                      int lane,
                                                      int sl,
                                                      uint32_t seg) {
  constexpr int N = 8 * NS;
  const int q = kV3 ? kV3Shape.group_octets : lay.group_octets, qs = __ffs(q) - 1;  // q is a power of two
  const int per_group = kV3 ? kV3Shape.per_group : lay.per_group;
  const int group_topk = kV3 ? kV3Shape.group_topk : p.group_topk;
  if (NS == 1 && per_group <= C) {
    // One group per lane: the group's best keys are among its lanes' cached ones.
    const uint32_t gl = q == 32 ? kFullMask : ((1u << q) - 1u) << (lane & ~(q - 1)), gbelow = lanemask_lt() & gl;
    uint32_t gk[C];
#pragma unroll
    for (int c = 0; c < C; ++c) gk[c] = ck[c];
    float gsum = 0.0f;
    if (kGroupPairs && per_group <= 2 && C >= 2) {
      gsum = group_pair_sum(gk[0], gk[C > 1 ? 1 : 0], q, per_group);  // C = 1: a tuning build only
    } else {
      for (int j = 0; j < per_group; ++j) {
        const uint32_t gm = group_max_u32(gk[0], q);
        const bool eq = gk[0] == gm && gm != kKeyNone;
        const uint32_t bal = __ballot_sync(kFullMask, eq);
        const bool win = eq && (bal & gbelow) == 0u;
        gsum = __fadd_rn(gsum, key_value(gm));
        pop_keys<C>(win, gk);
      }
    }
    // The best group_topk groups: every lane of a group holds its score, so the lowest lane of a tie
    // is the first lane of the lowest group: a hit when that lane is one of the group's (gl).
    uint32_t gkey = nval[0] > 0 ? select_key(gsum) : kKeyNone;
    bool keep = false;
    if constexpr (kV3) {
      // DeepSeek-V3's 8 groups of 4 lanes: a group is kept when fewer than group_topk groups rank above it (a higher
      // score, or the same and a lower group): what the rounds below keep, in two compares a lane (lane j of a group
      // compares it with groups j and j + 4) and two ballots, not 4 rounds of a reduction and a ballot.
      constexpr int kQ = kV3Shape.group_octets, kGroups = G / kQ;
      static_assert(kGroups % kQ == 0, "each lane of a group compares it with kGroups / kQ groups");
      // The lane read here (not the kernel's `sl`, which the compiler would keep, with what it derives, through the
      // tile: ptxas spilled 4-8 bytes at the kernel's 40 registers).
      uint32_t ln;
      asm volatile("mov.u32 %0, %%laneid;" : "=r"(ln));
      const int g = static_cast<int>(ln) / kQ;
      int above = 0;
#pragma unroll
      for (int c = 0; c < kGroups / kQ; ++c) {
        const int h = static_cast<int>(ln) % kQ + c * kQ;
        const uint32_t hk = __shfl_sync(kFullMask, gkey, h * kQ);
        const bool a = hk > gkey || (hk == gkey && h < g);
        above += __popc(__ballot_sync(kFullMask, a) & (((1u << kQ) - 1u) << (kQ * g)));
      }
      keep = gkey != kKeyNone && above < group_topk;
    } else {
      for (int r = 0; r < group_topk; ++r) {
        const uint32_t gm = seg_max_u32<G>(gkey);
        const bool eq = gkey == gm && gm != kKeyNone;
        const uint32_t bal = __ballot_sync(kFullMask, eq) & seg;
        const bool hit = (bal & (0u - bal) & gl) != 0u;
        keep = keep || hit;
        gkey = hit ? kKeyNone : gkey;
      }
    }
    if (!keep) {
#pragma unroll
      for (int i = 0; i < N; ++i) key[i] = kKeyNone;
#pragma unroll
      for (int c = 0; c < C; ++c) ck[c] = kKeyNone;
    }
  } else {
    float gsum[NS];
    Mask gtaken = 0;
#pragma unroll
    for (int s = 0; s < NS; ++s) gsum[s] = 0.0f;
    if (kGroupPairs && per_group <= 2) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        uint32_t a0 = kKeyNone, a1 = kKeyNone;  // the slot's two best keys of this lane
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const uint32_t kk = key[8 * s + b], lo = min(a0, kk);
          a0 = max(a0, kk);
          a1 = max(a1, lo);
        }
        gsum[s] = group_pair_sum(a0, a1, q, per_group);
      }
    }
    for (int j = 0; j < (kGroupPairs && per_group <= 2 ? 0 : per_group); ++j) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        uint32_t bk = 0u;
        int bb = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          const uint32_t kk = ((gtaken >> (8 * s + b)) & 1) ? kKeyNone : key[8 * s + b];
          if (kk > bk) bk = kk, bb = b;
        }
        const uint32_t gm = group_max_u32(bk, q);
        const int ci = (bk == gm && bk != kKeyNone) ? (s * G + sl) * 8 + bb : INT_MAX;
        const int gi = group_min_i32(ci, q);
        gsum[s] = __fadd_rn(gsum[s], key_value(gm));
        if (ci == gi && bk != kKeyNone) gtaken |= static_cast<Mask>(1u) << (8 * s + bb);
      }
    }
    uint32_t gkey[NS];
    bool keep[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      keep[s] = false;
      gkey[s] = nval[s] > 0 ? select_key(gsum[s]) : kKeyNone;
    }
    for (int r = 0; r < group_topk; ++r) {
      uint32_t bk = 0u;
      int bg = INT_MAX;
#pragma unroll
      for (int s = 0; s < NS; ++s)
        if (gkey[s] > bk) bk = gkey[s], bg = (s * G + sl) >> qs;
      const uint32_t gm = seg_max_u32<G>(bk);
      const int gw = seg_min_i32<G>((bk == gm && bk != kKeyNone) ? bg : INT_MAX);
#pragma unroll
      for (int s = 0; s < NS; ++s)
        if ((s * G + sl) >> qs == gw) keep[s] = true, gkey[s] = kKeyNone;
    }
#pragma unroll
    for (int s = 0; s < NS; ++s)
      if (!keep[s]) {
#pragma unroll
        for (int b = 0; b < 8; ++b) key[8 * s + b] = kKeyNone;
      }
    if constexpr (kKeysOnly)
      top_keys<N, C>(key, static_cast<Mask>(0), ck);
    else
      top_cached<N, C>(key, static_cast<Mask>(0), ck, cp);
  }
}

// Step 3b: groups that are not whole octets (DeepSeek-V2: 8 groups of 20 experts), at one octet a lane. A lane's octet
// meets at most two groups (at least 8 experts each): its part A (elements [0, split)) is group g0's, its part B the
// next group's, and the lane brings the best two keys of each. Every group holds an octet's start, so its lanes are
// the lanes whose g0 is that group (its A parts; lane order is group order), plus the B part of the lane before them
// where the group starts inside an octet. Each group's best two keys: a segmented suffix merge of the A parts over its
// lanes (steps of 1, 2, .. below the octets a group spans), then the B part before; the group's first lane takes its
// score (group_pair_sum's merge and sum, the same bits) and holds its key for the group rounds, so the lowest lane of
// a tie is the lowest group. The launch's conditions: E <= 256, per_group <= 2. group_size 0: no groups; either way
// the cache is filled here (the kernel's kAnyWidthGroups instances fill it nowhere else). tv: the lane's token is
// below T; below: the segment's lanes below this one.
template <int G, int C, bool kKeysOnly, class Params, class Layout>
__device__ __forceinline__ void keep_groups_of_any_width(uint32_t (&key)[8],
                                                         uint32_t (&ck)[C],
                                                         int (&cp)[C],
                                                         int E,
                                                         bool tv,
                                                         const Params& p,
                                                         const Layout& lay,
                                                         int lane,
                                                         int sl,
                                                         uint32_t seg,
                                                         uint32_t below) {
  constexpr int N = 8;
  using Mask = uint32_t;
  if (lay.group_size > 0) {
    // g0 = e0 / gsz: (e0 + 1/2) / gsz is at least 1 / 512 from an integer (e0, gsz <= 256), far more than the
    // approximate division's error (2 ulps of a value below 32).
    const int gsz = lay.group_size, e0 = sl * 8;
    const int g0 = static_cast<int>(__fdividef(static_cast<float>(e0) + 0.5f, static_cast<float>(gsz)));
    const int split = min((g0 + 1) * gsz - e0, 8);
    uint32_t a0 = kKeyNone, a1 = kKeyNone, b0 = kKeyNone, b1 = kKeyNone;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const uint32_t ka = b < split ? key[b] : kKeyNone, kb = b < split ? kKeyNone : key[b];
      a1 = max(a1, min(a0, ka));
      a0 = max(a0, ka);
      b1 = max(b1, min(b0, kb));
      b0 = max(b0, kb);
    }
    const int span = (gsz + 7) / 8;  // the most octets that start in one group
    for (int d = 1; d < span; d <<= 1) {
      const uint32_t d0 = __shfl_down_sync(kFullMask, a0, d), d1 = __shfl_down_sync(kFullMask, a1, d);
      const int dg = __shfl_down_sync(kFullMask, g0, d);
      if (sl + d < G && dg == g0) pair_merge(a0, a1, d0, d1);
    }
    const uint32_t p0 = __shfl_up_sync(kFullMask, b0, 1), p1 = __shfl_up_sync(kFullMask, b1, 1);
    const int pg = __shfl_up_sync(kFullMask, g0, 1);
    const bool first = e0 < E && (sl == 0 || pg != g0);  // the group's first lane (g0 < E / gsz)
    if (sl > 0 && pg + 1 == g0) pair_merge(a0, a1, p0, p1);
    // the score as group_pair_sum sums it
    const float gs0 = __fadd_rn(0.0f, key_value(a0));
    const float gsum = lay.per_group == 2 ? __fadd_rn(gs0, key_value(a1)) : gs0;
    uint32_t gkey = first && tv ? select_key(gsum) : kKeyNone;
    bool keep = false;
    for (int r = 0; r < p.group_topk; ++r) {
      const uint32_t gm = seg_max_u32<G>(gkey);
      const bool eq = gkey == gm && gm != kKeyNone;
      const uint32_t bal = __ballot_sync(kFullMask, eq) & seg;
      const bool hit = eq && (bal & below) == 0u;
      keep = keep || hit;
      gkey = hit ? kKeyNone : gkey;
    }
    // Group g0 is kept if its first lane (the last first lane at or below this one) is; group g0 + 1 if the next
    // first lane above this one is.
    const uint32_t firsts = __ballot_sync(kFullMask, first) & seg, kept = __ballot_sync(kFullMask, keep) & seg;
    const uint32_t at_or_below = firsts & (below | (1u << lane)), above = firsts & ~(below | (1u << lane));
    const bool keep0 = at_or_below != 0u && ((kept >> (31 - __clz(at_or_below))) & 1u);
    const bool keep1 = above != 0u && ((kept >> (__ffs(above) - 1)) & 1u);
#pragma unroll
    for (int b = 0; b < 8; ++b)
      if (!(b < split ? keep0 : keep1)) key[b] = kKeyNone;
  }
  if constexpr (kKeysOnly)
    top_keys<N, C>(key, static_cast<Mask>(0), ck);
  else
    top_cached<N, C>(key, static_cast<Mask>(0), ck, cp);
}

}  // namespace
}  // namespace bitep::kernels
