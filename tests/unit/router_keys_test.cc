// SPDX-License-Identifier: Apache-2.0
// The warp-per-token router's key cache and won sets (kernels/router_keys.h), on the host: top_keys against a
// sort, won_mask on hand-made lanes, and the keys-only top-k rounds of kernels/router_topk_select.cuh (one octet a
// lane: the segment's best head key, the lowest lane holding it wins and pops it, a lane refills from the keys
// it has not won when its cache runs dry, its selection is its won set) against a brute-force top-k (key
// descending, then the lower expert; key 0 is no candidate), on rows full of equal keys. And the first rounds without
// the refill (DeepSeek-V3's, and the normalised sigmoid's by the ballot): where they stand (sat_out_lost), the same
// top-k.
#include "kernels/router_keys.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using bitep::kernels::router_keys::sat_out_lost;
using bitep::kernels::router_keys::top_below;
using bitep::kernels::router_keys::top_keys;
using bitep::kernels::router_keys::won_mask;

TEST(RouterKeys, TopKeysAreTheLargestWithRepeats) {
  std::mt19937 rng(7);
  for (int it = 0; it < 2000; ++it) {
    uint32_t key[8];
    for (uint32_t& x : key) x = rng() % 4 == 0 ? 0u : 1u + rng() % 3;  // few values: repeats
    const uint32_t skip = rng() & 0xffu;
    uint32_t ck[3];
    top_keys<8, 3>(key, skip, ck);
    std::vector<uint32_t> want;
    for (int p = 0; p < 8; ++p) want.push_back(((skip >> p) & 1) ? 0u : key[p]);
    std::sort(want.rbegin(), want.rend());
    for (int c = 0; c < 3; ++c) ASSERT_EQ(ck[c], want[c]) << "iteration " << it << ", entry " << c;
  }
}

TEST(RouterKeys, TopBelowTakesTheLargestUnderTheBound) {
  std::mt19937 rng(5);
  for (int it = 0; it < 2000; ++it) {
    uint32_t key[8];
    for (int p = 0; p < 8; ++p) key[p] = rng() % 4 == 0 ? 0u : (1u + rng() % 1000) * 8 + p;  // unique, as packed
    const uint32_t below = rng() % 9000;
    uint32_t ck[3];
    top_below<8, 3>(key, below, ck);
    std::vector<uint32_t> want;
    for (uint32_t k : key) want.push_back(k < below ? k : 0u);
    std::sort(want.rbegin(), want.rend());
    for (int c = 0; c < 3; ++c) ASSERT_EQ(ck[c], want[c]) << "iteration " << it << ", entry " << c;
  }
}

TEST(RouterKeys, WonMaskTakesTheLowerOfEqualKeys) {
  const uint32_t key[8] = {5, 9, 5, 7, 5, 0, 9, 1};
  EXPECT_EQ((won_mask<8, uint32_t>(key, 9, 0)), 0u);                           // no wins
  EXPECT_EQ((won_mask<8, uint32_t>(key, 9, 1)), 0x02u);                        // the first 9
  EXPECT_EQ((won_mask<8, uint32_t>(key, 9, 2)), 0x42u);                        // both 9s
  EXPECT_EQ((won_mask<8, uint32_t>(key, 7, 3)), 0x4au);                        // and the 7
  EXPECT_EQ((won_mask<8, uint32_t>(key, 5, 4)), 0x4bu);                        // the lowest 5
  EXPECT_EQ((won_mask<8, uint32_t>(key, 5, 5)), 0x4fu);                        // the two lowest 5s
  EXPECT_EQ((won_mask<8, uint32_t>(key, 1, 7)), 0xdfu);                        // all but the none key
  const uint32_t wide[16] = {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};  // two octets a lane
  EXPECT_EQ((won_mask<16, uint32_t>(wide, 3, 11)), 0x7ffu);
}

// A lane of the simulated rounds, one octet a lane: its cache of C keys, its last won key and its number of wins.
template <int C>
struct Lane {
  uint32_t ck[C];
  uint32_t last = ~0u;
  int wins = 0;
};

// The lanes of a segment of G, each cache filled from the lane's octet of `row`.
template <int C>
std::vector<Lane<C>> fill_lanes(const std::vector<uint32_t>& row, int G) {
  std::vector<Lane<C>> lanes(G);
  for (int l = 0; l < G; ++l) top_keys<8, C>(&row[l * 8], 0u, lanes[l].ck);
  return lanes;
}

// The experts the lanes won (their won sets), ascending.
template <int C>
std::vector<int> won_experts(const std::vector<uint32_t>& row, const std::vector<Lane<C>>& lanes) {
  std::vector<int> got;
  for (size_t l = 0; l < lanes.size(); ++l) {
    const uint32_t m = won_mask<8, uint32_t>(&row[l * 8], lanes[l].last, lanes[l].wins);
    for (int p = 0; p < 8; ++p)
      if ((m >> p) & 1) got.push_back(static_cast<int>(l) * 8 + p);
  }
  return got;
}

// One segment of G lanes, one octet a lane: the kernel's rounds with a cache of C keys a lane.
template <int C>
std::vector<int> rounds(const std::vector<uint32_t>& row, int G, int k) {
  std::vector<Lane<C>> lanes = fill_lanes<C>(row, G);
  for (int r = 0; r < k; ++r) {
    uint32_t gm = 0;
    for (const Lane<C>& x : lanes) gm = std::max(gm, x.ck[0]);
    if (gm == 0) continue;  // nothing left: no lane wins
    int w = 0;
    while (lanes[w].ck[0] != gm) ++w;  // the lowest lane holding it
    Lane<C>& x = lanes[w];
    x.last = gm, ++x.wins;
    for (int i = 0; i + 1 < C; ++i) x.ck[i] = x.ck[i + 1];
    x.ck[C - 1] = 0;
    if (x.ck[0] == 0 && r + 1 < k)
      top_keys<8, C>(&row[w * 8], won_mask<8, uint32_t>(&row[w * 8], x.last, x.wins), x.ck);
  }
  return won_experts<C>(row, lanes);
}

std::vector<int> brute_force(const std::vector<uint32_t>& row, int k) {
  std::vector<int> idx(row.size());
  for (size_t e = 0; e < row.size(); ++e) idx[e] = static_cast<int>(e);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return row[a] > row[b]; });
  std::vector<int> want;
  for (int i = 0; i < k && i < static_cast<int>(idx.size()); ++i)
    if (row[idx[i]] != 0) want.push_back(idx[i]);
  std::sort(want.begin(), want.end());
  return want;
}

TEST(RouterKeys, KeysOnlyRoundsMatchBruteForce) {
  std::mt19937 rng(11);
  int64_t cases = 0;
  for (int G : {8, 16, 32})
    for (int range : {1, 2, 3, 7, 1 << 20})  // 1: every candidate equal
      for (int none_pct : {0, 50, 90, 99})   // no candidate: past E, past T, outside the kept groups
        for (int it = 0; it < 40; ++it) {
          std::vector<uint32_t> row(static_cast<size_t>(G) * 8);
          for (uint32_t& x : row) x = static_cast<int>(rng() % 100) < none_pct ? 0u : 1u + rng() % range;
          for (int k : {1, 2, 3, 4, 6, 8, 9, 16, 32, G * 8}) {
            const std::vector<int> want = brute_force(row, k);
            const std::string what = "G=" + std::to_string(G) + " range=" + std::to_string(range) +
                                     " none=" + std::to_string(none_pct) + "% k=" + std::to_string(k);
            ASSERT_EQ(rounds<3>(row, G, k), want) << what << " C=3";
            ASSERT_EQ(rounds<2>(row, G, k), want) << what << " C=2";
            ++cases;
          }
        }
  EXPECT_EQ(cases, 3 * 5 * 4 * 40 * 10);
}

// DeepSeek-V3's first rounds (kernels/router_topk_kernel.cuh), one octet a lane: every lane whose head key is the
// segment's best wins it and pops it, and a lane whose C cached keys are won sits the later rounds out (no refill).
// They stand when the wins add up to k and no lane that ran dry could have won a later round (sat_out_lost); else the
// kernel runs rounds<C> above. `dry`: some lane won all C of its keys.
// kLowest: rounds by the ballot, as the normalised sigmoid's at a compiled k (router v83; the pre-top-k softmax keeps
// the rounds with the refill): the lowest lane holding the maximum wins it (none where the maximum is key 0); they
// stand where no lane lost by sitting out.
template <int C, bool kLowest = false>
std::vector<int> rounds_without_refill(const std::vector<uint32_t>& row, int G, int k, bool* stand, bool* dry) {
  std::vector<Lane<C>> lanes = fill_lanes<C>(row, G);
  uint32_t gm_last = 0u;
  for (int r = 0; r < k; ++r) {
    uint32_t gm = 0u;
    for (const Lane<C>& x : lanes) gm = std::max(gm, x.ck[0]);
    for (Lane<C>& x : lanes) {
      if (x.ck[0] != gm) continue;  // every lane holding the maximum wins (key 0 too, where every head is 0)
      if (kLowest && gm == 0u) break;
      x.last = gm, ++x.wins;
      for (int i = 0; i + 1 < C; ++i) x.ck[i] = x.ck[i + 1];
      x.ck[C - 1] = 0u;
      if (kLowest) break;  // the lowest lane alone
    }
    gm_last = gm;
  }
  int total = 0;
  bool lost = false;
  *dry = false;
  for (int l = 0; l < G; ++l) {
    total += lanes[l].wins;
    *dry = *dry || lanes[l].wins == C;
    lost = lost || sat_out_lost<8>(&row[l * 8], lanes[l].last, lanes[l].wins, C, gm_last);
  }
  *stand = kLowest ? !lost : total == k && !lost;
  return won_experts<C>(row, lanes);
}

// A row of G octets: keys 1..range, none_pct% of them 0 (no candidate); with one_lane, one lane then holds m of the
// best keys (1-8, distinct, above the rest), the case where a lane runs dry.
std::vector<uint32_t> random_row(std::mt19937& rng, int G, int range, int none_pct, bool one_lane) {
  std::vector<uint32_t> row(static_cast<size_t>(G) * 8);
  for (uint32_t& x : row) x = static_cast<int>(rng() % 100) < none_pct ? 0u : 1u + rng() % range;
  if (one_lane) {
    const int lane = static_cast<int>(rng() % G), m = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < m; ++i) row[lane * 8 + (i * 3) % 8] = (1u << 21) + static_cast<uint32_t>(rng() % 4096);
  }
  return row;
}

// Where the rounds stand, their selection is the brute-force top-k. The grid reaches every outcome: rounds that stand
// with a lane that ran dry (the check lets them through), rounds that fall for a tie between lanes, and rounds whose
// wins add up to k but whose selection is wrong, each caught by sat_out_lost (the check is what keeps them out).
TEST(RouterKeys, RoundsWithoutRefillStandOnlyWhenExact) {
  std::mt19937 rng(13);
  int64_t stood = 0, stood_dry = 0, fell = 0, caught = 0;
  for (int range : {2, 3, 7, 64, 1 << 20})
    for (int none_pct : {0, 50, 90})
      for (int it = 0; it < 300; ++it) {
        const int G = 32;
        const std::vector<uint32_t> row = random_row(rng, G, range, none_pct, it % 3 == 0);
        for (int k : {1, 4, 8, 16}) {
          const std::vector<int> want = brute_force(row, k);
          const std::string what =
              "range=" + std::to_string(range) + " none=" + std::to_string(none_pct) + "% k=" + std::to_string(k);
          for (int c : {2, 3}) {
            bool stand = false, dry = false;
            const std::vector<int> got = c == 3 ? rounds_without_refill<3>(row, G, k, &stand, &dry)
                                                : rounds_without_refill<2>(row, G, k, &stand, &dry);
            if (stand) {
              ASSERT_EQ(got, want) << what << " C=" << c << ": rounds that stand";
              ++stood;
              stood_dry += dry ? 1 : 0;
            } else {
              ++fell;
              // Wins that add up to k with a wrong selection: the lane that sat out is what made them fall.
              if (static_cast<int>(got.size()) == k && got != want) ++caught;
            }
          }
        }
      }
  // By hand, C = 3, k = 4: lane 0 wins 10, 9 and 8 and sits out; its 6 ties lane 1's 6, which wins the last round, but
  // the top-4 takes lane 0's (the lower expert): the rounds must fall. And a lane with an unwon copy of its last won
  // key.
  {
    std::vector<uint32_t> row(32 * 8, 0u);
    row[0] = 10, row[1] = 9, row[2] = 8, row[3] = 6, row[8] = 6;
    bool stand = true, dry = false;
    rounds_without_refill<3>(row, 32, 4, &stand, &dry);
    EXPECT_TRUE(dry);
    EXPECT_FALSE(stand) << "a tie at the last round's key with a lane that sat out";
    EXPECT_EQ(brute_force(row, 4), (std::vector<int>{0, 1, 2, 3}));
    row[3] = 8, row[8] = 7;  // lane 0: 10, 9, 8 won, another 8 left; lane 1's 7 wins the last round
    rounds_without_refill<3>(row, 32, 4, &stand, &dry);
    EXPECT_FALSE(stand) << "an unwon copy of the last won key";
    row[3] = 5;  // lane 0's best key left is below the last round's maximum: the rounds stand
    EXPECT_EQ(rounds_without_refill<3>(row, 32, 4, &stand, &dry), (std::vector<int>{0, 1, 2, 8}));
    EXPECT_TRUE(stand && dry);
  }
  EXPECT_GT(stood, 0);
  EXPECT_GT(stood_dry, 0) << "no rounds stood with a lane that ran dry";
  EXPECT_GT(fell, 0);
  EXPECT_GT(caught, 0) << "no wrong selection for sat_out_lost to catch";
}

// The same for the rounds by the ballot (kLowest), at 16 and 32 lanes a token (one segment here): where they stand they
// select the top-k, ties between lanes included (the lowest lane wins, as the brute force's lower expert).
TEST(RouterKeys, LowestLaneRoundsWithoutRefillStandOnlyWhenExact) {
  std::mt19937 rng(17);
  int64_t stood = 0, stood_dry = 0, fell = 0, caught = 0;
  for (int G : {16, 32})
    for (int range : {2, 3, 7, 64, 1 << 20})
      for (int none_pct : {0, 50, 90})
        for (int it = 0; it < 200; ++it) {
          const std::vector<uint32_t> row = random_row(rng, G, range, none_pct, it % 3 == 0);
          for (int k : {1, 4, 8, 16}) {
            const std::vector<int> want = brute_force(row, k);
            for (int c : {2, 3}) {
              bool stand = false, dry = false;
              const std::vector<int> got = c == 3 ? rounds_without_refill<3, true>(row, G, k, &stand, &dry)
                                                  : rounds_without_refill<2, true>(row, G, k, &stand, &dry);
              if (stand) {
                ASSERT_EQ(got, want) << "G=" << G << " range=" << range << " none=" << none_pct << "% k=" << k
                                     << " C=" << c << ": rounds that stand";
                ++stood;
                stood_dry += dry ? 1 : 0;
              } else {
                ++fell;
                if (got != want) ++caught;
              }
            }
          }
        }
  EXPECT_GT(stood, 0);
  EXPECT_GT(stood_dry, 0) << "no rounds stood with a lane that ran dry";
  EXPECT_GT(fell, 0);
  EXPECT_GT(caught, 0) << "no wrong selection for sat_out_lost to catch";
}

}  // namespace
