// SPDX-License-Identifier: Apache-2.0
// Fused router forward (kernels/router.h), the launch: the warp-per-token kernel (router_topk_kernel.cuh) for
// E <= 2048, k <= 64 and groups aligned to octets, or of any width at one octet a lane, through its bucket's entry
// (router_topk_launch.h; each bucket's instances in a kernels/router_topk_g<G>x<NS>.cu of their own); anything else
// goes to router_generic.cu.
#include "kernels/router.h"
#include "kernels/router_common.cuh"
#include "kernels/router_topk_launch.h"

namespace bitep::kernels {

namespace router_detail {
thread_local ForwardLaunchRecord t_forward_record;
}  // namespace router_detail

namespace {

using namespace router_detail;

// Groups the warp-per-token kernel takes: whole octets per group, a power of two of them, within one
// slot of lanes.
int aligned_group_octets(const RouterForwardParams& p, int lanes) {
  const int gs = p.num_experts / p.num_groups;
  if (gs % 8 != 0) return 0;
  const int q = gs / 8;
  if ((q & (q - 1)) != 0 || q > lanes) return 0;
  return q;
}

// Groups that are not whole octets the warp-per-token kernel also takes (the kernel's step 3b, kAnyWidthGroups: the
// pre-top-k softmax's and the normalised sigmoid's kernels, from 8 lanes a token; router_topk_bucket.cuh's
// launch_bucket sends the rest to the generic kernel): at one octet a lane (E <= 256), at least 8 experts a group (an
// octet meets at most two) and a group's score of one or two keys (a pair merge).
bool unaligned_groups(const RouterForwardParams& p) {
  return p.num_experts <= 256 && p.num_experts / p.num_groups >= 8 && p.topk / p.group_topk <= 2;
}

}  // namespace

int last_router_forward_kernel() { return router_detail::t_forward_record.kernel; }
int last_router_forward_topk() { return router_detail::t_forward_record.topk; }
int last_router_forward_lanes() { return router_detail::t_forward_record.lanes; }
int last_router_forward_cache() { return router_detail::t_forward_record.cache; }
bool last_router_forward_whole_octets() { return router_detail::t_forward_record.whole_octets; }
bool last_router_forward_staged() { return router_detail::t_forward_record.staged; }
bool last_router_forward_saved_late() { return router_detail::t_forward_record.saved_late; }

cudaError_t launch_router_forward(const RouterForwardParams& p, cudaStream_t stream) {
  router_detail::t_forward_record = router_detail::ForwardLaunchRecord{};
  if (p.num_tokens <= 0) return cudaSuccess;
  if (p.rank_counts != nullptr && p.num_ranks > 0) {
    cudaError_t err = cudaMemsetAsync(p.rank_counts, 0, sizeof(int32_t) * p.num_ranks, stream);
    if (err != cudaSuccess) return err;
  }
  const bool groups = p.mode == RouterMode::kTopk && p.num_groups > 0;
  const int bucket = bucket_of(p.num_experts);
  int q = 0;
  if (bucket >= 0 && groups) q = aligned_group_octets(p, kBucketLanes[bucket]);
  const bool unaligned = groups && q == 0 && unaligned_groups(p);
  if (bucket < 0 || p.topk > kMaxBucketTopk || (groups && q == 0 && !unaligned))
    return launch_router_forward_generic(p, stream);
  const int group_octets = groups ? q : 0, group_size = unaligned ? p.num_experts / p.num_groups : 0;
  return with_bucket(bucket, [&](auto g, auto ns) {
    return launch_forward<decltype(g)::value, decltype(ns)::value>(p, group_octets, group_size, stream);
  });
}

}  // namespace bitep::kernels
