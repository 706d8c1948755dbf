// SPDX-License-Identifier: Apache-2.0
// Argument checks of the EP calls (names the argument and the constraint in the error text).
#pragma once

#include <cstdint>

#include "bitep/bitep.h"
#include "kernels/ep_params.h"
#include "src/ep/handle.h"

namespace bitep::ep {

// Bytes of T rows of a routing input of the given format.
uint64_t routing_bytes(bitepMapFormat_t format, uint64_t num_tokens, int num_experts, int topk);

inline kernels::RoutingFormat to_routing_format(bitepMapFormat_t f) {
  return f == bitepMapBytemap       ? kernels::RoutingFormat::kBytemap
         : f == bitepMapTopkIndices ? kernels::RoutingFormat::kTopkIndices
                                    : kernels::RoutingFormat::kBitmap;
}

// Everything about bitepDispatch's arguments that one rank can check alone. Host backend: also that every
// row of the routing map routes to exactly k distinct experts (the cuda backend trusts the map and stays
// in bounds whatever it holds, see kernels/ep_params.h).
bitepResult_t check_dispatch_args(const bitepGroup* group, const bitepDispatchArgs_t* args, bitepHandle_t* handle);

// Rows of y for a layout: N (expert-major) or R (rank-major).
int64_t rows_of(const bitepHandle* h, bitepLayout_t layout);

bitepResult_t check_layout(bitepLayout_t layout, const char* name);

}  // namespace bitep::ep
