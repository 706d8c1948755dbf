// SPDX-License-Identifier: Apache-2.0
// What the permute (kernels/permute.cu) and the low-latency send (kernels/low_latency.cu) share: the token
// side of their arguments and the writing of one destination row's map slice and weights. Included by those
// two files only; in an anonymous namespace, so each has its own copy of the device code.
#pragma once

#include "kernels/ep_common.cuh"
#include "kernels/ep_params.h"

namespace bitep::kernels {
namespace {

using namespace ep_detail;

struct PermuteArgs {
  RouteView v;
  WeightFormat weight_format;
  const float* weights;
  int64_t num_tokens;
  int num_ranks, local_experts, self_rank, map_bytes, row_experts;  // W, L, self, MB, KL
  const char* x;
  int64_t row_bytes, nvec;
  const int32_t* token_slot;
  const int64_t* send_offsets;
  int64_t self_recv_offset;
  char* send_x;
  uint8_t* send_map;
  float* send_weights;
  char* recv_x;
  uint8_t* recv_map;
  float* recv_weights;
  void* const* peer_dest;  // [3W] or null (PermuteParams)
  int32_t* self_tokens;
  int32_t* chunk_count;  // arrival flags (PermuteParams::chunk_*), or null
  uint64_t* const* chunk_flag;
  const int64_t* send_counts;
  int64_t chunk_rows;
  int max_chunks;
  uint64_t chunk_epoch;
  const int32_t* self_expert_rows;  // the bulk permute's own expert rows (PermuteParams), or null
  char* expert_x;
  int64_t pieces, piece_vec;  // the permute's warps a token, and the vectors of each (row_pieces)
};

// Weight of expert e of token t whose compact index is c (ep_params.h "Weight of expert e").
__device__ __forceinline__ float route_weight(const PermuteArgs& a, int64_t t, int e, int c) {
  if (a.weights == nullptr) return 0.0f;
  if (a.weight_format == WeightFormat::kDense) return __ldg(a.weights + t * a.v.num_experts + e);
  return c >= 0 && c < a.v.topk ? __ldg(a.weights + t * a.v.topk + c) : 0.0f;
}

// Row `row` of rank r's chunk: the local slice of token t (MB bytes, when map is not null) and its
// weights (KL floats, 0-padded, when w is not null and the input has weights).
__device__ void write_row_meta(const PermuteArgs& a, int64_t t, int r, int64_t row, uint8_t* map, float* w) {
  const int L = a.local_experts, lo = r * L, MB = a.map_bytes, KL = a.row_experts;
  const bool weights = w != nullptr && a.weight_format != WeightFormat::kNone;
  if (map == nullptr && !weights) return;
  const int limit = route_limit(a.v, t);
  const int hi = lo + L < limit ? lo + L : limit;  // t's experts on r: the map bits in [lo, hi)
  if (map != nullptr) {
    uint8_t* out = map + row * MB;
    for (int b = 0; b < MB; b += 4) {
      const uint32_t bits = route_bits(a.v, t, lo + 8 * b, hi);
      for (int q = 0; q < 4 && b + q < MB; ++q) out[b + q] = static_cast<uint8_t>(bits >> (8 * q));
    }
  }
  if (!weights) return;
  float* out = w + row * KL;
  const int base = a.v.format == RoutingFormat::kTopkIndices || hi <= lo ? 0 : routed_before(a.v, t, lo);
  int pos = 0;
  for (int b = lo; b < hi; b += 32) {
    for (uint32_t bits = route_bits(a.v, t, b, hi); bits != 0; bits &= bits - 1) {
      const int e = b + __ffs(bits) - 1;
      if (pos < KL) out[pos] = route_weight(a, t, e, compact_index(a.v, t, e, base + pos));
      ++pos;
    }
  }
  for (; pos < KL; ++pos) out[pos] = 0.0f;
}

// The token side of a permute or a low-latency send: routing, weights, shape and x (the rest left empty).
inline PermuteArgs token_args(const RoutingInput& routing,
                              int64_t num_tokens,
                              int E,
                              int topk,
                              int W,
                              int self,
                              const void* x,
                              int64_t hidden,
                              DType dtype) {
  PermuteArgs a{};
  a.v = make_route_view(routing, E, topk);
  a.weight_format = routing.weight_format;
  a.weights = routing.weights;
  a.num_tokens = num_tokens;
  a.num_ranks = W;
  a.local_experts = E / W;
  a.self_rank = self;
  a.map_bytes = local_map_bytes(a.local_experts);
  a.row_experts = max_row_experts(topk, a.local_experts);
  a.x = static_cast<const char*>(x);
  a.row_bytes = hidden * dtype_size(dtype);
  return a;
}

}  // namespace
}  // namespace bitep::kernels
