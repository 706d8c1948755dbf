// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 32 lanes of eight octets (E 1025-2048): its instances and their launch
// (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<32, 8>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<32, 8>(p, stream);
}

}  // namespace bitep::kernels::router_detail
