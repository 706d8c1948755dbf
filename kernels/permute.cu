// SPDX-License-Identifier: Apache-2.0
// Permute (PermuteParams, kernels/ep_params.h) and the batched copy (CopyBatchParams).
//
// Permute: one warp per token (persistent grid; few tokens' rows split among warps, row_pieces). Lane r reads the
// token's slot for rank r; the warp loads the token row once (16-byte vectors where the row size and pointers allow,
// 4 per lane in flight) and stores it to every destination row; then lane r writes rank r's local map slice (bits [r*L,
// (r+1)*L) of the routing row, shifted across byte boundaries) and the slice's weights. Rows alone may go
// by bulk (TMA) copies instead (PermuteParams::bulk, kernels/bulk_rows.cuh), one thread per block. Either
// way a row stored for a peer can be counted into its arrival chunk (PermuteParams::chunk_*).

#include <algorithm>

#include "kernels/bulk_rows.cuh"
#include "kernels/ep.h"
#include "kernels/ep_common.cuh"
#include "kernels/permute_rows.cuh"
#include "kernels/sync.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

// ---- permute --------------------------------------------------------------------------------------

// Row `slot` for rank r is stored (and fenced): counted into its chunk; the row that completes the chunk
// raises the chunk's flag in r's window (PermuteParams::chunk_*). The counts are a release sequence: the
// completing lane's fence orders every counted row's stores before the flag.
__device__ __forceinline__ void count_arrival(const PermuteArgs& a, int r, int64_t slot) {
  const int64_t c = slot / a.chunk_rows;
  const int64_t left = __ldg(a.send_counts + r) - c * a.chunk_rows;
  const int rows = static_cast<int>(left < a.chunk_rows ? left : a.chunk_rows);
  if (atomicAdd(a.chunk_count + static_cast<int64_t>(r) * a.max_chunks + c, 1) != rows - 1) return;
  __threadfence_system();
  store_release_sys(a.chunk_flag[r] + c, a.chunk_epoch);
}

template <int V>
__global__ void __launch_bounds__(kRowThreads) permute_kernel(PermuteArgs a) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp);
  const int W = a.num_ranks;
  // Warp gw: piece gw % pieces of token gw / pieces (vectors [v0, v1) of its row); the first piece also writes the
  // token's map slices, weights and self token, and counts its rows into their arrival chunks (one piece a token
  // there).
  for (int64_t gw = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / kWarp;
       gw < a.num_tokens * a.pieces; gw += warps) {
    const int64_t t = gw / a.pieces, piece = gw - t * a.pieces;
    const int64_t v0 = piece * a.piece_vec, v1 = v0 + a.piece_vec < a.nvec ? v0 + a.piece_vec : a.nvec;
    const bool first = piece == 0;
    for (int rg = 0; rg < W; rg += kWarp) {
      const int r = rg + lane;
      const int slot = r < W ? __ldg(a.token_slot + t * W + r) : -1;
      const bool self = r == a.self_rank;
      int64_t row = 0;
      char* dst = nullptr;
      uint8_t* map = nullptr;
      float* w = nullptr;
      if (slot >= 0) {
        if (self) {
          row = a.self_recv_offset + slot;
          dst = a.recv_x, map = a.recv_map, w = a.recv_weights;
        } else if (a.peer_dest != nullptr) {
          row = slot;
          dst = static_cast<char*>(a.peer_dest[r]);
          map = static_cast<uint8_t*>(a.peer_dest[W + r]);
          w = static_cast<float*>(a.peer_dest[2 * W + r]);
        } else {
          row = __ldg(a.send_offsets + r) + slot;
          dst = a.send_x, map = a.send_map, w = a.send_weights;
        }
        if (dst != nullptr) dst += row * a.row_bytes;
      }
      // A null x destination (recv_x, or peer_dest[r]) skips the row's copy; null map / weights its meta.
      const uint32_t mask = __ballot_sync(kFullMask, slot >= 0 && dst != nullptr);
      if (mask != 0 && v1 > v0)
        warp_copy_row<V, kUnroll>(a.x + t * a.row_bytes + v0 * V, v1 - v0, mask, dst != nullptr ? dst + v0 * V : dst);
      if (!first) continue;
      if (slot >= 0) write_row_meta(a, t, r, row, map, w);
      if (slot >= 0 && self && a.self_tokens != nullptr) a.self_tokens[slot] = static_cast<int32_t>(t);
      if (a.chunk_count != nullptr) {
        // Every lane stored a part of each destination row: each fences its own stores, then the lane of
        // rank r counts the row into its chunk.
        __threadfence_system();
        __syncwarp();
        if (slot >= 0 && !self && dst != nullptr) count_arrival(a, r, slot);
      }
    }
  }
}

// The permute of rows alone by bulk copies (PermuteParams::bulk): one thread per block, token t's row loaded
// once and stored to each destination: the peers' (peer_dest or the send buffer), the own one (recv_x) and
// the own row's expert rows. With arrival flags each row is counted once its stores are complete.
__global__ void __launch_bounds__(kWarp) permute_bulk_kernel(PermuteArgs a, int nbuf) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char bulk_smem[];
  __shared__ __align__(8) uint64_t bar[kBulkMaxBufs];
  if (threadIdx.x != 0) return;
  const int W = a.num_ranks, KL = a.row_experts;
  const int64_t T = a.num_tokens;
  const int64_t mine = T > blockIdx.x ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto token = [](int64_t n) { return blockIdx.x + n * gridDim.x; };
  // Row n's peers counted into their chunks (its stores complete: made visible, then fenced).
  auto count = [&](int64_t n) {
    asm volatile("fence.proxy.async.global;" ::: "memory");
    __threadfence_system();
    const int64_t t = token(n);
    for (int r = 0; r < W; ++r) {
      const int slot = __ldg(a.token_slot + t * W + r);
      if (slot >= 0 && r != a.self_rank && (a.peer_dest == nullptr || a.peer_dest[r] != nullptr))
        count_arrival(a, r, slot);
    }
  };
  const BulkRing ring = make_ring(bulk_smem, bar, a.row_bytes, nbuf);
  bulk_rows(
      ring, mine, [&](int64_t n) { return a.x + token(n) * a.row_bytes; },
      [&](int64_t n) {
        const int64_t t = token(n);
        for (int r = 0; r < W; ++r) {
          const int slot = __ldg(a.token_slot + t * W + r);
          if (slot < 0) continue;
          if (r == a.self_rank) {
            if (a.recv_x != nullptr) ring.store(n, a.recv_x + (a.self_recv_offset + slot) * a.row_bytes);
            for (int j = 0; a.self_expert_rows != nullptr && j < KL; ++j) {
              const int pos = __ldg(a.self_expert_rows + static_cast<int64_t>(slot) * KL + j);
              if (pos >= 0) ring.store(n, a.expert_x + pos * a.row_bytes);
            }
          } else if (a.peer_dest != nullptr) {
            char* d = static_cast<char*>(a.peer_dest[r]);
            if (d != nullptr) ring.store(n, d + slot * a.row_bytes);
          } else {
            ring.store(n, a.send_x + (__ldg(a.send_offsets + r) + slot) * a.row_bytes);
          }
        }
      },
      [&](int64_t n) {
        // Row n - 1's stores complete (all groups but row n's): count it.
        if (a.chunk_count == nullptr || n == 0) return;
        asm volatile("cp.async.bulk.wait_group 1;" ::: "memory");
        count(n - 1);
      },
      [&] {
        if (a.chunk_count != nullptr && mine > 0) count(mine - 1);
      });
#else
  (void)a, (void)nbuf;
  __trap();  // launched only where the device is sm_90 or later (launch_ep_permute checks)
#endif
}

// CopyBatchParams: the pieces cut into chunks of kBatchChunk bytes, a block per chunk (grid-stride); each
// chunk copied in 16-byte vectors when its ends and the piece's pointers allow, else 4-byte, else bytes.
constexpr int64_t kBatchChunk = 16 * 1024;

template <typename Vec>
__device__ __forceinline__ void block_copy(char* dst, const char* src, int64_t n) {
  for (int64_t o = static_cast<int64_t>(threadIdx.x) * sizeof(Vec); o < n;
       o += static_cast<int64_t>(blockDim.x) * sizeof(Vec))
    *reinterpret_cast<Vec*>(dst + o) = *reinterpret_cast<const Vec*>(src + o);
}

__global__ void __launch_bounds__(kRowThreads) copy_batch_kernel(CopyBatchParams p) {
  int64_t first[CopyBatchParams::kMaxPieces + 1];
  first[0] = 0;
#pragma unroll
  for (int q = 0; q < CopyBatchParams::kMaxPieces; ++q)
    first[q + 1] = first[q] + (q < p.count ? (p.bytes[q] + kBatchChunk - 1) / kBatchChunk : 0);
  for (int64_t c = blockIdx.x; c < first[CopyBatchParams::kMaxPieces]; c += gridDim.x) {
    int q = 0;
    while (c >= first[q + 1]) ++q;
    const int64_t off = (c - first[q]) * kBatchChunk;
    const int64_t n = p.bytes[q] - off < kBatchChunk ? p.bytes[q] - off : kBatchChunk;
    char* d = static_cast<char*>(p.dst[q]) + off;
    const char* s = static_cast<const char*>(p.src[q]) + off;
    const uintptr_t align = reinterpret_cast<uintptr_t>(d) | reinterpret_cast<uintptr_t>(s) | static_cast<uintptr_t>(n);
    if (align % 16 == 0) {
      block_copy<uint4>(d, s, n);
    } else if (align % 4 == 0) {
      block_copy<uint32_t>(d, s, n);
    } else {
      block_copy<uint8_t>(d, s, n);
    }
  }
}

// permute_bulk_kernel's ring and per-block shared memory on the current device (cached per device).
cudaError_t permute_bulk_smem(BulkSmem* out) {
  static BulkSmemCache cache;
  return bulk_smem(permute_bulk_kernel, cache, out);
}

// Whether p's rows go by the bulk permute (PermuteParams::bulk).
cudaError_t permute_bulk(const PermuteParams& p, bool* out) {
  *out = false;
  const int64_t row_bytes = p.hidden * dtype_size(p.dtype);
  const bool meta =
      p.recv_map != nullptr || p.recv_weights != nullptr || p.send_map != nullptr || p.send_weights != nullptr;
  if (!p.bulk || meta || p.x == nullptr || vec_bytes(row_bytes, p.x, p.recv_x, p.send_x) != 16 ||
      vec_bytes(row_bytes, p.expert_x) != 16)
    return cudaSuccess;
  BulkSmem smem;
  const cudaError_t err = permute_bulk_smem(&smem);
  *out = err == cudaSuccess && bulk_available(smem, row_bytes);
  return err;
}

}  // namespace

cudaError_t permute_takes_bulk(const PermuteParams& p, bool* out) { return permute_bulk(p, out); }

cudaError_t launch_ep_copy_batch(const CopyBatchParams& p, cudaStream_t stream) {
  if (p.count < 0 || p.count > CopyBatchParams::kMaxPieces) return cudaErrorInvalidValue;
  int64_t chunks = 0;
  for (int q = 0; q < p.count; ++q) {
    if (p.bytes[q] < 0 || (p.bytes[q] > 0 && (p.dst[q] == nullptr || p.src[q] == nullptr)))
      return cudaErrorInvalidValue;
    chunks += (p.bytes[q] + kBatchChunk - 1) / kBatchChunk;
  }
  if (chunks == 0) return cudaSuccess;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  copy_batch_kernel<<<static_cast<unsigned>(std::min<int64_t>(chunks, 4 * static_cast<int64_t>(sms))), kRowThreads, 0,
                      stream>>>(p);
  return cudaGetLastError();
}

cudaError_t load_permute_kernels() {
  cudaFuncAttributes attr;
  BulkSmem smem;  // also opts the bulk kernel in to its ring's shared memory
  cudaError_t err = permute_bulk_smem(&smem);
  for (int v : {16, 8, 4, 2, 1})
    if (err == cudaSuccess)
      err = dispatch_vec(v, [&](auto vt) { return cudaFuncGetAttributes(&attr, permute_kernel<decltype(vt)::value>); });
  return err;
}

cudaError_t launch_ep_permute(const PermuteParams& p, cudaStream_t stream) {
  const int W = p.num_ranks, E = p.num_experts;
  if (W < 1 || E < 1 || E % W != 0 || p.topk < 1 || p.num_tokens < 0 || p.hidden < 0 || p.self_rank < 0 ||
      p.self_rank >= W)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  const bool need_routing =
      p.send_map != nullptr || p.recv_map != nullptr ||
      (p.routing.weight_format != WeightFormat::kNone && (p.send_weights != nullptr || p.recv_weights != nullptr));
  const bool peers = W > 1 && p.peer_dest == nullptr;  // the send buffers are written
  if ((need_routing && p.routing.map == nullptr) || p.token_slot == nullptr || (peers && p.send_offsets == nullptr))
    return cudaErrorInvalidValue;
  PermuteArgs a = token_args(p.routing, p.num_tokens, E, p.topk, W, p.self_rank, p.x, p.hidden, p.dtype);
  a.token_slot = p.token_slot;
  a.send_offsets = p.send_offsets;
  a.self_recv_offset = p.self_recv_offset;
  a.send_x = static_cast<char*>(p.send_x);
  a.send_map = p.send_map;
  a.send_weights = p.send_weights;
  a.recv_x = static_cast<char*>(p.recv_x);
  a.recv_map = p.recv_map;
  a.recv_weights = p.recv_weights;
  a.peer_dest = p.peer_dest;
  a.self_tokens = p.self_tokens;
  a.chunk_count = p.chunk_count;
  a.chunk_flag = p.chunk_flag;
  a.send_counts = p.send_counts;
  a.chunk_rows = p.chunk_rows;
  a.max_chunks = p.max_chunks;
  a.chunk_epoch = p.chunk_epoch;
  if (p.chunk_count != nullptr && ((p.peer_dest == nullptr && p.send_x == nullptr) || p.chunk_flag == nullptr ||
                                   p.send_counts == nullptr || p.chunk_rows < 1 || p.max_chunks < 1))
    return cudaErrorInvalidValue;
  // The x copy is skipped (nvec = 0) for an empty row; send_x / recv_x may then be null (a null recv_x:
  // the own rows are not written, a null peer_dest entry: that peer's rows are not). Peer chunks
  // (peer_dest) start at a multiple of the row size past a 16-byte aligned window: the row size decides.
  const int v = vec_bytes(a.row_bytes, p.x, peers ? p.send_x : nullptr, p.recv_x);
  a.nvec = a.row_bytes / v;
  if (a.row_bytes > 0 && (p.x == nullptr || (peers && p.send_x == nullptr))) return cudaErrorInvalidValue;

  if (p.self_expert_rows != nullptr && (!p.bulk || p.expert_x == nullptr)) return cudaErrorInvalidValue;
  a.self_expert_rows = p.self_expert_rows;
  a.expert_x = static_cast<char*>(p.expert_x);
  bool bulk = false;
  cudaError_t err = permute_bulk(p, &bulk);
  if (err != cudaSuccess) return err;
  if (p.self_expert_rows != nullptr && !bulk) return cudaErrorInvalidValue;  // the caller asks permute_takes_bulk
  int sms = 0;
  if ((err = sm_count(&sms)) != cudaSuccess) return err;
  if (bulk) {
    BulkSmem smem;
    if ((err = permute_bulk_smem(&smem)) != cudaSuccess) return err;
    const int nbuf = bulk_bufs(smem, a.row_bytes);  // >= 2 (permute_bulk)
    int64_t per_sm = 0;
    if ((err = bulk_blocks_per_sm(smem, nbuf * a.row_bytes, p.blocks_per_sm, &per_sm)) != cudaSuccess) return err;
    int64_t grid = std::min<int64_t>(p.num_tokens, per_sm * sms);
    if (p.max_blocks > 0) grid = std::min<int64_t>(grid, p.max_blocks);
    permute_bulk_kernel<<<static_cast<unsigned>(grid), kWarp, static_cast<size_t>(nbuf * a.row_bytes), stream>>>(a,
                                                                                                                 nbuf);
    return cudaGetLastError();
  }
  // Few tokens: a row's passes shared among warps (not where rows count into arrival chunks: a row counts once).
  a.pieces = 1;
  a.piece_vec = a.nvec;
  if (p.chunk_count == nullptr && (err = row_pieces(p.num_tokens, a.nvec, p.blocks_per_sm, p.max_row_pieces, &a.pieces,
                                                    &a.piece_vec)) != cudaSuccess)
    return err;
  unsigned grid = 0;
  if ((err = row_grid(p.num_tokens * a.pieces, &grid, p.blocks_per_sm)) != cudaSuccess) return err;
  if (p.max_blocks > 0 && grid > static_cast<unsigned>(p.max_blocks)) grid = static_cast<unsigned>(p.max_blocks);
  dispatch_vec(v, [&](auto vt) { permute_kernel<decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(a); });
  return cudaGetLastError();
}

}  // namespace bitep::kernels
