// SPDX-License-Identifier: Apache-2.0
// The launch of the exhaustive GPU tests (router_packed_keys_test.cu, router_sigmoid_test.cu): one thread per 32-bit
// word, each recording into one record M (a count and the first mismatch) that starts zeroed.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>

namespace bitep::test {

// Whether a CUDA device is visible (the tests skip, saying why, without one).
inline bool cuda_device_present() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// kernel(m) over 2^32 threads (2^24 blocks of 256; thread i takes the word i) with *m zeroed first; *out = *m after.
// Fails the calling test on a CUDA error (wrap the call in ASSERT_NO_FATAL_FAILURE).
template <class M>
void run_on_every_word(void (*kernel)(M*), M* out) {
  M* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, sizeof(M)), cudaSuccess);
  ASSERT_EQ(cudaMemset(d, 0, sizeof(M)), cudaSuccess);
  kernel<<<(1u << 24), 256>>>(d);
  const cudaError_t launched = cudaGetLastError();
  const cudaError_t copied = cudaMemcpy(out, d, sizeof(M), cudaMemcpyDeviceToHost);
  cudaFree(d);
  ASSERT_EQ(launched, cudaSuccess);
  ASSERT_EQ(copied, cudaSuccess);
}

}  // namespace bitep::test
