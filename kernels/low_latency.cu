// SPDX-License-Identifier: Apache-2.0
// The low-latency dispatch's kernels (LowLatencySendParams, LowLatencyReceiveParams; src/ep/low_latency.cc):
// the send into the owners' fixed slots, with each token's rank among the source's tokens of each of its
// experts and the source's per-expert counts, and the receive after the barrier: one kernel, launched
// dependent on the barrier, whose blocks each turn the W x L counts into the aligned offsets and every
// source's first row of each expert, then copy each slot's row to its expert rows (position = that first
// row + the slot's rank), zero the pad rows and pad the empty slots.
#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "kernels/ep.h"
#include "kernels/ep_common.cuh"
#include "kernels/permute_rows.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

struct LowLatencySendArgs {
  PermuteArgs m;         // the routing, weights, shape and x (write_row_meta's fields)
  char* const* regions;  // [2][W]: the kernel keeps its parity's row
  SlotParity parity;
  LowLatencyBlock b;
  int32_t* token_slot;
  int pieces;       // warps a token
  int rank_groups;  // column groups of 32 experts
  int rank_blocks;  // the grid's first blocks: ranks and counts, one a group and tile of 256 tokens
};

// Token t's experts in [e0, e0 + nc) among its first k (mask), and its experts in [lo0, e0) (below): the row's
// words below e0 are read together (no load waits for another), and give both the first-k limit and the
// entries of lo0's owner's experts below the range.
__device__ __forceinline__ void rank_bits(
    const RouteView& v, int64_t t, int e0, int nc, int lo0, uint32_t* mask, int* below) {
  int before = 0, before_lo = 0;  // the row's set bits in [0, e0) and in [0, lo0)
  for (int b = 0; b < e0; b += 32) {
    const uint32_t w = route_bits(v, t, b, e0);
    before += __popc(w);
    before_lo += __popc(lo0 - b >= 32 ? w : lo0 > b ? w & ((1u << (lo0 - b)) - 1u) : 0u);
  }
  const int k = v.topk;
  *mask = keep_lowest(route_bits(v, t, e0, e0 + nc), k - before);  // the first k of the row
  *below = (before < k ? before : k) - (before_lo < k ? before_lo : k);
}

// Rank block (g, q), g the fastest (experts [32 g, 32 g + 32), tokens [256 q, 256 q + 256)): for each token t
// of its tile and each of its experts e in that range (its first k), t's rank among this source's tokens using
// e, in token order, into slot t of this source's block in e's owner's region, at the entry of e among t's
// experts there (the j-th set bit of the slot's map slice). One token a thread; one ballot a column gives every
// warp's count and each lane's place among the warp's tokens, and the tile scan turns the counts into bases,
// starting from the columns' counts over the tiles before q (counted by the block itself, so the tiles rank in
// parallel). The last tile's block writes each expert's total into the owner's header counts; block 0 writes T
// into every region's header.
__device__ void low_latency_ranks(const LowLatencySendArgs& a, int g, int q, TileScanSmem<kRowThreads>& s) {
  const PermuteArgs& m = a.m;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const int E = m.v.num_experts, L = m.local_experts, KL = m.row_experts, W = m.num_ranks, self = m.self_rank;
  if (g == 0 && q == 0)
    for (int r = tid; r < W; r += kRowThreads)
      reinterpret_cast<int64_t*>(a.regions[r] + a.b.header)[self] = m.num_tokens;
  const int e0 = 32 * g, nc = E - e0 < kWarp ? E - e0 : kWarp;
  const int r0 = e0 / L, lo0 = r0 * L;  // the owner of e0, whose experts may start below e0
  const int64_t t0 = static_cast<int64_t>(q) * kRowThreads;
  {  // the carries: lane j of each warp counts column j over the warp's tokens of the earlier tiles
    int n = 0;
    for (int64_t tb = 0; tb < t0; tb += kRowThreads) {
      uint32_t mask = 0;
      int below = 0;
      rank_bits(m.v, tb + tid, e0, nc, lo0, &mask, &below);
      for (int j = 0; j < nc; ++j) {
        const uint32_t bal = __ballot_sync(kFullMask, (mask >> j) & 1u);
        if (lane == j) n += __popc(bal);
      }
    }
    s.warp_base[warp][lane] = n;
    __syncthreads();
    if (tid < nc) {
      int c = 0;
#pragma unroll
      for (int w = 0; w < kRowThreads / kWarp; ++w) c += s.warp_base[w][tid];
      s.carry[tid] = c;
    }
    __syncthreads();
  }
  const int64_t t = t0 + tid;
  uint32_t mask = 0;  // t's experts in [e0, e0 + nc)
  int below = 0;      // t's experts in [lo0, e0): the entries of r0's slice before e0
  if (t < m.num_tokens) rank_bits(m.v, t, e0, nc, lo0, &mask, &below);
  tile_totals(s, mask, nc);
  __syncthreads();
  tile_prefix(s, nc);
  __syncthreads();
  const int64_t slot_ranks = a.b.first + self * a.b.stride + a.b.ranks;
  for (uint32_t x = mask; x != 0; x &= x - 1) {
    const int j = __ffs(x) - 1, e = e0 + j, r = e / L;
    const int rank = tile_slot(s, j);
    const int from = r * L > e0 ? r * L - e0 : 0;  // r's experts start at bit `from` of the range
    const int entry = (r == r0 ? below : 0) + __popc(mask & ((1u << j) - 1u) & ~((1u << from) - 1u));
    reinterpret_cast<int32_t*>(a.regions[r] + slot_ranks)[t * KL + entry] = rank;
  }
  if (t0 + kRowThreads >= m.num_tokens && tid < nc) {  // the last tile (or none): the totals
    const int e = e0 + tid, r = e / L;
    reinterpret_cast<int32_t*>(a.regions[r] + a.b.counts)[self * L + e - r * L] = s.carry[tid];
  }
}

// The first rank_blocks blocks rank (above); the others copy, one warp per token: lane r finds whether the
// token has an expert on rank r, the warp stores the row once into every such rank's slot (over NVLink for
// the peers), then lane r writes r's map slice (zero when empty) and, for a non-empty slice, its weights.
template <int V>
__global__ void __launch_bounds__(kRowThreads) low_latency_send_kernel(LowLatencySendArgs a) {
  __shared__ TileScanSmem<kRowThreads> rank_smem;
  a.regions += static_cast<int64_t>(slot_parity(a.parity)) * a.m.num_ranks;
  if (static_cast<int>(blockIdx.x) < a.rank_blocks) {
    low_latency_ranks(a, blockIdx.x % a.rank_groups, blockIdx.x / a.rank_groups, rank_smem);
    return;
  }
  const PermuteArgs& m = a.m;
  const int lane = threadIdx.x & (kWarp - 1);
  const int W = m.num_ranks, L = m.local_experts, self = m.self_rank;
  // P warps a token, warp p of a token copying its p-th piece of vectors (a few tokens still fill the GPU);
  // piece 0 also writes the slot's map slice, weights and token_slot.
  const int P = a.pieces;
  const int64_t blocks = gridDim.x - a.rank_blocks, warps = blocks * (kRowThreads / kWarp);
  const int64_t piece_vecs = (m.nvec + P - 1) / P;
  for (int64_t gw = ((static_cast<int64_t>(blockIdx.x) - a.rank_blocks) * kRowThreads + threadIdx.x) / kWarp;
       gw < m.num_tokens * P; gw += warps) {
    const int64_t t = gw / P;
    const int piece = static_cast<int>(gw - t * P);
    const int64_t v0 = piece * piece_vecs, v1 = v0 + piece_vecs < m.nvec ? v0 + piece_vecs : m.nvec;
    const int limit = route_limit(m.v, t);
    for (int rg = 0; rg < W; rg += kWarp) {
      const int r = rg + lane;
      bool any = false;
      char* blk = nullptr;
      if (r < W) {
        const int lo = r * L, hi = lo + L < limit ? lo + L : limit;
        for (int b = lo; b < hi && !any; b += kWarp) any = route_bits(m.v, t, b, hi) != 0u;
        blk = a.regions[r] + a.b.first + self * a.b.stride;
        if (piece == 0) a.token_slot[t * W + r] = any ? static_cast<int32_t>(t) : -1;
      }
      const uint32_t mask = __ballot_sync(kFullMask, any);
      const int64_t vb = v0 * V;  // the piece's first byte
      if (mask != 0 && v1 > v0)
        warp_copy_row<V, kUnroll>(m.x + t * m.row_bytes + vb, v1 - v0, mask,
                                  any ? blk + t * m.row_bytes + vb : nullptr);
      if (r < W && piece == 0) {
        float* w = any ? reinterpret_cast<float*>(blk + a.b.weights) : nullptr;
        write_row_meta(m, t, r, t, reinterpret_cast<uint8_t*>(blk + a.b.map), w);
        if (w != nullptr && m.weight_format == WeightFormat::kNone)  // no weights: zeros, not stale ones
          for (int j = 0; j < m.row_experts; ++j) w[t * m.row_experts + j] = 0.0f;
      }
    }
  }
}

struct LowLatencyReceiveArgs {
  int W, L, KL, MB, align;
  int slice_vec;  // bytes a load of a map slice (divides MB and every slice's address)
  int64_t C;
  const char* region;  // parity 0's; the kernel moves it to its parity's
  int64_t region_parity_bytes;
  SlotParity parity;
  LowLatencyBlock b;
  char* expert_x;
  int64_t expert_capacity, row_bytes, nvec;
  int32_t* counts;
  int32_t* offsets;
  int32_t* rows;
  float* weights;
};

// Slot t of source s: its map slice, ranks and weights.
__device__ __forceinline__ const char* low_latency_block(const LowLatencyReceiveArgs& a, int s) {
  return a.region + a.b.first + s * a.b.stride;
}
__device__ __forceinline__ const uint8_t* low_latency_slice(const LowLatencyReceiveArgs& a, int s, int t) {
  return reinterpret_cast<const uint8_t*>(low_latency_block(a, s) + a.b.map) + static_cast<int64_t>(t) * a.MB;
}

// The source of valid slot v: first [W + 1] numbers the valid slots source by source (first[0] = 0 <= v <
// first[W]); the answer s has first[s] <= v < first[s + 1].
__device__ __forceinline__ int source_of(const int* first, int W, int v) {
  int lo = 0, hi = W;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (first[mid] <= v)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// A map slice is read in chunks of 32 bytes (256 experts), each loaded slice_vec bytes a load into 8 words:
// expert 8c + 32k + b is bit b of w[k] (the bytes are LSB first, in order). Experts past L read as 0.
// (bitmap_bits32 in ep_common.cuh reads a 32-bit window at any bit offset, 4 bytes a load at most; a slice
// is read whole here, so in whole chunks, up to 16 bytes a load.)
constexpr int kChunkBytes = 32, kChunkWords = kChunkBytes / 4;

__device__ __forceinline__ void load_chunk(const LowLatencyReceiveArgs& a,
                                           const uint8_t* m,
                                           int c,
                                           uint32_t (&w)[kChunkWords]) {
  const int n = a.MB - c < kChunkBytes ? a.MB - c : kChunkBytes;  // a multiple of slice_vec
  const uint8_t* p = m + c;
  if (a.slice_vec == 16) {
#pragma unroll
    for (int k = 0; k < kChunkWords / 4; ++k) {
      const uint4 v = 16 * k < n ? *reinterpret_cast<const uint4*>(p + 16 * k) : make_uint4(0u, 0u, 0u, 0u);
      w[4 * k] = v.x;
      w[4 * k + 1] = v.y;
      w[4 * k + 2] = v.z;
      w[4 * k + 3] = v.w;
    }
  } else if (a.slice_vec == 8) {
#pragma unroll
    for (int k = 0; k < kChunkWords / 2; ++k) {
      const uint2 v = 8 * k < n ? *reinterpret_cast<const uint2*>(p + 8 * k) : make_uint2(0u, 0u);
      w[2 * k] = v.x;
      w[2 * k + 1] = v.y;
    }
  } else if (a.slice_vec == 4) {
#pragma unroll
    for (int k = 0; k < kChunkWords; ++k) w[k] = 4 * k < n ? *reinterpret_cast<const uint32_t*>(p + 4 * k) : 0u;
  } else {
#pragma unroll
    for (int k = 0; k < kChunkWords; ++k) {
      uint32_t v = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        if (4 * k + b < n) v |= static_cast<uint32_t>(p[4 * k + b]) << (8 * b);
      w[k] = v;
    }
  }
#pragma unroll
  for (int k = 0; k < kChunkWords; ++k) {
    const int e0 = 8 * c + 32 * k;
    if (e0 + 32 > a.L) w[k] &= e0 >= a.L ? 0u : (1u << (a.L - e0)) - 1u;
  }
}

// The local expert of entry j of a slot (its map slice m's j-th set bit), -1 past the slice's experts.
__device__ __forceinline__ int slice_entry(const LowLatencyReceiveArgs& a, const uint8_t* m, int j) {
  int n = 0;
  for (int c = 0; c < a.MB; c += kChunkBytes) {
    uint32_t w[kChunkWords];
    load_chunk(a, m, c, w);
#pragma unroll
    for (int k = 0; k < kChunkWords; ++k) {
      const int pc = __popc(w[k]);
      if (j >= n && j < n + pc) {
        uint32_t x = w[k];
        for (int q = j - n; q > 0; --q) x &= x - 1u;  // drop the slice's earlier experts in this word
        return 8 * c + 32 * k + __ffs(x) - 1;
      }
      n += pc;
    }
  }
  return -1;
}

// The receive, one kernel. Every block first reads the sources' T and per-expert counts from the header into
// shared memory: first [W + 1] numbers the valid slots source by source; off [L + 1] the aligned offsets;
// start [W + 1][L] the first row of source s's rows of expert l (start[W][l] = off[l] + count). Then the
// grid's warps take, in turn: the pad rows (P pieces a row), the valid slots' rows (P pieces a slot; entry j of
// slot (s, t), expert l, goes to row start[s][l] + its rank, read from the slot; piece 0 writes the slot's
// positions and weights), and the -1 / 0 padding of the empty slots. Block 0 writes the counts and offsets.
template <int V>
__global__ void __launch_bounds__(kRowThreads) low_latency_receive_kernel(LowLatencyReceiveArgs a, int P) {
  using BlockScan = cub::BlockScan<int, kRowThreads>;
  extern __shared__ int ll_smem[];
  __shared__ typename BlockScan::TempStorage scan;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1);
  const int L = a.L, KL = a.KL, W = a.W;
  int* start = ll_smem;
  int* off = start + (W + 1) * L;
  int* first = off + L + 1;
  wait_for_prerequisite();  // the barrier: every slot landed (and counted itself: the parity)
  if (slot_parity(a.parity) != 0) a.region += a.region_parity_bytes;
  {
    const int64_t* header = reinterpret_cast<const int64_t*>(a.region + a.b.header);
    int carry = 0;
    for (int s0 = 0; s0 < W; s0 += kRowThreads) {
      const int s = s0 + tid;
      const int64_t T = s < W ? header[s] : 0;
      const int n = T < 0 ? 0 : static_cast<int>(T > a.C ? a.C : T);
      int excl = 0, total = 0;
      BlockScan(scan).ExclusiveSum(n, excl, total);
      if (s < W) first[s] = carry + excl;
      carry += total;
      __syncthreads();  // the scan's storage is reused
    }
    if (tid == 0) first[W] = carry;
  }
  const int32_t* counts = reinterpret_cast<const int32_t*>(a.region + a.b.counts);
  for (int i = tid; i < W * L; i += kRowThreads) {  // a source has at most C tokens of an expert
    const int n = counts[i];
    start[i] = n < 0 ? 0 : static_cast<int>(n > a.C ? a.C : n);
  }
  __syncthreads();
  for (int l = tid; l < L; l += kRowThreads) {  // per expert, exclusive over the sources; the total in row W
    int run = 0;
    for (int s = 0; s < W; ++s) {
      const int n = start[s * L + l];
      start[s * L + l] = run;
      run += n;
    }
    start[W * L + l] = run;
  }
  __syncthreads();
  {  // aligned offsets: thread tid scans experts [tid * per, tid * per + per)
    const int per = (L + kRowThreads - 1) / kRowThreads;
    int sum = 0;
    for (int e = tid * per; e < L && e < tid * per + per; ++e)
      sum += (start[W * L + e] + a.align - 1) / a.align * a.align;
    int excl = 0, total = 0;
    BlockScan(scan).ExclusiveSum(sum, excl, total);
    for (int e = tid * per; e < L && e < tid * per + per; ++e) {
      off[e] = excl;
      excl += (start[W * L + e] + a.align - 1) / a.align * a.align;
    }
    if (tid == 0) off[L] = total;
  }
  __syncthreads();
  for (int i = tid; i < (W + 1) * L; i += kRowThreads) start[i] += off[i % L];
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int l = tid; l < L; l += kRowThreads) {
      a.counts[l] = start[W * L + l] - off[l];
      a.offsets[l] = off[l];
    }
    if (tid == 0) a.offsets[L] = off[L];
  }
  const int valid = first[W];
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp);
  const int64_t gw0 = (static_cast<int64_t>(blockIdx.x) * kRowThreads + tid) / kWarp;
  const int64_t piece_vecs = (a.nvec + P - 1) / P;
  // The pad rows [off[l] + count, off[l + 1]) of each expert: align - 1 candidates an expert, P pieces each.
  // They go first, so that the copies' rows are the last this kernel writes (in L2 for what reads them next).
  using Vec = typename VecOf<V>::type;
  const int pads = a.align - 1;
  for (int64_t it = gw0; it < static_cast<int64_t>(L) * pads * P; it += warps) {
    const int64_t u = it / P;
    const int piece = static_cast<int>(it - u * P);
    const int l = static_cast<int>(u / pads);
    const int64_t p = start[W * L + l] + (u - static_cast<int64_t>(l) * pads);
    if (p >= off[l + 1] || p >= a.expert_capacity) continue;
    const int64_t v0 = piece * piece_vecs, v1 = v0 + piece_vecs < a.nvec ? v0 + piece_vecs : a.nvec;
    Vec* out = reinterpret_cast<Vec*>(a.expert_x + p * a.row_bytes);
    for (int64_t q = v0 + lane; q < v1; q += kWarp) out[q] = Vec{};
  }
  // The valid slots' rows.
  for (int64_t it = gw0; it < static_cast<int64_t>(valid) * P; it += warps) {
    const int v = static_cast<int>(it / P);
    const int piece = static_cast<int>(it - static_cast<int64_t>(v) * P);
    const int s = source_of(first, W, v), t = v - first[s];
    const int64_t i = static_cast<int64_t>(s) * a.C + t;
    const char* blk = low_latency_block(a, s);
    const uint8_t* m = low_latency_slice(a, s, t);
    const int32_t* ranks = reinterpret_cast<const int32_t*>(blk + a.b.ranks) + static_cast<int64_t>(t) * KL;
    const int64_t v0 = piece * piece_vecs, v1 = v0 + piece_vecs < a.nvec ? v0 + piece_vecs : a.nvec;
    const char* src = blk + t * a.row_bytes + v0 * V;
    for (int jg = 0; jg < KL; jg += kWarp) {
      const int j = jg + lane;
      const int l = j < KL ? slice_entry(a, m, j) : -1;
      int pos = -1;
      if (l >= 0) {
        const int p = start[s * L + l] + ranks[j];
        if (p >= start[s * L + l] && p < start[(s + 1) * L + l]) pos = p;  // else inconsistent input: no row
      }
      if (piece == 0 && j < KL) {
        a.rows[i * KL + j] = pos;
        if (a.weights != nullptr)
          a.weights[i * KL + j] = l >= 0 ? reinterpret_cast<const float*>(blk + a.b.weights)[t * KL + j] : 0.0f;
      }
      const bool ok = pos >= 0 && pos < a.expert_capacity;
      const uint32_t mask = __ballot_sync(kFullMask, ok);
      if (mask != 0 && v1 > v0)
        warp_copy_row<V, kUnroll>(src, v1 - v0, mask, ok ? a.expert_x + pos * a.row_bytes + v0 * V : nullptr);
    }
  }
  // The empty slots' positions (-1) and weights (0).
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + tid; i < W * a.C;
       i += static_cast<int64_t>(gridDim.x) * kRowThreads) {
    const int s = static_cast<int>(i / a.C);
    if (i - s * a.C < first[s + 1] - first[s]) continue;
    for (int q = 0; q < KL; ++q) {
      a.rows[i * KL + q] = -1;
      if (a.weights != nullptr) a.weights[i * KL + q] = 0.0f;
    }
  }
}

// Warps that share one row of `row_bytes` (*pieces) when `rows` rows should keep about `warps_per_sm` warps an
// SM busy: pieces of at least 512 bytes, at least 1, at most `cap` (<= 32).
cudaError_t row_pieces(int warps_per_sm, int64_t rows, int64_t row_bytes, int cap, int* pieces) {
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t warps = static_cast<int64_t>(warps_per_sm < 1 ? 1 : warps_per_sm) * sms;
  const int64_t top = cap < 1 ? 1 : (cap > 32 ? 32 : cap);
  *pieces = static_cast<int>(warps_per_row(rows, (row_bytes + 511) / 512, warps, top));
  return cudaSuccess;
}

// Vector width of rows copied between `rows` and the window's slots, which sit at multiples of the row size
// past the block's 16-byte aligned offsets.
int slot_vec_bytes(int64_t row_bytes, const void* rows, const LowLatencyBlock& b) {
  return vec_bytes(row_bytes, rows, reinterpret_cast<const void*>(static_cast<uintptr_t>(b.first)),
                   reinterpret_cast<const void*>(static_cast<uintptr_t>(b.stride)));
}

// Dynamic shared memory every instance of the receive kernel takes on the current device: kLowLatencyMaxSmem,
// or the device's opt-in maximum less an instance's static shared memory (the block scan's; 1184 bytes on an
// H200) where that is less. Each instance is opted in to its own where that is past the 48 KiB default less its
// static size. Cached per device.
cudaError_t receive_smem_limit(int* out) {
  static std::atomic<int> cache[kMaxCachedDevices];
  return cached_per_device(
      cache,
      [](int, int* v) {
        *v = 1;
        int optin = 0;
        cudaError_t err = smem_optin_bytes(&optin);
        int most = static_cast<int>(kLowLatencyMaxSmem);
        for (int vb : {16, 8, 4, 2, 1}) {
          if (err != cudaSuccess) return err;
          err = dispatch_vec(vb, [&](auto vt) {
            auto kernel = low_latency_receive_kernel<decltype(vt)::value>;
            cudaFuncAttributes attr;
            cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
            if (e != cudaSuccess) return e;
            const int static_bytes = static_cast<int>(attr.sharedSizeBytes);
            const int mine = std::min(static_cast<int>(kLowLatencyMaxSmem), optin - static_bytes);
            if (mine > 48 * 1024 - static_bytes)
              e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, mine);
            most = std::min(most, mine);
            return e;
          });
        }
        *v = std::max(most, 1);
        return err;
      },
      out);
}

}  // namespace

cudaError_t low_latency_receive_supported(int num_ranks, int num_local_experts, int64_t capacity, bool* out) {
  *out = false;
  if (!low_latency_receive_fits(num_ranks, num_local_experts, capacity)) return cudaSuccess;
  int limit = 0;
  const cudaError_t err = receive_smem_limit(&limit);
  *out = err == cudaSuccess && low_latency_receive_smem(num_ranks, num_local_experts) <= static_cast<size_t>(limit);
  return err;
}

cudaError_t launch_ep_low_latency_send(const LowLatencySendParams& p, cudaStream_t stream) {
  const int W = p.num_ranks, E = p.num_experts;
  if (W < 1 || E < 1 || E % W != 0 || p.topk < 1 || p.num_tokens < 0 || p.num_tokens > p.capacity || p.hidden < 1 ||
      p.self_rank < 0 || p.self_rank >= W || p.regions == nullptr || (p.num_tokens > 0 && p.token_slot == nullptr))
    return cudaErrorInvalidValue;
  if (p.num_tokens > 0 && (p.x == nullptr || p.routing.map == nullptr)) return cudaErrorInvalidValue;
  LowLatencySendArgs a;
  PermuteArgs& m = a.m;
  m = token_args(p.routing, p.num_tokens, E, p.topk, W, p.self_rank, p.x, p.hidden, p.dtype);
  a.regions = p.regions;
  a.parity = p.parity;
  a.b = p.block;
  a.token_slot = p.token_slot;
  // At least one tile: block 0 writes the headers and the counts, also without tokens.
  a.rank_groups = (E + kWarp - 1) / kWarp;
  a.rank_blocks =
      a.rank_groups * static_cast<int>(p.num_tokens > 0 ? (p.num_tokens + kRowThreads - 1) / kRowThreads : 1);
  const int v = slot_vec_bytes(m.row_bytes, p.x, p.block);
  m.nvec = m.row_bytes / v;
  // Pieces of at least 512 bytes a warp, as many as give about 32 warps an SM over the tokens.
  cudaError_t err = row_pieces(32, p.num_tokens, m.row_bytes, p.max_pieces, &a.pieces);
  if (err != cudaSuccess) return err;
  unsigned copy_blocks = 0;
  if (p.num_tokens > 0) {
    err = row_grid(p.num_tokens * a.pieces, &copy_blocks);
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = static_cast<unsigned>(a.rank_blocks) + copy_blocks;
  dispatch_vec(v, [&](auto vt) { low_latency_send_kernel<decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(a); });
  return cudaGetLastError();
}

cudaError_t launch_ep_low_latency_receive(const LowLatencyReceiveParams& p, cudaStream_t stream) {
  const int L = p.num_local_experts, KL = p.max_row_experts;
  if (p.num_ranks < 1 || L < 1 || KL < 1 || KL > L || p.capacity < 1 || p.hidden < 1 || p.alignment < 1 ||
      p.region == nullptr || p.expert_x == nullptr || p.expert_counts == nullptr || p.expert_offsets == nullptr ||
      p.recv_expert_rows == nullptr || p.expert_capacity < 0)
    return cudaErrorInvalidValue;
  bool supported = false;
  cudaError_t err = low_latency_receive_supported(p.num_ranks, L, p.capacity, &supported);
  if (err != cudaSuccess) return err;
  if (!supported) return cudaErrorInvalidValue;
  LowLatencyReceiveArgs a;
  a.W = p.num_ranks;
  a.L = L;
  a.KL = KL;
  a.MB = local_map_bytes(L);
  a.slice_vec = vec_bytes(a.MB, p.region + p.block.first + p.block.map,
                          reinterpret_cast<const void*>(static_cast<uintptr_t>(p.block.stride)));
  a.align = p.alignment;
  a.C = p.capacity;
  a.region = p.region;
  if (p.parity.count != nullptr && p.region_parity_bytes % 16 != 0) return cudaErrorInvalidValue;  // vector loads
  a.region_parity_bytes = p.region_parity_bytes;
  a.parity = p.parity;
  a.b = p.block;
  a.expert_x = static_cast<char*>(p.expert_x);
  a.expert_capacity = p.expert_capacity;
  a.row_bytes = p.hidden * dtype_size(p.dtype);
  a.counts = p.expert_counts;
  a.offsets = p.expert_offsets;
  a.rows = p.recv_expert_rows;
  a.weights = p.recv_weights;
  const int v = slot_vec_bytes(a.row_bytes, p.expert_x, p.block);
  a.nvec = a.row_bytes / v;
  // Pieces of at least 512 bytes, about copy_warps_per_sm warps an SM over the slots (the receiver does not
  // know how many of them hold a token).
  const int64_t slots = static_cast<int64_t>(p.num_ranks) * p.capacity;
  int P = 1;
  err = row_pieces(p.copy_warps_per_sm, slots, a.row_bytes, 32, &P);
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = row_grid(slots * P, &grid);
  if (err != cudaSuccess) return err;
  // Launched dependent on the barrier: the blocks take their places while it runs and wait for it inside.
  const size_t smem = low_latency_receive_smem(p.num_ranks, L);
  return dispatch_vec(v, [&](auto vt) {
    return launch_dependent(low_latency_receive_kernel<decltype(vt)::value>, dim3(grid), dim3(kRowThreads), smem,
                            stream, a, P);
  });
}

}  // namespace bitep::kernels
