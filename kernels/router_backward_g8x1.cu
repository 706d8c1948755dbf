// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 8 lanes a token (E 33-64): its instances and their launch
// (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<8, 1>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<8, 1>(p, stream);
}

}  // namespace bitep::kernels::router_detail
