// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 2 lanes a token (E 9-16): its instances and their launch (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<2, 1>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<2, 1>(p, stream);
}

}  // namespace bitep::kernels::router_detail
