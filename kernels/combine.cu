// SPDX-License-Identifier: Apache-2.0
// Combine primitives (kernels/ep_params.h): the local weighted reduce (ReduceParams, with the weight
// gradients of the combine backward), the final sum over ranks (FinalSumParams) and the scatter of
// returned weight gradients (WeightGradParams).
//
// All three are one warp per row over a persistent grid; the reduce and the final sum split a row into pieces of
// kWarp * kUnroll vectors among several warps when there are fewer rows than warps to fill the device (a decode
// batch: 128 rows of 14 KB were one warp each, a chain of ~28 dependent loads). Rows move in 16-byte vectors where the
// row size and pointers allow (4 per lane in flight per source row; the sums load two source rows at a time); sums are
// fp32 in the order ep_params.h fixes (reduce: acc = fmaf(w, y, acc) over j ascending; final sum: acc + row over r
// ascending), one rounding at the end, so the results are bit-identical to the host reference.
#include <algorithm>

#include "kernels/ep.h"
#include "kernels/ep_common.cuh"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t num_warps() { return static_cast<int64_t>(gridDim.x) * (kRowThreads / kWarp); }

// acc[u] (vectors base + u * 32 + lane of a row) += w_d * row_d for the lanes d set in `mask`, in
// ascending d, each with one fmaf per element (w = 1 gives the plain sum acc + row, bit for bit). Lane
// d's row address and weight are read by shuffle. Two rows are loaded before either is summed: twice the
// bytes in flight of one at a time.
template <class P>
__device__ __forceinline__ void sum_rows(
    float (&acc)[kUnroll][P::N], uint32_t mask, const char* row, float w, int64_t base, int64_t nvec) {
  using Vec = typename P::Vec;
  const int lane = threadIdx.x & (kWarp - 1);
  const unsigned long long my = reinterpret_cast<unsigned long long>(row);
  for (uint32_t m = mask; m != 0;) {
    const int d0 = __ffs(m) - 1;
    m &= m - 1;
    const bool two = m != 0;
    const int d1 = two ? __ffs(m) - 1 : d0;
    if (two) m &= m - 1;
    const Vec* s0 = reinterpret_cast<const Vec*>(__shfl_sync(kFullMask, my, d0));
    const Vec* s1 = reinterpret_cast<const Vec*>(__shfl_sync(kFullMask, my, d1));
    const float w0 = __shfl_sync(kFullMask, w, d0), w1 = __shfl_sync(kFullMask, w, d1);
    Vec b0[kUnroll], b1[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + u * kWarp + lane;
      b0[u] = idx < nvec ? __ldg(s0 + idx) : Vec{};
      b1[u] = two && idx < nvec ? __ldg(s1 + idx) : Vec{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[P::N];
      P::to_float(b0[u], f);
#pragma unroll
      for (int q = 0; q < P::N; ++q) acc[u][q] = __fmaf_rn(w0, f[q], acc[u][q]);
      if (two) {
        P::to_float(b1[u], f);
#pragma unroll
        for (int q = 0; q < P::N; ++q) acc[u][q] = __fmaf_rn(w1, f[q], acc[u][q]);
      }
    }
  }
}

// ---- reduce ---------------------------------------------------------------------------------------

struct ReduceArgs {
  int64_t num_rows;
  int row_experts;  // KL
  const char* y;
  const int32_t* rows;
  const float* weights;
  char* out;
  const char* grad_rows;
  float* grad_weights;
  int64_t row_bytes, nvec;
  int num_sources, self_source;  // per source destinations (ReduceParams::outs), or 0
  char* const* outs;
  SlotParity outs_parity;  // picks outs' table (ReduceParams::outs_parity)
  const int64_t* row_offsets;
  bool skip_empty;            // ReduceParams::skip_empty_rows
  int64_t pieces, piece_vec;  // a row's warps, and the vectors of each (a multiple of kWarp * kUnroll)
};

// Step j of a reduce over R rows of which [own0, own0 + own_n) are the own rows: the others' rows and the
// own ones alternate while both last, then the rest of the longer run, each in ascending order.
__device__ __forceinline__ int64_t interleaved_row(int64_t j, int64_t own0, int64_t own_n, int64_t R) {
  const int64_t others = R - own_n, m = others < own_n ? others : own_n;
  const bool own = j < 2 * m ? (j & 1) != 0 : own_n > others;
  const int64_t q = j < 2 * m ? j >> 1 : j - m;
  return own ? own0 + q : (q < own0 ? q : q + own_n);
}

// The largest s < n with off[s] <= i (so a source without rows is passed over).
__device__ __forceinline__ int source_of(const int64_t* off, int n, int64_t i) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (__ldg(off + mid) <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) reduce_kernel(ReduceArgs a) {
  using P = Pack<T, V>;
  using Vec = typename P::Vec;
  constexpr int N = P::N;
  const int lane = threadIdx.x & (kWarp - 1);
  const int KL = a.row_experts;
  int64_t own0 = 0, own_n = 0;
  char* const* outs = a.outs;
  if (a.num_sources > 0) outs += static_cast<int64_t>(slot_parity(a.outs_parity)) * a.num_sources;
  if (a.num_sources > 0 && a.self_source >= 0) {
    own0 = __ldg(a.row_offsets + a.self_source);
    own_n = __ldg(a.row_offsets + a.self_source + 1) - own0;
  }
  for (int64_t w = global_warp(); w < a.num_rows * a.pieces; w += num_warps()) {
    const int64_t j = w / a.pieces, piece = w - j * a.pieces;
    const int64_t v0 = piece * a.piece_vec, v1 = v0 + a.piece_vec < a.nvec ? v0 + a.piece_vec : a.nvec;
    int64_t i = j;
    char* dst = a.out != nullptr ? a.out + i * a.row_bytes : nullptr;
    if (a.num_sources > 0) {
      i = interleaved_row(j, own0, own_n, a.num_rows);
      const int s = source_of(a.row_offsets, a.num_sources, i);
      char* base = outs[s];
      dst = base != nullptr ? base + (i - __ldg(a.row_offsets + s)) * a.row_bytes : nullptr;
    }
    const int32_t* rr = a.rows + i * KL;
    // Positions and weights of the first 32 entries stay in registers; more (KL > 32) are reloaded.
    const int pos0 = lane < KL ? __ldg(rr + lane) : -1;
    const float w0 = a.weights != nullptr && lane < KL ? __ldg(a.weights + i * KL + lane) : 1.0f;
    if (a.skip_empty && __shfl_sync(kFullMask, pos0, 0) < 0) dst = nullptr;
    if (dst != nullptr) {
      Vec* out = reinterpret_cast<Vec*>(dst);
      for (int64_t base = v0; base < v1; base += kWarp * kUnroll) {
        float acc[kUnroll][N];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int q = 0; q < N; ++q) acc[u][q] = 0.0f;
        for (int jg = 0; jg < KL; jg += kWarp) {
          const int j = jg + lane;
          const int pos = jg == 0 ? pos0 : (j < KL ? __ldg(rr + j) : -1);
          const float w = jg == 0 ? w0 : (a.weights != nullptr && j < KL ? __ldg(a.weights + i * KL + j) : 1.0f);
          const char* src = pos >= 0 ? a.y + static_cast<int64_t>(pos) * a.row_bytes : nullptr;
          sum_rows<P>(acc, __ballot_sync(kFullMask, pos >= 0), src, w, base, a.nvec);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t idx = base + u * kWarp + lane;
          if (idx < a.nvec) out[idx] = P::from_float(acc[u]);
        }
      }
    }
    if (piece == 0 && a.grad_weights != nullptr && a.grad_rows != nullptr) {  // the whole row's dot, once
      // dot(y[pos], g[i]): lane-strided fmaf partials, then a fixed xor-tree: deterministic.
      const Vec* g = reinterpret_cast<const Vec*>(a.grad_rows + i * a.row_bytes);
      for (int j = 0; j < KL; ++j) {
        const int pos = j < kWarp ? __shfl_sync(kFullMask, pos0, j) : __ldg(rr + j);
        float d = 0.0f;
        if (pos >= 0) {
          const Vec* yr = reinterpret_cast<const Vec*>(a.y + static_cast<int64_t>(pos) * a.row_bytes);
          for (int64_t idx = lane; idx < a.nvec; idx += kWarp) {
            float fy[N], fg[N];
            P::to_float(__ldg(yr + idx), fy);
            P::to_float(__ldg(g + idx), fg);
#pragma unroll
            for (int q = 0; q < N; ++q) d = __fmaf_rn(fy[q], fg[q], d);
          }
#pragma unroll
          for (int off = kWarp / 2; off > 0; off >>= 1) d = __fadd_rn(d, __shfl_xor_sync(kFullMask, d, off));
        }
        if (lane == 0) a.grad_weights[i * KL + j] = d;
      }
    }
  }
}

// ---- final sum ------------------------------------------------------------------------------------

struct FinalArgs {
  int64_t num_tokens;
  int num_ranks, self_rank;
  const int32_t* token_slot;
  const int64_t* send_offsets;
  const char* ret;
  const char* self_ret;
  int64_t self_ret_offset;
  char* out;
  int64_t row_bytes, nvec;
  SlotParity ret_parity;  // FinalSumParams::ret_parity
  int64_t ret_parity_bytes;
  int64_t pieces, piece_vec;  // as ReduceArgs
};

// Lane r's source row for token t (rank rg + lane), or null.
__device__ __forceinline__ const char* final_src(const FinalArgs& a, int64_t t, int rg) {
  const int r = rg + (threadIdx.x & (kWarp - 1));
  const int slot = r < a.num_ranks ? __ldg(a.token_slot + t * a.num_ranks + r) : -1;
  if (slot < 0) return nullptr;
  if (r == a.self_rank) return a.self_ret + (a.self_ret_offset + slot) * a.row_bytes;
  return a.ret + (__ldg(a.send_offsets + r) + slot) * a.row_bytes;
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) final_sum_kernel(FinalArgs a) {
  using P = Pack<T, V>;
  using Vec = typename P::Vec;
  constexpr int N = P::N;
  const int lane = threadIdx.x & (kWarp - 1);
  if (slot_parity(a.ret_parity) != 0) {
    a.ret += a.ret_parity_bytes;
    a.self_ret += a.ret_parity_bytes;
  }
  for (int64_t w = global_warp(); w < a.num_tokens * a.pieces; w += num_warps()) {
    const int64_t t = w / a.pieces, piece = w - t * a.pieces;
    const int64_t v0 = piece * a.piece_vec, v1 = v0 + a.piece_vec < a.nvec ? v0 + a.piece_vec : a.nvec;
    const char* src0 = final_src(a, t, 0);  // ranks 0..31 stay in registers; more are reloaded per chunk
    Vec* out = reinterpret_cast<Vec*>(a.out + t * a.row_bytes);
    for (int64_t base = v0; base < v1; base += kWarp * kUnroll) {
      float acc[kUnroll][N];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int q = 0; q < N; ++q) acc[u][q] = 0.0f;
      for (int rg = 0; rg < a.num_ranks; rg += kWarp) {
        const char* src = rg == 0 ? src0 : final_src(a, t, rg);
        sum_rows<P>(acc, __ballot_sync(kFullMask, src != nullptr), src, 1.0f, base, a.nvec);  // acc + row
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kWarp + lane;
        if (idx < a.nvec) out[idx] = P::from_float(acc[u]);
      }
    }
  }
}

// ---- weight gradient scatter ----------------------------------------------------------------------

struct WeightGradArgs {
  RouteView v;
  int64_t num_tokens;
  int num_ranks, local_experts, row_experts, self_rank;
  const int32_t* token_slot;
  const int64_t* send_offsets;
  const float* ret_grad_w;
  const float* self_grad_w;
  int64_t self_offset;
  float* grad_dense;    // written when not null (kDense)
  float* grad_compact;  // written when not null (kCompact)
};

__global__ void __launch_bounds__(kRowThreads) weight_grad_kernel(WeightGradArgs a) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int E = a.v.num_experts, k = a.v.topk, W = a.num_ranks, L = a.local_experts, KL = a.row_experts;
  for (int64_t t = global_warp(); t < a.num_tokens; t += num_warps()) {
    if (a.grad_dense != nullptr)
      for (int e = lane; e < E; e += kWarp) a.grad_dense[t * E + e] = 0.0f;
    if (a.grad_compact != nullptr)
      for (int c = lane; c < k; c += kWarp) a.grad_compact[t * k + c] = 0.0f;
    __syncwarp();  // the zeros land before any lane's scatter
    for (int rg = 0; rg < W; rg += kWarp) {
      const int r = rg + lane;
      const int slot = r < W ? __ldg(a.token_slot + t * W + r) : -1;
      if (slot < 0) continue;
      const float* q = r == a.self_rank ? a.self_grad_w + (a.self_offset + slot) * KL
                                        : a.ret_grad_w + (__ldg(a.send_offsets + r) + slot) * KL;
      const int lo = r * L, limit = route_limit(a.v, t);
      const int hi = lo + L < limit ? lo + L : limit;
      const int base = a.v.format == RoutingFormat::kTopkIndices || hi <= lo ? 0 : routed_before(a.v, t, lo);
      int pos = 0;
      for (int b = lo; b < hi && pos < KL; b += 32) {
        for (uint32_t bits = route_bits(a.v, t, b, hi); bits != 0 && pos < KL; bits &= bits - 1, ++pos) {
          const int e = b + __ffs(bits) - 1;
          const float g = __ldg(q + pos);
          if (a.grad_dense != nullptr) a.grad_dense[t * E + e] = g;
          if (a.grad_compact != nullptr) {
            const int c = compact_index(a.v, t, e, base + pos);
            if (c >= 0 && c < k) a.grad_compact[t * k + c] = g;
          }
        }
      }
    }
    __syncwarp();
  }
}

template <class Launch>
cudaError_t with_vec_dtype(DType dtype, int v, Launch&& launch) {
  return dispatch_dtype(dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    return dispatch_vec(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      if constexpr (V >= static_cast<int>(sizeof(T))) {
        return launch(tt, vt);
      } else {
        return cudaErrorMisalignedAddress;  // a row or pointer not aligned to the element size
      }
    });
  });
}

}  // namespace

cudaError_t launch_ep_reduce(const ReduceParams& p, cudaStream_t stream) {
  if (p.num_recv_rows < 0 || p.max_row_experts < 1 || p.hidden < 0) return cudaErrorInvalidValue;
  if (p.num_recv_rows == 0) return cudaSuccess;
  const bool grads = p.grad_rows != nullptr && p.grad_weights != nullptr;
  const bool sources = p.num_sources > 0;
  if (p.out == nullptr && !sources && !grads) return cudaSuccess;
  if (p.recv_expert_rows == nullptr) return cudaErrorInvalidValue;  // y is read only at positions >= 0
  if (sources && (p.outs == nullptr || p.row_offsets == nullptr || p.self_source >= p.num_sources))
    return cudaErrorInvalidValue;
  ReduceArgs a;
  a.num_rows = p.num_recv_rows;
  a.row_experts = p.max_row_experts;
  a.y = static_cast<const char*>(p.y);
  a.rows = p.recv_expert_rows;
  a.weights = p.recv_weights;
  a.out = sources ? nullptr : static_cast<char*>(p.out);
  a.grad_rows = static_cast<const char*>(p.grad_rows);
  a.grad_weights = grads ? p.grad_weights : nullptr;
  a.row_bytes = p.hidden * dtype_size(p.dtype);
  a.num_sources = sources ? p.num_sources : 0;
  a.self_source = p.self_source;
  a.outs = reinterpret_cast<char* const*>(p.outs);
  a.outs_parity = p.outs_parity;
  a.row_offsets = p.row_offsets;
  a.skip_empty = p.skip_empty_rows;
  // outs[s] live on the device: the caller states their alignment.
  int v = vec_bytes(a.row_bytes, p.y, a.out, grads ? p.grad_rows : nullptr);
  if (sources) {
    if (p.outs_align < 1 || p.outs_align > 16 || (p.outs_align & (p.outs_align - 1)) != 0) return cudaErrorInvalidValue;
    v = v < p.outs_align ? v : p.outs_align;
  }
  a.nvec = a.row_bytes / v;
  cudaError_t err = row_pieces(p.num_recv_rows, a.nvec, p.blocks_per_sm, p.max_row_pieces, &a.pieces, &a.piece_vec);
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = row_grid(p.num_recv_rows * a.pieces, &grid, p.blocks_per_sm);
  if (err != cudaSuccess) return err;
  err = with_vec_dtype(p.dtype, v, [&](auto tt, auto vt) {
    reduce_kernel<typename decltype(tt)::type, decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(a);
    return cudaSuccess;
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_ep_final_sum(const FinalSumParams& p, cudaStream_t stream) {
  const int W = p.num_ranks;
  if (p.num_tokens < 0 || W < 1 || p.self_rank < 0 || p.self_rank >= W || p.hidden < 0) return cudaErrorInvalidValue;
  if (p.num_tokens == 0 || p.hidden == 0) return cudaSuccess;
  if (p.token_slot == nullptr || p.out == nullptr || (W > 1 && p.send_offsets == nullptr)) return cudaErrorInvalidValue;
  FinalArgs a;
  a.num_tokens = p.num_tokens;
  a.num_ranks = W;
  a.self_rank = p.self_rank;
  a.token_slot = p.token_slot;
  a.send_offsets = p.send_offsets;
  a.ret = static_cast<const char*>(p.ret);
  a.self_ret = static_cast<const char*>(p.self_ret);
  a.self_ret_offset = p.self_ret_offset;
  a.ret_parity = p.ret_parity;
  a.ret_parity_bytes = p.ret_parity_bytes;
  if (p.ret_parity.count != nullptr && p.ret_parity_bytes % 16 != 0)
    return cudaErrorInvalidValue;  // keeps the vectors aligned
  a.out = static_cast<char*>(p.out);
  a.row_bytes = p.hidden * dtype_size(p.dtype);
  const int v = vec_bytes(a.row_bytes, p.out, p.ret, p.self_ret);
  a.nvec = a.row_bytes / v;
  cudaError_t err = row_pieces(p.num_tokens, a.nvec, 0, p.max_row_pieces, &a.pieces, &a.piece_vec);
  if (err != cudaSuccess) return err;
  unsigned grid = 0;
  err = row_grid(p.num_tokens * a.pieces, &grid);
  if (err != cudaSuccess) return err;
  err = with_vec_dtype(p.dtype, v, [&](auto tt, auto vt) {
    final_sum_kernel<typename decltype(tt)::type, decltype(vt)::value><<<grid, kRowThreads, 0, stream>>>(a);
    return cudaSuccess;
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

cudaError_t launch_ep_weight_grad(const WeightGradParams& p, cudaStream_t stream) {
  const int W = p.num_ranks, E = p.num_experts;
  if (W < 1 || E < 1 || E % W != 0 || p.topk < 1 || p.num_tokens < 0 || p.self_rank < 0 || p.self_rank >= W)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  float* dense = p.routing.weight_format == WeightFormat::kDense ? p.grad_dense : nullptr;
  float* compact = p.routing.weight_format == WeightFormat::kCompact ? p.grad_compact : nullptr;
  if (dense == nullptr && compact == nullptr) return cudaSuccess;
  if (p.routing.map == nullptr || p.token_slot == nullptr || (W > 1 && p.send_offsets == nullptr))
    return cudaErrorInvalidValue;
  WeightGradArgs a;
  a.v = make_route_view(p.routing, E, p.topk);
  a.num_tokens = p.num_tokens;
  a.num_ranks = W;
  a.local_experts = E / W;
  a.row_experts = max_row_experts(p.topk, a.local_experts);
  a.self_rank = p.self_rank;
  a.token_slot = p.token_slot;
  a.send_offsets = p.send_offsets;
  a.ret_grad_w = p.ret_grad_w;
  a.self_grad_w = p.self_grad_w;
  a.self_offset = p.self_offset;
  a.grad_dense = dense;
  a.grad_compact = compact;
  unsigned grid = 0;
  cudaError_t err = row_grid(p.num_tokens, &grid);
  if (err != cudaSuccess) return err;
  weight_grad_kernel<<<grid, kRowThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace bitep::kernels
