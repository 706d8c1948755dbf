// SPDX-License-Identifier: Apache-2.0
#include "src/trace.h"

#include <cstdio>
#include <cstdlib>

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep {

int trace_level() {
  static const int level = [] {
    const char* v = std::getenv("BITEP_TRACE");
    return v == nullptr ? 0 : std::atoi(v) >= 2 ? 2 : std::atoi(v) == 1 ? 1 : 0;
  }();
  return level;
}

Trace::Trace(const char* call, int rank, bitepStream_t stream, bool cuda)
    : call_(call), rank_(rank), stream_(stream), cuda_(cuda), level_(trace_level()) {
  if (level_ != 0) start_ = last_ = Clock::now();
}

void Trace::mark_slow(const char* name) {
#ifdef BITEP_HAVE_CUDA
  if (level_ >= 2 && cuda_) (void)cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream_));
#endif
  const Clock::time_point now = Clock::now();
  if (n_ < kMaxMarks) {
    names_[n_] = name;
    us_[n_] = std::chrono::duration<double, std::micro>(now - last_).count();
    ++n_;
  }
  last_ = now;
}

Trace::~Trace() {
  if (level_ == 0) return;
  char line[1024];
  int len = std::snprintf(line, sizeof(line), "[bitep trace] rank %d %s: %.1f us =", rank_, call_,
                          std::chrono::duration<double, std::micro>(last_ - start_).count());
  for (int i = 0; i < n_ && len > 0 && len < static_cast<int>(sizeof(line)); ++i)
    len += std::snprintf(line + len, sizeof(line) - len, " %s %.1f", names_[i], us_[i]);
  std::fprintf(stderr, "%s\n", line);
}

}  // namespace bitep
