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

// One bucket's launch, for a call the warp-per-token kernels take (E <= 2048).
using BackwardBucketLaunch = cudaError_t (*)(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g1x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g2x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g4x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g8x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g16x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g32x1(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g32x2(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g32x4(const RouterBackwardParams& p, cudaStream_t stream);
cudaError_t launch_backward_g32x8(const RouterBackwardParams& p, cudaStream_t stream);

}  // namespace bitep::kernels::router_detail
