// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 16 lanes a token (E 65-128): its instances and their launch
// (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<16, 1>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<16, 1>(p, stream);
}

}  // namespace bitep::kernels::router_detail
