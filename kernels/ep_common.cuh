// SPDX-License-Identifier: Apache-2.0
// Device helpers shared by the expert-parallel kernels (layout.cu, permute.cu, expert_major.cu, combine.cu): device
// properties, reading a routing input (bitmap / bytemap / [T, k] indices) as 32-bit words of routing
// bits, vectorised row copies, dtype conversions, and the ballot-based tile scan that gives every
// (item, column) pair its rank among the items of that column in ascending item order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cub/warp/warp_scan.cuh>

#include "kernels/device_info.cuh"
#include "kernels/ep_params.h"

namespace bitep::kernels::ep_detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Launch shapes shared by the kernels.
constexpr int kRowThreads = 256;      // warp-per-row kernels: 8 warps per block
constexpr int kRowBlocksPerSm = 8;    // persistent grids: at most this many blocks per SM
constexpr int kUnroll = 4;            // vectors per lane in flight in row copies and sums
constexpr int kScanThreads = 256;     // segmented scans: items (tokens / rows) per tile
constexpr int kSingleThreads = 1024;  // single-block scans
// Up to this many items (tokens, received rows) one block scans them all; more take segments of kScanThreads, each
// its own block. One tile: at 2048 rows the one-block layout took 17-74 us and the one-block positions 47-130 us
// where the segmented launches took 17-23 and 10-18 (ncu, H200, W = 1, T = 2048, bench/NOTES.md).
constexpr int64_t kSingleMaxItems = kScanThreads;
constexpr int kOffsetThreads = 1024;  // the one-block per-segment offset scan

// ---- host: device properties (cached per device) ------------------------------------------------

using kernels::persistent_grid;  // kernels/device_info.cuh
using kernels::sm_count;

inline int dtype_size(DType d) { return d == DType::kF32 ? 4 : 2; }

// Largest of 16, 8, 4, 2, 1 bytes dividing the row size and every base address given.
inline int vec_bytes(int64_t row_bytes, const void* a, const void* b = nullptr, const void* c = nullptr) {
  uintptr_t bits = static_cast<uintptr_t>(row_bytes) | reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                   reinterpret_cast<uintptr_t>(c);
  for (int v = 16; v > 1; v >>= 1)
    if ((bits & static_cast<uintptr_t>(v - 1)) == 0) return v;
  return 1;
}

// ---- host: launch shapes ---------------------------------------------------------------------------

// Grid of the warp-per-row kernels (kRowThreads threads, one warp a row or token) over `rows`:
// persistent, at most per_sm (> 0, else kRowBlocksPerSm) blocks per SM.
inline cudaError_t row_grid(int64_t rows, unsigned* grid, int per_sm = 0) {
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  *grid = persistent_grid(rows, kRowThreads / kWarp, sms, per_sm > 0 ? per_sm : kRowBlocksPerSm);
  return cudaSuccess;
}

// Warps that share one row when `rows` rows should keep about `target_warps` warps busy: target_warps / rows rounded
// down, at most `units` (the row's pieces of the smallest size the caller takes) and `cap`, at least 1. The
// low-latency send and receive split their rows by it, and row_pieces below (the combine, the permute).
inline int64_t warps_per_row(int64_t rows, int64_t units, int64_t target_warps, int64_t cap) {
  int64_t p = target_warps / (rows > 0 ? rows : 1);
  p = p < units ? p : units;
  p = p < cap ? p : cap;
  return p > 1 ? p : 1;
}

// Pieces of a row for `rows` rows of `nvec` vectors: as many warps a row as fill about kPieceWarpsPerSm warps an SM
// (within the grid's cap of per_sm blocks an SM), each at least kWarp * kUnroll vectors (one pass of a warp), at most
// max_pieces (> 0) where the caller caps them. One piece (the whole row) once the rows alone fill the device. The
// combine's reduce and final sum and the permute split their rows by it.
constexpr int kPieceWarpsPerSm = 32;
inline cudaError_t row_pieces(
    int64_t rows, int64_t nvec, int per_sm, int max_pieces, int64_t* pieces, int64_t* piece_vec) {
  constexpr int64_t kPass = kWarp * kUnroll;
  const int64_t passes = (nvec + kPass - 1) / kPass;
  *pieces = 1;
  *piece_vec = passes * kPass;
  if (rows <= 0 || passes <= 1) return cudaSuccess;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t cap = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : kRowBlocksPerSm) * (kRowThreads / kWarp);
  const int64_t target = std::min<int64_t>(static_cast<int64_t>(sms) * kPieceWarpsPerSm, cap);
  // Rounded down: rows that nearly fill the device stay whole.
  const int64_t want = warps_per_row(rows, passes, target, max_pieces > 0 ? max_pieces : passes);
  if (want <= 1) return cudaSuccess;
  const int64_t per = (passes + want - 1) / want;  // passes a piece
  *piece_vec = per * kPass;
  *pieces = (passes + per - 1) / per;
  return cudaSuccess;
}

// A row of `words` 32-bit words split among lanes (the one-block layout and the few-row positions): each lane walks
// lane_words consecutive words, 2^log_lanes lanes a row (at most 32, a power of 2: a row's lanes share a warp).
struct RowLanes {
  int lane_words;
  int log_lanes;
};
inline RowLanes row_lanes(int words) {
  RowLanes s;
  s.lane_words = (words + kWarp - 1) / kWarp;
  const int lanes = (words + s.lane_words - 1) / s.lane_words;  // <= 32
  s.log_lanes = 0;
  while ((1 << s.log_lanes) < lanes) ++s.log_lanes;
  return s;
}

// ---- device: routing input ------------------------------------------------------------------------

struct RouteView {
  RoutingFormat format;
  const uint8_t* map8;  // bitmap or bytemap rows
  const int32_t* idx;   // [T, k] indices
  int64_t row_bytes;    // bitmap: ceil(E/8); bytemap: E
  int num_experts;      // E
  int topk;             // k
  bool aligned4;        // row_bytes % 4 == 0 and the base is 4-byte aligned: rows read as 32-bit words
};

inline RouteView make_route_view(const RoutingInput& r, int num_experts, int topk) {
  RouteView v;
  v.format = r.format;
  v.map8 = static_cast<const uint8_t*>(r.map);
  v.idx = static_cast<const int32_t*>(r.map);
  v.num_experts = num_experts;
  v.topk = topk;
  v.row_bytes = r.format == RoutingFormat::kBytemap ? num_experts : (num_experts + 7) / 8;
  v.aligned4 = (v.row_bytes % 4 == 0) && (reinterpret_cast<uintptr_t>(r.map) % 4 == 0);
  return v;
}

// A low-latency call's slot parity (SlotParity, ep_params.h), read when the kernel starts (after
// wait_for_prerequisite() in a kernel launched dependent on the barrier that counts it).
__device__ __forceinline__ int slot_parity(const SlotParity& p) {
  return p.count == nullptr ? 0 : static_cast<int>((*reinterpret_cast<const volatile uint64_t*>(p.count) + p.add) & 1u);
}

// 32 bits of a BITMAP_U8 row starting at bit `lo` (bit i of the result = bit lo + i of the row); bits past
// the row's end read as 0. Crosses byte (and word) boundaries with shifts.
__device__ __forceinline__ uint32_t bitmap_bits32(const uint8_t* row, int64_t row_bytes, bool aligned4, int lo) {
  if (aligned4) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row);
    const int64_t nw = row_bytes >> 2;
    const int a = lo >> 5, sh = lo & 31;
    const uint32_t w0 = a < nw ? __ldg(w + a) : 0u;
    if (sh == 0) return w0;
    const uint32_t w1 = a + 1 < nw ? __ldg(w + a + 1) : 0u;
    return (w0 >> sh) | (w1 << (32 - sh));
  }
  const int b = lo >> 3, sh = lo & 7;
  uint64_t v = 0;
#pragma unroll
  for (int i = 0; i < 5; ++i)
    if (b + i < row_bytes) v |= static_cast<uint64_t>(__ldg(row + b + i)) << (8 * i);
  return static_cast<uint32_t>(v >> sh);
}

// Raw routing bits of token t for experts [lo, min(lo + 32, hi)), hi <= E: bit i = the map has expert
// lo + i (maps: set bit / nonzero byte; indices: some entry equals lo + i, entries outside [0, E) are
// ignored). The map's "first k" rule is applied by the callers (route_limit / for_each_routed).
__device__ __forceinline__ uint32_t route_bits(const RouteView& v, int64_t t, int lo, int hi) {
  const int n = hi - lo;
  if (n <= 0) return 0u;
  const uint32_t keep = n >= 32 ? kFullMask : ((1u << n) - 1u);
  uint32_t bits = 0;
  if (v.format == RoutingFormat::kBitmap) {
    bits = bitmap_bits32(v.map8 + t * v.row_bytes, v.row_bytes, v.aligned4, lo);
  } else if (v.format == RoutingFormat::kBytemap) {
    const uint8_t* row = v.map8 + t * v.row_bytes;
    const int m = n < 32 ? n : 32;
    if (v.aligned4 && (lo & 3) == 0) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(row + lo);
      for (int i = 0; i < m; i += 4) {
        const uint32_t x = __ldg(w + (i >> 2));  // bytes lo + i .. lo + i + 3 < E (E % 4 == 0)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if ((x >> (8 * j)) & 0xffu) bits |= 1u << (i + j);
      }
    } else {
      for (int i = 0; i < m; ++i)
        if (__ldg(row + lo + i)) bits |= 1u << i;
    }
  } else {
    const int32_t* row = v.idx + t * v.topk;
    for (int j = 0; j < v.topk; ++j) {
      const int e = __ldg(row + j);
      const unsigned d = static_cast<unsigned>(e - lo);
      if (e >= 0 && e < v.num_experts && d < 32u) bits |= 1u << d;
    }
  }
  return bits & keep;
}

// The lowest `room` set bits of bits (room <= 0: none).
__device__ __forceinline__ uint32_t keep_lowest(uint32_t bits, int room) {
  if (room <= 0) return 0u;
  while (__popc(bits) > room) bits &= ~(0x80000000u >> __clz(bits));
  return bits;
}

// Words of an aligned bitmap row that route_limit and for_each_routed load together before walking them: word by
// word, each load waited for the previous word's work.
constexpr int kRoutePreWords = 8;

// The first kRoutePreWords words of token t's row (v.format == kBitmap, v.aligned4), those at or past bit hi or the
// row's end as 0, loaded together.
__device__ __forceinline__ void load_pre_words(const RouteView& v, int64_t t, int hi, uint32_t (&pre)[kRoutePreWords]) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(v.map8 + t * v.row_bytes);
  const int64_t nw = v.row_bytes >> 2;
#pragma unroll
  for (int q = 0; q < kRoutePreWords; ++q) pre[q] = q * 32 < hi && q < nw ? __ldg(w + q) : 0u;
}

// The bits of word (experts [b, b + 32)) below expert hi > b.
__device__ __forceinline__ uint32_t bits_below(uint32_t word, int b, int hi) {
  const int n = hi - b;
  return word & (n >= 32 ? kFullMask : ((1u << n) - 1u));
}

// Maps: token t's experts are the set bits of [0, limit) (the first k of the row). Indices: E.
__device__ __forceinline__ int route_limit(const RouteView& v, int64_t t) {
  const int E = v.num_experts;
  if (v.format == RoutingFormat::kTopkIndices) return E;
  int seen = 0, b = 0;
  auto window = [&](uint32_t bits, int* limit) {  // bits = route_bits(v, t, b, E)
    const int n = __popc(bits);
    if (seen + n >= v.topk) {  // the k-th expert is in this window
      const uint32_t first = keep_lowest(bits, v.topk - seen);
      *limit = first ? b + 32 - __clz(first) : b;
      return true;
    }
    seen += n;
    return false;
  };
  int limit = E;
  if (v.format == RoutingFormat::kBitmap && v.aligned4) {
    // The row's first words loaded together, then walked. One at a time, H200, W = 1, T = 128, E = 256: the
    // low-latency send's warps spent ~460 of their ~820 instructions in that chain (ncu; bench/NOTES.md, "The first-k
    // limit without a load chain").
    uint32_t pre[kRoutePreWords];
    load_pre_words(v, t, E, pre);
#pragma unroll
    for (int q = 0; q < kRoutePreWords; ++q, b += 32) {
      if (b >= E) return E;
      if (window(bits_below(pre[q], b, E), &limit)) return limit;
    }
  }
  for (; b < E; b += 32)
    if (window(route_bits(v, t, b, E), &limit)) return limit;
  return E;
}

// Whether idx[t][j] repeats an earlier entry of its row (indices format).
__device__ __forceinline__ bool repeats_earlier(const int32_t* row, int j, int e) {
  for (int i = 0; i < j; ++i)
    if (__ldg(row + i) == e) return true;
  return false;
}

// Calls f(e, j) for each of token t's experts e in [lo, hi) (ep_params.h "Routed experts"), j its entry
// index (its compact index: maps, its rank among t's first k; indices, its position in the row): ascending
// for maps (first k set bits / nonzero bytes), index order for indices (valid, first occurrences only).
// Returns, for maps, t's entries below hi (those below lo counted, not visited); for indices, the calls made.
template <class F>
__device__ __forceinline__ int for_each_routed(const RouteView& v, int64_t t, int lo, int hi, F&& f) {
  if (v.format == RoutingFormat::kTopkIndices) {
    const int32_t* row = v.idx + t * v.topk;
    int n = 0;
    for (int j = 0; j < v.topk; ++j) {
      const int e = __ldg(row + j);
      if (e >= lo && e < hi && e < v.num_experts && e >= 0 && !repeats_earlier(row, j, e)) {
        f(e, j);
        ++n;
      }
    }
    return n;
  }
  int seen = 0;  // t's experts below b
  int b = 0;
  auto visit = [&](uint32_t raw) {  // raw = route_bits(v, t, b, hi)
    const uint32_t all = keep_lowest(raw, v.topk - seen);
    const uint32_t from = lo <= b ? kFullMask : (lo - b >= 32 ? 0u : kFullMask << (lo - b));
    int j = seen + __popc(all & ~from);
    seen += __popc(all);
    for (uint32_t bits = all & from; bits != 0; bits &= bits - 1, ++j) f(b + __ffs(bits) - 1, j);
  };
  if (v.format == RoutingFormat::kBitmap && v.aligned4) {
    // The row's first words loaded together, then walked. One at a time, H200, W = 1, T = 4096, E = 256 (ncu): the
    // layout's count pass 8.0 -> 7.2 us, its slot pass 8.0 -> 6.9.
    uint32_t pre[kRoutePreWords];
    load_pre_words(v, t, hi, pre);
#pragma unroll
    for (int q = 0; q < kRoutePreWords; ++q, b += 32) {
      if (b >= hi || seen >= v.topk) return seen;
      visit(bits_below(pre[q], b, hi));
    }
  }
  for (; b < hi && seen < v.topk; b += 32) visit(route_bits(v, t, b, hi));
  return seen;
}

// Number of t's map bits below `lo` (maps; lo <= route_limit: then it is the compact index base).
__device__ __forceinline__ int routed_before(const RouteView& v, int64_t t, int lo) {
  int n = 0;
  for (int b = 0; b < lo; b += 32) n += __popc(route_bits(v, t, b, lo));
  return n;
}

// Compact weight index of expert e of token t: maps, its rank among t's experts (e < route_limit);
// indices, its first occurrence (-1 if none).
__device__ __forceinline__ int compact_index(const RouteView& v, int64_t t, int e, int rank_in_row) {
  if (v.format != RoutingFormat::kTopkIndices) return rank_in_row;
  const int32_t* row = v.idx + t * v.topk;
  for (int j = 0; j < v.topk; ++j)
    if (__ldg(row + j) == e) return j;
  return -1;
}

// ---- device: the per-column offset scan ---------------------------------------------------------------

// Called by every thread of a grid of kOffsetThreads blocks: for each column c < num_cols (one warp a column, the
// grid's warps in turn), the entries *at(s, c) of segments s = 0 .. num_segs - 1 become their exclusive prefix sum
// in segment order, in place; done(c, total) then runs on lane 0 with the column's total.
template <class At, class Done>
__device__ void scan_segment_columns(int num_segs, int num_cols, At at, Done done) {
  using WarpScan = cub::WarpScan<int>;
  constexpr int kWarps = kOffsetThreads / kWarp;
  __shared__ typename WarpScan::TempStorage scan[kWarps];
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  for (int c = blockIdx.x * kWarps + warp; c < num_cols; c += gridDim.x * kWarps) {
    int carry = 0;
    for (int s0 = 0; s0 < num_segs; s0 += kWarp) {
      const int s = s0 + lane;
      int32_t* p = s < num_segs ? at(s, c) : nullptr;
      const int v = p ? *p : 0;
      int excl = 0, total = 0;
      WarpScan(scan[warp]).ExclusiveSum(v, excl, total);
      if (p) *p = carry + excl;
      carry += total;
      __syncwarp();
    }
    if (lane == 0) done(c, carry);
  }
}

// ---- device: vectors and dtypes -------------------------------------------------------------------

template <int V>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};
template <>
struct VecOf<1> {
  using type = uint8_t;
};

// Storage <-> fp32 on raw bits: exact widening; narrowing rounds to nearest even (as the host's
// dtype_host.h does).
template <typename T>
struct Bits16;
template <>
struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ float load(uint32_t h) { return __uint_as_float(h << 16); }
  static __device__ __forceinline__ uint32_t store(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};
template <>
struct Bits16<__half> {
  static __device__ __forceinline__ float load(uint32_t h) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  }
  static __device__ __forceinline__ uint32_t store(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// A vector as 32-bit words (V >= 4).
__device__ __forceinline__ void to_words(const uint4& v, uint32_t (&w)[4]) {
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}
__device__ __forceinline__ void to_words(const uint2& v, uint32_t (&w)[2]) { w[0] = v.x, w[1] = v.y; }
__device__ __forceinline__ void to_words(const uint32_t& v, uint32_t (&w)[1]) { w[0] = v; }
__device__ __forceinline__ void from_words(const uint32_t (&w)[4], uint4& v) { v = make_uint4(w[0], w[1], w[2], w[3]); }
__device__ __forceinline__ void from_words(const uint32_t (&w)[2], uint2& v) { v = make_uint2(w[0], w[1]); }
__device__ __forceinline__ void from_words(const uint32_t (&w)[1], uint32_t& v) { v = w[0]; }

// A vector of V bytes viewed as N elements of T (fp32, bf16, fp16), converted to / from fp32 registers.
template <typename T, int V>
struct Pack {
  static_assert(V >= static_cast<int>(sizeof(T)), "vector narrower than one element");
  static constexpr int N = V / static_cast<int>(sizeof(T));
  static constexpr int NW = V >= 4 ? V / 4 : 1;
  using Vec = typename VecOf<V>::type;
  static __device__ __forceinline__ void to_float(const Vec& v, float (&f)[N]) {
    if constexpr (V == 2) {
      f[0] = Bits16<T>::load(v);
    } else {
      uint32_t w[NW];
      to_words(v, w);
#pragma unroll
      for (int q = 0; q < NW; ++q) {
        if constexpr (sizeof(T) == 4) {
          f[q] = __uint_as_float(w[q]);
        } else {
          f[2 * q] = Bits16<T>::load(w[q] & 0xffffu);
          f[2 * q + 1] = Bits16<T>::load(w[q] >> 16);
        }
      }
    }
  }
  static __device__ __forceinline__ Vec from_float(const float (&f)[N]) {
    Vec v;
    if constexpr (V == 2) {
      v = static_cast<uint16_t>(Bits16<T>::store(f[0]));
    } else {
      uint32_t w[NW];
#pragma unroll
      for (int q = 0; q < NW; ++q) {
        if constexpr (sizeof(T) == 4)
          w[q] = __float_as_uint(f[q]);
        else
          w[q] = Bits16<T>::store(f[2 * q]) | (Bits16<T>::store(f[2 * q + 1]) << 16);
      }
      from_words(w, v);
    }
    return v;
  }
};

// Calls f(Tag<T>) with the storage type of d (fp32, bf16, fp16).
template <typename T>
struct Tag {
  using type = T;
};
template <class F>
inline auto dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kBF16:
      return f(Tag<__nv_bfloat16>{});
    case DType::kF16:
      return f(Tag<__half>{});
    default:
      return f(Tag<float>{});
  }
}

// Calls f(std::integral_constant<int, V>) for V in {16, 8, 4, 2, 1} (v must be one of them).
template <int V>
struct VecTag {
  static constexpr int value = V;
};
template <class F>
inline auto dispatch_vec(int v, F&& f) {
  switch (v) {
    case 16:
      return f(VecTag<16>{});
    case 8:
      return f(VecTag<8>{});
    case 4:
      return f(VecTag<4>{});
    case 2:
      return f(VecTag<2>{});
    default:
      return f(VecTag<1>{});
  }
}

// ---- device: tile scan over up to 32 columns --------------------------------------------------------
//
// A block of kThreads threads owns one item per thread (an item = a token or a received row, in
// ascending order by thread index); `mask` bit j says the item belongs to column j of the current
// group of up to 32 columns (ranks or experts). tile_totals + tile_prefix give, per column, the first
// position of the tile (carry) and each warp's first position inside it; tile_slot then gives the
// item's position in column j: carry + earlier warps + earlier lanes with bit j (from the column's
// ballot, kept by tile_totals). Deterministic: no atomics, order fixed by the item index.
template <int kThreads>
struct TileScanSmem {
  int warp_base[kThreads / kWarp][kWarp];    // per warp, per column: first position (after tile_prefix)
  int carry[kWarp];                          // per column: first position of the next tile
  uint32_t ballot[kThreads / kWarp][kWarp];  // per warp, per column: the lanes whose item has the column
};

template <int kThreads>
__device__ __forceinline__ void tile_totals(TileScanSmem<kThreads>& s, uint32_t mask, int ncols) {
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  for (int j = 0; j < ncols; ++j) {
    const uint32_t b = __ballot_sync(kFullMask, (mask >> j) & 1u);
    if (lane == j) {
      s.ballot[warp][j] = b;
      s.warp_base[warp][j] = __popc(b);
    }
  }
}

// After a __syncthreads: turns warp totals into warp bases (exclusive, plus carry) and advances carry.
template <int kThreads>
__device__ __forceinline__ void tile_prefix(TileScanSmem<kThreads>& s, int ncols) {
  const int c = threadIdx.x;
  if (c < ncols) {
    int acc = s.carry[c];
#pragma unroll
    for (int w = 0; w < kThreads / kWarp; ++w) {
      const int n = s.warp_base[w][c];
      s.warp_base[w][c] = acc;
      acc += n;
    }
    s.carry[c] = acc;
  }
}

// After another __syncthreads: the item's position in column j (meaningful where its bit j is set). Not a
// collective: each thread reads its warp's kept ballot.
template <int kThreads>
__device__ __forceinline__ int tile_slot(const TileScanSmem<kThreads>& s, int j) {
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  return s.warp_base[warp][j] + __popc(s.ballot[warp][j] & ((1u << lane) - 1u));
}

// Inclusive sum of v over lanes [0, p] of the calling lane's segment of P lanes (P a power of 2 up to 32, p = lane %
// P): a row's popcounts split by row_lanes. Every lane of the warp calls it.
__device__ __forceinline__ int segment_inclusive_sum(int v, int p, int P) {
  for (int d = 1; d < P; d <<= 1) {
    const int x = __shfl_up_sync(kFullMask, v, d, P);
    if (p >= d) v += x;
  }
  return v;
}

// ---- device: warp row copies ------------------------------------------------------------------------
//
// One warp moves one source row of nvec vectors to every lane d set in `mask`, whose destination row
// lane d holds in `dst`: each vector is loaded once (U per lane in flight) and stored once per
// destination. Coalesced: lane l handles vectors l, l + 32, ...

template <int V, int U>
__device__ __forceinline__ void warp_copy_row(const void* src, int64_t nvec, uint32_t mask, void* dst) {
  using Vec = typename VecOf<V>::type;
  const int lane = threadIdx.x & (kWarp - 1);
  const Vec* s = static_cast<const Vec*>(src);
  const unsigned long long my_dst = reinterpret_cast<unsigned long long>(dst);
  for (int64_t base = 0; base < nvec; base += kWarp * U) {
    Vec buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kWarp + lane;
      if (i < nvec) buf[u] = __ldg(s + i);
    }
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      Vec* out = reinterpret_cast<Vec*>(__shfl_sync(kFullMask, my_dst, d));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * kWarp + lane;
        if (i < nvec) out[i] = buf[u];
      }
    }
  }
}

// As warp_copy_row, each destination d getting w_d * x (fp32 product, one rounding to T).
template <typename T, int V, int U>
__device__ __forceinline__ void warp_scale_row(const void* src, int64_t nvec, uint32_t mask, void* dst, float w) {
  using P = Pack<T, V>;
  using Vec = typename P::Vec;
  const int lane = threadIdx.x & (kWarp - 1);
  const Vec* s = static_cast<const Vec*>(src);
  const unsigned long long my_dst = reinterpret_cast<unsigned long long>(dst);
  for (int64_t base = 0; base < nvec; base += kWarp * U) {
    float f[U][P::N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kWarp + lane;
      Vec v{};
      if (i < nvec) v = __ldg(s + i);
      P::to_float(v, f[u]);
    }
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      Vec* out = reinterpret_cast<Vec*>(__shfl_sync(kFullMask, my_dst, d));
      const float wd = __shfl_sync(kFullMask, w, d);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * kWarp + lane;
        float g[P::N];
#pragma unroll
        for (int q = 0; q < P::N; ++q) g[q] = __fmul_rn(wd, f[u][q]);
        if (i < nvec) out[i] = P::from_float(g);
      }
    }
  }
}

// Writes zeros to one row of nvec vectors (the warp together).
template <int V>
__device__ __forceinline__ void warp_zero_row(void* dst, int64_t nvec) {
  using Vec = typename VecOf<V>::type;
  Vec* d = static_cast<Vec*>(dst);
  for (int64_t i = threadIdx.x & (kWarp - 1); i < nvec; i += kWarp) d[i] = Vec{};
}

}  // namespace bitep::kernels::ep_detail
