// SPDX-License-Identifier: Apache-2.0
// The low-latency dispatch's kernels (LowLatencySendParams, LowLatencyReceiveParams; src/ep/low_latency.cc):
// the send into the owners' fixed slots, and the receive after the barrier as two kernels launched dependent
// on the one before: the positions (one block an expert) and the copies in source order.
#include <cooperative_groups.h>

#include <cub/block/block_scan.cuh>

#include "kernels/ep.h"
#include "kernels/ep_common.cuh"
#include "kernels/permute_rows.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

struct LowLatencySendArgs {
  PermuteArgs m;  // the routing, weights, shape and x (write_row_meta's fields)
  char* const* regions;
  LowLatencyBlock b;
  int32_t* token_slot;
  int pieces;  // warps a token
};

// One warp per token: lane r finds whether the token has an expert on rank r, the warp stores the row once
// into every such rank's slot (over NVLink for the peers), then lane r writes r's map slice (zero when
// empty) and, for a non-empty slice, its weights.
template <int V>
__global__ void __launch_bounds__(kRowThreads) low_latency_send_kernel(LowLatencySendArgs a) {
  const PermuteArgs& m = a.m;
  const int lane = threadIdx.x & (kWarp - 1);
  const int W = m.num_ranks, L = m.local_experts, self = m.self_rank;
  if (blockIdx.x == 0)
    for (int r = threadIdx.x; r < W; r += blockDim.x)
      reinterpret_cast<int64_t*>(a.regions[r] + a.b.header)[self] = m.num_tokens;
  // P warps a token, warp p of a token copying its p-th piece of vectors (a few tokens still fill the GPU);
  // piece 0 also writes the slot's map slice, weights and token_slot.
  const int P = a.pieces;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp);
  const int64_t piece_vecs = (m.nvec + P - 1) / P;
  for (int64_t gw = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / kWarp; gw < m.num_tokens * P;
       gw += warps) {
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
  const char* region;
  LowLatencyBlock b;
  char* expert_x;
  int64_t expert_capacity, row_bytes, nvec;
  int32_t* counts;
  int32_t* offsets;
  int32_t* rows;
  float* weights;
};

constexpr int kLowLatencyThreads = 256;
constexpr int kPositionsCluster = 8;  // blocks that share the positions kernel's count (portable cluster size)

// Source s's map slice of token t.
__device__ __forceinline__ const uint8_t* low_latency_slice(const LowLatencyReceiveArgs& a, int s, int t) {
  return reinterpret_cast<const uint8_t*>(a.region + a.b.first + s * a.b.stride + a.b.map) +
         static_cast<int64_t>(t) * a.MB;
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
// (bitmap_bits32 in ep_common.cuh reads a 32-bit window at any bit offset, 4 bytes a load at most; the
// passes here take whole slices, so they load whole chunks, up to 16 bytes a load.)
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

// Positions, one block per local expert l. Every block reads the sources' T once into shared memory and
// numbers the valid slots source by source (first), so it walks only slots that hold a token, and the
// global loads it issues are those slots' map slices: the L blocks read the same few kilobytes, and every
// load they repeat is traffic to the same L2 lines. Every block counts all experts' slots (shared atomics)
// and scans the counts into the aligned offsets, so no block waits for another; block l then ranks expert
// l's slots chunk by chunk (256 slots a chunk, in slot order) and writes their positions and weights.
// Block 0 writes the -1 / 0 padding of the valid slots, the blocks together that of the empty slots, block
// l the count, offset and pad rows of l.
// kCluster > 1 (sm_90): the blocks run in clusters of kCluster (the grid rounded up to whole clusters; the
// blocks past L only count): block q of a cluster counts the valid slots v = q (mod kCluster) into its
// shared counts, and every block sums its cluster's kCluster shares through distributed shared memory, so
// each slot's experts are counted L / kCluster times over the grid instead of L times.
template <int V, int kCluster>
__global__ void __launch_bounds__(kLowLatencyThreads) low_latency_positions_kernel(LowLatencyReceiveArgs a) {
  using BlockScan = cub::BlockScan<int, kLowLatencyThreads>;
  extern __shared__ int ll_smem[];  // counts [L], offsets [L + 1], first valid slot of each source [W + 1]
  __shared__ typename BlockScan::TempStorage scan;
  const int tid = threadIdx.x;
  const int l = blockIdx.x, L = a.L, KL = a.KL, W = a.W;
  int* cnt = ll_smem;
  int* off = cnt + L;
  int* first = off + L + 1;
  for (int e = tid; e < L; e += kLowLatencyThreads) cnt[e] = 0;
  wait_for_prerequisite();  // the barrier: every slot landed
  dependents_may_launch();  // the copies' blocks take their places and wait for this grid
  {
    const int64_t* header = reinterpret_cast<const int64_t*>(a.region + a.b.header);
    int carry = 0;
    for (int s0 = 0; s0 < W; s0 += kLowLatencyThreads) {
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
  __syncthreads();
  const int valid = first[W];
  int share = 0;  // this block's share of the count: the valid slots v = share (mod kCluster)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kCluster > 1) share = static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  for (int v = share + kCluster * tid; v < valid; v += kCluster * kLowLatencyThreads) {
    const int s = source_of(first, W, v);
    const uint8_t* m = low_latency_slice(a, s, v - first[s]);
    for (int c = 0; c < a.MB; c += kChunkBytes) {
      uint32_t w[kChunkWords];
      load_chunk(a, m, c, w);
#pragma unroll
      for (int k = 0; k < kChunkWords; ++k)
        for (uint32_t x = w[k]; x != 0; x &= x - 1) atomicAdd(&cnt[8 * c + 32 * k + __ffs(x) - 1], 1);
    }
  }
  if constexpr (kCluster > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();  // every share counted
    for (int e = tid; e < L; e += kLowLatencyThreads) {
      int sum = 0;
#pragma unroll
      for (int r = 0; r < kCluster; ++r) sum += cluster.map_shared_rank(cnt, r)[e];
      off[e] = sum;  // off is free until the scan
    }
    cluster.sync();  // every block has read the others' shares: each may now overwrite its own, or exit
    for (int e = tid; e < L; e += kLowLatencyThreads) cnt[e] = off[e];
    if (l >= L) return;  // a block of the last cluster's padding: it only counted
#else
    __trap();  // launched in clusters on sm_90 only
#endif
  }
  __syncthreads();
  {  // aligned offsets: thread tid scans experts [tid * per, tid * per + per)
    const int per = (L + kLowLatencyThreads - 1) / kLowLatencyThreads;
    int sum = 0;
    for (int e = tid * per; e < L && e < tid * per + per; ++e) sum += (cnt[e] + a.align - 1) / a.align * a.align;
    int excl = 0, total = 0;
    BlockScan(scan).ExclusiveSum(sum, excl, total);
    for (int e = tid * per; e < L && e < tid * per + per; ++e) {
      off[e] = excl;
      excl += (cnt[e] + a.align - 1) / a.align * a.align;
    }
    if (tid == 0) off[L] = total;
  }
  __syncthreads();
  if (tid == 0) {
    a.counts[l] = cnt[l];
    a.offsets[l] = off[l];
    if (l == L - 1) a.offsets[L] = off[L];
  }
  {
    const int64_t p1 = off[l + 1] < a.expert_capacity ? off[l + 1] : a.expert_capacity;
    using Vec = typename VecOf<V>::type;
    const int lane = tid & (kWarp - 1), warp = tid / kWarp;
    for (int64_t p = off[l] + cnt[l] + warp; p < p1; p += kLowLatencyThreads / kWarp) {
      Vec* out = reinterpret_cast<Vec*>(a.expert_x + p * a.row_bytes);
      for (int64_t q = lane; q < a.nvec; q += kWarp) out[q] = Vec{};
    }
  }
  // The empty slots' rows (-1) and weights (0), spread over the blocks.
  for (int64_t i = static_cast<int64_t>(l) * kLowLatencyThreads + tid; i < W * a.C;
       i += static_cast<int64_t>(L) * kLowLatencyThreads) {
    const int s = static_cast<int>(i / a.C);
    if (i - s * a.C < first[s + 1] - first[s]) continue;
    for (int q = 0; q < KL; ++q) {
      a.rows[i * KL + q] = -1;
      if (a.weights != nullptr) a.weights[i * KL + q] = 0.0f;
    }
  }
  // Block 0 needs every slot's expert count n (the padding); the others only the chunks up to l's.
  const int rank_bytes = l == 0 ? a.MB : (l / 256 + 1) * kChunkBytes;
  int run = 0;  // expert l's slots in earlier chunks
  for (int c0 = 0; c0 < valid; c0 += kLowLatencyThreads) {
    const int v = c0 + tid;
    int s = 0, t = 0;
    int j = 0, n = 0;  // expert l's index in the slice; the slice's experts
    bool has = false;
    if (v < valid) {
      s = source_of(first, W, v);
      t = v - first[s];
      const uint8_t* m = low_latency_slice(a, s, t);
      for (int c = 0; c < rank_bytes && c < a.MB; c += kChunkBytes) {
        uint32_t w[kChunkWords];
        load_chunk(a, m, c, w);
#pragma unroll
        for (int k = 0; k < kChunkWords; ++k) {
          const int e0 = 8 * c + 32 * k;
          n += __popc(w[k]);
          if (e0 + 32 <= l) {
            j += __popc(w[k]);
          } else if (e0 <= l) {
            has = (w[k] >> (l - e0)) & 1u;
            j += __popc(w[k] & ((1u << (l - e0)) - 1u));
          }
        }
      }
    }
    int excl = 0, total = 0;
    BlockScan(scan).ExclusiveSum(has ? 1 : 0, excl, total);
    const int64_t i = static_cast<int64_t>(s) * a.C + t;
    if (has && j < KL) {
      a.rows[i * KL + j] = off[l] + run + excl;
      if (a.weights != nullptr) {
        const float* w = reinterpret_cast<const float*>(a.region + a.b.first + s * a.b.stride + a.b.weights);
        a.weights[i * KL + j] = w[static_cast<int64_t>(t) * KL + j];
      }
    }
    if (l == 0 && v < valid)
      for (int q = n < KL ? n : KL; q < KL; ++q) {
        a.rows[i * KL + q] = -1;
        if (a.weights != nullptr) a.weights[i * KL + q] = 0.0f;
      }
    run += total;
    __syncthreads();  // the scan's storage is reused
  }
}

// Copies, in source order: P warps a slot, warp p storing its p-th piece of the slot's row (read once) to
// each of the slot's expert rows (the positions the kernel above wrote). A hot expert's rows spread over the
// whole grid like any other.
template <int V>
__global__ void __launch_bounds__(kRowThreads) low_latency_copy_kernel(LowLatencyReceiveArgs a, int P) {
  const int lane = threadIdx.x & (kWarp - 1), KL = a.KL;
  const int64_t slots = a.W * a.C, warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp);
  const int64_t piece_vecs = (a.nvec + P - 1) / P;
  wait_for_prerequisite();  // the positions
  for (int64_t gw = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / kWarp; gw < slots * P;
       gw += warps) {
    const int64_t i = gw / P;
    const int piece = static_cast<int>(gw - i * P);
    if (__ldg(a.rows + i * KL) < 0) continue;  // empty slot (entries ascend, -1 padded): warp-uniform
    const int64_t v0 = piece * piece_vecs, v1 = v0 + piece_vecs < a.nvec ? v0 + piece_vecs : a.nvec;
    if (v1 <= v0) continue;
    const int s = static_cast<int>(i / a.C);
    const int64_t vb = v0 * V;
    const char* src = a.region + a.b.first + s * a.b.stride + (i - s * a.C) * a.row_bytes + vb;
    for (int jg = 0; jg < KL; jg += kWarp) {
      const int j = jg + lane;
      const int pos = j < KL ? __ldg(a.rows + i * KL + j) : -1;
      const bool ok = pos >= 0 && pos < a.expert_capacity;
      const uint32_t mask = __ballot_sync(kFullMask, ok);
      if (mask != 0) warp_copy_row<V, kUnroll>(src, v1 - v0, mask, ok ? a.expert_x + pos * a.row_bytes + vb : nullptr);
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
  const int64_t want = warps / (rows > 0 ? rows : 1), most = (row_bytes + 511) / 512;
  int64_t P = want < most ? want : most;
  const int64_t top = cap < 1 ? 1 : (cap > 32 ? 32 : cap);
  P = P > top ? top : P;
  *pieces = static_cast<int>(P < 1 ? 1 : P);
  return cudaSuccess;
}

// Vector width of rows copied between `rows` and the window's slots, which sit at multiples of the row size
// past the block's 16-byte aligned offsets.
int slot_vec_bytes(int64_t row_bytes, const void* rows, const LowLatencyBlock& b) {
  return vec_bytes(row_bytes, rows, reinterpret_cast<const void*>(static_cast<uintptr_t>(b.first)),
                   reinterpret_cast<const void*>(static_cast<uintptr_t>(b.stride)));
}

}  // namespace

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
  a.b = p.block;
  a.token_slot = p.token_slot;
  const int v = slot_vec_bytes(m.row_bytes, p.x, p.block);
  m.nvec = m.row_bytes / v;
  // Pieces of at least 512 bytes a warp, as many as give about 32 warps an SM over the tokens.
  cudaError_t err = row_pieces(32, p.num_tokens, m.row_bytes, p.max_pieces, &a.pieces);
  if (err != cudaSuccess) return err;
  unsigned grid = 1;  // one block even without tokens: it writes the headers
  if (p.num_tokens > 0) {
    err = row_grid(p.num_tokens * a.pieces, &grid);
    if (err != cudaSuccess) return err;
  }
  dispatch_vec(v, [&](auto vt) { low_latency_send_kernel<decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(a); });
  return cudaGetLastError();
}

cudaError_t launch_ep_low_latency_receive(const LowLatencyReceiveParams& p, cudaStream_t stream) {
  const int L = p.num_local_experts, KL = p.max_row_experts;
  if (p.num_ranks < 1 || L < 1 || KL < 1 || KL > L || p.capacity < 1 || p.hidden < 1 || p.alignment < 1 ||
      p.region == nullptr || p.expert_x == nullptr || p.expert_counts == nullptr || p.expert_offsets == nullptr ||
      p.recv_expert_rows == nullptr || p.expert_capacity < 0)
    return cudaErrorInvalidValue;
  if (!low_latency_receive_fits(p.num_ranks, L, p.capacity)) return cudaErrorInvalidValue;
  const size_t smem = low_latency_receive_smem(p.num_ranks, L);
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
  // Both kernels launch dependent on the one before (the barrier, the positions): they take their places
  // while it runs and wait for it inside.
  // The count shared by clusters of kPositionsCluster blocks where the device takes clusters (sm_90) and
  // p.positions_cluster asks for them; else every block counts every slot.
  int major = 0;
  cudaError_t err = cc_major(&major);
  if (err != cudaSuccess) return err;
  const bool clustered = p.positions_cluster && major >= 9;
  err = dispatch_vec(v, [&](auto vt) {
    constexpr int V = decltype(vt)::value;
    if (clustered) {
      const unsigned grid = (L + kPositionsCluster - 1) / kPositionsCluster * kPositionsCluster;
      const cudaError_t e =
          launch_dependent_cluster(kPositionsCluster, low_latency_positions_kernel<V, kPositionsCluster>, dim3(grid),
                                   dim3(kLowLatencyThreads), smem, stream, a);
      if (e == cudaSuccess) return e;
      (void)cudaGetLastError();  // clusters the device cannot place (a launch error, not sticky): the plain launch
    }
    return launch_dependent(low_latency_positions_kernel<V, 1>, dim3(L), dim3(kLowLatencyThreads), smem, stream, a);
  });
  if (err != cudaSuccess) return err;
  // Copy pieces of at least 512 bytes, about copy_warps_per_sm warps an SM over the slots.
  const int64_t slots = static_cast<int64_t>(p.num_ranks) * p.capacity;
  int P = 1;
  err = row_pieces(p.copy_warps_per_sm, slots, a.row_bytes, 32, &P);
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = row_grid(slots * P, &grid);
  if (err != cudaSuccess) return err;
  return dispatch_vec(v, [&](auto vt) {
    return launch_dependent(low_latency_copy_kernel<decltype(vt)::value>, dim3(grid), dim3(kRowThreads), 0, stream, a,
                            P);
  });
}

}  // namespace bitep::kernels
