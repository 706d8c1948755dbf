// SPDX-License-Identifier: Apache-2.0
// The forward kernels' sigmoid of a lane's values at once (sigmoid_n: one range test for all, then the reciprocal
// without a branch each) against sigmoid_f, bit for bit, on every float: NaNs of both signs, +-0, subnormals, +-inf,
// and the values whose 1 + exp(-x) passes 2^126 (which send the whole batch to the division). Skips, saying why,
// without a CUDA device.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>

#include "kernels/router_common.cuh"
#include "tests/gpu/every_word.cuh"

namespace {

using bitep::kernels::router_detail::sigmoid_f;
using bitep::kernels::router_detail::sigmoid_n;

struct Mismatch {
  unsigned long long count;
  uint32_t x, slot, got, want;
};

__device__ void record(Mismatch* m, uint32_t x, uint32_t slot, float got, float want) {
  if (__float_as_uint(got) == __float_as_uint(want)) return;
  if (atomicAdd(&m->count, 1ull) == 0ull)
    m->x = x, m->slot = slot, m->got = __float_as_uint(got), m->want = __float_as_uint(want);
}

// Thread i < 2^32: x = the float of bits i, alone and in slot i % 8 of eight values whose others are ordinary ones
// (so x alone decides between the batch's two forms), each against sigmoid_f.
__global__ void compare_kernel(Mismatch* m) {
  const uint32_t i = static_cast<uint32_t>(static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  const float x = __uint_as_float(i);
  float one[1] = {x};
  sigmoid_n<1>(one);
  record(m, i, 8u, one[0], sigmoid_f(x));
  float v[8], in[8];
#pragma unroll
  for (int s = 0; s < 8; ++s) in[s] = static_cast<float>(s) * 0.75f - 2.5f;
  const int at = static_cast<int>(i & 7u);
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    in[s] = s == at ? x : in[s];
    v[s] = in[s];
  }
  sigmoid_n<8>(v);
#pragma unroll
  for (int s = 0; s < 8; ++s) record(m, i, static_cast<uint32_t>(s), v[s], sigmoid_f(in[s]));
}

TEST(RouterSigmoid, BatchMatchesScalarOnEveryFloat) {
  if (!bitep::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device: the batched sigmoid not run";
  Mismatch h{};
  ASSERT_NO_FATAL_FAILURE(bitep::test::run_on_every_word(compare_kernel, &h));
  char first[160];
  std::snprintf(first, sizeof(first), "first: x bits %08x in slot %u (8: alone) got %08x, want %08x", h.x, h.slot,
                h.got, h.want);
  EXPECT_EQ(h.count, 0ull) << "values whose sigmoid differs, of 9 x 2^32; " << first;
}

}  // namespace
