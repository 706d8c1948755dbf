// SPDX-License-Identifier: Apache-2.0
// Fused router forward (kernels/router.h): score function, group-limited top-k, weights, and the routing
// map written straight as BITMAP_U8 (or BYTEMAP), plus the compact [T, k] outputs, the saved tensor and
// the dispatch-layout epilogue, in one pass over the logits. Semantics: src/host/router_host.cc.
//
// Warp-per-token kernel (E <= 2048, k <= 64, groups aligned to octets): the row stays in registers
// (router_common.cuh, "Lane layout"); top-k is k rounds of a segment arg-max on uint32 selection keys
// (value order, ties to the lower expert index, NaN lowest). Each lane caches its two best remaining
// keys, so a round is two reductions (redux.sync for a full warp) and a lane rescans its registers only
// when it wins a second time since its last scan. Anything else goes to router_generic.cu.
//
// Lanes per token: the default is the smallest power-of-two segment holding the row as one octet per lane
// (at most 32 lanes, then up to 8 octets per lane). BITEP_ROUTER_LANES=4|8|16|32 caps the segment
// instead (more octets per lane, more tokens per warp: fewer reduction steps per token, more registers);
// it exists to measure the choice (bench/NOTES.md), not to tune production runs.
#include <cstdlib>

#include "kernels/router_topk.cuh"

namespace bitep::kernels {

namespace router_fwd {
// Instantiated in router_topk_narrow.cu.
#define BITEP_NARROW(G, NS)                                                                                      \
  extern template cudaError_t launch_bucket_t<G, NS, true>(const RouterForwardParams&, FwdLayout, cudaStream_t); \
  extern template cudaError_t launch_bucket_t<G, NS, false>(const RouterForwardParams&, FwdLayout, cudaStream_t);
BITEP_NARROW(16, 2)
BITEP_NARROW(16, 4)
BITEP_NARROW(16, 8)
BITEP_NARROW(8, 2)
BITEP_NARROW(8, 4)
BITEP_NARROW(8, 8)
BITEP_NARROW(4, 2)
BITEP_NARROW(4, 4)
BITEP_NARROW(4, 8)
#undef BITEP_NARROW
}  // namespace router_fwd

namespace {

using namespace router_detail;
using namespace router_fwd;

template <int G, int NS>
cudaError_t launch_shape(const RouterForwardParams& p, const FwdLayout& lay, cudaStream_t stream) {
  return p.logits_dtype == DType::kF32 ? launch_bucket_t<G, NS, true>(p, lay, stream)
                                       : launch_bucket_t<G, NS, false>(p, lay, stream);
}

// Calls f(integral_constant<G>, integral_constant<NS>) for one of the instantiated shapes.
template <class F>
cudaError_t with_shape(int G, int NS, F&& f) {
  using std::integral_constant;
#define BITEP_SHAPE(g, ns) \
  if (G == g && NS == ns) return f(integral_constant<int, g>{}, integral_constant<int, ns>{});
  BITEP_SHAPE(1, 1)
  BITEP_SHAPE(2, 1)
  BITEP_SHAPE(4, 1)
  BITEP_SHAPE(8, 1)
  BITEP_SHAPE(16, 1)
  BITEP_SHAPE(32, 1)
  BITEP_SHAPE(32, 2)
  BITEP_SHAPE(32, 4)
  BITEP_SHAPE(32, 8)
  BITEP_SHAPE(16, 2)
  BITEP_SHAPE(16, 4)
  BITEP_SHAPE(16, 8)
  BITEP_SHAPE(8, 2)
  BITEP_SHAPE(8, 4)
  BITEP_SHAPE(8, 8)
  BITEP_SHAPE(4, 2)
  BITEP_SHAPE(4, 4)
  BITEP_SHAPE(4, 8)
#undef BITEP_SHAPE
  return cudaErrorInvalidValue;
}

// BITEP_ROUTER_LANES (4, 8, 16 or 32), read once; 32 when unset or anything else.
int lanes_cap() {
  static const int cap = [] {
    const char* v = std::getenv("BITEP_ROUTER_LANES");
    const int c = v != nullptr ? std::atoi(v) : 32;
    return c == 4 || c == 8 || c == 16 ? c : 32;
  }();
  return cap;
}

// Groups the warp-per-token kernel takes: whole octets per group, a power of two of them, within one
// slot of lanes.
int aligned_group_octets(const RouterForwardParams& p, int lanes) {
  const int gs = p.num_experts / p.num_groups;
  if (gs % 8 != 0) return 0;
  const int q = gs / 8;
  if ((q & (q - 1)) != 0 || q > lanes) return 0;
  return q;
}

}  // namespace

cudaError_t launch_router_forward(const RouterForwardParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return cudaSuccess;
  if (p.rank_counts != nullptr && p.num_ranks > 0) {
    cudaError_t err = cudaMemsetAsync(p.rank_counts, 0, sizeof(int32_t) * p.num_ranks, stream);
    if (err != cudaSuccess) return err;
  }
  const bool groups = p.mode == RouterMode::kTopk && p.num_groups > 0;
  const int bucket = bucket_of(p.num_experts);
  if (bucket < 0 || p.topk > kMaxBucketTopk) return launch_router_forward_generic(p, stream);
  // Segment shape: the row's octets rounded up to a power of two, G lanes of NS octets each.
  const int octets = kBucketLanes[bucket] * (bucket <= 5 ? 1 : 1 << (bucket - 5));
  int G = std::min(octets, lanes_cap()), NS = octets / G;
  if (NS > 8) NS = 8, G = octets / 8;
  int q = 0;
  if (groups) {
    q = aligned_group_octets(p, G);
    if (q == 0 && G < kBucketLanes[bucket]) {  // the narrow segment splits the groups: the default shape
      G = kBucketLanes[bucket], NS = octets / G;
      q = aligned_group_octets(p, G);
    }
    if (q == 0) return launch_router_forward_generic(p, stream);
  }

  FwdLayout lay{};
  lay.rank_words = p.num_ranks > 0 ? (p.num_ranks + 31) / 32 : 0;
  lay.mask_bytes = p.num_ranks > 0 ? map_bytes_of(p.num_ranks) : 0;
  lay.experts_per_rank = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 1;
  lay.group_octets = groups ? q : 0;
  lay.per_group = groups ? p.topk / p.group_topk : 0;
  return with_shape(
      G, NS, [&](auto g, auto ns) { return launch_shape<decltype(g)::value, decltype(ns)::value>(p, lay, stream); });
}

}  // namespace bitep::kernels
