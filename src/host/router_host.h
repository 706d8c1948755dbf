// SPDX-License-Identifier: Apache-2.0
// Host reference router: plain C++ on host memory, the same semantics as the CUDA kernels (fp32
// arithmetic). Arguments are already checked by src/router.cc.
#pragma once

#include "kernels/router_params.h"

namespace bitep::host {

void router_forward(const kernels::RouterForwardParams& p);
void router_backward(const kernels::RouterBackwardParams& p);
void aux_loss_forward(const kernels::AuxLossParams& p);
void aux_loss_backward(const kernels::AuxLossParams& p);

}  // namespace bitep::host
