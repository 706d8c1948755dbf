// SPDX-License-Identifier: Apache-2.0
// The low-latency dispatch and combine (bitepDispatchLowLatency): fixed slots in a window of their own, no
// count exchange, no host wait. Layout of that window's data area, the same on every rank:
//   [dispatch region, parity 0][dispatch region, parity 1][combine region, parity 0][combine region, parity 1]
// A dispatch region: a header of W int64 (each source's T) and [W, L] int32 (each source's tokens per local
// expert), then per source rank s a block of C slots: rows [C, H], map slices [C, MB], weights [C, KL] fp32,
// ranks [C, KL] int32 (kernels::LowLatencyBlock). A combine region: [W * C, H]
// partial rows, source s's at rows [s * C, (s + 1) * C). The n-th dispatch (and the n-th combine) uses parity
// n % 2; every call ends in one barrier of the window, so a call's stores into parity p come after every
// rank finished reading parity p two calls before (which it did before entering the barrier in between).
#pragma once

#include <cstddef>
#include <cstdint>

#include "bitep/bitep.h"
#include "kernels/ep_params.h"
#include "src/ep/exec.h"
#include "src/ep/handle.h"
#include "src/trace.h"

namespace bitep::ep {

constexpr int kMaxLowLatencyTokens = 65536;

struct LowLatencyLayout {
  kernels::LowLatencyBlock block;  // offsets within a dispatch region
  size_t dispatch_bytes = 0;       // one dispatch region
  size_t combine_bytes = 0;        // one combine region
  size_t dispatch(int parity) const { return parity * dispatch_bytes; }
  size_t combine(int parity) const { return 2 * dispatch_bytes + parity * combine_bytes; }
  size_t total() const { return 2 * dispatch_bytes + 2 * combine_bytes; }
};

LowLatencyLayout low_latency_layout(int W, int C, int L, int KL, size_t row_bytes);

// Bytes of the low-latency window's data area for a group of W ranks.
inline size_t low_latency_window_bytes(int W, int C, int L, int KL, size_t row_bytes) {
  return low_latency_layout(W, C, L, KL, row_bytes).total();
}

class Transport;

// After the group's low-latency window is open (cuda): the device tables its calls read (each parity's
// dispatch region of every rank, the combine's destinations, the slots' row offsets). Sets
// group->ll_tables; a no-op without the window, or where the receive kernel cannot take the group's shape on
// the device (kernels::low_latency_receive_supported): the fast path needs the tables.
bitepResult_t make_low_latency_tables(bitepGroup* group, Transport* transport);

// Whether the group's low-latency calls run on the device alone (cuda, the low-latency window and its tables,
// a shape the receive kernel takes): no host wait, so a CUDA graph can capture them. Elsewhere they run
// bitepDispatch.
bool low_latency_on_device(const bitepGroup* group);

// bitepDispatch's work (src/ep/dispatch.cc) after a failure `prior` of this rank's own checks (or
// bitepSuccess): a failed rank still takes part in the count exchange, so its peers fail with it.
bitepResult_t dispatch_after_checks(bitepGroup* group,
                                    const bitepDispatchArgs_t* args,
                                    bitepStream_t stream,
                                    bitepHandle_t* handle,
                                    bitepResult_t prior);

// bitepCombine of a handle whose dispatch went through the low-latency window (expert-major y).
bitepResult_t combine_low_latency(
    Exec& ex, bitepGroup* group, bitepHandle* handle, const void* y, int weighted, void* out, Trace* trace);

}  // namespace bitep::ep
