// SPDX-License-Identifier: Apache-2.0
// Dispatch layout (kernels/ep_params.h, LayoutParams): routing input -> per destination rank counts,
// per (rank, local expert) counts, and each token's slot in each destination chunk, in ascending token
// order. Deterministic: integer counts only, positions from ballot scans in token order.
//
// No scratch beyond the outputs:
// - T <= kSingleMaxItems (256): one block finds every token's ranks (a token's row split among lanes), then scans
//   them in token order and writes every output itself: one launch (layout_single_kernel).
// - larger T: tokens split into S contiguous segments (S <= 2 x SMs):
//     1. count: per segment, per rank totals -> stored in the segment's last row of token_slot;
//        per expert totals -> atomically added (integers) to the zeroed counts;
//     2. offsets: one block turns the stored totals into exclusive per-segment offsets in place and
//        writes counts[r][0];
//     3. slots: per segment, reads its offsets, then scans its tokens and writes every slot (the last
//        row is read before it is rewritten, by the same block).
//   With scratch (LayoutParams::scratch) the three passes and the packing are one launch (layout_fused_kernel):
//   each block takes the next segment by ticket, counts its tokens per rank into the scratch, raises its flag,
//   waits for the flags of the segments before it and starts each rank at the sum of their counts; the last
//   segment writes the totals and the last block to finish packs the exchange's rows.

#include <cstdint>

#include "kernels/ep.h"
#include "kernels/ep_common.cuh"
#include "kernels/sync.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

constexpr int kMaxSmemExperts = 4096;  // expert counts in shared memory up to this E, else global atomics

struct LayoutArgs {
  RouteView v;
  int64_t num_tokens;
  int num_ranks;
  int local_experts;
  int32_t* counts;      // [W, L + 1]
  int32_t* token_slot;  // [T, W]
  int64_t seg_len;      // tokens per segment (multiple of the block size)
  int num_segs;
  bool smem_experts;  // per-expert counts accumulate in shared memory (else global atomics, counts zeroed)
  bool vec4;          // token_slot rows written as int4 (W % 4 == 0, base 16-byte aligned)
  int32_t* pack_out;  // the single and fused passes: the exchange's send rows too (LayoutParams::pack_out)
  int pack_row;
  int32_t pack_flags;
  int32_t* scratch;  // the fused pass: header (ticket, finished blocks), S flags, [S][W] segment totals
};

// Entry i of the count exchange's send rows (PackCountsParams); counts read through L2 (the single pass
// packs what its own block wrote, some of it by atomics).
__device__ __forceinline__ void pack_entry(
    const int32_t* counts, int W, int L, int row, int32_t flags, int64_t i, int32_t* out) {
  const int peer = static_cast<int>(i / row), c = static_cast<int>(i % row);
  if (c <= L)
    out[i] = __ldcg(counts + static_cast<int64_t>(peer) * (L + 1) + c);
  else if (c == L + 1)
    out[i] = flags;
  else if (c >= L + 2 && c < L + 2 + W)
    out[i] = __ldcg(counts + static_cast<int64_t>(c - L - 2) * (L + 1));
}

__device__ __forceinline__ int32_t* expert_count(const LayoutArgs& a, int e) {
  const int r = e / a.local_experts;
  return a.counts + static_cast<int64_t>(r) * (a.local_experts + 1) + 1 + (e - r * a.local_experts);
}

// Ranks [rg, rg + nr) that token t goes to, as bits; with `count`, adds 1 per routed expert of those ranks.
__device__ __forceinline__ uint32_t rank_mask(const LayoutArgs& a, int64_t t, int rg, int nr, bool count, int* ecnt) {
  uint32_t m = 0;
  const int L = a.local_experts;
  for_each_routed(a.v, t, rg * L, (rg + nr) * L, [&](int e, int) {
    m |= 1u << (e / L - rg);
    if (count) {
      if (a.smem_experts)
        atomicAdd(ecnt + e, 1);
      else
        atomicAdd(expert_count(a, e), 1);
    }
  });
  return m;
}

__device__ __forceinline__ int64_t seg_last_row(const LayoutArgs& a, int s) {
  const int64_t end = (static_cast<int64_t>(s) + 1) * a.seg_len;
  return (end < a.num_tokens ? end : a.num_tokens) - 1;
}

// Tokens [t0, t1) per rank of [rg, rg + nr) into totals[0, nr) (zeroed by the caller, then a __syncthreads);
// with `count`, per expert counts added too (rank_mask). Ends with a __syncthreads.
template <int kThreads>
__device__ __forceinline__ void segment_totals(
    const LayoutArgs& a, int64_t t0, int64_t t1, int rg, int nr, bool count, int* ecnt, int* totals) {
  const int lane = threadIdx.x & (kWarp - 1);
  int mine = 0;  // lane j: tokens of this warp going to rank rg + j
  for (int64_t tb = t0; tb < t1; tb += kThreads) {
    const int64_t t = tb + threadIdx.x;
    const uint32_t mask = t < t1 ? rank_mask(a, t, rg, nr, count, ecnt) : 0u;
    for (int j = 0; j < nr; ++j) {
      const uint32_t b = __ballot_sync(kFullMask, (mask >> j) & 1u);
      if (lane == j) mine += __popc(b);
    }
  }
  if (lane < nr) atomicAdd(&totals[lane], mine);
  __syncthreads();
}

// The slots of tokens [t0, t1) for ranks [rg, rg + nr), each rank starting at s.carry (set by the caller, then a
// __syncthreads); s.carry ends past the segment's last slot. With `count`, per expert counts added too.
template <int kThreads>
__device__ __forceinline__ void slot_tiles(
    const LayoutArgs& a, TileScanSmem<kThreads>& s, int64_t t0, int64_t t1, int rg, int nr, bool count, int* ecnt) {
  const int W = a.num_ranks;
  for (int64_t tb = t0; tb < t1; tb += kThreads) {
    const int64_t t = tb + threadIdx.x;
    const bool valid = t < t1;
    const uint32_t mask = valid ? rank_mask(a, t, rg, nr, count, ecnt) : 0u;
    tile_totals(s, mask, nr);
    __syncthreads();
    tile_prefix(s, nr);
    __syncthreads();
    int32_t* row = a.token_slot + t * W + rg;
    if (a.vec4) {  // nr is a multiple of 4 here
      for (int j = 0; j < nr; j += 4) {
        int4 q;
        q.x = tile_slot(s, j);
        q.y = tile_slot(s, j + 1);
        q.z = tile_slot(s, j + 2);
        q.w = tile_slot(s, j + 3);
        if (!((mask >> j) & 1u)) q.x = -1;
        if (!((mask >> (j + 1)) & 1u)) q.y = -1;
        if (!((mask >> (j + 2)) & 1u)) q.z = -1;
        if (!((mask >> (j + 3)) & 1u)) q.w = -1;
        if (valid) *reinterpret_cast<int4*>(row + j) = q;
      }
    } else {
      for (int j = 0; j < nr; ++j) {
        const int slot = tile_slot(s, j);
        if (valid) row[j] = ((mask >> j) & 1u) ? slot : -1;
      }
    }
    __syncthreads();  // warp_base and carry are reused by the next tile
  }
}

// Pass 1 (multi-segment): per segment and rank, the number of tokens going there, into the segment's
// last row of token_slot; per expert counts added to counts.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) layout_count_kernel(LayoutArgs a) {
  extern __shared__ int ecnt[];  // [E] when smem_experts
  __shared__ int totals[kWarp];
  const int tid = threadIdx.x;
  const int E = a.v.num_experts, W = a.num_ranks;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.seg_len;
  const int64_t t1 = seg_last_row(a, blockIdx.x) + 1;
  if (a.smem_experts)
    for (int e = tid; e < E; e += kThreads) ecnt[e] = 0;
  for (int rg = 0; rg < W; rg += kWarp) {
    const int nr = W - rg < kWarp ? W - rg : kWarp;
    if (tid < kWarp) totals[tid] = 0;
    __syncthreads();
    segment_totals<kThreads>(a, t0, t1, rg, nr, true, ecnt, totals);
    if (tid < nr) a.token_slot[(t1 - 1) * W + rg + tid] = totals[tid];
    __syncthreads();
  }
  if (a.smem_experts) {
    for (int e = tid; e < E; e += kThreads)
      if (ecnt[e] != 0) atomicAdd(expert_count(a, e), ecnt[e]);
  }
}

// Pass 2 (multi-segment): one block; warp c' handles ranks c = c', c' + 32, ...: exclusive scan of the
// segment totals in place, and counts[c][0] = the rank's total.
__global__ void __launch_bounds__(kOffsetThreads) layout_offsets_kernel(LayoutArgs a) {
  const int W = a.num_ranks;
  scan_segment_columns(
      a.num_segs, W, [&](int s, int c) { return a.token_slot + seg_last_row(a, s) * W + c; },
      [&](int c, int total) { a.counts[static_cast<int64_t>(c) * (a.local_experts + 1)] = total; });
}

// Pass 3 (or the single pass): token slots. kSingle: one block over all tokens, carry starts at 0,
// counts written here. Otherwise block s starts each rank at the offset pass 2 left in its last row.
template <int kThreads, bool kSingle>
__global__ void __launch_bounds__(kThreads) layout_slot_kernel(LayoutArgs a) {
  extern __shared__ int ecnt[];  // [E] (kSingle and smem_experts)
  __shared__ TileScanSmem<kThreads> s;
  const int tid = threadIdx.x;
  const int E = a.v.num_experts, W = a.num_ranks, L = a.local_experts;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.seg_len;
  const int64_t t1 = seg_last_row(a, blockIdx.x) + 1;
  if (kSingle && a.smem_experts)
    for (int e = tid; e < E; e += kThreads) ecnt[e] = 0;
  for (int rg = 0; rg < W; rg += kWarp) {
    const int nr = W - rg < kWarp ? W - rg : kWarp;
    // The last row's entries of ranks [rg, rg + nr) are rewritten only in this iteration, after the
    // __syncthreads below: reading them here is race-free.
    if (tid < nr) s.carry[tid] = kSingle ? 0 : a.token_slot[(t1 - 1) * W + rg + tid];
    __syncthreads();
    slot_tiles<kThreads>(a, s, t0, t1, rg, nr, kSingle, ecnt);
    if (kSingle && tid < nr) a.counts[static_cast<int64_t>(rg + tid) * (L + 1)] = s.carry[tid];
  }
  if (kSingle && a.smem_experts) {
    __syncthreads();
    for (int e = tid; e < E; e += kThreads) *expert_count(a, e) = ecnt[e];
  }
  if (kSingle && a.pack_out != nullptr) {
    __syncthreads();  // every count written
    const int64_t n = static_cast<int64_t>(W) * a.pack_row;
    for (int64_t i = tid; i < n; i += kThreads) pack_entry(a.counts, W, L, a.pack_row, a.pack_flags, i, a.pack_out);
  }
}

// n bytes from src to dst by the block's threads: 16 bytes a thread where both pointers and n allow it.
template <int kThreads>
__device__ __forceinline__ void block_copy(char* dst, const char* src, int64_t n) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(n)) & 15) == 0) {
    for (int64_t i = threadIdx.x; i < n / 16; i += kThreads)
      reinterpret_cast<uint4*>(dst)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) dst[i] = src[i];
  }
}

// The single pass of T <= kSingleMaxItems tokens (one block, all outputs), in two phases (LayoutSingleArgs): T=128,
// E=256, bitmap: one thread a token walking its row's words one by one ran ~3300 instructions a warp, its lanes
// diverging over their bits (bench/NOTES.md, "The one-block layout: divergence, not code fetch").
//   1. the routing: maps, P = 2^log_lanes lanes a token, each c words of its row (coalesced loads), the first k set
//      bits found by a segmented scan of their popcounts; indices, a thread a (token, entry). Each routed expert adds
//      1 to its count, each destination rank sets its bit in the token's rank words rank_bits[t][W / 32].
//   2. per group of 32 ranks: the ballot scan in token order, the totals, then every slot written item by item
//      (coalesced).
// Shared memory (dynamic, single_layout_smem_bytes): [E] expert counts (smem_experts), [W] rank totals, [T][G] rank
// words. With LayoutParams::map_copy the block also copies the routing map before its first barrier.
struct LayoutSingleArgs {
  LayoutArgs a;
  int row_words;   // maps: ceil(E / 32)
  RowLanes lanes;  // maps: c = lanes.lane_words words a lane, P = 2^lanes.log_lanes lanes a token
  int groups;      // G = ceil(W / 32)
  char* map_copy;  // LayoutParams::map_copy (null: none): the routing input's map_bytes copied there
  int64_t map_bytes;
};

constexpr size_t kSingleStaticSmem = 2 * sizeof(int) * (kSingleThreads / kWarp) * kWarp;  // ballots, warp_base
constexpr size_t kSingleDynamicSmemMax = 48 * 1024 - kSingleStaticSmem;  // within the default limit: no opt-in

inline size_t single_layout_smem_bytes(int64_t T, int E, int W, bool smem_experts) {
  return sizeof(int) * ((smem_experts ? E : 0) + W + T * ((W + kWarp - 1) / kWarp));
}

template <int kThreads, RoutingFormat kFormat>
__global__ void __launch_bounds__(kThreads) layout_single_kernel(LayoutSingleArgs sa) {
  extern __shared__ int smem[];
  static_assert(kThreads == kSingleThreads, "kSingleStaticSmem");
  __shared__ uint32_t ballots[kThreads / kWarp][kWarp];  // per warp, per rank of the group: lanes going there
  __shared__ int warp_base[kThreads / kWarp][kWarp];     // per warp, per rank: its first slot
  const LayoutArgs& a = sa.a;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const int E = a.v.num_experts, W = a.num_ranks, L = a.local_experts, G = sa.groups, k = a.v.topk;
  const int T = static_cast<int>(a.num_tokens);
  int* const ecnt = smem;                                                   // [E] when smem_experts
  int* const rank_total = smem + (a.smem_experts ? E : 0);                  // [W]
  uint32_t* const rank_bits = reinterpret_cast<uint32_t*>(rank_total + W);  // [T][G]
  if (a.smem_experts)
    for (int e = tid; e < E; e += kThreads) ecnt[e] = 0;
  for (int i = tid; i < T * G; i += kThreads) rank_bits[i] = 0u;
  if (sa.map_copy != nullptr) block_copy<kThreads>(sa.map_copy, reinterpret_cast<const char*>(a.v.map8), sa.map_bytes);
  __syncthreads();

  // Expert e of token t: its count, and its rank's bit unless the last expert seen there was of the same rank.
  auto routed = [&](int t, int e, int& rank_end) {
    int r = -1;
    if (e >= rank_end || !a.smem_experts) r = e / L;
    if (e >= rank_end) {
      rank_end = (r + 1) * L;
      atomicOr(rank_bits + static_cast<int64_t>(t) * G + r / kWarp, 1u << (r % kWarp));
    }
    if (a.smem_experts)
      atomicAdd(ecnt + e, 1);
    else
      atomicAdd(a.counts + static_cast<int64_t>(r) * (L + 1) + 1 + (e - r * L), 1);
  };
  if constexpr (kFormat == RoutingFormat::kTopkIndices) {
    for (int i = tid; i < T * k; i += kThreads) {
      const int t = i / k, j = i - t * k;
      const int32_t* row = a.v.idx + static_cast<int64_t>(t) * k;
      const int e = __ldg(row + j);
      int rank_end = 0;
      if (e >= 0 && e < E && !repeats_earlier(row, j, e)) routed(t, e, rank_end);
    }
  } else {
    const int log_lanes = sa.lanes.log_lanes, P = 1 << log_lanes, c = sa.lanes.lane_words, n = T << log_lanes;
    auto word = [&](int t, int w) {  // route_bits(v, t, 32 w, E), its format known here
      if constexpr (kFormat == RoutingFormat::kBitmap) {
        const int left = E - w * kWarp;
        return bitmap_bits32(a.v.map8 + static_cast<int64_t>(t) * a.v.row_bytes, a.v.row_bytes, a.v.aligned4,
                             w * kWarp) &
               (left >= kWarp ? kFullMask : (1u << left) - 1u);
      } else {
        return route_bits(a.v, t, w * kWarp, E);
      }
    };
    for (int base = 0; base < n; base += kThreads) {  // every lane of a warp in each round: the scan's shuffles
      const int i = base + tid, t = i >> log_lanes, p = i & (P - 1);
      const int w0 = p * c, w1 = min(w0 + c, sa.row_words);
      const bool mine = i < n && w0 < w1;
      const uint32_t first = mine ? word(t, w0) : 0u;
      int cnt = __popc(first);
      for (int w = w0 + 1; mine && w < w1; ++w) cnt += __popc(word(t, w));
      int seen = segment_inclusive_sum(cnt, p, P) - cnt, rank_end = 0;  // t's set bits before this lane's words
      for (int w = w0; mine && w < w1 && seen < k; ++w) {
        const uint32_t bits = keep_lowest(w == w0 ? first : word(t, w), k - seen);
        seen += __popc(bits);
        for (uint32_t b = bits; b != 0; b &= b - 1) routed(t, w * kWarp + __ffs(b) - 1, rank_end);
      }
    }
  }
  __syncthreads();

  const int tw = (T + kWarp - 1) / kWarp;  // warps holding a token in phase 2
  for (int g = 0; g < G; ++g) {
    const int rg = g * kWarp, nr = min(W - rg, kWarp);
    if (warp < tw) {
      const uint32_t m = tid < T ? rank_bits[static_cast<int64_t>(tid) * G + g] : 0u;
      for (int j = 0; j < nr; ++j) {
        const uint32_t b = __ballot_sync(kFullMask, (m >> j) & 1u);
        if (lane == j) {
          ballots[warp][j] = b;
          warp_base[warp][j] = __popc(b);
        }
      }
    }
    __syncthreads();
    if (tid < nr) {
      int acc = 0;
      for (int w = 0; w < tw; ++w) {
        const int x = warp_base[w][tid];
        warp_base[w][tid] = acc;
        acc += x;
      }
      rank_total[rg + tid] = acc;
    }
    __syncthreads();
    for (int i = tid; i < T * nr; i += kThreads) {
      const int t = i / nr, j = i - t * nr, tw_ = t / kWarp, tl = t % kWarp;
      const uint32_t b = ballots[tw_][j];
      a.token_slot[static_cast<int64_t>(t) * W + rg + j] =
          (b >> tl) & 1u ? warp_base[tw_][j] + __popc(b & ((1u << tl) - 1u)) : -1;
    }
    __syncthreads();  // ballots and warp_base are reused by the next group
  }
  for (int r = tid; r < W; r += kThreads) a.counts[static_cast<int64_t>(r) * (L + 1)] = rank_total[r];
  if (a.smem_experts)
    for (int e = tid; e < E; e += kThreads) *expert_count(a, e) = ecnt[e];
  if (a.pack_out == nullptr) return;
  if (!a.smem_experts) __syncthreads();  // the global expert counts: every atomic done before the packing reads them
  const int n = W * a.pack_row;          // within int: launch_ep_layout (32-bit divisions here)
  for (int i = tid; i < n; i += kThreads) {
    const int peer = i / a.pack_row, c = i - peer * a.pack_row;
    if (!a.smem_experts) {
      pack_entry(a.counts, W, L, a.pack_row, a.pack_flags, i, a.pack_out);
    } else if (c == 0) {
      a.pack_out[i] = rank_total[peer];
    } else if (c <= L) {
      a.pack_out[i] = ecnt[peer * L + c - 1];
    } else if (c == L + 1) {
      a.pack_out[i] = a.pack_flags;
    } else if (c < L + 2 + W) {
      a.pack_out[i] = rank_total[c - L - 2];
    }
  }
}

// The three passes and the packing in one launch (LayoutArgs::scratch, zeroed header and flags). The block's
// segment is its ticket's. It counts its tokens per rank into the scratch, and its experts in shared memory (E is at
// most kLayoutOneLaunchMaxExperts here), and raises its flag; the first segment's block zeroes counts before it raises
// its own. Then it waits for the flags of the segments before it (raised by blocks that started earlier and wait for
// nothing after them: no deadlock), which also orders the expert counts it adds to counts after the zeroing, starts
// each rank at the sum of their totals and writes its slots. The last segment writes each
// rank's total; the last block to finish packs the exchange's rows. Taken up to kLayoutOneLaunchMaxExperts
// (kernels/ep_params.h): its slot pass grew with E in the measurements, the four launches' did not.
static_assert(kLayoutOneLaunchMaxExperts <= kMaxSmemExperts, "the one launch counts its experts in shared memory");
template <int kThreads>
__global__ void __launch_bounds__(kThreads) layout_fused_kernel(LayoutArgs a) {
  extern __shared__ int ecnt[];  // [E]
  __shared__ TileScanSmem<kThreads> s;
  __shared__ int totals[kWarp];
  __shared__ int block_seg;
  __shared__ bool last_done;
  constexpr int kWarps = kThreads / kWarp;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const int E = a.v.num_experts, W = a.num_ranks, L = a.local_experts, S = a.num_segs;
  int* const flags = a.scratch + kScanHeaderInts;
  int32_t* const seg_totals = flags + S;  // [S][W]
  if (tid == 0) block_seg = atomicAdd(a.scratch, 1);
  for (int e = tid; e < E; e += kThreads) ecnt[e] = 0;
  __syncthreads();
  const int seg = block_seg;
  const int64_t t0 = static_cast<int64_t>(seg) * a.seg_len;
  const int64_t t1 = seg_last_row(a, seg) + 1;
  for (int rg = 0; rg < W; rg += kWarp) {
    const int nr = W - rg < kWarp ? W - rg : kWarp;
    if (tid < kWarp) totals[tid] = 0;
    __syncthreads();
    segment_totals<kThreads>(a, t0, t1, rg, nr, true, ecnt, totals);
    if (tid < nr) seg_totals[static_cast<int64_t>(seg) * W + rg + tid] = totals[tid];
    __syncthreads();
  }
  if (seg == 0) {
    const int64_t n = static_cast<int64_t>(W) * (L + 1);
    for (int64_t i = tid; i < n; i += kThreads) a.counts[i] = 0;
    __syncthreads();
  }
  if (tid == 0) {
    __threadfence();
    store_release_gpu(flags + seg, 1);
  }
  wait_raised(flags, seg);
  for (int e = tid; e < E; e += kThreads)  // counted by the count pass; added now that counts are zeroed
    if (ecnt[e] != 0) atomicAdd(expert_count(a, e), ecnt[e]);
  for (int rg = 0; rg < W; rg += kWarp) {
    const int nr = W - rg < kWarp ? W - rg : kWarp;
    for (int j = warp; j < nr; j += kWarps) {  // a warp a rank: the totals of the segments before this one
      int acc = 0;
      for (int q = lane; q < seg; q += kWarp) acc += __ldcg(seg_totals + static_cast<int64_t>(q) * W + rg + j);
#pragma unroll
      for (int d = kWarp / 2; d > 0; d >>= 1) acc += __shfl_xor_sync(kFullMask, acc, d);
      if (lane == 0) s.carry[j] = acc;
    }
    __syncthreads();
    slot_tiles<kThreads>(a, s, t0, t1, rg, nr, false, nullptr);
    if (seg == S - 1 && tid < nr) a.counts[static_cast<int64_t>(rg + tid) * (L + 1)] = s.carry[tid];
    __syncthreads();  // carry read before the next rank group's warps set it
  }
  if (a.pack_out == nullptr) return;
  if (tid == 0) {
    __threadfence();  // this block's counts before its finish
    last_done = atomicAdd(a.scratch + 1, 1) == S - 1;
  }
  __syncthreads();
  if (!last_done) return;
  __threadfence();  // every block's counts, then the packing reads them through L2
  const int64_t n = static_cast<int64_t>(W) * a.pack_row;
  for (int64_t i = tid; i < n; i += kThreads) pack_entry(a.counts, W, L, a.pack_row, a.pack_flags, i, a.pack_out);
}

__global__ void pack_counts_kernel(PackCountsParams p) {
  const int64_t n = static_cast<int64_t>(p.num_ranks) * p.row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    pack_entry(p.counts, p.num_ranks, p.local_experts, p.row, p.flags, i, p.out);
}

}  // namespace

cudaError_t launch_ep_pack_counts(const PackCountsParams& p, cudaStream_t stream) {
  const int W = p.num_ranks, L = p.local_experts;
  if (W < 1 || L < 1 || p.row < L + 2 + W || p.counts == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  const int64_t n = static_cast<int64_t>(W) * p.row;
  const unsigned blocks = static_cast<unsigned>(n < 256 * 64 ? (n + 255) / 256 : 64);
  pack_counts_kernel<<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_ep_layout(const LayoutParams& p, cudaStream_t stream) {
  const int W = p.num_ranks, E = p.num_experts;
  if (W < 1 || E < 1 || E % W != 0 || p.topk < 1 || p.num_tokens < 0) return cudaErrorInvalidValue;
  const int L = E / W;
  const size_t counts_bytes = sizeof(int32_t) * static_cast<size_t>(W) * (L + 1);
  if (p.num_tokens == 0) return cudaSuccess;  // writes nothing: the orchestration zeroes the counts
  if (p.routing.map == nullptr || p.counts == nullptr || p.token_slot == nullptr) return cudaErrorInvalidValue;

  LayoutArgs a;
  a.v = make_route_view(p.routing, E, p.topk);
  a.num_tokens = p.num_tokens;
  a.num_ranks = W;
  a.local_experts = L;
  a.counts = p.counts;
  a.token_slot = p.token_slot;
  a.smem_experts = E <= kMaxSmemExperts;
  a.vec4 = W % 4 == 0 && reinterpret_cast<uintptr_t>(p.token_slot) % 16 == 0;
  a.pack_out = nullptr;
  a.scratch = nullptr;
  a.pack_row = p.pack_row;
  a.pack_flags = p.pack_flags;
  const size_t ecnt_bytes = a.smem_experts ? sizeof(int) * E : 0;
  if (p.pack_out != nullptr && p.pack_row < L + 2 + W) return cudaErrorInvalidValue;

  cudaError_t err;
  // The two-phase one-block pass, unless past its shared memory ([T][W / 32] rank words, W > ~1000) or int packing.
  const size_t single_smem = single_layout_smem_bytes(p.num_tokens, E, W, a.smem_experts);
  const bool one_block = p.num_tokens <= kSingleMaxItems && single_smem <= kSingleDynamicSmemMax &&
                         static_cast<int64_t>(W) * p.pack_row <= INT32_MAX;
  // The map's copy: in the one-block pass's launch, else one copy before the other passes.
  const uint64_t map_bytes = routing_map_bytes(p.routing.format, p.num_tokens, E, p.topk);
  if (p.map_copy != nullptr && !one_block &&
      (err = cudaMemcpyAsync(p.map_copy, p.routing.map, map_bytes, cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
    return err;
  if (p.num_tokens <= kSingleMaxItems) {
    a.seg_len = kSingleMaxItems;
    a.num_segs = 1;
    if (!a.smem_experts && (err = cudaMemsetAsync(p.counts, 0, counts_bytes, stream)) != cudaSuccess) return err;
    a.pack_out = p.pack_out;
    if (!one_block) {  // a thread a token
      layout_slot_kernel<kSingleThreads, true><<<1, kSingleThreads, ecnt_bytes, stream>>>(a);
      return cudaGetLastError();
    }
    LayoutSingleArgs sa;
    sa.a = a;
    sa.groups = (W + kWarp - 1) / kWarp;
    sa.row_words = (E + kWarp - 1) / kWarp;
    sa.lanes = row_lanes(sa.row_words);
    sa.map_copy = static_cast<char*>(p.map_copy);
    sa.map_bytes = static_cast<int64_t>(map_bytes);
    if (a.v.format == RoutingFormat::kBitmap)
      layout_single_kernel<kSingleThreads, RoutingFormat::kBitmap><<<1, kSingleThreads, single_smem, stream>>>(sa);
    else if (a.v.format == RoutingFormat::kBytemap)
      layout_single_kernel<kSingleThreads, RoutingFormat::kBytemap><<<1, kSingleThreads, single_smem, stream>>>(sa);
    else
      layout_single_kernel<kSingleThreads, RoutingFormat::kTopkIndices><<<1, kSingleThreads, single_smem, stream>>>(sa);
    return cudaGetLastError();
  }

  int sms = 0;
  if ((err = sm_count(&sms)) != cudaSuccess) return err;
  const int64_t tiles = (p.num_tokens + kScanThreads - 1) / kScanThreads;
  const int64_t max_segs = 2 * static_cast<int64_t>(sms);
  const int64_t tiles_per_seg = (tiles + max_segs - 1) / max_segs;
  a.seg_len = tiles_per_seg * kScanThreads;
  a.num_segs = static_cast<int>((p.num_tokens + a.seg_len - 1) / a.seg_len);

  if (p.scratch != nullptr && layout_scratch_ints(p.num_tokens, E, W) > 0) {  // one launch
    a.scratch = p.scratch;
    a.pack_out = p.pack_out;
    err = cudaMemsetAsync(p.scratch, 0, sizeof(int32_t) * (kScanHeaderInts + static_cast<size_t>(a.num_segs)), stream);
    if (err != cudaSuccess) return err;
    layout_fused_kernel<kScanThreads><<<a.num_segs, kScanThreads, ecnt_bytes, stream>>>(a);
    return cudaGetLastError();
  }
  if ((err = cudaMemsetAsync(p.counts, 0, counts_bytes, stream)) != cudaSuccess) return err;
  layout_count_kernel<kScanThreads><<<a.num_segs, kScanThreads, ecnt_bytes, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  layout_offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  layout_slot_kernel<kScanThreads, false><<<a.num_segs, kScanThreads, 0, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess || p.pack_out == nullptr) return err;
  return launch_ep_pack_counts(layout_pack(p), stream);  // the multi-segment passes pack in a launch of their own
}

}  // namespace bitep::kernels
