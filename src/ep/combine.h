// SPDX-License-Identifier: Apache-2.0
// Pieces of the combine shared with the combine backward.
#pragma once

#include <cstdint>
#include <vector>

#include "src/ep/exec.h"
#include "src/ep/handle.h"
#include "src/trace.h"

namespace bitep::ep {

// The checks every call on a handle starts with: the handle is live, the group is live and is the handle's, and
// (backward: the dispatch and combine backward passes) the handle is not a low-latency one, which has none. A
// handle this rank cannot use while its group can still agree (NULL, not a live handle, another group's, a
// low-latency one for a backward pass) becomes *local, this rank's part of the call's agreement (host groups),
// so that its peers fail at once with bitepRemoteError instead of waiting out timeout_s and breaking the group.
// Fails, for the caller to return at once, where no agreement can be had: the group is not usable, another thread is
// inside a call on it (*call, entered here as `api`, holds the group for the caller's call), or the handle's group
// was destroyed (bitepInvalidUsage; `group` may dangle then and is not looked at).
bitepResult_t check_call_agreed(
    bitepGroup_t group, bitepHandle_t handle, bool backward, GroupCall* call, const char* api, bitepResult_t* local);

// The collective calls on a handle, as their agreement names them.
enum class CallKind : int32_t { kCombine = 1, kDispatchBackward = 2, kCombineBackward = 3 };
const char* call_name(CallKind kind);

// The agreement bits of a call on `handle` (host groups): its dispatch's number above bit 8, the call's kind in bits
// 5-7 (bits 0-4 are the call's own); and the check that every rank makes the same call (a rank whose call was refused
// on its own, by the thread rules, and that went on to another call, is caught here) on the handle of the same
// dispatch.
int32_t dispatch_bits(const bitepHandle* handle, CallKind kind);
bitepResult_t same_dispatch(const bitepGroup* group, const std::vector<int32_t>& all_bits, const char* what);

// Sends the partial rows [R, H] (rank-major, the receive layout) back to their source ranks and sums
// them per token in ascending rank order into out [T, H].
bitepResult_t return_rows(
    Exec& ex, bitepGroup* group, bitepHandle* handle, const void* partial, void* out, Trace* trace = nullptr);

// The most warps sharing a row in the reduce and the final sum (kernels::ReduceParams::max_row_pieces):
// BITEP_COMBINE_PIECES (1-1024; unset: 0, as many as fill the device), a launch shape only (bench/NOTES.md).
int combine_row_pieces();

}  // namespace bitep::ep
