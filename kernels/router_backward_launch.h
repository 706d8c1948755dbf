// SPDX-License-Identifier: Apache-2.0
// Router backward, the launch split by bucket (router_common.cuh bucket_of): router_backward.cu takes the generic
// kernel past E = 2048 and otherwise calls the bucket's entry below; each kernels/router_backward_g<G>x<NS>.cu compiles
// one bucket's instances (router_backward_bucket.cuh), so they build in parallel, not in one translation unit.
#pragma once

#include <cuda_runtime.h>

#include "kernels/router_params.h"

namespace bitep::kernels::router_detail {

// The kernel the calling thread's last backward launch ran (kernels/router.h, last_router_backward_kernel). Defined in
// router_backward.cu, written by the launch.
extern thread_local int t_backward_kernel;

// One bucket's launch (G lanes a token, NS octets a lane), for a call the warp-per-token kernels take (E <= 2048). Each
// bucket's specialization is defined in its kernels/router_backward_g<G>x<NS>.cu; router_backward.cu calls it through
// with_bucket (router_common.cuh), so the buckets' shapes have one table.
template <int G, int NS>
cudaError_t launch_backward(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<1, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<2, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<4, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<8, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<16, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<32, 1>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<32, 2>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<32, 4>(const RouterBackwardParams& p, cudaStream_t stream);
template <>
cudaError_t launch_backward<32, 8>(const RouterBackwardParams& p, cudaStream_t stream);

}  // namespace bitep::kernels::router_detail
