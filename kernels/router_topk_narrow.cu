// SPDX-License-Identifier: Apache-2.0
// The narrow-segment shapes of the router forward (router_topk.cuh), selected by BITEP_ROUTER_LANES;
// a file of their own so that they compile in parallel with router_topk.cu.
#include "kernels/router_topk.cuh"

namespace bitep::kernels::router_fwd {

#define BITEP_NARROW(G, NS)                                                                               \
  template cudaError_t launch_bucket_t<G, NS, true>(const RouterForwardParams&, FwdLayout, cudaStream_t); \
  template cudaError_t launch_bucket_t<G, NS, false>(const RouterForwardParams&, FwdLayout, cudaStream_t);
BITEP_NARROW(16, 2)
BITEP_NARROW(16, 4)
BITEP_NARROW(16, 8)
BITEP_NARROW(8, 2)
BITEP_NARROW(8, 4)
BITEP_NARROW(8, 8)
BITEP_NARROW(4, 2)
BITEP_NARROW(4, 4)
BITEP_NARROW(4, 8)
#undef BITEP_NARROW

}  // namespace bitep::kernels::router_fwd
