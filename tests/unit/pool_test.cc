// SPDX-License-Identifier: Apache-2.0
// The group's buffer pool (src/ep/pool.h) on the host backend: size classes, reuse of released blocks,
// release_all (an Exec's temporaries), held bytes and the trim of old blocks.
#include "src/ep/pool.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <vector>

namespace {

using bitep::ep::Block;
using bitep::ep::Pool;

TEST(Pool, SizeClassesStayWithinAnEighth) {
  EXPECT_EQ(Pool::size_class(1), 256u);
  EXPECT_EQ(Pool::size_class(256), 256u);
  for (size_t bytes : {257ul, 1000ul, 4097ul, 123457ul, (size_t{1} << 30) + 1}) {
    const size_t c = Pool::size_class(bytes);
    EXPECT_GE(c, bytes);
    EXPECT_LT(static_cast<double>(c), 1.125 * static_cast<double>(bytes) + 1) << bytes;
  }
}

TEST(Pool, ReleasedBlocksComeBackWithoutAllocating) {
  Pool pool(bitepBackendHost, -1);
  Block a, b;
  ASSERT_EQ(pool.acquire(1000, nullptr, &a), bitepSuccess);
  ASSERT_EQ(pool.acquire(5000, nullptr, &b), bitepSuccess);
  ASSERT_NE(a.ptr, nullptr);
  ASSERT_NE(b.ptr, nullptr);
  EXPECT_EQ(pool.num_allocations(), 2u);
  const size_t held = pool.held_bytes();
  EXPECT_EQ(held, Pool::size_class(1000) + Pool::size_class(5000));
  void* const pa = a.ptr;
  void* const pb = b.ptr;
  // As an Exec's destructor gives its temporaries back: all at once, the list emptied.
  std::vector<Block> temps = {a, b};
  pool.release_all(&temps, nullptr, 7);
  EXPECT_TRUE(temps.empty());
  EXPECT_EQ(pool.held_bytes(), held);  // cached, not freed
  Block c, d;
  ASSERT_EQ(pool.acquire(990, nullptr, &c, 7), bitepSuccess);   // same class as 1000
  ASSERT_EQ(pool.acquire(4900, nullptr, &d, 8), bitepSuccess);  // same class as 5000, another stream
  EXPECT_EQ(c.ptr, pa);
  EXPECT_EQ(d.ptr, pb);
  EXPECT_EQ(pool.num_allocations(), 2u);
  pool.release(&c, nullptr);
  pool.release(&d, nullptr);
  EXPECT_EQ(c.ptr, nullptr);  // the caller's copy is cleared
  EXPECT_EQ(pool.held_bytes(), held);
}

TEST(Pool, BlocksNotReusedFor256AcquisitionsAreFreedOnTheNextMiss) {
  Pool pool(bitepBackendHost, -1);
  Block a;
  ASSERT_EQ(pool.acquire(1000, nullptr, &a), bitepSuccess);
  std::vector<Block> temps = {a};
  pool.release_all(&temps, nullptr);
  for (int i = 0; i < 256; ++i) {  // hits of another class (after its first miss): no trim
    Block b;
    ASSERT_EQ(pool.acquire(5000, nullptr, &b), bitepSuccess);
    pool.release(&b, nullptr);
  }
  EXPECT_EQ(pool.num_allocations(), 2u);
  EXPECT_EQ(pool.held_bytes(), Pool::size_class(1000) + Pool::size_class(5000));
  Block c;  // a miss: the 1000-byte block, unused for 256 acquisitions, goes
  ASSERT_EQ(pool.acquire(70000, nullptr, &c), bitepSuccess);
  EXPECT_EQ(pool.held_bytes(), Pool::size_class(5000) + Pool::size_class(70000));
  pool.release(&c, nullptr);
  Block again;
  ASSERT_EQ(pool.acquire(1000, nullptr, &again), bitepSuccess);
  EXPECT_EQ(pool.num_allocations(), 4u);
  pool.release(&again, nullptr);
}

// trim(): every cached block goes at once, the blocks in use stay (and come back cached); after leak()
// nothing is freed.
TEST(Pool, TrimFreesTheCachedBlocksOnly) {
  Pool pool(bitepBackendHost, -1);
  Block a, b, kept;
  ASSERT_EQ(pool.acquire(1000, nullptr, &a), bitepSuccess);
  ASSERT_EQ(pool.acquire(70000, nullptr, &b), bitepSuccess);
  ASSERT_EQ(pool.acquire(5000, nullptr, &kept), bitepSuccess);
  static_cast<char*>(kept.ptr)[4999] = 42;
  pool.release(&a, nullptr);
  pool.release(&b, nullptr);
  const size_t cached = Pool::size_class(1000) + Pool::size_class(70000);
  EXPECT_EQ(pool.held_bytes(), cached + Pool::size_class(5000));
  EXPECT_EQ(pool.trim(), cached);
  EXPECT_EQ(pool.held_bytes(), Pool::size_class(5000));
  EXPECT_EQ(static_cast<char*>(kept.ptr)[4999], 42);  // the block in use is untouched
  EXPECT_EQ(pool.trim(), 0u);                         // nothing cached any more
  Block again;                                        // a freed class is allocated anew
  ASSERT_EQ(pool.acquire(1000, nullptr, &again), bitepSuccess);
  EXPECT_EQ(pool.num_allocations(), 4u);
  void* const leaked[] = {again.ptr, kept.ptr};  // both cached after these releases
  pool.release(&again, nullptr);
  pool.release(&kept, nullptr);
  pool.leak();  // a peer may still write: trim frees nothing (and the destructor nothing either)
  const size_t held = pool.held_bytes();
  EXPECT_EQ(pool.trim(), 0u);
  EXPECT_EQ(pool.held_bytes(), held);
  // What the pool left on purpose is the test's to free (host blocks come from posix_memalign), so that the leak
  // checker of a sanitizer build sees none.
  for (void* ptr : leaked) std::free(ptr);
}

TEST(Pool, ZeroBytesAndForeignBlocksAreIgnored) {
  Pool pool(bitepBackendHost, -1);
  Block z;
  ASSERT_EQ(pool.acquire(0, nullptr, &z), bitepSuccess);
  EXPECT_EQ(z.ptr, nullptr);
  EXPECT_EQ(pool.num_allocations(), 0u);
  int local = 0;
  Block foreign;
  foreign.ptr = &local;
  foreign.bytes = 256;
  std::vector<Block> list = {foreign, z};
  pool.release_all(&list, nullptr);  // neither is the pool's: nothing cached, nothing freed
  EXPECT_TRUE(list.empty());
  EXPECT_EQ(pool.held_bytes(), 0u);
  Block fresh;
  ASSERT_EQ(pool.acquire(256, nullptr, &fresh), bitepSuccess);
  EXPECT_NE(fresh.ptr, static_cast<void*>(&local));
  pool.release(&fresh, nullptr);
}

}  // namespace
