// SPDX-License-Identifier: Apache-2.0
// Phase timing of the communication calls, for finding where a call's time goes without a profiler.
//   BITEP_TRACE=1  one stderr line per traced call: the host time of each phase, in microseconds
//   BITEP_TRACE=2  the same, the stream synchronised at each mark, so each phase includes its device work
//   BITEP_TRACE=3  the device's timeline (cuda): each mark records an event on its stream (the caller's, or
//                  the side stream's with mark_on), nothing is synchronised until the call ends; the line
//                  ("[bitep gpu] ...") gives each mark's time after the call's first event, so phases on
//                  two streams show where they overlap. The host waits for the events when the call ends.
// Off (the default) a Trace costs one branch per mark.
#pragma once

#include <chrono>

#include "bitep/bitep.h"

namespace bitep {

// 0 .. 3: BITEP_TRACE, read once.
int trace_level();

class Trace {
 public:
  Trace(const char* call, int rank, bitepStream_t stream, bool cuda);
  ~Trace();  // prints the line
  Trace(const Trace&) = delete;
  Trace& operator=(const Trace&) = delete;

  // Ends the phase `name` (started at the previous mark or at construction).
  void mark(const char* name) {
    if (level_ != 0) mark_slow(name, stream_);
  }
  // The same for work queued on `stream` (level 3 records the event there; the other levels as mark()).
  void mark_on(const char* name, bitepStream_t stream) {
    if (level_ != 0) mark_slow(name, stream);
  }

 private:
  void mark_slow(const char* name, bitepStream_t stream);
  static constexpr int kMaxMarks = 16;
  using Clock = std::chrono::steady_clock;
  const char* call_;
  int rank_;
  bitepStream_t stream_;
  bool cuda_;
  int level_;
  int n_ = 0;
  const char* names_[kMaxMarks];
  double us_[kMaxMarks];
  [[maybe_unused]] void* events_[kMaxMarks + 1] = {};  // level 3: the call's first event, then one per mark
  Clock::time_point start_, last_;
};

}  // namespace bitep
