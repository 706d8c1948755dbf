// SPDX-License-Identifier: Apache-2.0
// The window of a one-rank group (cuda): device memory of its own, no peer to wait for. It takes the
// low-latency dispatches and combines at W = 1, whose kernels then store into the rank's own slots and read
// them back, with stream order (and acquire / release across streams) in place of the barriers.
#pragma once

#include <cstddef>
#include <memory>

#include "src/ep/transport.h"

namespace bitep::ep {

// *out = a window of exactly `bytes` of data, zeroed, never replaced; bitepNotSupported without CUDA.
bitepResult_t make_local_window(size_t bytes, std::unique_ptr<PeerWindow>* out);

}  // namespace bitep::ep
