// SPDX-License-Identifier: Apache-2.0
// CUDA launchers of the router kernels: raw pointers + stream, no handles, no allocation.
// Zero tokens returns cudaSuccess at once, except launch_aux_loss_forward, which still writes loss = 0
// (the loss is an output even when this rank holds no tokens).
#pragma once

#include <cuda_runtime.h>

#include "kernels/router_params.h"

namespace bitep::kernels {

cudaError_t launch_router_forward(const RouterForwardParams& params, cudaStream_t stream);
cudaError_t launch_router_backward(const RouterBackwardParams& params, cudaStream_t stream);
// The post-top-k softmax's backward from its routed experts (router_backward_routed.cu), which
// launch_router_backward takes for the recompute from 2 octets a lane (E > 256) and for the saved mode from 4
// (E > 512): cudaErrorInvalidValue for other shapes.
cudaError_t launch_router_backward_routed(const RouterBackwardParams& params, cudaStream_t stream);
cudaError_t launch_aux_loss_forward(const AuxLossParams& params, cudaStream_t stream);
cudaError_t launch_aux_loss_backward(const AuxLossParams& params, cudaStream_t stream);

// The most expert groups launch_router_forward takes on the current device: the generic kernel, which takes
// every group layout the warp-per-token one does not, holds a block's group scores in shared memory.
cudaError_t router_forward_max_groups(int* max_groups);

// The kernel the calling thread's last launch_router_forward chose, for the tests: the warp-per-token kernel's
// score path (0 any path, 1 post-top-k softmax, 2 pre-top-k softmax, 3 normalised sigmoid, 4 the same in
// DeepSeek-V3's shape; router_topk_spec.cuh FwdSpec), -1 for the generic kernel or no launch (T = 0).
int last_router_forward_kernel();
// The k that kernel was compiled for (its rounds unrolled; router_topk_spec.cuh kconst_kernel), 0 where it reads k from
// the parameters or no warp-per-token kernel ran.
int last_router_forward_topk();
// The lanes a token that kernel ran at (G: 32 / G tokens a warp), 0 where no warp-per-token kernel ran.
int last_router_forward_lanes();
// The keys a lane of that kernel caches between rescans (router_topk_select.cuh cache_size), 0 where no warp-per-token
// kernel ran.
int last_router_forward_cache();
// Whether that kernel was the instance for E a multiple of 8 below its bucket's width (router_topk_spec.cuh
// whole_octets_kernel), false where another or none ran.
bool last_router_forward_whole_octets();
// Whether that kernel was an instance that stages its dense rows in shared memory and stores them by whole sectors
// (router_topk_spec.cuh staged_float4s; the rows of a partial tile are stored octet by octet even there), false where
// another or none ran.
bool last_router_forward_staged();
// Whether that kernel was a staged instance of the pre-top-k softmax told to store its saved row from the stage at the
// tile's end, beside probs, not right after the softmax (router_topk_bucket.cuh saved_row_late), false where another
// or none ran.
bool last_router_forward_saved_late();
// The kernel the calling thread's last launch_router_backward chose: 1 the post-top-k softmax's routed-expert kernel
// (router_backward_routed.cu), 0 another warp-per-token kernel, -1 the generic kernel, -2 no launch.
int last_router_backward_kernel();

}  // namespace bitep::kernels
