// SPDX-License-Identifier: Apache-2.0
// Router backward, the bucket of 32 lanes of four octets (E 513-1024): its instances and their launch
// (router_backward_bucket.cuh).
#include "kernels/router_backward_bucket.cuh"

namespace bitep::kernels::router_detail {

template <>
cudaError_t launch_backward<32, 4>(const RouterBackwardParams& p, cudaStream_t stream) {
  return launch_bucket<32, 4>(p, stream);
}

}  // namespace bitep::kernels::router_detail
