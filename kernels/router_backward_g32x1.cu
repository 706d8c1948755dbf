// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 32 lanes of one octet (E 129-256): its instances and their launch
// (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<32, 1>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<32, 1>(p, stream);
}

}  // namespace bitep::kernels::router_detail
