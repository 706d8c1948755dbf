// SPDX-License-Identifier: Apache-2.0
// The bf16 post-top-k kernels' packed keys from the logits' bits (packed_keys_bf16x2) against the keys of the
// widened values (packed_key_lo), on every pair of bf16 bit patterns: NaNs of both signs, +-0, subnormals, +-inf; and
// the won set's carry chain (keys_at_least) against plain compares, at every bound. Skips, saying why, without a CUDA
// device.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "kernels/router_packed_keys.cuh"
#include "tests/gpu/every_word.cuh"

namespace {

using bitep::kernels::router_detail::keys_at_least;
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

struct MaskMismatch {
  unsigned long long count;
  uint32_t bound, n, got, want;
};

// Thread i < 2^32: the bound i (~0u for i = 0: bounds are never 0), 32 keys around it and across the range (0, 1,
// bound - 1, bound, bound + 1, ~0u - 1, ~0u, the bound with its top bit flipped, and hashed ones); the masks of the
// first 8, 16 and all 32 against key >= bound key by key.
__global__ void at_least_kernel(MaskMismatch* m) {
  const uint32_t w = static_cast<uint32_t>(static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  const uint32_t bound = w == 0u ? ~0u : w;
  uint32_t key[32] = {bound, 0u, bound - 1u, ~0u, bound + 1u, 1u, ~0u - 1u, bound ^ 0x80000000u};
  for (int i = 8; i < 32; ++i) {
    uint32_t h = w * 0x9e3779b9u + static_cast<uint32_t>(i) * 0x85ebca6bu;
    h ^= h >> 15, h *= 0x2c1b3c6du, h ^= h >> 12;
    key[i] = (i & 3) == 0 ? bound + (h & 7u) - 3u : h;  // some near the bound, the rest anywhere
  }
  uint32_t want = 0u;
  for (int i = 0; i < 32; ++i) want |= key[i] >= bound ? 1u << i : 0u;
  const uint32_t got[3] = {keys_at_least<8>(key, bound), keys_at_least<16>(key, bound), keys_at_least<32>(key, bound)};
  const uint32_t wants[3] = {want & 0xffu, want & 0xffffu, want};
  for (int j = 0; j < 3; ++j)
    if (got[j] != wants[j] && atomicAdd(&m->count, 1ull) == 0ull)
      m->bound = bound, m->n = 8u << j, m->got = got[j], m->want = wants[j];
}

TEST(RouterPackedKeys, CarryChainMatchesComparesAtEveryBound) {
  if (!bitep::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device: keys_at_least not run";
  MaskMismatch h{};
  ASSERT_NO_FATAL_FAILURE(bitep::test::run_on_every_word(at_least_kernel, &h));
  char first[160];
  std::snprintf(first, sizeof(first), "first: bound %08x, %u keys: got %08x, want %08x", h.bound, h.n, h.got, h.want);
  EXPECT_EQ(h.count, 0ull) << "masks that differ of 3 x 2^32; " << first;
}

}  // namespace
