// SPDX-License-Identifier: Apache-2.0
// Pieces of the combine shared with the combine backward.
#pragma once

#include "src/ep/exec.h"
#include "src/ep/handle.h"
#include "src/trace.h"

namespace bitep::ep {

// The checks every call on a handle starts with: the handle is live (bitepInvalidUsage once its group is
// destroyed; `group` is not looked at then), the group is live and is the handle's.
bitepResult_t check_call(bitepGroup_t group, bitepHandle_t handle);

// Sends the partial rows [R, H] (rank-major, the receive layout) back to their source ranks and sums
// them per token in ascending rank order into out [T, H].
bitepResult_t return_rows(
    Exec& ex, bitepGroup* group, bitepHandle* handle, const void* partial, void* out, Trace* trace = nullptr);

}  // namespace bitep::ep
