// SPDX-License-Identifier: Apache-2.0
// Fused router forward, the launch split by bucket (router_common.cuh bucket_of): router_topk.cu picks the
// warp-per-token kernel or the generic one and calls the bucket's entry below; each kernels/router_topk_g<G>x<NS>.cu
// compiles one bucket's instances (router_topk_bucket.cuh), so the buckets' 135 instances build in parallel, not in
// one translation unit.
#pragma once

#include <cuda_runtime.h>

#include "kernels/router_params.h"

namespace bitep::kernels::router_detail {

// What the last forward launch on the calling thread ran (kernels/router.h, last_router_forward_*): the kernel
// (FwdSpec; -1 none or the generic kernel), its compiled k (0: runtime k), lanes a token, keys cached a lane, whether
// it is the whole-octets instance, whether it staged its dense rows in shared memory (kStaged in the kernel), and
// whether such an instance stored its saved row from the stage at the tile's end (FwdLayout::saved_late). Defined in
// router_topk.cu, written by the bucket's launch.
struct ForwardLaunchRecord {
  int kernel = -1;
  int topk = 0;
  int lanes = 0;
  int cache = 0;
  bool whole_octets = false;
  bool staged = false;
  bool saved_late = false;
};
extern thread_local ForwardLaunchRecord t_forward_record;

// One bucket's launch (G lanes a token, NS octets a lane), for a call the warp-per-token kernel takes (router_topk.cu):
// group_octets and group_size as FwdLayout's (0 where there are no groups). Each bucket's specialization is defined in
// its kernels/router_topk_g<G>x<NS>.cu; router_topk.cu calls it through with_bucket (router_common.cuh), so the
// buckets' shapes have one table.
template <int G, int NS>
cudaError_t launch_forward(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<1, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<2, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<4, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<8, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<16, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<32, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<32, 2>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<32, 4>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);
template <>
cudaError_t launch_forward<32, 8>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream);

}  // namespace bitep::kernels::router_detail
