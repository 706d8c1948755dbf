// SPDX-License-Identifier: Apache-2.0
#include "src/ep/dispatch_args.h"

#include <climits>
#include <vector>

#include "src/args.h"
#include "src/check.h"

namespace bitep::ep {
namespace {

// Host backend only: every row routes to exactly k distinct experts in [0, E).
bitepResult_t validate_routing(const bitepDispatchArgs_t* a, int E, int k) {
  const int64_t T = a->num_tokens;
  if (a->map_format == bitepMapBitmapU8) {
    const int nb = kernels::bitmap_bytes(E);
    const uint8_t* m = static_cast<const uint8_t*>(a->routing_map);
    for (int64_t t = 0; t < T; ++t) {
      int n = 0;
      for (int b = 0; b < nb; ++b) {
        unsigned v = m[t * nb + b];
        if (b == nb - 1 && E % 8 != 0) v &= (1u << (E % 8)) - 1;  // pad bits are not experts
        n += __builtin_popcount(v);
      }
      BITEP_ARG_CHECK(n == k, "args->routing_map (BITMAP_U8) row %lld routes to %d experts, expected topk = %d",
                      static_cast<long long>(t), n, k);
    }
  } else if (a->map_format == bitepMapBytemap) {
    const uint8_t* m = static_cast<const uint8_t*>(a->routing_map);
    for (int64_t t = 0; t < T; ++t) {
      int n = 0;
      for (int e = 0; e < E; ++e) {
        const uint8_t v = m[t * E + e];
        BITEP_ARG_CHECK(v <= 1, "args->routing_map (BYTEMAP) [%lld, %d] is %d, must be 0 or 1",
                        static_cast<long long>(t), e, v);
        n += v;
      }
      BITEP_ARG_CHECK(n == k, "args->routing_map (BYTEMAP) row %lld routes to %d experts, expected topk = %d",
                      static_cast<long long>(t), n, k);
    }
  } else {
    const int32_t* m = static_cast<const int32_t*>(a->routing_map);
    std::vector<int64_t> seen(E, -1);
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < k; ++j) {
        const int32_t e = m[t * k + j];
        BITEP_ARG_CHECK(e >= 0 && e < E,
                        "args->routing_map (indices) [%lld, %d] is %d, must be in [0, num_experts = %d)",
                        static_cast<long long>(t), j, e, E);
        BITEP_ARG_CHECK(seen[e] != t,
                        "args->routing_map (indices) row %lld names expert %d twice: indices must be "
                        "distinct",
                        static_cast<long long>(t), e);
        seen[e] = t;
      }
    }
  }
  return bitepSuccess;
}

}  // namespace

uint64_t routing_bytes(bitepMapFormat_t f, uint64_t T, int E, int k) {
  return kernels::routing_map_bytes(to_routing_format(f), T, E, k);
}

bitepResult_t check_layout(bitepLayout_t layout, const char* name) {
  BITEP_ARG_CHECK(layout == bitepLayoutExpertMajor || layout == bitepLayoutRankMajor,
                  "%s is %d, expected bitepLayoutExpertMajor (0) or bitepLayoutRankMajor (1)", name,
                  static_cast<int>(layout));
  return bitepSuccess;
}

int64_t rows_of(const bitepHandle* h, bitepLayout_t layout) {
  return layout == bitepLayoutExpertMajor ? h->num_expert_rows : h->num_recv_rows;
}

bitepResult_t check_dispatch_args(const bitepGroup* g, const bitepDispatchArgs_t* a, bitepHandle_t* handle) {
  BITEP_ARG_CHECK(handle != nullptr, "handle is NULL");
  BITEP_CHECK_STRUCT(a, "args", bitepDispatchArgs_t, BITEP_DISPATCH_ARGS_MAGIC, "BITEP_DISPATCH_ARGS_INIT");
  const bitepGroupConfig_t& c = g->config;
  const int E = c.num_experts, k = c.topk, W = g->nranks;
  const uint64_t ds = dtype_size(c.dtype), row = ds * static_cast<uint64_t>(c.hidden);
  BITEP_ARG_CHECK(a->num_tokens >= 0 && a->num_tokens <= INT32_MAX,
                  "args->num_tokens is %lld, must be in [0, 2^31 - 1]", static_cast<long long>(a->num_tokens));
  const uint64_t T = static_cast<uint64_t>(a->num_tokens);
  uint64_t widest = row > static_cast<uint64_t>(E) * 4 ? row : static_cast<uint64_t>(E) * 4;
  if (static_cast<uint64_t>(W) * 4 > widest) widest = static_cast<uint64_t>(W) * 4;
  uint64_t bytes = 0;
  BITEP_ARG_CHECK(!mul_overflows(T, widest, &bytes) && bytes < (uint64_t{1} << 62),
                  "args->num_tokens (%lld) is too large: its buffers overflow a 64-bit byte count",
                  static_cast<long long>(a->num_tokens));
  BITEP_ARG_CHECK(
      a->map_format == bitepMapBitmapU8 || a->map_format == bitepMapBytemap || a->map_format == bitepMapTopkIndices,
      "args->map_format is %d, expected bitepMapBitmapU8 (2), bitepMapBytemap (1) or bitepMapTopkIndices (3)",
      static_cast<int>(a->map_format));
  BITEP_ARG_CHECK(a->probs == nullptr || a->topk_weights == nullptr,
                  "args->probs and args->topk_weights are both set: give at most one form of the weights");
  BITEP_ARG_CHECK(a->recv_x_capacity >= 0, "args->recv_x_capacity is %lld, must be >= 0",
                  static_cast<long long>(a->recv_x_capacity));
  BITEP_ARG_CHECK(a->expert_x_capacity >= 0, "args->expert_x_capacity is %lld, must be >= 0",
                  static_cast<long long>(a->expert_x_capacity));
  BITEP_ARG_CHECK(a->recv_x != nullptr || a->recv_x_capacity == 0,
                  "args->recv_x_capacity is %lld but args->recv_x is NULL (NULL: buffers from the group's pool, "
                  "capacity 0)",
                  static_cast<long long>(a->recv_x_capacity));
  BITEP_ARG_CHECK(a->expert_x != nullptr || a->expert_x_capacity == 0,
                  "args->expert_x_capacity is %lld but args->expert_x is NULL (NULL: buffers from the group's pool, "
                  "capacity 0)",
                  static_cast<long long>(a->expert_x_capacity));
  BITEP_ARG_CHECK(a->expert_major_only == 0 || a->expert_major_only == 1,
                  "args->expert_major_only is %d, expected 0 (both views) or 1 (expert-major only)",
                  a->expert_major_only);
  BITEP_ARG_CHECK(a->expert_major_only == 0 || a->recv_x == nullptr,
                  "args->recv_x is set but args->expert_major_only is 1: an expert-major-only dispatch has no "
                  "rank-major rows (pass recv_x NULL, or expert_major_only 0)");
  BITEP_ARG_CHECK(a->rank_major_only == 0 || a->rank_major_only == 1,
                  "args->rank_major_only is %d, expected 0 (as expert_major_only says) or 1 (rank-major only)",
                  a->rank_major_only);
  BITEP_ARG_CHECK(a->rank_major_only == 0 || a->expert_major_only == 0,
                  "args->rank_major_only and args->expert_major_only are both 1: a dispatch keeps at least one view "
                  "(set at most one of them)");
  BITEP_ARG_CHECK(a->rank_major_only == 0 || (a->expert_x == nullptr && a->expert_x_capacity == 0),
                  "args->expert_x is set (capacity %lld) but args->rank_major_only is 1: a rank-major-only dispatch "
                  "writes no expert-major rows (pass expert_x NULL, capacity 0, or rank_major_only 0)",
                  static_cast<long long>(a->expert_x_capacity));
  uint64_t recv_bytes = 0, expert_bytes = 0;
  BITEP_ARG_CHECK(!mul_overflows(static_cast<uint64_t>(a->recv_x_capacity), row, &recv_bytes),
                  "args->recv_x_capacity (%lld rows) overflows a byte count",
                  static_cast<long long>(a->recv_x_capacity));
  BITEP_ARG_CHECK(!mul_overflows(static_cast<uint64_t>(a->expert_x_capacity), row, &expert_bytes),
                  "args->expert_x_capacity (%lld rows) overflows a byte count",
                  static_cast<long long>(a->expert_x_capacity));
  if (T > 0) {
    BITEP_ARG_CHECK(a->x != nullptr, "args->x is NULL but args->num_tokens is %lld", static_cast<long long>(T));
    BITEP_ARG_CHECK(a->routing_map != nullptr, "args->routing_map is NULL but args->num_tokens is %lld",
                    static_cast<long long>(T));
  }
  const int ids = a->map_format == bitepMapTopkIndices ? 4 : 1;
  BITEP_CHECK(check_buffers(c.backend,
                            {{"args->x", a->x, T * row, false},
                             {"args->routing_map", a->routing_map, routing_bytes(a->map_format, T, E, k), false},
                             {"args->probs", a->probs, T * E * 4, false},
                             {"args->topk_weights", a->topk_weights, T * k * 4, false},
                             {"args->recv_x", a->recv_x, recv_bytes, true},
                             {"args->expert_x", a->expert_x, expert_bytes, true}},
                            {static_cast<int>(ds), ids, 4, 4, static_cast<int>(ds), static_cast<int>(ds)}, g->device));
  if (c.backend == bitepBackendHost && T > 0) BITEP_CHECK(validate_routing(a, E, k));
  return bitepSuccess;
}

}  // namespace bitep::ep
