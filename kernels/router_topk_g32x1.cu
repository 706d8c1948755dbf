// SPDX-License-Identifier: Apache-2.0
// Fused router forward, the bucket of 32 lanes of one octet (E 129-256): its instances and their launch
// (router_topk_bucket.cuh).
#include "kernels/router_topk_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_forward<32, 1>(const RouterForwardParams& p, int group_octets, int group_size, cudaStream_t stream) {
  return launch_forward_bucket<32, 1>(p, group_octets, group_size, stream);
}

}  // namespace bitep::kernels::router_detail
