// SPDX-License-Identifier: Apache-2.0
// Fused router forward, the bucket of 16 lanes a token (E 65-128): its instances and their launch
// (router_topk_bucket.cuh).
#include "kernels/router_topk_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_forward<16, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream) {
  return launch_forward_bucket<16, 1>(p, group_octets, group_size, stream);
}

}  // namespace bitep::kernels::router_detail
