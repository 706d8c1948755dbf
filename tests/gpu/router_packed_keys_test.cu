// SPDX-License-Identifier: Apache-2.0
// The bf16 post-top-k kernels' packed keys from the logits' bits (packed_keys_bf16x2) against the keys of the
// widened values (packed_key_lo), on every pair of bf16 bit patterns: NaNs of both signs, +-0, subnormals, +-inf.
// Skips, saying why, without a CUDA device.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "kernels/router_packed_keys.cuh"
#include "tests/gpu/every_word.cuh"

namespace {

using bitep::kernels::router_detail::packed_key_lo;
using bitep::kernels::router_detail::packed_keys_bf16x2;

struct Mismatch {
  unsigned long long count;
  uint32_t w, got0, got1, want0, want1;
};

// Thread i < 2^32: the word i, x its low half and y its high half; the keys of both halves with expert parts that
// differ per thread, against the fp32 form.
__global__ void compare_kernel(Mismatch* m) {
  const uint32_t w = static_cast<uint32_t>(static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  const uint32_t x = w & 0xffffu, y = w >> 16;
  const uint32_t lo0 = 0xffffu - 8u * (x & 0x1fffu), lo1 = lo0 ^ 1u;
  uint32_t k0, k1;
  packed_keys_bf16x2(w, lo0, lo1, k0, k1);
  const uint32_t want0 = packed_key_lo(__uint_as_float(x << 16), lo0);
  const uint32_t want1 = packed_key_lo(__uint_as_float(y << 16), lo1);
  if (k0 != want0 || k1 != want1) {
    if (atomicAdd(&m->count, 1ull) == 0ull) m->w = w, m->got0 = k0, m->got1 = k1, m->want0 = want0, m->want1 = want1;
  }
}

TEST(RouterPackedKeys, BitsMatchWidenedValuesOnEveryPair) {
  if (!bitep::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device: the packed keys not run";
  Mismatch h{};
  ASSERT_NO_FATAL_FAILURE(bitep::test::run_on_every_word(compare_kernel, &h));
  char first[160];
  std::snprintf(first, sizeof(first), "first: word %08x got %08x %08x, want %08x %08x", h.w, h.got0, h.got1, h.want0,
                h.want1);
  EXPECT_EQ(h.count, 0ull) << "pairs whose keys differ of 2^32; " << first;
}

}  // namespace
