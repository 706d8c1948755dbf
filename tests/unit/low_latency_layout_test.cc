// SPDX-License-Identifier: Apache-2.0
// The low-latency window's layout (src/ep/low_latency.h): every part of a dispatch region in its own bytes, in
// the order and alignment the kernels rely on (kernels/ep_params.h section 9), for shapes from one rank and one
// expert to many ranks, maps of L % 8 != 0 and rows of odd byte counts.
#include <gtest/gtest.h>

#include <cstdint>

#include "kernels/ep_params.h"
#include "src/ep/low_latency.h"

namespace {

TEST(LowLatencyLayout, PartsApartAlignedAndInOrder) {
  const int shapes[][4] = {{1, 1, 1, 1},    {1, 512, 256, 8}, {2, 128, 128, 8}, {3, 17, 9, 4},
                           {8, 130, 32, 8}, {40, 20, 3, 3},   {64, 256, 4, 4},  {2, 65536, 1, 1}};
  for (const auto& sh : shapes)
    for (size_t row : {size_t(2), size_t(26), size_t(14336)}) {
      const int W = sh[0], C = sh[1], L = sh[2], KL = sh[3];
      const int64_t MB = bitep::kernels::local_map_bytes(L);
      const bitep::ep::LowLatencyLayout lay = bitep::ep::low_latency_layout(W, C, L, KL, row);
      const bitep::kernels::LowLatencyBlock& b = lay.block;
      const std::string where = "W=" + std::to_string(W) + " C=" + std::to_string(C) + " L=" + std::to_string(L) +
                                " KL=" + std::to_string(KL) + " row=" + std::to_string(row);
      // Header: T [W] int64, then counts [W, L] int32, then the blocks.
      EXPECT_EQ(b.header, 0) << where;
      EXPECT_GE(b.counts, b.header + int64_t(sizeof(int64_t)) * W) << where;
      EXPECT_EQ(b.counts % int64_t(alignof(int32_t)), 0) << where;
      EXPECT_GE(b.first, b.counts + int64_t(sizeof(int32_t)) * W * L) << where;
      EXPECT_EQ(b.first % 256, 0) << where;
      // A block: rows [C, row], map slices [C, MB], weights [C, KL] fp32, ranks [C, KL] int32, each 16-aligned.
      EXPECT_GE(b.map, int64_t(row) * C) << where;
      EXPECT_GE(b.weights, b.map + MB * C) << where;
      EXPECT_GE(b.ranks, b.weights + int64_t(sizeof(float)) * KL * C) << where;
      EXPECT_GE(b.stride, b.ranks + int64_t(sizeof(int32_t)) * KL * C) << where;
      for (int64_t off : {b.map, b.weights, b.ranks}) EXPECT_EQ(off % 16, 0) << where;
      EXPECT_EQ(b.stride % 256, 0) << where;
      // The region holds every source's block; the window two dispatch and two combine regions.
      EXPECT_GE(int64_t(lay.dispatch_bytes), b.first + b.stride * W) << where;
      EXPECT_GE(lay.combine_bytes, row * W * C) << where;
      EXPECT_EQ(lay.dispatch(1), lay.dispatch_bytes) << where;
      EXPECT_EQ(lay.combine(0), 2 * lay.dispatch_bytes) << where;
      EXPECT_EQ(lay.total(), 2 * lay.dispatch_bytes + 2 * lay.combine_bytes) << where;
      EXPECT_EQ(bitep::ep::low_latency_window_bytes(W, C, L, KL, row), lay.total()) << where;
    }
}

// The receive's shared memory ((W + 2) L + W + 2 int32) decides whether a shape takes the kernels: ep_bench's
// shapes do at W = 1 to 64; a map too wide for 48 KiB does not.
TEST(LowLatencyLayout, ReceiveFits) {
  for (int W : {1, 2, 8, 64}) EXPECT_TRUE(bitep::kernels::low_latency_receive_fits(W, 256 / W, 512));
  EXPECT_EQ(bitep::kernels::low_latency_receive_smem(2, 128), sizeof(int) * (4 * 128 + 4));
  EXPECT_FALSE(bitep::kernels::low_latency_receive_fits(8, 2048, 128));  // 20490 ints
  // Up to 48 KiB of dynamic shared memory, the kernel's static shared memory beside it (the launcher opts in).
  EXPECT_TRUE(bitep::kernels::low_latency_receive_fits(2, 3000, 8));                 // 12004 ints
  EXPECT_TRUE(bitep::kernels::low_latency_receive_fits(8, 1216, 4));                 // 12170 ints
  EXPECT_FALSE(bitep::kernels::low_latency_receive_fits(8, 1229, 4));                // 12300 ints
  EXPECT_FALSE(bitep::kernels::low_latency_receive_fits(2, 8, int64_t(INT32_MAX)));  // W x C past int32
  EXPECT_FALSE(bitep::kernels::low_latency_receive_fits(0, 8, 16));
}

}  // namespace
