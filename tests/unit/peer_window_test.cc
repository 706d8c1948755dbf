// SPDX-License-Identifier: Apache-2.0
// The peer window's bookkeeping (src/ep/transport.h): where a combine puts its partial rows and whether it
// needs its first barrier. The rules the window's users rely on: no barrier only after a count exchange
// through the window since the last combine, and then only past the latest dispatch's bytes.
#include <gtest/gtest.h>

#include "src/ep/transport.h"

namespace {

// The bookkeeping alone: exchanges are counted, nothing is stored.
class CountingWindow final : public bitep::ep::PeerWindow {
 public:
  uint64_t n = 0;
  uint64_t exchanges() const override { return n; }
  bitepResult_t reserve(size_t, double) override { return bitepSuccess; }
  size_t bytes() const override { return 0; }
  char* data(int) const override { return nullptr; }
  bitepResult_t barrier(bitepStream_t, double) override { return bitepSuccess; }
  bitepResult_t check() override { return bitepSuccess; }
  bool can_exchange(int) const override { return true; }
  bitepResult_t exchange(const int32_t*, int32_t*, int32_t*, int, bitepStream_t, double) override {
    ++n;
    return bitepSuccess;
  }
  bitepResult_t acquire(bitepStream_t) override { return bitepSuccess; }
  bitepResult_t release(bitepStream_t) override { return bitepSuccess; }
};

constexpr size_t kLimit = 1000;

TEST(PeerWindowPlacement, NoExchangeYetMeansABarrierAtTheStart) {
  CountingWindow w;  // a count exchange by NCCL orders nothing in the window
  w.dispatch_extent = 100;
  bool barrier = false;
  EXPECT_EQ(w.place_combine(50, kLimit, &barrier), 0u);
  EXPECT_TRUE(barrier);
}

TEST(PeerWindowPlacement, AfterAnExchangePastTheDispatchWithoutBarrierOnce) {
  CountingWindow w;
  ASSERT_EQ(w.exchange(nullptr, nullptr, nullptr, 1, nullptr, 1.0), bitepSuccess);
  w.dispatch_extent = 300;  // rounded up to 256-byte steps
  bool barrier = true;
  EXPECT_EQ(w.place_combine(200, kLimit, &barrier), 512u);
  EXPECT_FALSE(barrier);
  // A second combine with no exchange between (another handle, or the same twice): the first one's
  // partials may still be read by their ranks' final sums.
  EXPECT_EQ(w.place_combine(200, kLimit, &barrier), 0u);
  EXPECT_TRUE(barrier);
  // The next dispatch's exchange makes it fresh again; a dispatch whose rows went another way left 0 bytes.
  ASSERT_EQ(w.exchange(nullptr, nullptr, nullptr, 1, nullptr, 1.0), bitepSuccess);
  w.dispatch_extent = 0;
  EXPECT_EQ(w.place_combine(200, kLimit, &barrier), 0u);
  EXPECT_FALSE(barrier);
}

TEST(PeerWindowPlacement, PastTheLimitTakesTheBarrierAndTheStart) {
  CountingWindow w;
  ASSERT_EQ(w.exchange(nullptr, nullptr, nullptr, 1, nullptr, 1.0), bitepSuccess);
  w.dispatch_extent = 768;
  bool barrier = false;
  EXPECT_EQ(w.place_combine(233, kLimit, &barrier), 0u);  // 768 + 233 > 1000
  EXPECT_TRUE(barrier);
  ASSERT_EQ(w.exchange(nullptr, nullptr, nullptr, 1, nullptr, 1.0), bitepSuccess);
  EXPECT_EQ(w.place_combine(232, kLimit, &barrier), 768u);  // exactly at the limit
  EXPECT_FALSE(barrier);
}

}  // namespace
