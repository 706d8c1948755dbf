// SPDX-License-Identifier: Apache-2.0
// The fp64 reference's per-token helpers (tests/reference): token_values must reproduce router_forward's
// values for its own experts, and near_tie_selection must accept exactly the selections that rounding at a
// near-tie explains. router_bench's check and the GPU tests excuse a differing map only through these two.
#include "tests/reference/router_reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bitep/bitep.h"

namespace {

using bitep::ref::near_tie_selection;
using bitep::ref::token_values;

constexpr double kTol = 1e-5;

bitepRouterConfig_t config(int E, int k, bitepScoreFunction_t fn, bool pre, int groups = 0, int group_topk = 0) {
  bitepRouterConfig_t c = BITEP_ROUTER_CONFIG_INIT;
  c.num_experts = E;
  c.topk = k;
  c.score_function = fn;
  c.use_pre_softmax = pre;
  c.num_groups = groups;
  c.group_topk = group_topk;
  return c;
}

std::vector<int> row_of(const std::vector<int32_t>& indices, int64_t t, int k) {
  return std::vector<int>(indices.begin() + t * k, indices.begin() + (t + 1) * k);
}

TEST(RouterReference, TokenValuesMatchForward) {
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 2.0);
  struct C {
    bitepRouterConfig_t cfg;
    bool aux, bias;
  };
  bitepRouterConfig_t scaled = config(64, 8, bitepScoreSigmoid, false, 8, 4);
  scaled.scaling_factor = 2.5f;
  const std::vector<C> cases = {
      {config(16, 4, bitepScoreSoftmax, false), false, false},
      {config(16, 4, bitepScoreSoftmax, true), false, false},
      {scaled, false, true},
      {config(30, 1, bitepScoreSigmoid, false), false, false},
      {config(40, 6, bitepScoreSqrtSoftplus, false, 4, 2), false, true},
      {config(16, 4, bitepScoreSoftmax, false), true, false},
      {config(24, 3, bitepScoreSigmoid, false), true, false},
  };
  const int64_t T = 20;
  for (const C& c : cases) {
    const int E = c.cfg.num_experts, k = c.cfg.topk;
    std::vector<double> x(T * E);
    for (double& v : x) v = nd(rng);
    std::vector<float> bias(E);
    for (float& b : bias) b = static_cast<float>(nd(rng) * 0.1);
    const float* bp = c.bias ? bias.data() : nullptr;
    const auto f = bitep::ref::router_forward(c.cfg, T, x, bp, c.aux);
    for (int64_t t = 0; t < T; ++t) {
      SCOPED_TRACE("E " + std::to_string(E) + " fn " + std::to_string(c.cfg.score_function) + " aux " +
                   std::to_string(c.aux) + " token " + std::to_string(t));
      const std::vector<int> chosen = row_of(f.indices, t, k);
      const auto v = token_values(c.cfg, &x[t * E], bp, chosen, c.aux);
      EXPECT_EQ(v.weights, std::vector<double>(f.weights.begin() + t * k, f.weights.begin() + (t + 1) * k));
      EXPECT_EQ(v.probs, std::vector<double>(f.probs.begin() + t * E, f.probs.begin() + (t + 1) * E));
      EXPECT_EQ(v.saved, std::vector<double>(f.saved.begin() + t * E, f.saved.begin() + (t + 1) * E));
      EXPECT_EQ(v.sel, std::vector<double>(f.sel.begin() + t * E, f.sel.begin() + (t + 1) * E));
      std::string why;
      EXPECT_TRUE(near_tie_selection(c.cfg, v.sel, chosen, c.aux, kTol, &why)) << "its own selection: " << why;
      // Its last expert traded for the best one it dropped: wrong unless the two are within rounding.
      std::vector<int> other = chosen;
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!f.bytemap[t * E + e] && (best < 0 || v.sel[e] > v.sel[best])) best = e;
      if (best < 0) continue;
      int worst = 0;
      for (int j = 1; j < k; ++j)
        if (v.sel[other[j]] < v.sel[other[worst]]) worst = j;
      if (c.cfg.num_groups > 0 && best / (E / c.cfg.num_groups) != other[worst] / (E / c.cfg.num_groups)) continue;
      const double a = v.sel[other[worst]], b = v.sel[best];
      other[worst] = best;
      std::sort(other.begin(), other.end());
      const bool near = a - b <= kTol * std::max(std::fabs(a), std::fabs(b));
      EXPECT_EQ(near_tie_selection(c.cfg, v.sel, other, c.aux, kTol, &why), near) << why;
    }
  }
}

TEST(RouterReference, NearTieSelectionExperts) {
  const bitepRouterConfig_t cfg = config(8, 2, bitepScoreSoftmax, false);  // selects on the logits themselves
  std::vector<double> sel = {0.1, 3.0, 0.2, 2.0, 2.0 * (1 - 1e-7), -1.0, 0.0, 1.0};
  std::string why;
  EXPECT_TRUE(near_tie_selection(cfg, sel, {1, 3}, false, kTol, &why)) << why;
  EXPECT_TRUE(near_tie_selection(cfg, sel, {1, 4}, false, kTol, &why)) << "a near-tie at the cut: " << why;
  EXPECT_FALSE(near_tie_selection(cfg, sel, {1, 7}, false, kTol, &why)) << "1.0 dropped 2.0";
  EXPECT_NE(why.find("beyond rounding"), std::string::npos) << why;
  EXPECT_FALSE(near_tie_selection(cfg, sel, {3, 4}, false, kTol, &why)) << "dropped the best";
  EXPECT_FALSE(near_tie_selection(cfg, sel, {1}, false, kTol, &why)) << "one expert of two";
  EXPECT_FALSE(near_tie_selection(cfg, sel, {1, 3, 4}, false, kTol, &why)) << "three of two";
  EXPECT_FALSE(near_tie_selection(cfg, sel, {3, 3}, false, kTol, &why)) << "not distinct";
  EXPECT_FALSE(near_tie_selection(cfg, sel, {3, 1}, false, kTol, &why)) << "not ascending";
  EXPECT_FALSE(near_tie_selection(cfg, sel, {1, 8}, false, kTol, &why)) << "past E";
  // Exact ties are the lower index's, never an excuse: a non-finite score is not rounding.
  std::vector<double> inf = sel;
  inf[1] = std::numeric_limits<double>::infinity();
  EXPECT_FALSE(near_tie_selection(cfg, inf, {1, 3}, false, kTol, &why));
  std::vector<double> nan = sel;
  nan[6] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(near_tie_selection(cfg, nan, {1, 3}, false, kTol, &why));
}

TEST(RouterReference, NearTieSelectionGroups) {
  // 4 groups of 4, 2 of them taken, 2 experts a group score (k = 4): group 0 clearly first, groups 1 and 2
  // tied within rounding for second, group 3 far below.
  const bitepRouterConfig_t cfg = config(16, 4, bitepScoreSigmoid, false, 4, 2);
  const double d = 1e-7;
  const std::vector<double> sel = {0.9,
                                   0.8,
                                   0.1,
                                   0.1,  // group 0: 1.7
                                   0.5,
                                   0.4,
                                   0.0,
                                   0.0,  // group 1: 0.9
                                   0.45 * (1 - d),
                                   0.45,
                                   0.01,
                                   0.0,  // group 2: ~0.9
                                   0.2,
                                   0.1,
                                   0.0,
                                   0.0};  // group 3: 0.3
  std::string why;
  EXPECT_TRUE(near_tie_selection(cfg, sel, {0, 1, 4, 5}, false, kTol, &why)) << why;
  // Group 2 for group 1 at the tie: within rounding, its best two.
  EXPECT_TRUE(near_tie_selection(cfg, sel, {0, 1, 8, 9}, false, kTol, &why)) << why;
  // Group 2 taken, but its third best instead of its second.
  EXPECT_FALSE(near_tie_selection(cfg, sel, {0, 1, 9, 10}, false, kTol, &why));
  // Group 3 is not at the cut.
  EXPECT_FALSE(near_tie_selection(cfg, sel, {0, 1, 12, 13}, false, kTol, &why));
  EXPECT_NE(why.find("not among the top groups"), std::string::npos) << why;
  // Group 0 left out although clearly above the cut.
  EXPECT_FALSE(near_tie_selection(cfg, sel, {4, 5, 8, 9}, false, kTol, &why));
  // Three groups used.
  EXPECT_FALSE(near_tie_selection(cfg, sel, {0, 4, 8, 9}, false, kTol, &why));
  // All four from group 0: the second group taken (1 or 2) gave none, but each has an expert that beats
  // group 0's 0.1.
  EXPECT_FALSE(near_tie_selection(cfg, sel, {0, 1, 2, 3}, false, kTol, &why));
  // With group 0's last two raised above every expert of groups 1 and 2, all four from group 0 is right.
  std::vector<double> high = sel;
  high[2] = high[3] = 0.6;
  EXPECT_TRUE(near_tie_selection(cfg, high, {0, 1, 2, 3}, false, kTol, &why)) << why;
}

}  // namespace
