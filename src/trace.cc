// SPDX-License-Identifier: Apache-2.0
#include "src/trace.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "src/ep/pool.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep {

namespace {
// One write of the line and its newline: the ranks under mpirun share stderr, and a line written in pieces
// can interleave with another rank's.
void print_line(char (&line)[1024]) {
  size_t n = std::strlen(line);
  if (n + 1 >= sizeof(line)) n = sizeof(line) - 2;
  line[n] = '\n';
  line[n + 1] = '\0';
  std::fwrite(line, 1, n + 1, stderr);
}
}  // namespace

int trace_level() {
  static const int level = [] {
    const char* v = std::getenv("BITEP_TRACE");
    const int n = v == nullptr ? 0 : std::atoi(v);
    return n < 0 ? 0 : n > 3 ? 3 : n;
  }();
  return level;
}

#ifdef BITEP_HAVE_CUDA
namespace {
// Level 3's events, made once per thread (a call records at most 17) and kept for the process.
cudaEvent_t trace_event(int i) {
  thread_local cudaEvent_t events[17] = {};
  if (events[i] == nullptr && cudaEventCreate(&events[i]) != cudaSuccess) {
    events[i] = nullptr;
    (void)cudaGetLastError();  // a diagnostic must not leave an error for the launch checks to find
  }
  return events[i];
}

// Event i recorded on `stream`, or null (an event made on another device than the stream's, say).
void* record_trace_event(int i, bitepStream_t stream) {
  cudaEvent_t e = trace_event(i);
  if (e != nullptr && cudaEventRecord(e, reinterpret_cast<cudaStream_t>(stream)) == cudaSuccess) return e;
  (void)cudaGetLastError();
  return nullptr;
}
}  // namespace
#endif

Trace::Trace(const char* call, int rank, bitepStream_t stream, bool cuda)
    : call_(call), rank_(rank), stream_(stream), cuda_(cuda), level_(trace_level()) {
  if (level_ == 3 && !cuda_) level_ = 1;
  // A call captured into a CUDA graph may not synchronise its stream or record events there: host times only.
  if (level_ >= 2 && cuda_ && ep::cuda_stream_capturing(stream_)) level_ = 1;
  if (level_ != 0) start_ = last_ = Clock::now();
#ifdef BITEP_HAVE_CUDA
  if (level_ == 3) events_[0] = record_trace_event(0, stream_);
#endif
}

void Trace::mark_slow(const char* name, bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  if (level_ == 2 && cuda_) (void)cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream_));
  if (level_ == 3 && n_ < kMaxMarks) events_[n_ + 1] = record_trace_event(n_ + 1, stream);
#else
  (void)stream;
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
#ifdef BITEP_HAVE_CUDA
  if (level_ == 3) {
    // Each mark's time after the first event; a mark whose event failed reads -1.
    double end = 0;
    for (int i = 0; i < n_; ++i) {
      float ms = -1;
      cudaEvent_t e = static_cast<cudaEvent_t>(events_[i + 1]);
      if (events_[0] == nullptr || e == nullptr || cudaEventSynchronize(e) != cudaSuccess ||
          cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(events_[0]), e) != cudaSuccess) {
        ms = -1e-3f;
        (void)cudaGetLastError();
      }
      us_[i] = 1e3 * ms;
      if (us_[i] > end) end = us_[i];
    }
    int len = std::snprintf(line, sizeof(line), "[bitep gpu] rank %d %s: %.1f us =", rank_, call_, end);
    for (int i = 0; i < n_ && len > 0 && len < static_cast<int>(sizeof(line)); ++i)
      len += std::snprintf(line + len, sizeof(line) - len, " %s %.1f", names_[i], us_[i]);
    print_line(line);
    return;
  }
#endif
  int len = std::snprintf(line, sizeof(line), "[bitep trace] rank %d %s: %.1f us =", rank_, call_,
                          std::chrono::duration<double, std::micro>(last_ - start_).count());
  for (int i = 0; i < n_ && len > 0 && len < static_cast<int>(sizeof(line)); ++i)
    len += std::snprintf(line + len, sizeof(line) - len, " %s %.1f", names_[i], us_[i]);
  print_line(line);
}

}  // namespace bitep
