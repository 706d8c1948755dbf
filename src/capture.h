// SPDX-License-Identifier: Apache-2.0
// CUDA stream capture and the library's own runtime calls. A capture in global mode (the default) is invalidated
// by any "potentially unsafe" runtime call made while it is open, from any thread: an allocation, a pointer
// query, a device synchronisation. The library's calls of that kind (argument checks, pool allocations, the
// kernels' attribute queries) are not part of the graph being built, so they run with the calling thread's
// capture mode relaxed (cudaThreadExchangeStreamCaptureMode), and the caller's capture stays valid.
#pragma once

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep {

// The calling thread's capture mode is relaxed while this lives, then restored (a no-op without CUDA).
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() {
#ifdef BITEP_HAVE_CUDA
    ok_ = cudaThreadExchangeStreamCaptureMode(&mode_) == cudaSuccess;
    if (!ok_) (void)cudaGetLastError();
#endif
  }
  ~RelaxedCaptureMode() {
#ifdef BITEP_HAVE_CUDA
    if (ok_) (void)cudaThreadExchangeStreamCaptureMode(&mode_);
#endif
  }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
#ifdef BITEP_HAVE_CUDA
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
#endif
  [[maybe_unused]] bool ok_ = false;  // cuda builds
};

}  // namespace bitep
