// SPDX-License-Identifier: Apache-2.0
// The expert-major view (ExpertMajorParams), kernels/ep_params.h.
//
// Expert-major: per local expert, its rows in receive order. Positions come from a scan over the received
// rows, without scratch beyond the outputs; each row's work is its set bits (at most KL), not L:
// - R <= kSingleMaxItems (256) with the rows' maps and masks fitting in shared memory: one block, a thread a row
//   over the staged maps (per-expert row masks); otherwise, up to kSingleMaxItems rows (or too few rows to split in
//   two segments): one block scans all rows.
// - otherwise S segments: 1. per segment, per expert totals into the first L entries of the segment's
//   own recv_expert_rows region (each segment has >= ceil(L / KL) rows); 2. a warp per expert scans them into
//   per-segment offsets in place; 3. each segment reads its offsets into shared memory, then writes its
//   rows' positions (tile by tile: a lane mask per warp and expert, expert_pos_kernel). With scratch
//   (ExpertMajorParams::scratch) the three are one launch: each block counts its segment into the scratch and
//   sums the counts of the segments before it (expert_pos_kernel, Pass::kFused).
// Then the copy runs in gather order: expert_src[pos] (the entry i * KL + j whose position is pos, -1 for
// a pad row) is filled from recv_expert_rows, and one warp per expert row, consecutive warps on
// consecutive rows, copies its source row (optionally scaled by its weight) or zeroes a pad row. The
// writes, k / W times the bytes of the reads, then stream out in address order (a scatter from each
// received row to its k rows ran at a third of the HBM rate: ncu, H200, T = 4096, H = 7168).
// On sm_90, unweighted copies of rows that are 16-byte multiples up to 24 KiB go in source order by bulk
// (TMA) copies instead (ExpertMajorParams::bulk): each row read once into shared memory, then stored to
// each of its expert rows, issued by one thread per block (kernels/bulk_rows.cuh); the pad rows are zeroed
// before them (expert_pad_kernel), so that the copies' rows are the last written, the ones the L2 holds for the
// reads after the dispatch (H200, W = 1, T = 128, H = 7168: the combine 10.7-11.5 us against 14.6-15.8). With
// arrival flags the bulk copies wait for each piece of rows to land (the window's dispatch).

#include <algorithm>

#include "kernels/bulk_rows.cuh"
#include "kernels/ep.h"
#include "kernels/ep_common.cuh"
#include "kernels/sync.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

static_assert(kScanSingleRows == kSingleMaxItems && kScanSegmentRows == kScanThreads,
              "expert_scratch_ints (kernels/ep_params.h) sizes the segments as the launcher cuts them");

// ---- expert-major ---------------------------------------------------------------------------------

struct ExpertArgs {
  int64_t num_rows;                           // R
  int local_experts, row_experts, map_bytes;  // L, KL, MB
  const uint8_t* recv_map;
  bool map_aligned4;
  const int32_t* expert_offsets;
  const int32_t* expert_counts;
  int32_t* rows;  // recv_expert_rows [R, KL]
  int64_t seg_len;
  int num_segs;
  const char* recv_x;
  char* expert_x;
  const float* recv_weights;
  int64_t row_bytes, nvec, num_expert_rows;
  int64_t* src;                  // [N] expert_src: the gather's source entry per expert row
  int64_t copy_begin, copy_end;  // received rows whose copies are written (copy_outside: the others)
  bool copy_outside, zero_pads;
  // [copy_end - copy_begin] or null: row i's copies read recv_x row src_index[i - copy_begin].
  const int32_t* src_index;
  // The bulk copies' arrival waits (ExpertMajorParams::arrival_flags ...; flags null: none) and recv_copy.
  const uint64_t* arrival_flags;
  const int64_t* arrival_pieces;
  int num_pieces;
  uint64_t arrival_epoch, timeout_ns;
  volatile int* timed_out;
  char* recv_copy;
  int32_t* scratch;  // the one-launch positions: header, S flags, [S][L] counts (expert_scratch_ints)
};

// The row of recv_x that received row i's copies read.
__device__ __forceinline__ int64_t source_row(const ExpertArgs& a, int64_t i) {
  return a.src_index != nullptr ? __ldg(a.src_index + (i - a.copy_begin)) : i;
}

// Experts [lo, lo + 32) ∩ [0, L) of received row i, as bits.
__device__ __forceinline__ uint32_t row_bits(const ExpertArgs& a, int64_t i, int lo) {
  const int n = a.local_experts - lo;
  const uint32_t keep = n >= 32 ? kFullMask : ((1u << n) - 1u);
  return bitmap_bits32(a.recv_map + i * a.map_bytes, a.map_bytes, a.map_aligned4, lo) & keep;
}

// The received rows' local maps as a routing view: bitmap rows of L bits, each row's first KL set bits its
// entries (for_each_routed: f(l, j) for its local experts l, j the entry's index in recv_expert_rows[i]).
__device__ __forceinline__ RouteView recv_view(const ExpertArgs& a) {
  RouteView v;
  v.format = RoutingFormat::kBitmap;
  v.map8 = a.recv_map;
  v.idx = nullptr;
  v.row_bytes = a.map_bytes;
  v.num_experts = a.local_experts;
  v.topk = a.row_experts;
  v.aligned4 = a.map_aligned4;
  return v;
}

__device__ __forceinline__ int64_t seg_begin(const ExpertArgs& a, int s) { return static_cast<int64_t>(s) * a.seg_len; }
__device__ __forceinline__ int64_t seg_end(const ExpertArgs& a, int s) {
  return s + 1 == a.num_segs ? a.num_rows : (static_cast<int64_t>(s) + 1) * a.seg_len;  // the last takes the rest
}

// Pass 1: per segment and expert, the rows using it, into the segment's region of recv_expert_rows: each row
// adds its experts (at most KL) to counters in shared memory.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) expert_count_kernel(ExpertArgs a) {
  extern __shared__ int counts[];  // [L]
  const int tid = threadIdx.x, L = a.local_experts;
  const int64_t i0 = seg_begin(a, blockIdx.x), i1 = seg_end(a, blockIdx.x);
  for (int c = tid; c < L; c += kThreads) counts[c] = 0;
  __syncthreads();
  const RouteView v = recv_view(a);
  for (int64_t i = i0 + tid; i < i1; i += kThreads)
    for_each_routed(v, i, 0, L, [&](int l, int) { atomicAdd(&counts[l], 1); });
  __syncthreads();
  for (int c = tid; c < L; c += kThreads) a.rows[i0 * a.row_experts + c] = counts[c];
}

// Pass 2: a warp per expert; exclusive scan of the segment totals in place.
__global__ void __launch_bounds__(kOffsetThreads) expert_offsets_kernel(ExpertArgs a) {
  scan_segment_columns(
      a.num_segs, a.local_experts, [&](int s, int c) { return a.rows + seg_begin(a, s) * a.row_experts + c; },
      [](int, int) {});
}

// The positions' shared memory: experts are taken `chunk` = min(L, pos_chunk_max) at a time, each warp's lanes
// using an expert as one mask word.
template <int kThreads>
__host__ __device__ constexpr int pos_chunk_max() {
  return 4096 / (kThreads / kWarp);  // masks and bases: 32 KiB
}
template <int kThreads>
size_t pos_smem_bytes(int L, bool single) {
  const int chunk = std::min(L, pos_chunk_max<kThreads>());
  return sizeof(int) *
         ((single ? 0 : static_cast<size_t>(L)) + static_cast<size_t>(chunk) * (2 * (kThreads / kWarp) + 2));
}

// Pass 3 (or the single pass): recv_expert_rows. Position of row i's entry for expert l = expert_offsets[l] + the
// rows before i using l (-1 past expert_offsets[l] + expert_counts[l]). Per tile of kThreads rows and chunk of
// experts: each row sets its lane's bit in its warp's mask word of each of its experts (shared atomics), one pass
// over the chunk's experts turns the warps' masks into bases (and carries the tile's totals), then each row's
// position is its warp's base plus the lanes below it in the mask. The work is the rows' set bits, not L per row.
// kSingle: one block over all rows. kSlots (pass 3): block s starts each expert at the offset pass 2 left in its
// segment's region. kFused (one launch for the three passes): the block's segment is its ticket's; it counts the
// segment's rows per expert into the scratch (ExpertMajorParams::scratch), raises its flag, waits for the flags of
// the segments before it (raised by blocks that started earlier and wait for nothing before: no deadlock) and
// starts each expert at the sum of their counts.
enum class Pass { kSingle, kSlots, kFused };

template <int kThreads, Pass kPass>
__global__ void __launch_bounds__(kThreads) expert_pos_kernel(ExpertArgs a, int chunk) {
  constexpr bool kSingle = kPass == Pass::kSingle;
  constexpr int kWarps = kThreads / kWarp;
  extern __shared__ int smem[];  // [L] segment offsets (multi-segment only), then the chunk's arrays below
  __shared__ int block_seg;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp, L = a.local_experts, KL = a.row_experts;
  int* seg_offset = smem;
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + (kSingle ? 0 : L));  // [kWarps][chunk]
  int* base = reinterpret_cast<int*>(mask + kWarps * chunk);               // [kWarps][chunk]
  int* carry = base + kWarps * chunk;                                      // [chunk] next position
  int* stop = carry + chunk;                                               // [chunk] offset + count
  const uint32_t below = (1u << lane) - 1u;
  const RouteView v = recv_view(a);
  int seg = static_cast<int>(blockIdx.x);
  if constexpr (kPass == Pass::kFused) {
    if (tid == 0) block_seg = atomicAdd(a.scratch, 1);
    for (int c = tid; c < L; c += kThreads) seg_offset[c] = 0;
    __syncthreads();
    seg = block_seg;
  }
  const int64_t i0 = seg_begin(a, seg), i1 = seg_end(a, seg);
  if constexpr (kPass == Pass::kSlots) {  // read before any row of the segment (whose region holds them) is rewritten
    for (int c = tid; c < L; c += kThreads) seg_offset[c] = a.rows[i0 * KL + c];
    __syncthreads();
  }
  if constexpr (kPass == Pass::kFused) {
    int* const flags = a.scratch + kScanHeaderInts;
    int32_t* const seg_counts = flags + a.num_segs;  // [S][L]
    for (int64_t i = i0 + tid; i < i1; i += kThreads)
      for_each_routed(v, i, 0, L, [&](int l, int) { atomicAdd(&seg_offset[l], 1); });
    __syncthreads();
    for (int c = tid; c < L; c += kThreads) seg_counts[static_cast<int64_t>(seg) * L + c] = seg_offset[c];
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      store_release_gpu(flags + seg, 1);
    }
    wait_raised(flags, seg);
    for (int c = tid; c < L; c += kThreads) {
      int acc = 0;
#pragma unroll 4
      for (int j = 0; j < seg; ++j) acc += __ldcg(seg_counts + static_cast<int64_t>(j) * L + c);
      seg_offset[c] = acc;
    }
    __syncthreads();
  }
  for (int lo = 0; lo < L; lo += chunk) {
    const int nc = L - lo < chunk ? L - lo : chunk, hi = lo + nc;
    for (int c = tid; c < nc; c += kThreads) {
      const int off = __ldg(a.expert_offsets + lo + c);
      carry[c] = (kSingle ? 0 : seg_offset[lo + c]) + off;
      stop[c] = off + __ldg(a.expert_counts + lo + c);
    }
    for (int64_t ib = i0; ib < i1; ib += kThreads) {
      const int64_t i = ib + tid;
      const bool valid = i < i1;
      for (int c = tid; c < kWarps * chunk; c += kThreads) mask[c] = 0u;
      __syncthreads();  // also orders the chunk's carry and stop, and the previous tile's reads
      if (valid) for_each_routed(v, i, lo, hi, [&](int l, int) { atomicOr(mask + warp * chunk + l - lo, 1u << lane); });
      __syncthreads();
      for (int c = tid; c < nc; c += kThreads) {
        int run = carry[c];
#pragma unroll 4
        for (int w = 0; w < kWarps; ++w) {
          base[w * chunk + c] = run;
          run += __popc(mask[w * chunk + c]);
        }
        carry[c] = run;
      }
      __syncthreads();
      if (valid) {
        int32_t* out = a.rows + i * KL;
        const int n = for_each_routed(v, i, lo, hi, [&](int l, int j) {
          const int c = warp * chunk + l - lo;
          const int pos = base[c] + __popc(mask[c] & below);
          out[j] = pos < stop[l - lo] ? pos : -1;
        });
        if (hi == L)
          for (int j = n; j < KL; ++j) out[j] = -1;
      }
      __syncthreads();  // the next tile clears the masks
    }
  }
}

// The single pass for few rows (R <= kSingleMaxItems; the rows' local maps and the experts' offsets and ends staged in
// shared memory): each row ORs its bit into the row mask of each of its first KL experts ([L][row_words] words of row
// bits), then the position of row i's entry for expert l is expert_offsets[l] plus the rows below i in l's mask. A
// row's words are split among P = 2^log_lanes lanes (lane_words each), its entry indices found by a segmented scan of
// the lanes' popcounts, as the one-block layout does (kernels/layout.cu). One warp an expert over all rows took 16.1 us
// at R = 128, L = 256 (ncu, H200); one thread a row walking its 8 words 11.4-12.6; this 6.1-6.3 (bench/NOTES.md, "The
// small dispatch's kernels" and "The one-block layout: divergence, not code fetch").
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    expert_pos_masks_kernel(ExpertArgs a, int words, int stride, int row_words, int lane_words, int log_lanes) {
  extern __shared__ uint32_t staged[];  // [R][stride] map words, [L][row_words] row masks, [L] firsts, [L] ends
  const int tid = threadIdx.x, L = a.local_experts, KL = a.row_experts, R = static_cast<int>(a.num_rows);
  uint32_t* const row_mask = staged + R * stride;
  int* const first = reinterpret_cast<int*>(row_mask + L * row_words);
  int* const end = first + L;
  for (int q = tid; q < R * words; q += kThreads) {
    const int i = q / words, w = q - i * words;
    staged[i * stride + w] = row_bits(a, i, w * kWarp);
  }
  for (int q = tid; q < L * row_words; q += kThreads) row_mask[q] = 0;
  for (int l = tid; l < L; l += kThreads) {
    first[l] = __ldg(a.expert_offsets + l);
    end[l] = first[l] + __ldg(a.expert_counts + l);
  }
  __syncthreads();
  const int P = 1 << log_lanes, n = R << log_lanes;
  // Item q: row q / P, its words [p c, min(p c + c, words)) for lane p = q % P. Called by every thread of the block
  // (the scan's shuffles); f(i, l, j) for each of the item's entries (expert l, entry j < KL of row i), then done(i,
  // total) on the row's last lane with the row's set bits in all.
  auto for_items = [&](auto&& f, auto&& done) {
    for (int base = 0; base < n; base += kThreads) {
      const int q = base + tid, i = q >> log_lanes, p = q & (P - 1);
      const int w0 = p * lane_words, w1 = min(w0 + lane_words, words);
      const bool mine = q < n && w0 < w1;
      const uint32_t* m = staged + static_cast<int64_t>(i) * stride;
      int cnt = 0;
      for (int w = w0; mine && w < w1; ++w) cnt += __popc(m[w]);
      const int incl = segment_inclusive_sum(cnt, p, P);
      int j = incl - cnt;
      for (int w = w0; mine && w < w1 && j < KL; ++w)
        for (uint32_t b = m[w]; b != 0 && j < KL; b &= b - 1, ++j) f(i, w * kWarp + __ffs(b) - 1, j);
      if (q < n && p == P - 1) done(i, incl);
    }
  };
  for_items([&](int i, int l, int) { atomicOr(row_mask + l * row_words + i / kWarp, 1u << (i % kWarp)); },
            [](int, int) {});
  __syncthreads();
  for_items(
      [&](int i, int l, int j) {
        const int wi = i / kWarp;
        const uint32_t* lm = row_mask + l * row_words;
        int pos = first[l] + __popc(lm[wi] & ((1u << (i % kWarp)) - 1u));
        for (int q = 0; q < wi; ++q) pos += __popc(lm[q]);
        a.rows[static_cast<int64_t>(i) * KL + j] = pos < end[l] ? pos : -1;
      },
      [&](int i, int total) {
        for (int j = total < KL ? total : KL; j < KL; ++j) a.rows[static_cast<int64_t>(i) * KL + j] = -1;
      });
}

// The inverse of recv_expert_rows: out[pos] = the entry e = i * KL + j whose position is pos (the gather's source
// table, int64: expert_src), or that entry's received row i (kRow: the gather index, ExpertSourcesParams, int32).
// Rows no entry names (pad rows) keep the -1 the launcher filled in.
template <typename T, bool kRow>
__global__ void __launch_bounds__(kScanThreads)
    expert_inverse_kernel(const int32_t* rows, int64_t entries, int KL, int64_t N, T* out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kScanThreads + threadIdx.x; e < entries;
       e += static_cast<int64_t>(gridDim.x) * kScanThreads) {
    const int pos = __ldg(rows + e);
    if (pos >= 0 && pos < N) out[pos] = static_cast<T>(kRow ? e / KL : e);
  }
}

// One warp per expert row: its source row (scaled by its weight when kWeighted), or zeros for a pad row.
template <typename T, int V, bool kWeighted>
__global__ void __launch_bounds__(kRowThreads) expert_copy_kernel(ExpertArgs a) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp);
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / kWarp;
  const int KL = a.row_experts;
  for (int64_t pos = gw; pos < a.num_expert_rows; pos += warps) {
    char* dst = a.expert_x + pos * a.row_bytes;
    const int64_t e = __ldg(a.src + pos);
    if (e < 0) {
      if (a.zero_pads) warp_zero_row<V>(dst, a.nvec);
      continue;
    }
    const int64_t i = e / KL;
    if (a.recv_x == nullptr || (i >= a.copy_begin && i < a.copy_end) == a.copy_outside) continue;
    const char* src = a.recv_x + source_row(a, i) * a.row_bytes;
    if constexpr (kWeighted) {
      warp_scale_row<T, V, kUnroll>(src, a.nvec, 1u, dst, __ldg(a.recv_weights + e));
    } else {
      warp_copy_row<V, kUnroll>(src, a.nvec, 1u, dst);
    }
  }
}

// Pad rows of the bulk path (the gather's source table is not filled there): block l zeroes expert l's rows
// [expert_offsets[l] + expert_counts[l], expert_offsets[l + 1]), one warp per row.
template <int V>
__global__ void __launch_bounds__(kRowThreads) expert_pad_kernel(ExpertArgs a) {
  const int l = blockIdx.x;
  const int64_t end = __ldg(a.expert_offsets + l + 1);
  constexpr int kWarps = kRowThreads / kWarp;
  for (int64_t pos = __ldg(a.expert_offsets + l) + __ldg(a.expert_counts + l) + threadIdx.x / kWarp; pos < end;
       pos += kWarps)
    warp_zero_row<V>(a.expert_x + pos * a.row_bytes, a.nvec);
}

// The expert copies in source order: one thread per block, each received row loaded once and stored to each
// of its expert rows (and to recv_copy).
__global__ void __launch_bounds__(kWarp) expert_bulk_copy_kernel(ExpertArgs a, int64_t count, int nbuf) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  __shared__ __align__(8) uint64_t bar[kBulkMaxBufs];
  if (threadIdx.x != 0) return;
  const int KL = a.row_experts;
  const int64_t mine = count > blockIdx.x ? (count - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  // The n-th received row whose copies this call writes (the copy range, or the rows outside it).
  auto bulk_row = [&a](int64_t n) {
    const int64_t m = blockIdx.x + n * gridDim.x;
    if (!a.copy_outside) return a.copy_begin + m;
    return m < a.copy_begin ? m : m + (a.copy_end - a.copy_begin);
  };
  // With arrival pieces, the n-th row is the pieces' (seq, row_start, flag). The loads and the stores walk
  // them with a cursor each (both in ascending order).
  const int64_t* seq = a.arrival_flags != nullptr ? a.arrival_pieces : nullptr;
  const int64_t* row_start = seq + a.num_pieces + 1;
  const int64_t* flag = row_start + a.num_pieces;
  auto piece_row = [&](int64_t n, int& q) {
    const int64_t m = blockIdx.x + n * gridDim.x;
    while (__ldg(seq + q + 1) <= m) ++q;
    return __ldg(row_start + q) + (m - __ldg(seq + q));
  };
  int load_piece = 0, store_piece = 0;
  int ready = -1;  // the last piece seen landed
  bool gave_up = false;
  auto wait_arrival = [&](int q) {
    if (q == ready || gave_up) return;
    const uint64_t start = global_ns();
    while (load_acquire_sys(a.arrival_flags + __ldg(flag + q)) < a.arrival_epoch) {
      if (global_ns() - start > a.timeout_ns) {
        *a.timed_out = 1;
        gave_up = true;
        break;
      }
      __nanosleep(64);
    }
    // The landed rows were written by the peer's stores; the bulk load reads through the async proxy.
    asm volatile("fence.proxy.async.global;" ::: "memory");
    ready = q;
  };
  const BulkRing ring = make_ring(bulk_smem, bar, a.row_bytes, nbuf);
  bulk_rows(
      ring, mine,
      [&](int64_t n) {
        if (seq != nullptr) {
          const int64_t i = piece_row(n, load_piece);
          wait_arrival(load_piece);
          return a.recv_x + i * a.row_bytes;
        }
        return a.recv_x + source_row(a, bulk_row(n)) * a.row_bytes;
      },
      [&](int64_t n) {
        const int64_t i = seq != nullptr ? piece_row(n, store_piece) : bulk_row(n);
        for (int j = 0; a.expert_x != nullptr && j < KL; ++j) {  // null: the rank-major copy alone
          const int pos = __ldg(a.rows + i * KL + j);
          if (pos >= 0) ring.store(n, a.expert_x + pos * a.row_bytes);
        }
        if (a.recv_copy != nullptr) ring.store(n, a.recv_copy + i * a.row_bytes);
      },
      [](int64_t) {}, [] {});
#else
  (void)a, (void)count, (void)nbuf;
  __trap();  // launched only where the device is sm_90 or later (launch_ep_expert_major checks)
#endif
}

template <typename T, int V>
cudaError_t launch_expert_copy(const ExpertArgs& a, bool weighted, unsigned grid, cudaStream_t stream) {
  if (weighted) {
    if constexpr (V >= static_cast<int>(sizeof(T))) {
      expert_copy_kernel<T, V, true><<<grid, kRowThreads, 0, stream>>>(a);
    } else {
      return cudaErrorMisalignedAddress;  // rows or pointers not aligned to the element size
    }
  } else {
    expert_copy_kernel<float, V, false><<<grid, kRowThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// expert_bulk_copy_kernel's ring and per-block shared memory on the current device (cached per device).
cudaError_t expert_bulk_smem(BulkSmem* out) {
  static BulkSmemCache cache;
  return bulk_smem(expert_bulk_copy_kernel, cache, out);
}

// Whether p's copies go by bulk copies (see launch_ep_expert_major), with the vector width of its rows (recv_x
// and expert_x). The bulk copies also store to recv_copy, which must be 16-byte aligned too. Without expert_x they
// store to recv_copy alone (a rank-major-only dispatch's rows out of the window as they land).
cudaError_t takes_bulk(const ExpertMajorParams& p, int v, bool* out) {
  *out = false;
  const int64_t row_bytes = p.hidden * dtype_size(p.dtype);
  const bool weighted = p.recv_weights != nullptr && p.recv_x != nullptr;
  if (!p.bulk || weighted || p.recv_x == nullptr || (p.expert_x == nullptr && p.recv_copy == nullptr) || v != 16 ||
      vec_bytes(row_bytes, p.recv_copy) != 16)
    return cudaSuccess;
  BulkSmem smem;
  const cudaError_t err = expert_bulk_smem(&smem);
  *out = err == cudaSuccess && bulk_available(smem, row_bytes);
  return err;
}

}  // namespace

cudaError_t expert_major_takes_bulk(const ExpertMajorParams& p, bool* out) {
  const int64_t row_bytes = p.hidden * dtype_size(p.dtype);
  return takes_bulk(p, vec_bytes(row_bytes, p.recv_x, p.expert_x), out);
}

cudaError_t load_ep_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = load_permute_kernels();
  BulkSmem smem;  // also opts the bulk kernel in to its ring's shared memory
  if (err == cudaSuccess) err = expert_bulk_smem(&smem);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, expert_pad_kernel<16>);
  return err;
}

cudaError_t launch_ep_expert_major(const ExpertMajorParams& p, cudaStream_t stream) {
  const int L = p.num_local_experts, KL = p.max_row_experts;
  if (L < 1 || KL < 1 || KL > L || p.num_recv_rows < 0 || p.hidden < 0 || p.num_expert_rows < 0)
    return cudaErrorInvalidValue;
  // expert_x given: rows are copied (when recv_x is given too) and pad rows zeroed. recv_copy alone (bulk copies
  // only): the rows are copied there, and no expert row is written.
  const bool rows_out = (p.expert_x != nullptr || p.recv_copy != nullptr) && p.hidden > 0;
  if (p.num_recv_rows == 0 && (!rows_out || p.num_expert_rows == 0)) return cudaSuccess;
  if (p.expert_offsets == nullptr || p.expert_counts == nullptr) return cudaErrorInvalidValue;
  if (p.num_recv_rows > 0 && (p.recv_expert_rows == nullptr || (!p.positions_given && p.recv_map == nullptr)))
    return cudaErrorInvalidValue;
  if (p.expert_x != nullptr && p.hidden > 0 && p.num_expert_rows > 0 && p.expert_src == nullptr)
    return cudaErrorInvalidValue;
  if (p.src_index != nullptr && p.copy_outside) return cudaErrorInvalidValue;

  ExpertArgs a;
  a.num_rows = p.num_recv_rows;
  a.local_experts = L;
  a.row_experts = KL;
  a.map_bytes = local_map_bytes(L);
  a.recv_map = p.recv_map;
  a.map_aligned4 = a.map_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(p.recv_map) % 4 == 0;
  a.expert_offsets = p.expert_offsets;
  a.expert_counts = p.expert_counts;
  a.rows = p.recv_expert_rows;
  a.recv_x = static_cast<const char*>(p.recv_x);
  a.expert_x = static_cast<char*>(p.expert_x);
  a.recv_weights = p.recv_weights;
  a.row_bytes = p.hidden * dtype_size(p.dtype);
  a.num_expert_rows = p.num_expert_rows;
  a.src = p.expert_src;
  a.copy_begin = p.copy_begin;
  a.copy_end = p.copy_end < 0 ? p.num_recv_rows : p.copy_end;
  a.copy_outside = p.copy_outside;
  a.zero_pads = p.zero_pads;
  a.src_index = p.src_index;
  a.arrival_flags = p.arrival_flags;
  a.arrival_pieces = p.arrival_pieces;
  a.num_pieces = p.num_pieces;
  a.arrival_epoch = p.arrival_epoch;
  a.timeout_ns = p.timeout_ns;
  a.timed_out = p.timed_out;
  a.recv_copy = static_cast<char*>(p.recv_copy);
  a.scratch = nullptr;
  if (p.arrival_flags != nullptr && (p.arrival_pieces == nullptr || p.timed_out == nullptr || p.num_pieces < 0 ||
                                     p.src_index != nullptr || !p.positions_given))
    return cudaErrorInvalidValue;

  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;

  if (p.num_recv_rows > 0 && !p.positions_given) {
    // Each segment's region of recv_expert_rows must hold L totals: >= ceil(L / KL) rows per segment.
    const int64_t R = p.num_recv_rows;
    const int64_t min_rows = (L + KL - 1) / KL;
    const int64_t tiles = (R + kScanThreads - 1) / kScanThreads;
    const int64_t max_segs = 2 * static_cast<int64_t>(sms);
    int64_t seg_len = (tiles + max_segs - 1) / max_segs * kScanThreads;
    if (seg_len < min_rows) seg_len = (min_rows + kScanThreads - 1) / kScanThreads * kScanThreads;
    const int64_t segs = R / seg_len;  // the last segment takes the remainder: every segment >= seg_len
    const int words = (L + kWarp - 1) / kWarp, stride = words | 1;  // odd stride: rows on distinct banks
    const int row_words = static_cast<int>((R + kWarp - 1) / kWarp);
    const size_t masks_smem =
        sizeof(uint32_t) * (static_cast<size_t>(R) * stride + static_cast<size_t>(L) * (row_words + 2));
    int optin = 0;
    if ((err = smem_optin_bytes(&optin)) != cudaSuccess) return err;
    if (R <= kSingleMaxItems && masks_smem <= static_cast<size_t>(optin)) {
      static std::atomic<int> fits[kMaxCachedDevices];  // past 48 KiB (L above ~1000 at R = 256) the kernel opts in
      if ((err = allow_dynamic_smem(expert_pos_masks_kernel<kSingleThreads>, fits, masks_smem)) != cudaSuccess)
        return err;
      a.seg_len = R;
      a.num_segs = 1;
      const RowLanes lanes = row_lanes(words);
      expert_pos_masks_kernel<kSingleThreads>
          <<<1, kSingleThreads, masks_smem, stream>>>(a, words, stride, row_words, lanes.lane_words, lanes.log_lanes);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else if (R <= kSingleMaxItems || segs < 2) {
      a.seg_len = R;
      a.num_segs = 1;
      auto kernel = expert_pos_kernel<kSingleThreads, Pass::kSingle>;
      const size_t smem = pos_smem_bytes<kSingleThreads>(L, true);  // <= 34 KiB
      kernel<<<1, kSingleThreads, smem, stream>>>(a, std::min(L, pos_chunk_max<kSingleThreads>()));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else {
      a.seg_len = seg_len;
      a.num_segs = static_cast<int>(segs);
      if (sizeof(int) * static_cast<size_t>(L) > 48 * 1024) return cudaErrorInvalidValue;  // L > 12288 local experts
      // One launch where the caller gave the scratch (the ticket and the flags zeroed first), else three.
      const bool one_launch = p.scratch != nullptr && expert_scratch_ints(R, L) > 0;
      if (one_launch) {
        a.scratch = p.scratch;
        err = cudaMemsetAsync(p.scratch, 0, sizeof(int32_t) * (kScanHeaderInts + static_cast<size_t>(segs)), stream);
        if (err != cudaSuccess) return err;
      } else {
        expert_count_kernel<kScanThreads><<<a.num_segs, kScanThreads, sizeof(int) * L, stream>>>(a);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        // A warp a column (expert): each warp's scan is one chain of loads; H200, T = 4096, L = 256: one block, 8
        // columns a warp, took 9 us.
        constexpr int kOffsetWarps = kOffsetThreads / kWarp;
        expert_offsets_kernel<<<(L + kOffsetWarps - 1) / kOffsetWarps, kOffsetThreads, 0, stream>>>(a);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
      auto kernel =
          one_launch ? expert_pos_kernel<kScanThreads, Pass::kFused> : expert_pos_kernel<kScanThreads, Pass::kSlots>;
      // 4 L + 36 KiB; past 48 KiB less the kernel's static shared memory (128 bytes on an H200, so 49024 bytes
      // without opting in: L >= 3041), the kernel opts in.
      static std::atomic<int> fits[2][kMaxCachedDevices];  // [one_launch]
      const size_t smem = pos_smem_bytes<kScanThreads>(L, false);
      if ((err = allow_dynamic_smem(kernel, fits[one_launch], smem)) != cudaSuccess) return err;
      kernel<<<a.num_segs, kScanThreads, smem, stream>>>(a, std::min(L, pos_chunk_max<kScanThreads>()));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  if (!rows_out || p.num_expert_rows == 0) return cudaSuccess;

  const bool weighted = p.recv_weights != nullptr && p.recv_x != nullptr;
  const int v = vec_bytes(a.row_bytes, p.recv_x, p.expert_x);
  a.nvec = a.row_bytes / v;
  bool bulk = false;
  if ((err = takes_bulk(p, v, &bulk)) != cudaSuccess) return err;
  // The arrival waits and the rank-major copy are the bulk copies' (the dispatch asks expert_major_takes_bulk).
  if (!bulk && (p.arrival_flags != nullptr || p.recv_copy != nullptr)) return cudaErrorInvalidValue;
  if (bulk) {
    // Source order by bulk copies, no source table; the pad rows from the expert offsets and counts.
    BulkSmem smem;
    if ((err = expert_bulk_smem(&smem)) != cudaSuccess) return err;
    const int64_t nbuf = bulk_bufs(smem, a.row_bytes);  // >= 2 (takes_bulk)
    const int64_t in_range = std::max<int64_t>(0, std::min(a.copy_end, p.num_recv_rows) - a.copy_begin);
    const int64_t count = a.copy_outside ? p.num_recv_rows - in_range : in_range;
    // Every block resident at once (each works through its rows in turn): as many as the shared memory holds, at
    // most the asked-for blocks per SM. Asked before any launch: a refused call writes nothing.
    int64_t per_sm = 0;
    if (count > 0 && (err = bulk_blocks_per_sm(smem, nbuf * a.row_bytes, p.blocks_per_sm, &per_sm)) != cudaSuccess)
      return err;
    // The pad rows before the copies: the copies' rows, written last, are then what the L2 holds when the experts
    // (or the combine) read them, not the pads' zeros (num_pad_rows -1: not known, zeroed).
    if (p.zero_pads && p.num_pad_rows != 0 && p.expert_x != nullptr) {
      expert_pad_kernel<16><<<L, kRowThreads, 0, stream>>>(a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (count > 0) {
      const unsigned bgrid = static_cast<unsigned>(std::min<int64_t>(count, per_sm * sms));
      expert_bulk_copy_kernel<<<bgrid, kWarp, static_cast<size_t>(nbuf * a.row_bytes), stream>>>(
          a, count, static_cast<int>(nbuf));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
  }

  // The gather's source table: -1 (all bits set) for every row, then the entries' rows.
  if (!p.src_given) {
    err = cudaMemsetAsync(a.src, 0xff, sizeof(int64_t) * static_cast<size_t>(p.num_expert_rows), stream);
    if (err != cudaSuccess) return err;
  }
  if (!p.src_given && p.num_recv_rows > 0) {
    const unsigned sgrid = persistent_grid(p.num_recv_rows * KL, kScanThreads, sms, kRowBlocksPerSm);
    expert_inverse_kernel<int64_t, false>
        <<<sgrid, kScanThreads, 0, stream>>>(a.rows, p.num_recv_rows * KL, KL, p.num_expert_rows, a.src);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const unsigned grid = persistent_grid(p.num_expert_rows, kRowThreads / kWarp, sms,
                                        p.blocks_per_sm > 0 ? p.blocks_per_sm : kRowBlocksPerSm);
  return dispatch_dtype(p.dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    return dispatch_vec(v,
                        [&](auto vt) { return launch_expert_copy<T, decltype(vt)::value>(a, weighted, grid, stream); });
  });
}

cudaError_t launch_ep_expert_sources(const ExpertSourcesParams& p, cudaStream_t stream) {
  const int KL = p.max_row_experts;
  if (p.num_recv_rows < 0 || p.num_expert_rows < 0 || KL < 1) return cudaErrorInvalidValue;
  if (p.num_expert_rows == 0) return cudaSuccess;
  if (p.sources == nullptr || (p.num_recv_rows > 0 && p.recv_expert_rows == nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(p.sources, 0xff, sizeof(int32_t) * static_cast<size_t>(p.num_expert_rows), stream);
  if (err != cudaSuccess || p.num_recv_rows == 0) return err;
  int sms = 0;
  if ((err = sm_count(&sms)) != cudaSuccess) return err;
  const int64_t entries = p.num_recv_rows * KL;
  const unsigned grid = persistent_grid(entries, kScanThreads, sms, kRowBlocksPerSm);
  expert_inverse_kernel<int32_t, true>
      <<<grid, kScanThreads, 0, stream>>>(p.recv_expert_rows, entries, KL, p.num_expert_rows, p.sources);
  return cudaGetLastError();
}

}  // namespace bitep::kernels
