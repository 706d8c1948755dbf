// SPDX-License-Identifier: Apache-2.0
// The CUDA router forward kernels (kernels/router_topk*.cu*, router_generic.cu, router_aux_loss.cu) against the host
// reference backend and the fp64 oracle (tests/reference/router_reference.h), through the public C API; the grid
// checks the backward of every case too. Tolerances and helpers: router_gpu_test.h. Every test SKIPs with the
// reason when no CUDA device is visible.
#include "tests/gpu/router_gpu_test.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "bitep/bitep.h"
#include "kernels/router.h"
#include "tests/reference/inputs.h"
#include "tests/reference/router_reference.h"

namespace {

using namespace router_gpu_test;

// Every output of two forward runs, bit for bit (an output neither run wrote holds the same poison in both). dense
// false: probs and saved left out (`got` did not write them, `want` did).
void expect_same_outputs(const FwdOut& got, const FwdOut& want, const std::string& what, bool dense = true) {
  if (dense) {
    EXPECT_TRUE(same_bits(got.probs, want.probs)) << what << ": probs";
    EXPECT_TRUE(same_bits(got.saved, want.saved)) << what << ": saved";
  }
  EXPECT_TRUE(same_bits(got.weights, want.weights)) << what << ": topk_weights";
  EXPECT_TRUE(same_bits(got.indices, want.indices)) << what << ": topk_indices";
  EXPECT_TRUE(same_bits(got.map, want.map)) << what << ": routing map";
  EXPECT_TRUE(same_bits(got.rank_mask, want.rank_mask)) << what << ": rank_mask";
  EXPECT_TRUE(same_bits(got.rank_counts, want.rank_counts)) << what << ": rank_counts";
}

// ---- tests ---------------------------------------------------------------------------------------

class RouterGrid : public ::testing::TestWithParam<int> {};

// T in {0, 1, 7, 4096} (4096 capped to 2^20 / E rows for E > 256: the fp64 oracle is the slow part),
// every k in {1, 2, 8, 32, E} <= E, every score function and softmax placement, all three logit dtypes
// (4096-row cases: fp32 and bf16).
TEST_P(RouterGrid, MatchesHostAndOracle) {
  REQUIRE_GPU();
  const int E = GetParam();
  CaseStats stats;
  std::vector<int> ks;
  for (int k : {1, 2, 8, 32, E})
    if (k <= E && std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
  const int64_t big = std::min<int64_t>(4096, std::max<int64_t>(64, (int64_t{1} << 20) / E));
  for (int64_t T : {int64_t{0}, int64_t{1}, int64_t{7}, big})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16, bitepFloat16}) {
      if (T == big && dt == bitepFloat16) continue;
      const auto logits = make_logits(T, E, dt, 1000 + E * 7 + T);
      for (int k : ks)
        for (int f = 0; f < 4; ++f) {
          const bitepScoreFunction_t fn = f < 2    ? bitepScoreSoftmax
                                          : f == 2 ? bitepScoreSigmoid
                                                   : bitepScoreSqrtSoftplus;
          bitepRouterConfig_t cfg = make_config(E, k, fn, f == 1, dt);
          if (f == 3) cfg.scaling_factor = 1.5f;
          check_case(cfg, T, logits, {}, false, 0, &stats);
          if (HasFatalFailure()) return;
        }
    }
  report(("E=" + std::to_string(E)).c_str(), stats);
}

INSTANTIATE_TEST_SUITE_P(Experts,
                         RouterGrid,
                         ::testing::Values(1, 8, 32, 64, 100, 130, 256, 512, 1000, 2048, 3000),
                         [](const ::testing::TestParamInfo<int>& i) { return "E" + std::to_string(i.param); });

// Group-limited routing, expert_bias, scaling: DeepSeek-V3 (E = 256, 8 groups, keep 4, k = 8) and layouts
// that take the warp-per-token kernel (whole octets per group) or the generic one (E = 160, 20 per group;
// E = 1024 with 2 groups; E = 4096).
TEST(RouterGpu, GroupsBiasScaling) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups, gtopk;
  };
  for (const G g : {G{256, 8, 8, 4}, G{64, 4, 8, 2}, G{160, 6, 8, 3}, G{512, 8, 4, 2}, G{2048, 32, 16, 4},
                    G{1024, 8, 2, 1}, G{4096, 8, 8, 4}, G{256, 16, 32, 8}})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSqrtSoftplus, bitepScoreSoftmax}) {
        const int64_t T = g.E > 1024 ? 129 : 1031;
        bitepRouterConfig_t cfg = make_config(g.E, g.k, fn, 0, dt);
        cfg.num_groups = g.groups;
        cfg.group_topk = g.gtopk;
        cfg.scaling_factor = 2.5f;
        const auto logits = make_logits(T, g.E, dt, 77 + g.E);
        const std::vector<float> bias = fn == bitepScoreSoftmax ? std::vector<float>{} : make_bias(g.E, g.E);
        check_case(cfg, T, logits, bias, false, 0, &stats);
        if (HasFatalFailure()) return;
      }
  report("groups", stats);
}

// Group-limited routing that keeps every group (group_topk == num_groups; num_groups = 1 in Kimi K2's and GLM-4.5's
// configs) selects as no groups do (src/router.cc): the launch takes the kernel the same config without groups takes
// (groups of 48 or 20 experts went to the generic kernel), and gives its outputs bit for bit, the host's and the fp64
// oracle's as every case (check_case).
TEST(RouterGpu, AllGroupsKeptTakesTheWarpKernels) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups;
    bitepScoreFunction_t fn;
    int pre;
  };
  for (const G g :
       {G{384, 8, 1, bitepScoreSigmoid, 0}, G{160, 8, 1, bitepScoreSigmoid, 0}, G{256, 8, 8, bitepScoreSigmoid, 0},
        G{256, 8, 1, bitepScoreSoftmax, 1}, G{60, 4, 3, bitepScoreSoftmax, 0}})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int64_t T = 1031;
      bitepRouterConfig_t none = make_config(g.E, g.k, g.fn, g.pre, dt);
      none.scaling_factor = 2.5f;
      bitepRouterConfig_t all = none;
      all.num_groups = g.groups;
      all.group_topk = g.groups;
      const std::string what = "E=" + std::to_string(g.E) + " k=" + std::to_string(g.k) + " " + dt_name(dt) + " " +
                               fn_name(all) + " num_groups = group_topk = " + std::to_string(g.groups);
      const auto logits = make_logits(T, g.E, dt, 91 + g.E);
      const std::vector<float> bias = g.fn == bitepScoreSigmoid ? make_bias(g.E, g.E + 3) : std::vector<float>{};
      check_case(all, T, logits, bias, false, 0, &stats);
      if (HasFatalFailure()) return;
      FwdSpec spec;
      spec.map = bitepMapBitmapU8;
      const FwdOut want = run_forward(bitepBackendCuda, none, T, logits, bias, spec);
      ASSERT_EQ(want.rc, bitepSuccess) << what << ": " << want.error;
      const int want_kernel = bitep::kernels::last_router_forward_kernel();
      const FwdOut got = run_forward(bitepBackendCuda, all, T, logits, bias, spec);
      ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
      EXPECT_GE(want_kernel, 0) << what << ": a warp kernel without groups";
      EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), want_kernel) << what << ": the kernel chosen";
      EXPECT_TRUE(got.guards) << what << ": forward wrote past a buffer";
      expect_same_outputs(got, want, what);
    }
  report("all groups kept", stats);
}

// Groups that are not whole octets (DeepSeek-V2: 8 groups of 20 experts): the pre-top-k softmax's and the normalised
// sigmoid's warp kernels take them at one octet a lane (E <= 256) with at least 8 experts a group, no more groups than
// lanes a token and a group score of one or two keys (kernels/router_topk.cu unaligned_groups); anything else, the
// generic kernel. Each case: the kernel chosen, the host's and the fp64 oracle's selection and values (check_case),
// and the generic kernel's map and indices bit for bit (BITEP_ROUTER_SPEC=0 sends these groups there).
TEST(RouterGpu, GroupsOfAnyWidth) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups, gtopk;
    bitepScoreFunction_t fn;
    int pre, kernel;  // the kernel that must run: 2 pre-top-k softmax, 3 normalised sigmoid, -1 generic
  };
  for (const G g : {G{160, 6, 8, 3, bitepScoreSoftmax, 1, 2},    // DeepSeek-V2's shape
                    G{160, 8, 8, 4, bitepScoreSigmoid, 0, 3},    // 32 lanes a token
                    G{200, 8, 8, 4, bitepScoreSigmoid, 0, 3},    // groups of 25, a partial last octet
                    G{96, 4, 8, 2, bitepScoreSigmoid, 0, 3},     // groups of 12 at 16 lanes a token
                    G{60, 4, 3, 2, bitepScoreSoftmax, 1, 2},     // 8 lanes a token, E % 8 != 0
                    G{48, 2, 4, 2, bitepScoreSoftmax, 1, 2},     // a group score of one key
                    G{160, 8, 8, 2, bitepScoreSigmoid, 0, -1},   // a group score of 4 keys: generic
                    G{64, 4, 16, 2, bitepScoreSigmoid, 0, -1},   // groups of 4 experts: generic
                    G{320, 8, 8, 4, bitepScoreSigmoid, 0, -1},   // two octets a lane: generic
                    G{160, 6, 8, 3, bitepScoreSoftmax, 0, -1}})  // the post-top-k softmax: generic
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int64_t T = 1031;
      bitepRouterConfig_t cfg = make_config(g.E, g.k, g.fn, g.pre, dt);
      cfg.num_groups = g.groups;
      cfg.group_topk = g.gtopk;
      cfg.scaling_factor = 2.5f;
      const std::string what = "E=" + std::to_string(g.E) + " k=" + std::to_string(g.k) + " " + dt_name(dt) + " " +
                               fn_name(cfg) + " " + std::to_string(g.gtopk) + " of " + std::to_string(g.groups) +
                               " groups";
      const auto logits = make_logits(T, g.E, dt, 131 + g.E);
      const std::vector<float> bias = g.fn == bitepScoreSigmoid ? make_bias(g.E, g.E + 7) : std::vector<float>{};
      check_case(cfg, T, logits, bias, false, 0, &stats);
      if (HasFatalFailure()) return;
      FwdSpec spec;
      spec.map = bitepMapBitmapU8;
      spec.num_ranks = 4;
      const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
      ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
      EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), g.kernel) << what << ": the kernel chosen";
      EXPECT_TRUE(got.guards) << what << ": forward wrote past a buffer";
      FwdOut generic;
      {
        AnyPathKernels scope;
        generic = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
        ASSERT_EQ(generic.rc, bitepSuccess) << what << ": " << generic.error;
        EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), -1) << what << ": BITEP_ROUTER_SPEC=0";
      }
      EXPECT_TRUE(same_bits(got.map, generic.map)) << what << ": routing map";
      EXPECT_TRUE(same_bits(got.indices, generic.indices)) << what << ": topk_indices";
      EXPECT_TRUE(same_bits(got.rank_mask, generic.rank_mask)) << what << ": rank_mask";
      EXPECT_TRUE(same_bits(got.rank_counts, generic.rank_counts)) << what << ": rank_counts";
    }
  report("groups of any width", stats);
}

constexpr int64_t kDegenerateRows = 12;

// Row t of the degenerate set (t < kDegenerateRows; any other t an ordinary row): all equal, ties, -inf,
// +inf, NaN, mixtures, signed zeros, saturation and underflow (of the sigmoid's exp, and of the pre-top-k softmax's).
float degenerate_logit(int64_t t, int e, int E) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float x = 0.0f;
  switch (t) {
    case 0:
      x = 0.5f;
      break;  // all equal
    case 1:
      x = -kInf;
      break;  // all -inf
    case 2:
      x = nan;
      break;  // all NaN
    case 3:
      x = e % 3 == 0 ? nan : static_cast<float>(e % 5 - 2);
      break;
    case 4:
      x = e % 2 ? kInf : -kInf;
      break;
    case 5:
      x = static_cast<float>(e % 4);
      break;  // many exact ties
    case 6:
      x = e % 7 == 0 ? kInf : 1.0f;
      break;
    case 7:
      x = e < E / 2 ? nan : -kInf;
      break;
    case 8:
      x = e % 2 ? -0.0f : 0.0f;
      break;  // signed zeros tie
    case 9:
      x = 30.0f + static_cast<float>(e % 3);
      break;  // sigmoid saturates to 1
    case 10:
      x = -100.0f - static_cast<float>(e % 2);
      break;  // exp underflows
    case 11:
      x = e < 2 ? 0.0f : -88.0f - static_cast<float>(e % 5);
      break;  // the pre-top-k softmax's exps below FLT_MIN, 0 on both backends: its k > 2 ties to the lower index
    default:
      x = static_cast<float>((e * 7) % 11) - 5.0f;
      break;
  }
  return x;
}

// logits with its first kDegenerateRows rows degenerate_logit's.
std::vector<uint8_t> with_degenerate_rows(std::vector<uint8_t> logits, int E, bitepDataType_t dt) {
  std::vector<float> deg(static_cast<size_t>(kDegenerateRows) * E);
  for (int64_t t = 0; t < kDegenerateRows; ++t)
    for (int e = 0; e < E; ++e) deg[t * E + e] = degenerate_logit(t, e, E);
  const auto bytes = encode(deg, dt);
  std::copy(bytes.begin(), bytes.end(), logits.begin());
  return logits;
}

// E a multiple of 8 below its bucket's width (GLM-4.5's and DeepSeek-V2's 160, Kimi K2's 384) takes the pre-top-k
// softmax's and the normalised sigmoid's instances for whole octets (kernels/router_topk_spec.cuh
// whole_octets_kernel): fp32 and bf16 logits at one octet a lane, bf16 at two. Each case: the instance chosen, the
// host's and the fp64 oracle's selection and values (check_case), and every output bit for bit against the same
// kernel's general body (BITEP_ROUTER_WHOLE_OCTETS=0), with the compact outputs alone too, there with the first rows
// degenerate (NaN, +-inf, ties). T = 1031 ends in a partial tile at 8, 16 and 32 lanes a token, which the general body
// takes in both.
TEST(RouterGpu, WholeOctetsBelowTheBucket) {
  REQUIRE_GPU();
  CaseStats stats;
  struct C {
    int E, k;
    bitepScoreFunction_t fn;
    int pre, groups, gtopk;
  };
  for (const C c : {C{160, 8, bitepScoreSigmoid, 0, 0, 0},   // GLM-4.5: 20 of 32 lanes, the instance for k = 8
                    C{160, 6, bitepScoreSoftmax, 1, 8, 3},   // DeepSeek-V2: groups of 20 (step 3b)
                    C{384, 8, bitepScoreSigmoid, 0, 0, 0},   // Kimi K2: two octets a lane, 16 lanes' second empty
                    C{320, 6, bitepScoreSoftmax, 1, 0, 0},   // two octets a lane, runtime k
                    C{192, 8, bitepScoreSigmoid, 0, 3, 2},   // groups of 8 octets (step 3), 24 of 32 lanes
                    C{96, 4, bitepScoreSigmoid, 0, 4, 2},    // 16 lanes a token, groups of 24 (step 3b)
                    C{48, 4, bitepScoreSoftmax, 1, 0, 0},    // 8 lanes a token, 6 of them
                    C{48, 6, bitepScoreSigmoid, 0, 0, 0},    // the same, the instance for k = 6
                    C{256, 8, bitepScoreSigmoid, 0, 0, 0},   // the bucket's width: not this instance
                    C{100, 8, bitepScoreSoftmax, 1, 0, 0}})  // E % 8 != 0: not this instance
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int64_t T = 1031;
      bitepRouterConfig_t cfg = make_config(c.E, c.k, c.fn, c.pre, dt);
      cfg.num_groups = c.groups;
      cfg.group_topk = c.gtopk;
      cfg.scaling_factor = 2.5f;
      const std::string what = describe(cfg, T);
      const auto plain = make_logits(T, c.E, dt, 151 + c.E);
      const std::vector<float> bias = c.fn == bitepScoreSigmoid ? make_bias(c.E, c.E + 11) : std::vector<float>{};
      check_case(cfg, T, plain, bias, false, 4, &stats);
      if (HasFatalFailure()) return;
      const auto logits = with_degenerate_rows(plain, c.E, dt);
      // The bucket's width: 8 octets a lane's slots at 8, 16 or 32 lanes, two octets a lane past E = 256 (one pass,
      // so whole tiles, for bf16 logits alone).
      const int width = c.E <= 256 ? 8 * bucket_lanes(c.E) : 512;
      const bool want = c.E % 8 == 0 && c.E < width && (c.E <= 256 || dt == bitepBfloat16);
      for (bool dense : {true, false}) {
        FwdSpec spec;
        spec.map = bitepMapBitmapU8;
        spec.num_ranks = 4;
        spec.probs = spec.saved = dense;
        const std::string w = what + (dense ? "" : " compact outputs");
        const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
        ASSERT_EQ(got.rc, bitepSuccess) << w << ": " << got.error;
        const int kernel = bitep::kernels::last_router_forward_kernel();
        EXPECT_EQ(kernel, c.pre ? 2 : 3) << w << ": the kernel chosen";
        EXPECT_EQ(bitep::kernels::last_router_forward_whole_octets(), want) << w << ": the instance for whole octets";
        EXPECT_TRUE(got.guards) << w << ": forward wrote past a buffer";
        GeneralBodyBelowTheBucket scope;
        const FwdOut general = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
        ASSERT_EQ(general.rc, bitepSuccess) << w << ": " << general.error;
        EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), kernel) << w << ": BITEP_ROUTER_WHOLE_OCTETS=0";
        EXPECT_FALSE(bitep::kernels::last_router_forward_whole_octets()) << w << ": BITEP_ROUTER_WHOLE_OCTETS=0";
        expect_same_outputs(got, general, w + ": against the general body", dense);
      }
    }
  report("whole octets below the bucket", stats);
}

// Degenerate rows: all equal, ties, -inf, +inf, NaN, mixtures; exactly k distinct experts, the host's.
TEST(RouterGpu, DegenerateRows) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {8, 64, 100, 128, 130, 256, 512, 2048, 3000})
    for (int k : {1, 8, E}) {
      if (k > E) continue;
      const int64_t T = 12;
      std::vector<float> v(static_cast<size_t>(T) * E);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) v[t * E + e] = degenerate_logit(t, e, E);
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
        for (int f = 0; f < 4; ++f) {
          const bitepScoreFunction_t fn = f < 2    ? bitepScoreSoftmax
                                          : f == 2 ? bitepScoreSigmoid
                                                   : bitepScoreSqrtSoftplus;
          const bitepRouterConfig_t cfg = make_config(E, k, fn, f == 1, dt);
          check_case(cfg, T, encode(v, dt), {}, false, 0, &stats, /*exact=*/true);
          if (HasFatalFailure()) return;
        }
    }
  report("degenerate", stats);
}

// The degenerate rows through group-limited routing: ties, NaN and -inf inside a group's best keys (its
// score), between the group scores, and past the kept groups. Groups of one octet (q = 1), of four (DeepSeek-V3),
// group scores of one and two keys (the pair butterfly) and of four (the rounds), one octet a lane and two; every
// group kept (E = 128, 4 of 4: routing without groups, src/router.cc); groups of 20 experts, not whole octets (E = 160
// and 60: the kernels' step 3b).
TEST(RouterGpu, DegenerateRowsGrouped) {
  REQUIRE_GPU();
  CaseStats stats;
  struct G {
    int E, k, groups, gtopk;
  };
  for (const G g : {G{256, 8, 8, 4}, G{64, 4, 8, 2}, G{256, 16, 32, 8}, G{128, 3, 4, 3}, G{128, 4, 4, 4},
                    G{512, 8, 4, 2}, G{512, 8, 16, 8}, G{160, 6, 8, 3}, G{60, 4, 3, 2}})
    for (bool with_bias : {false, true}) {
      const int64_t T = 12;
      std::vector<float> v(static_cast<size_t>(T) * g.E);
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < g.E; ++e) v[t * g.E + e] = degenerate_logit(t, e, g.E);
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
        for (bitepScoreFunction_t fn : {bitepScoreSigmoid, bitepScoreSoftmax}) {
          if (with_bias && fn == bitepScoreSoftmax) continue;  // softmax scores take no bias
          bitepRouterConfig_t cfg = make_config(g.E, g.k, fn, fn == bitepScoreSoftmax, dt);
          cfg.num_groups = g.groups;
          cfg.group_topk = g.gtopk;
          // A bias of a few values, so biased keys tie across experts too.
          std::vector<float> bias;
          if (with_bias)
            for (int e = 0; e < g.E; ++e) bias.push_back(static_cast<float>(e % 3) * 0.25f);
          check_case(cfg, T, encode(v, dt), bias, false, 0, &stats, /*exact=*/true);
          if (HasFatalFailure()) return;
        }
    }
  report("degenerate grouped", stats);
}

// A lane's cache of its best keys runs dry when it wins more rounds than the cache holds (2 or 3), and the lane then
// rescans its registers between rounds (kernels/router_topk_kernel.cuh): rows whose m best experts (m = 1 .. 16,
// distinct values) all sit in the slots of one lane, so that lane wins up to k rounds, beside rows of random logits.
// (The degenerate rows reach the rescans through ties alone.) One octet a lane at 16 lanes a token (E = 128) and 32 (E
// = 256), two (E = 512); the post-top-k softmax (its maps exact against the host), the pre-top-k softmax, the
// normalised sigmoid, and DeepSeek-V3's groups and bias; the spec kernel and its k = 8 instance asserted.
TEST(RouterGpu, TopkFromOneLane) {
  REQUIRE_GPU();
  CaseStats stats;
  const int64_t T = 300;
  // E = 128 and 256 twice: their rows built for the bucket's lanes of one octet, and for half those lanes of two (the
  // post-top-k kernel's layout at k = 8, two_octet_post: octets l and l + lanes in lane l), the latter through the
  // post-top-k softmax alone (bf16 at E = 128, both dtypes at 256), at any token count. That kernel writes probs and
  // saved at E = 128 alone; at E = 256 its compact outputs are checked against those of the run that writes them (exact
  // against the host there).
  const std::pair<int, int> shapes[] = {{128, 16}, {128, 8}, {256, 32}, {256, 16}, {512, 32}};
  for (const auto& [E, lanes] : shapes) {
    const int ns = E / 8 / lanes;
    std::vector<float> v(static_cast<size_t>(T) * E);
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) v[t * E + e] = std::max(-2.5f, std::min(2.5f, 0.5f * gauss(0x1a7e + E, t * E + e)));
      if (t % 4 == 3) continue;  // a random row
      const int lane = static_cast<int>((t * 7) % lanes), m = 1 + static_cast<int>(t % (8 * ns));
      for (int i = 0; i < m; ++i) {
        const int slot = i % ns, b = 7 - (i / ns + static_cast<int>(t)) % 8;  // the lane's experts, scattered
        v[t * E + (slot * lanes + lane) * 8 + b] = 3.0f + 0.0625f * static_cast<float>(i);  // bf16-exact, distinct
      }
    }
    std::vector<float> small_bias(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) small_bias[e] = 0.01f * static_cast<float>(e % 5);
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (int k : {4, 8})
        for (int path = 0; path < 4; ++path) {  // post-top-k softmax, pre-top-k, sigmoid, DeepSeek-V3's groups
          if (path == 3 && (E != 256 || k != 8)) continue;
          const bool two_octets = lanes < bucket_lanes(E);
          // Through the post-top-k softmax alone, in the dtypes two_octet_post takes for some outputs.
          if (two_octets && (path != 0 || want_lanes(1, E, 8, dt, int64_t{1} << 40, false) != lanes)) continue;
          bitepRouterConfig_t cfg =
              make_config(E, k, path >= 2 ? bitepScoreSigmoid : bitepScoreSoftmax, path == 1 ? 1 : 0, dt);
          std::vector<float> bias;
          if (path == 3) {
            cfg.num_groups = 8;
            cfg.group_topk = 4;
            cfg.scaling_factor = 2.5f;
            bias = small_bias;
          }
          std::optional<TwoOctetsAtAnyCount> two;  // the rows built for two octets a lane: through that kernel
          if (two_octets) two.emplace();
          const auto bytes = encode(v, dt);
          check_case(cfg, T, bytes, bias, false, 0, &stats, /*exact=*/path == 0);
          if (HasFatalFailure()) return;
          const int want_kernel = path == 0 ? 1 : (path == 1 ? 2 : (path == 3 ? 4 : 3));
          const std::string what = describe(cfg, T);  // check_case's last run writes probs and saved
          EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), want_kernel) << what << ": the kernel chosen";
          EXPECT_EQ(bitep::kernels::last_router_forward_topk(), want_topk_instance(want_kernel, E, k, dt))
              << what << ": the instance for k = 8";
          EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(want_kernel, E, k, dt, T, true))
              << what << ": the lanes a token";
          if (two_octets) {
            FwdSpec all;
            all.map = bitepMapBitmapU8;
            const FwdOut full = run_forward(bitepBackendCuda, cfg, T, bytes, bias, all);
            ASSERT_EQ(full.rc, bitepSuccess) << full.error;
            FwdSpec compact = all;
            compact.probs = compact.saved = false;
            const FwdOut c = run_forward(bitepBackendCuda, cfg, T, bytes, bias, compact);
            ASSERT_EQ(c.rc, bitepSuccess) << c.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(want_kernel, E, k, dt, T, false))
                << what << " compact outputs: the lanes a token";
            EXPECT_TRUE(c.guards) << what << " compact outputs: forward wrote past a buffer";
            expect_same_outputs(c, full, what + " compact outputs", /*dense=*/false);
          }
        }
  }
  report("top-k from one lane", stats);
}

// The post-top-k softmax at 32 lanes a token (E 129-2048) has two runtime-k instances at each octet count: 2 and 4 keys
// cached a lane at 1 and 2 octets a lane (E 129-512), 3 and 4 at 4 (E 513-1024), 4 and 6 at 8 (E 1025-2048)
// (router_topk_select.cuh cache_size; router_topk_spec.cuh many_wins_post takes the longer one from k =
// many_wins_min_topk(E, fp32 logits) on, router_params.h). Rows whose m best experts (m = 1 .. 48, distinct values)
// all sit in one lane's slots, so that lane wins every round and rescans its keys again and again, beside the
// degenerate rows (ties, NaN, infinities) and random ones; E = 2048, 1029, 1024, 520 (a lane's last octets past E),
// 512, 300, 256 and 130, k around the threshold. Each case against the host and the fp64 oracle (maps exact) in the
// instance the default picks (asserted; at E <= 512 and k = 8 the instance compiled for k = 8, which caches 2, where it
// is taken), then both instances at every k (BITEP_ROUTER_MANY_WINS_MIN_K): the same bits, all outputs and the compact
// ones alone.
TEST(RouterGpu, ManyWinsCacheInstances) {
  REQUIRE_GPU();
  CaseStats stats;
  const int64_t T = 300;
  for (int E : {2048, 1029, 1024, 520, 512, 300, 256, 130}) {
    const int slots = E > 1024 ? 8 : (E > 512 ? 4 : (E > 256 ? 2 : 1));  // octets a lane
    const int few = E > 1024 ? 4 : (E > 512 ? 3 : 2), many = E > 1024 ? 6 : 4;
    std::vector<float> v(static_cast<size_t>(T) * E);
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) {
        v[t * E + e] = t < kDegenerateRows ? degenerate_logit(t, e, E)
                                           : std::max(-2.5f, std::min(2.5f, 0.5f * gauss(0x3a1e + E, t * E + e)));
      }
      if (t < kDegenerateRows || t % 4 == 3) continue;  // a degenerate or random row
      const int lane = static_cast<int>((t * 5) % 32), m = 1 + static_cast<int>(t % 48);
      for (int i = 0; i < m; ++i) {
        const int slot = i % slots, b = 7 - (i / slots + static_cast<int>(t)) % 8;  // the lane's experts, scattered
        const int e = (slot * 32 + lane) * 8 + b;
        if (e < E) v[t * E + e] = 3.0f + 0.0625f * static_cast<float>(i);  // bf16-exact, distinct
      }
    }
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const auto bytes = encode(v, dt);
      const int min_k = bitep::kernels::many_wins_min_topk(E, dt == bitepFloat32);
      std::vector<int> ks = {1, 8, min_k - 1, min_k, 24, 32};
      std::sort(ks.begin(), ks.end());
      ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
      for (int k : ks) {
        const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, dt);
        const std::string what = describe(cfg, T);
        check_case(cfg, T, bytes, {}, false, 0, &stats, /*exact=*/true);
        if (HasFatalFailure()) return;
        EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 1) << what << ": the kernel chosen";
        // The instance compiled for k = 8 (dense outputs; want_topk_instance) has no many-wins twin.
        const bool kconst = want_topk_instance(1, E, k, dt) != 0;
        EXPECT_EQ(bitep::kernels::last_router_forward_topk(), kconst ? k : 0) << what << ": the instance for k = 8";
        EXPECT_EQ(bitep::kernels::last_router_forward_cache(), k >= min_k && !kconst ? many : few)
            << what << ": the keys cached a lane";
        FwdSpec all;
        all.map = bitepMapBitmapU8;
        FwdSpec compact = all;
        compact.probs = compact.saved = false;
        const FwdOut want = run_forward(bitepBackendCuda, cfg, T, bytes, {}, all);
        ASSERT_EQ(want.rc, bitepSuccess) << what << ": " << want.error;
        for (const char* from : {"0", "33"}) {
          const std::string at = what + " BITEP_ROUTER_MANY_WINS_MIN_K=" + from;
          ManyWinsFrom scope(from);
          const FwdOut got = run_forward(bitepBackendCuda, cfg, T, bytes, {}, all);
          ASSERT_EQ(got.rc, bitepSuccess) << at << ": " << got.error;
          EXPECT_EQ(bitep::kernels::last_router_forward_cache(), from[0] == '0' && !kconst ? many : few) << at;
          EXPECT_TRUE(got.guards) << at << ": forward wrote past a buffer";
          expect_same_outputs(got, want, at);
          const FwdOut c = run_forward(bitepBackendCuda, cfg, T, bytes, {}, compact);
          ASSERT_EQ(c.rc, bitepSuccess) << at << " compact outputs: " << c.error;
          EXPECT_TRUE(c.guards) << at << " compact outputs: forward wrote past a buffer";
          expect_same_outputs(c, want, at + " compact outputs", /*dense=*/false);
        }
      }
    }
  }
  report("many wins a lane", stats);
}

// Dispatch layout epilogue: rank masks and counts (counts overwritten: the poison must go).
TEST(RouterGpu, RankEpilogue) {
  REQUIRE_GPU();
  CaseStats stats;
  struct R {
    int E, k, W;
  };
  for (const R r : {R{8, 2, 1}, R{8, 3, 8}, R{64, 6, 4}, R{130, 8, 10}, R{130, 8, 130}, R{256, 8, 8}, R{256, 8, 256},
                    R{2048, 32, 64}, R{3000, 8, 8}})
    for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid}) {
      const int64_t T = r.E > 1000 ? 100 : 777;
      const bitepRouterConfig_t cfg = make_config(r.E, r.k, fn, 0, bitepBfloat16);
      check_case(cfg, T, make_logits(T, r.E, bitepBfloat16, 5 + r.W), {}, false, r.W, &stats);
      if (HasFatalFailure()) return;
    }
  report("ranks", stats);
}

// Aux-loss scores (forward: scores over all E and their top-k map; backward).
TEST(RouterGpu, AuxScores) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {1, 8, 130, 256, 2048, 3000})
    for (int k : {1, 4})
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16, bitepFloat16})
        for (bitepScoreFunction_t fn : {bitepScoreSoftmax, bitepScoreSigmoid, bitepScoreSqrtSoftplus}) {
          if (k > E) continue;
          const int64_t T = E > 1000 ? 65 : 513;
          const bitepRouterConfig_t cfg = make_config(E, k, fn, 0, dt);
          check_case(cfg, T, make_logits(T, E, dt, 31 + E), {}, true, 0, &stats);
          if (HasFatalFailure()) return;
        }
  report("aux scores", stats);
}

// Logits that are 4-byte but not 16-byte aligned: every row takes the scalar load path.
TEST(RouterGpu, MisalignedLogits) {
  REQUIRE_GPU();
  CaseStats stats;
  for (int E : {64, 256, 3000}) {
    const int64_t T = 300;
    const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSigmoid, 0, bitepFloat32);
    check_case(cfg, T, make_logits(T, E, bitepFloat32, 9), {}, false, 0, &stats, false, /*logits_offset=*/4);
    if (HasFatalFailure()) return;
  }
  report("misaligned", stats);
}

// Weights of the forward's post-top-k softmax whose sum ran in another order (kernels/router_topk.cu, the
// holders): the same zeros, -inf and NaN as `want`, every other value within (2 k + 2) ulps relative (the
// two sums of k positive terms each within (k - 1) u of the exact one, then a rounding each). Returns the
// elements outside that, and the count of those that differ at all in `*differing`.
int64_t weights_outside(const std::vector<float>& got, const std::vector<float>& want, int k, int64_t* differing) {
  if (got.size() != want.size()) return static_cast<int64_t>(std::max(got.size(), want.size()));
  const double rel = (2.0 * k + 2.0) * std::ldexp(1.0, -24);
  int64_t bad = 0;
  *differing = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float a = got[i], b = want[i];
    if (std::memcmp(&a, &b, 4) == 0) continue;
    ++*differing;
    const bool ok = std::isnan(a) ? std::isnan(b)
                                  : (std::isfinite(a) && std::isfinite(b) && a != 0.0f && b != 0.0f &&
                                     std::fabs(static_cast<double>(a) - b) <= rel * std::fabs(static_cast<double>(b)));
    if (!ok) ++bad;
  }
  return bad;
}

// The kernels compiled for one score path (kernels/router_topk_spec.cuh FwdSpec, router_backward_bucket.cuh BwdSpec)
// give the any-path kernels' outputs, which the other tests hold to the host reference: the same bits for every map,
// index and gradient but two; the forward's post-top-k softmax weights (probs, saved, topk_weights) within
// weights_outside's bound where k fits the lanes of a token (the holders sum in round order), the same bits
// past it; the post-top-k softmax's recomputed gradient at E 33-256 within the gradient tolerance (its sum and dot
// product in one butterfly, its exps by __expf, for bf16 logits unshifted where the sums allow). E = 64: 8 lanes a
// token; 100: 16 lanes, E % 8 != 0; 128: 16 lanes, whole rows (bf16's by the holders' wide stores, fp32's staged);
// 256: one octet a lane; 512: two (the backward staged); 1000: four; 2048: eight. k: 8, and for the post-top-k softmax
// also 1, 3, the lanes (G) and G + 1; at E = 64 also 6 (the instances for k = 6), with groups too. The pre-top-k
// softmax and the normalised sigmoid also with groups (8 of them, 4 kept: a group is an octet at E = 64, four lanes at
// 256, eight octets over two slots at 512; E = 100, 2 of 4 groups of 25, takes the generic kernel), expert bias, a
// scaling factor and the dispatch-layout epilogue (4 ranks). The post-top-k softmax at k = 8 again at two octets a lane
// (at any count), where its rule takes the outputs (bf16: E = 100 and 256 compact, E = 128 both ways; fp32: E = 256
// compact): the bits of the bucket's kernel.
TEST(RouterGpu, SpecKernelsMatchAnyPath) {
  REQUIRE_GPU();
  const int64_t T = 333;
  struct Path {
    bitepScoreFunction_t fn;
    int pre;
    int k;         // 0: 8 (32 at E = 2048); -1: the lanes of a token; -2: one more
    bool grouped;  // 8 groups, 4 kept, bias (sigmoid), scaling 2.5, 4 ranks
  };
  const Path paths[] = {
      {bitepScoreSoftmax, 0, 0, false},  {bitepScoreSoftmax, 1, 0, false}, {bitepScoreSigmoid, 0, 0, false},
      {bitepScoreSoftmax, 0, 1, false},  {bitepScoreSoftmax, 0, 3, false}, {bitepScoreSoftmax, 0, -1, false},
      {bitepScoreSoftmax, 0, -2, false}, {bitepScoreSigmoid, 0, 0, true},  {bitepScoreSoftmax, 1, 0, true},
      {bitepScoreSoftmax, 0, 6, false},  {bitepScoreSoftmax, 1, 6, false}, {bitepScoreSigmoid, 0, 6, false},
      {bitepScoreSigmoid, 0, 6, true},   {bitepScoreSoftmax, 1, 6, true}};
  for (int E : {64, 100, 128, 256, 512, 1000, 2048})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (const Path& path : paths) {
        const int lanes = std::min(32, (E + 7) / 8 <= 8 ? 8 : ((E + 7) / 8 <= 16 ? 16 : 32));
        if (E == 2048 && path.k != 0) continue;
        if (path.k == 6 && E != 64) continue;   // k = 6: the instances for it, at 8 lanes a token
        if (path.grouped && E > 512) continue;  // the any-path kernel in both runs
        const int k = path.k > 0 ? path.k : (path.k == -1 ? lanes : (path.k == -2 ? lanes + 1 : (E == 2048 ? 32 : 8)));
        const bool holders = path.fn == bitepScoreSoftmax && path.pre == 0 && E <= 2048 && k <= lanes;
        const bool fused_recompute = path.fn == bitepScoreSoftmax && path.pre == 0 && E > 32 && E <= 256;
        bitepRouterConfig_t cfg = make_config(E, k, path.fn, path.pre, dt);
        std::vector<float> bias;
        if (path.grouped) {
          cfg.num_groups = E == 100 ? 4 : 8;
          cfg.group_topk = E == 100 ? 2 : 4;  // E = 100: 2 of 4 (all 4 kept would be routing without groups)
          cfg.scaling_factor = 2.5f;
          if (path.fn == bitepScoreSigmoid) bias = make_bias(E, E + 1);
        }
        // The kernel that must run (kernels/router.h last_router_forward_kernel): groups of 25 experts (E =
        // 100) are not whole octets, so the generic kernel (-1); the post-top-k softmax's own kernels for k up
        // to the lanes, the pre-top-k softmax's and the sigmoid's up to E = 512, the sigmoid's in DeepSeek-V3's
        // shape (E = 256 grouped: 4 octets a group, k = 8) its own (4); else the any-path one (0).
        int want_kernel = 0;
        if (path.grouped && E == 100)
          want_kernel = -1;
        else if (path.fn == bitepScoreSoftmax && path.pre == 0)
          want_kernel = holders ? 1 : 0;
        else if (E <= 512)
          want_kernel = path.pre ? 2 : (path.grouped && E == 256 && k == 8 ? 4 : 3);
        // The first rows degenerate (NaN, +-inf, signed zeros, ties): the spec kernels' shortcuts (the
        // softmax's maximum from the first top-k round, the packed bf16 keys, the holders) must give the
        // any-path's selection there too, and its weights as above.
        auto logits = make_logits(T, E, dt, 21 + E);
        std::vector<float> deg(static_cast<size_t>(kDegenerateRows) * E);
        for (int64_t t = 0; t < kDegenerateRows; ++t)
          for (int e = 0; e < E; ++e) deg[t * E + e] = degenerate_logit(t, e, E);
        const auto deg_bytes = encode(deg, dt);
        std::copy(deg_bytes.begin(), deg_bytes.end(), logits.begin());
        std::vector<float> gp(static_cast<size_t>(T) * E);
        for (size_t i = 0; i < gp.size(); ++i) gp[i] = gauss(0x5eed, i);
        const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(k) + " " + dt_name(dt) + " " +
                                 fn_name(cfg) + (path.grouped ? " grouped" : "");
        for (bitepMapFormat_t fmt : {bitepMapBytemap, bitepMapBitmapU8}) {
          FwdSpec spec;
          spec.map = fmt;
          spec.num_ranks = path.grouped ? 4 : 0;
          FwdOut any;
          BwdOut any_bwd, any_saved_bwd;
          {
            AnyPathKernels scope;
            any = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
            ASSERT_EQ(any.rc, bitepSuccess) << any.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), std::min(want_kernel, 0)) << what;
            any_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, {}, logits, false);
            ASSERT_EQ(any_bwd.rc, bitepSuccess) << any_bwd.error;
            any_saved_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, any.saved, {}, false);
            ASSERT_EQ(any_saved_bwd.rc, bitepSuccess) << any_saved_bwd.error;
          }
          const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
          ASSERT_EQ(got.rc, bitepSuccess) << got.error;
          EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), want_kernel) << what << ": the kernel chosen";
          // The spec kernels' instance for k = 8 (k = 6 at 8 lanes a token) must be the one checked here (the runs
          // write probs and saved).
          EXPECT_EQ(bitep::kernels::last_router_forward_topk(), want_topk_instance(want_kernel, E, k, dt))
              << what << ": the instance for its k";
          EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(want_kernel, E, k, dt, T, true))
              << what << ": the lanes a token";
          EXPECT_TRUE(got.guards) << what << ": forward wrote past a buffer";
          for (bool dense : {true, false}) {
            // The bf16 post-top-k softmax at two octets a lane (at any token count in this scope), where its rule
            // takes these outputs: every output the bits of the bucket's kernel's above (the holders sum the same k
            // exps in the same order).
            const int half = want_lanes(want_kernel, E, k, dt, int64_t{1} << 40, dense);
            if (half == bucket_lanes(E)) continue;
            const std::string w = what + (dense ? "" : " compact outputs") + ": two octets a lane";
            TwoOctetsAtAnyCount scope;
            FwdSpec s = spec;
            s.probs = s.saved = dense;
            const FwdOut two = run_forward(bitepBackendCuda, cfg, T, logits, bias, s);
            ASSERT_EQ(two.rc, bitepSuccess) << two.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), half) << w;
            EXPECT_TRUE(two.guards) << w << ": forward wrote past a buffer";
            expect_same_outputs(two, got, w, dense);
          }
          if (want_kernel == 4) {
            // DeepSeek-V3's kernel loads the bias by 16-byte loads: a bias 4 bytes off takes the sigmoid's
            // general kernel (3), and both give the any-path kernel's bits (checked below for `got`).
            FwdSpec mis = spec;
            mis.bias_offset = 4;
            const FwdOut got3 = run_forward(bitepBackendCuda, cfg, T, logits, bias, mis);
            ASSERT_EQ(got3.rc, bitepSuccess) << got3.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 3) << what << ": misaligned bias";
            EXPECT_TRUE(got3.guards) << what << ": misaligned bias: forward wrote past a buffer";
            expect_same_outputs(got3, any, what + ": misaligned bias");
          }
          EXPECT_TRUE(same_bits(got.map, any.map)) << what << ": routing map";
          EXPECT_TRUE(same_bits(got.indices, any.indices)) << what << ": topk_indices";
          EXPECT_TRUE(same_bits(got.rank_mask, any.rank_mask)) << what << ": rank_mask";
          EXPECT_TRUE(same_bits(got.rank_counts, any.rank_counts)) << what << ": rank_counts";
          if (holders) {
            int64_t differing = 0;
            EXPECT_EQ(0, weights_outside(got.weights, any.weights, k, &differing)) << what << ": topk_weights";
            EXPECT_EQ(0, weights_outside(got.probs, any.probs, k, &differing)) << what << ": probs";
            const int64_t probs_differing = differing;
            EXPECT_EQ(0, weights_outside(got.saved, any.saved, k, &differing)) << what << ": saved";
            if (fmt == bitepMapBitmapU8 && E == 256)
              std::cout << "[ info ] " << what << ": " << probs_differing << " probs and " << differing
                        << " saved values differ from the any-path kernel's in their last bits\n";
          } else {
            EXPECT_TRUE(same_bits(got.weights, any.weights)) << what << ": topk_weights";
            EXPECT_TRUE(same_bits(got.probs, any.probs)) << what << ": probs";
            EXPECT_TRUE(same_bits(got.saved, any.saved)) << what << ": saved";
          }
          const BwdOut bwd = run_backward(bitepBackendCuda, cfg, T, gp, got.map, fmt, {}, logits, false);
          ASSERT_EQ(bwd.rc, bitepSuccess) << bwd.error;
          const int want_bwd = path.fn == bitepScoreSoftmax && path.pre == 0 && E > 256 ? 1 : 0;  // the routed kernel
          EXPECT_EQ(bitep::kernels::last_router_backward_kernel(), want_bwd) << what << ": the backward kernel";
          EXPECT_TRUE(bwd.guards) << what << ": backward wrote past grad_logits";
          if (fused_recompute) {
            // The post-top-k softmax recompute's own kernel (E 33-256) takes its sum and its dot product in one
            // butterfly, its exps by __expf, unshifted for bf16 where the sums allow
            // (kernels/router_backward_bucket.cuh): the any-path kernel's gradient within the tolerance the grid holds
            // both to against the host (tests/gpu/router_gpu_test.h), NaN and infinities where it has them. The
            // differing elements are counted.
            std::vector<uint8_t> bytemap(static_cast<size_t>(T) * E);
            const int row = fmt == bitepMapBitmapU8 ? (E + 7) / 8 : E;
            for (int64_t t = 0; t < T; ++t)
              for (int e = 0; e < E; ++e)
                bytemap[t * E + e] =
                    fmt == bitepMapBitmapU8 ? (got.map[t * row + e / 8] >> (e % 8)) & 1 : got.map[t * row + e] != 0;
            const auto x64 = bitep::ref::to_double(logits.data(), dt, static_cast<size_t>(T) * E);
            const auto M = grad_scale(cfg, T, x64, bytemap, gp, false);
            const auto err = grad_errors(any_bwd.grad, bwd.grad, M, T, E, 0.0);
            EXPECT_LE(*std::max_element(err.begin(), err.end()), grad_tol(dt, width_factor(cfg, false)))
                << what << ": grad_logits (recompute) against the any-path kernel's";
            if (fmt == bitepMapBitmapU8 && k == 8)
              std::cout << "[ info ] " << what << ": " << count_bit_diffs(bwd.grad, any_bwd.grad)
                        << " recomputed gradients differ from the any-path kernel's in their last bits\n";
          } else {
            EXPECT_TRUE(same_bits(bwd.grad, any_bwd.grad)) << what << ": grad_logits (recompute)";
          }
          // The saved tensor's backward (the post-top-k softmax's has a kernel of its own) from the same inputs.
          const BwdOut saved_bwd = run_backward(bitepBackendCuda, cfg, T, gp, any.map, fmt, any.saved, {}, false);
          ASSERT_EQ(saved_bwd.rc, bitepSuccess) << saved_bwd.error;
          EXPECT_TRUE(saved_bwd.guards) << what << ": backward wrote past grad_logits";
          EXPECT_TRUE(same_bits(saved_bwd.grad, any_saved_bwd.grad)) << what << ": grad_logits (saved)";
        }
      }
}

// Dense outputs at any alignment, for the kernels that stage their rows where probs and saved are both 16-byte aligned
// and store them by whole sectors: probs or saved 4 bytes off give the aligned run's outputs, bit for bit, and write
// nothing past them; probs alone and saved alone give the same bits as when both are written. T = 333: a last partial
// tile where four tokens share a warp (stored octet by octet even in the staged instances).
// kernel 1, the post-top-k softmax's holders (k = 8): staged at E = 64 (8 lanes a token) and for bf16 at E = 128 (8
// lanes of two octets; 16 when misaligned), fp32 at E = 128 at 16 lanes (staged, v84); E = 200 a partial last octet;
// 256 one octet a lane (staged); 512 two (staged for bf16).
// kernel 2, the pre-top-k softmax's own rows (k = 6 at E = 64, the instance for that k; else 8): staged at E = 64 and
// 256, octet by octet at 200 and 512.
void expect_dense_outputs_any_alignment(int kernel) {
  TwoOctetsAtAnyCount two;  // bf16 E = 128 aligned: the four-token kernel's staged wide stores at T = 333
  const int64_t T = 333;
  const std::vector<int> experts =
      kernel == 1 ? std::vector<int>{64, 128, 200, 256, 512} : std::vector<int>{64, 200, 256, 512};
  for (int E : experts)
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16}) {
      const int k = kernel == 2 && E == 64 ? 6 : 8;
      const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, kernel == 2, dt);
      const std::string name = describe(cfg, T);
      const bool want_staged =
          kernel == 1 ? E == 64 || E == 128 || E == 256 || (dt == bitepBfloat16 && E == 512) : E == 64 || E == 256;
      const auto logits = make_logits(T, E, dt, 5 + E);
      FwdSpec aligned;
      aligned.map = bitepMapBitmapU8;
      const FwdOut want = run_forward(bitepBackendCuda, cfg, T, logits, {}, aligned);
      ASSERT_EQ(want.rc, bitepSuccess) << want.error;
      EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), kernel) << name << ": the kernel chosen";
      EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(kernel, E, k, dt, T, true)) << name;
      EXPECT_EQ(bitep::kernels::last_router_forward_staged(), want_staged) << name << ": rows staged";
      EXPECT_TRUE(want.guards);
      for (int which = 1; which <= 3; ++which) {
        FwdSpec spec = aligned;
        spec.probs_offset = (which & 1) ? 4 : 0;
        spec.saved_offset = (which & 2) ? 4 : 0;
        const std::string what =
            name + " probs +" + std::to_string(spec.probs_offset) + " saved +" + std::to_string(spec.saved_offset);
        const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
        ASSERT_EQ(got.rc, bitepSuccess) << got.error;
        EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(kernel, E, k, dt, T, true, false)) << what;
        EXPECT_FALSE(bitep::kernels::last_router_forward_staged()) << what << ": rows staged though misaligned";
        EXPECT_TRUE(got.guards) << what << ": wrote past a buffer";
        expect_same_outputs(got, want, what);
      }
      // probs alone and saved alone, aligned: the staged kernels store each array by a path of its own.
      for (const bool probs : {true, false}) {
        const std::string what = name + (probs ? " probs alone" : " saved alone");
        FwdSpec one = aligned;
        one.probs = probs;
        one.saved = !probs;
        const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, {}, one);
        ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
        EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), kernel) << what << ": the kernel chosen";
        EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(kernel, E, k, dt, T, true)) << what;
        EXPECT_EQ(bitep::kernels::last_router_forward_staged(), want_staged) << what << ": rows staged";
        EXPECT_TRUE(got.guards) << what << ": wrote past a buffer";
        const std::vector<float>& array = probs ? got.probs : got.saved;
        const std::vector<float>& want_array = probs ? want.probs : want.saved;
        ASSERT_EQ(array.size(), want_array.size()) << what;
        EXPECT_EQ(count_bit_diffs(array, want_array), 0) << what;
        EXPECT_EQ(got.map, want.map) << what;
        EXPECT_EQ(got.indices, want.indices) << what;
        EXPECT_EQ(count_bit_diffs(got.weights, want.weights), 0) << what;
      }
    }
}

TEST(RouterGpu, HolderOutputsMisaligned) {
  REQUIRE_GPU();
  expect_dense_outputs_any_alignment(1);
}

TEST(RouterGpu, PreSoftmaxOutputsMisaligned) {
  REQUIRE_GPU();
  expect_dense_outputs_any_alignment(2);
}

// DeepSeek-V3's staged instance (kernel 4, bf16 logits; router_topk_spec.cuh dense_only_kernel) takes the launches that
// write probs or saved (both 16-byte aligned) and the map, and nothing else; its sigmoid values wait in the stage
// through the group steps and the rounds. fp32 logits take the unstaged instance every time. Its outputs are its
// unstaged twin's, bit for bit: the twin runs where compact outputs are asked for too (the reference run here), where
// probs or saved is 4 bytes off, and where the dispatch layout is asked for (num_ranks > 0). T = 333 (a last block
// partly past T) and 4099, both dtypes and both map formats; every output's guard intact.
TEST(RouterGpu, DeepSeekV3DenseRowsStaged) {
  REQUIRE_GPU();
  const int E = 256, k = 8;
  for (const int64_t T : {int64_t{333}, int64_t{4099}})
    for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
      for (bitepMapFormat_t map : {bitepMapBytemap, bitepMapBitmapU8}) {
        bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSigmoid, 0, dt);
        cfg.num_groups = 8;
        cfg.group_topk = 4;
        cfg.scaling_factor = 2.5f;
        const std::string name = describe(cfg, T) + (map == bitepMapBitmapU8 ? " bitmap" : " bytemap");
        const auto logits = make_logits(T, E, dt, 17 + T);
        const std::vector<float> bias = make_bias(E, 3 + T);
        FwdSpec all;
        all.map = map;
        const FwdOut want = run_forward(bitepBackendCuda, cfg, T, logits, bias, all);
        ASSERT_EQ(want.rc, bitepSuccess) << name << ": " << want.error;
        EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 4) << name << ": the kernel chosen";
        EXPECT_FALSE(bitep::kernels::last_router_forward_staged()) << name << ": staged with compact outputs";
        EXPECT_TRUE(want.guards) << name;
        struct Variant {
          const char* what;
          bool probs, saved;
          size_t probs_offset;
          int num_ranks;
          bool staged;
        };
        for (const Variant v :
             {Variant{"probs, saved and the map", true, true, 0, 0, true},
              Variant{"probs alone", true, false, 0, 0, true}, Variant{"saved alone", false, true, 0, 0, true},
              Variant{"probs 4 bytes off", true, true, 4, 0, false},
              Variant{"with the dispatch layout", true, true, 0, 8, false}}) {
          const std::string what = name + ": " + v.what;
          FwdSpec spec = all;
          spec.weights = spec.indices = false;
          spec.probs = v.probs, spec.saved = v.saved;
          spec.probs_offset = v.probs_offset;
          spec.num_ranks = v.num_ranks;
          const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
          ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
          EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), 4) << what << ": the kernel chosen";
          EXPECT_EQ(bitep::kernels::last_router_forward_staged(), v.staged && dt == bitepBfloat16)
              << what << ": rows staged";
          EXPECT_TRUE(got.guards) << what << ": wrote past a buffer";
          if (v.probs) EXPECT_EQ(count_bit_diffs(got.probs, want.probs), 0) << what << ": probs";
          if (v.saved) EXPECT_EQ(count_bit_diffs(got.saved, want.saved), 0) << what << ": saved";
          EXPECT_EQ(got.map, want.map) << what << ": routing map";
          if (v.num_ranks > 0) {
            // The layout's rank mask from the map: expert e on rank e / (E / W).
            const int row = map == bitepMapBitmapU8 ? E / 8 : E, per_rank = E / v.num_ranks;
            int64_t bad = 0;
            for (int64_t t = 0; t < T; ++t) {
              uint32_t mask = 0;
              for (int e = 0; e < E; ++e) {
                const bool on = map == bitepMapBitmapU8 ? ((want.map[t * row + e / 8] >> (e % 8)) & 1) != 0
                                                        : want.map[t * row + e] != 0;
                if (on) mask |= 1u << (e / per_rank);
              }
              bad += got.rank_mask[t] != mask ? 1 : 0;
            }
            EXPECT_EQ(bad, 0) << what << ": tokens whose rank mask is not their map's ranks";
          }
        }
      }
}

// The pre-top-k softmax's staged instances (E = 64 and 256) store their saved row from the stage either right after
// the softmax or at the tile's end beside probs, as the launch's rule says (router_topk_bucket.cuh saved_row_late: fp32
// always; bf16 where no compact output is asked for and the grid is more than one wave of resident blocks, 8 an SM for
// these instances, and at most four); DeepSeek-V3's staged instance (bf16) right after its sigmoid always. Either order
// gives the unstaged twin's outputs (probs and saved 4 bytes off), bit for bit, and writes nothing past a buffer:
// T = 333 (half a block) and about two waves (a partial last tile too), probs and saved, each alone, and with the
// compact outputs; both dtypes, both map formats.
TEST(RouterGpu, SavedRowEitherOrder) {
  REQUIRE_GPU();
  int device = 0, sms = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), cudaSuccess);
  const int64_t resident_warps = int64_t{8} * 8 * sms;  // 8 blocks an SM of 8 warps, one tile a warp
  struct Case {
    const char* what;
    int E, k, kernel, tokens_per_warp;
    bool v3;
  };
  int late_bf16 = 0, early_bf16 = 0;
  for (const Case c : {Case{"pre-top-k softmax E = 64", 64, 6, 2, 4, false},
                       Case{"pre-top-k softmax E = 256", 256, 8, 2, 1, false}, Case{"DeepSeek-V3", 256, 8, 4, 1, true}})
    for (const int64_t T : {int64_t{333}, 2 * resident_warps * c.tokens_per_warp + 3})
      for (bitepDataType_t dt : {bitepFloat32, bitepBfloat16})
        for (bitepMapFormat_t map : {bitepMapBytemap, bitepMapBitmapU8}) {
          bitepRouterConfig_t cfg = make_config(c.E, c.k, c.v3 ? bitepScoreSigmoid : bitepScoreSoftmax, !c.v3, dt);
          if (c.v3) {
            cfg.num_groups = 8;
            cfg.group_topk = 4;
            cfg.scaling_factor = 2.5f;
          }
          const std::string name =
              std::string(c.what) + " " + describe(cfg, T) + (map == bitepMapBitmapU8 ? " bitmap" : " bytemap");
          const auto logits = make_logits(T, c.E, dt, 41 + T);
          const std::vector<float> bias = c.v3 ? make_bias(c.E, 7 + T) : std::vector<float>{};
          const bool staged = !(c.v3 && dt == bitepFloat32);  // DeepSeek-V3 fp32: the unstaged instance
          const int64_t blocks = (T + 8 * c.tokens_per_warp - 1) / (8 * c.tokens_per_warp);
          const bool waves_1_to_4 = blocks > resident_warps / 8 && blocks <= 4 * (resident_warps / 8);
          FwdSpec off;  // the unstaged twin: probs and saved 4 bytes off, every output
          off.map = map;
          off.probs_offset = off.saved_offset = 4;
          const FwdOut want = run_forward(bitepBackendCuda, cfg, T, logits, bias, off);
          ASSERT_EQ(want.rc, bitepSuccess) << name << ": " << want.error;
          EXPECT_FALSE(bitep::kernels::last_router_forward_staged()) << name << ": staged though misaligned";
          EXPECT_FALSE(bitep::kernels::last_router_forward_saved_late()) << name << ": the twin's order";
          struct Variant {
            const char* what;
            bool probs, saved, compact;
          };
          for (const Variant v :
               {Variant{"probs, saved and the map", true, true, false}, Variant{"probs alone", true, false, false},
                Variant{"saved alone", false, true, false}, Variant{"with the compact outputs", true, true, true}}) {
            if (c.v3 && v.compact) continue;  // DeepSeek-V3's compact launches take the unstaged twin
            const std::string what = name + ": " + v.what;
            FwdSpec spec;
            spec.map = map;
            spec.probs = v.probs, spec.saved = v.saved;
            spec.weights = spec.indices = v.compact;
            const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, bias, spec);
            ASSERT_EQ(got.rc, bitepSuccess) << what << ": " << got.error;
            EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), c.kernel) << what << ": the kernel chosen";
            EXPECT_EQ(bitep::kernels::last_router_forward_staged(), staged) << what << ": rows staged";
            const bool want_late = staged && !c.v3 && (dt == bitepFloat32 || (!v.compact && waves_1_to_4));
            EXPECT_EQ(bitep::kernels::last_router_forward_saved_late(), want_late) << what << ": the saved row's order";
            if (staged && dt == bitepBfloat16 && v.saved) ++(want_late ? late_bf16 : early_bf16);
            EXPECT_TRUE(got.guards) << what << ": wrote past a buffer";
            if (v.probs) EXPECT_EQ(count_bit_diffs(got.probs, want.probs), 0) << what << ": probs";
            if (v.saved) EXPECT_EQ(count_bit_diffs(got.saved, want.saved), 0) << what << ": saved";
            EXPECT_EQ(got.map, want.map) << what << ": routing map";
            if (v.compact) {
              EXPECT_EQ(got.indices, want.indices) << what << ": topk_indices";
              EXPECT_EQ(count_bit_diffs(got.weights, want.weights), 0) << what << ": topk_weights";
            }
          }
        }
  EXPECT_GT(late_bf16, 0) << "no bf16 launch stored its saved row at the tile's end";
  EXPECT_GT(early_bf16, 0) << "no bf16 launch stored its saved row after the softmax";
}

// Outputs are optional one by one; a forward with only the compact outputs gives the same experts and weights, bit for
// bit, though the bf16 post-top-k softmax picks its kernel by the outputs. T = 1001: the bucket's lanes by default, and
// again with two octets a lane at any count (two_octet_post), where the compact outputs take half the lanes (E = 100
// and 128: 8, E = 256: 16), and probs and saved too at E = 128 (the wide stores); at E = 256 the runtime-k instance
// writes probs and saved, the one for k = 8 the compact outputs (the holders sum their k exps in the same order
// whatever the lanes).
TEST(RouterGpu, OptionalOutputs) {
  REQUIRE_GPU();
  const int64_t T = 1001;
  const int k = 8;
  for (bool two_at_any_count : {false, true})
    for (int E : {100, 128, 256}) {
      std::optional<TwoOctetsAtAnyCount> two;
      if (two_at_any_count) two.emplace();
      const std::string what = "E=" + std::to_string(E) + (two_at_any_count ? " (two octets a lane at any count)" : "");
      const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, bitepBfloat16);
      const auto logits = make_logits(T, E, bitepBfloat16, 3 + E);
      FwdSpec all;
      const FwdOut full = run_forward(bitepBackendCuda, cfg, T, logits, {}, all);
      ASSERT_EQ(full.rc, bitepSuccess) << full.error;
      EXPECT_TRUE(full.guards) << what;
      EXPECT_EQ(bitep::kernels::last_router_forward_topk(), E == 256 ? 0 : 8) << what << " with probs and saved";
      EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(1, E, k, bitepBfloat16, T, true)) << what;
      FwdSpec compact;
      compact.probs = compact.saved = false;
      compact.map = bitepMapNone;
      const FwdOut c = run_forward(bitepBackendCuda, cfg, T, logits, {}, compact);
      ASSERT_EQ(c.rc, bitepSuccess) << c.error;
      EXPECT_TRUE(c.guards) << what;
      EXPECT_EQ(bitep::kernels::last_router_forward_topk(), 8)
          << what << " compact outputs alone: the instance for k = 8";
      EXPECT_EQ(bitep::kernels::last_router_forward_lanes(), want_lanes(1, E, k, bitepBfloat16, T, false)) << what;
      EXPECT_EQ(c.indices, full.indices) << what;
      EXPECT_EQ(count_bit_diffs(c.weights, full.weights), 0) << what;
      FwdSpec map_only;
      map_only.probs = map_only.saved = map_only.weights = map_only.indices = false;
      map_only.map = bitepMapBitmapU8;
      const FwdOut m = run_forward(bitepBackendCuda, cfg, T, logits, {}, map_only);
      ASSERT_EQ(m.rc, bitepSuccess) << m.error;
      EXPECT_EQ(m.map, bitep::ref::pack_bitmap(full.map.data(), T, E)) << what;
    }
}

// The compact outputs of the kernels that stage them in shared memory (every kernel but the post-top-k softmax's
// holders), at many tiles a warp (fp16 logits: the any-path kernel's persistent grid, a warp's stage reused) and at one
// (the spec kernels), E = 8 G NS or not, the last tile partly past T: each token's indices are its map's experts in
// ascending order, its weights its probs at them, bit for bit; and the compact outputs alone are the same bits.
TEST(RouterGpu, CompactOutputsThroughTheStage) {
  REQUIRE_GPU();
  struct Case {
    int E, k;
    bitepScoreFunction_t fn;
    int pre;
    bitepDataType_t dt;
    int groups, group_topk;
    int kernel;  // last_router_forward_kernel: 0 any path, 2 pre-top-k softmax, 3 normalised sigmoid, 4 DeepSeek-V3
  };
  const int64_t T = 40001;
  for (const Case c : {Case{64, 6, bitepScoreSoftmax, 1, bitepFloat16, 0, 0, 0},
                       Case{130, 8, bitepScoreSigmoid, 0, bitepFloat16, 0, 0, 0},
                       Case{256, 8, bitepScoreSigmoid, 0, bitepFloat16, 8, 4, 0},
                       Case{512, 8, bitepScoreSqrtSoftplus, 0, bitepFloat16, 0, 0, 0},
                       Case{1000, 32, bitepScoreSoftmax, 0, bitepFloat16, 0, 0, 0},
                       Case{64, 6, bitepScoreSoftmax, 1, bitepBfloat16, 0, 0, 2},
                       Case{256, 8, bitepScoreSoftmax, 1, bitepBfloat16, 0, 0, 2},
                       Case{512, 8, bitepScoreSoftmax, 1, bitepFloat32, 0, 0, 2},
                       Case{128, 8, bitepScoreSigmoid, 0, bitepBfloat16, 0, 0, 3},
                       Case{256, 8, bitepScoreSigmoid, 0, bitepBfloat16, 8, 4, 4}}) {
    const std::string what = "E=" + std::to_string(c.E) + " k=" + std::to_string(c.k) + " kernel " +
                             std::to_string(c.kernel) + " dtype " + std::to_string(static_cast<int>(c.dt));
    bitepRouterConfig_t cfg = make_config(c.E, c.k, c.fn, c.pre, c.dt);
    cfg.num_groups = c.groups;
    cfg.group_topk = c.group_topk;
    cfg.scaling_factor = 2.5f;
    const auto logits = make_logits(T, c.E, c.dt, 91 + c.E);
    const std::vector<float> bias = c.fn == bitepScoreSoftmax ? std::vector<float>{} : make_bias(c.E, 5 + c.E);
    FwdSpec all;
    all.map = bitepMapBitmapU8;
    const FwdOut full = run_forward(bitepBackendCuda, cfg, T, logits, bias, all);
    ASSERT_EQ(full.rc, bitepSuccess) << what << ": " << full.error;
    EXPECT_TRUE(full.guards) << what;
    EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), c.kernel) << what << ": the kernel chosen";
    const int row = (c.E + 7) / 8;
    int64_t bad = 0, first_bad = -1;
    std::vector<int32_t> experts;
    for (int64_t t = 0; t < T; ++t) {
      experts.clear();
      for (int e = 0; e < c.E; ++e)
        if ((full.map[t * row + e / 8] >> (e % 8)) & 1) experts.push_back(e);
      bool ok = static_cast<int>(experts.size()) == c.k &&
                std::equal(experts.begin(), experts.end(), full.indices.begin() + t * c.k);
      for (int j = 0; ok && j < c.k; ++j)
        ok = std::memcmp(&full.weights[t * c.k + j], &full.probs[t * c.E + experts[j]], sizeof(float)) == 0;
      if (!ok && bad++ == 0) first_bad = t;
    }
    EXPECT_EQ(bad, 0) << what << ": tokens whose compact outputs are not their map's and probs' (first: " << first_bad
                      << ")";
    FwdSpec compact;
    compact.probs = compact.saved = false;
    compact.map = bitepMapBitmapU8;
    const FwdOut co = run_forward(bitepBackendCuda, cfg, T, logits, bias, compact);
    ASSERT_EQ(co.rc, bitepSuccess) << what << ": " << co.error;
    EXPECT_TRUE(co.guards) << what;
    EXPECT_EQ(bitep::kernels::last_router_forward_kernel(), c.kernel) << what << " compact outputs alone";
    EXPECT_EQ(co.indices, full.indices) << what << " compact outputs alone";
    EXPECT_EQ(count_bit_diffs(co.weights, full.weights), 0) << what << " compact outputs alone";
    EXPECT_EQ(co.map, full.map) << what << " compact outputs alone";
  }
}

// The generic kernel holds a block's group scores in shared memory: one group past what fits is refused with
// bitepNotSupported naming config->num_groups, before anything is written (rank_counts keeps its poison, 0xff
// bytes); the most that fit routes as the host does.
TEST(RouterGpu, GroupsPastSharedMemory) {
  REQUIRE_GPU();
  int max_groups = 0;
  ASSERT_EQ(bitep::kernels::router_forward_max_groups(&max_groups), cudaSuccess);
  ASSERT_GT(max_groups, 1000);
  const int64_t T = 3;
  FwdSpec spec;
  spec.map = bitepMapBitmapU8;
  spec.num_ranks = 1;
  for (int groups : {max_groups + 1, max_groups}) {
    bitepRouterConfig_t cfg = make_config(groups, 2, bitepScoreSigmoid, 0, bitepFloat32);
    cfg.num_groups = groups;  // one expert a group
    cfg.group_topk = 2;
    const auto logits = make_logits(T, groups, bitepFloat32, 9);
    const FwdOut got = run_forward(bitepBackendCuda, cfg, T, logits, {}, spec);
    if (groups > max_groups) {
      EXPECT_EQ(got.rc, bitepNotSupported) << got.error;
      EXPECT_NE(got.error.find("config->num_groups"), std::string::npos) << got.error;
      EXPECT_EQ(got.rank_counts, std::vector<int32_t>(1, -1)) << "rank_counts written on a refused call";
    } else {
      ASSERT_EQ(got.rc, bitepSuccess) << got.error;
      const FwdOut want = run_forward(bitepBackendHost, cfg, T, logits, {}, spec);
      ASSERT_EQ(want.rc, bitepSuccess) << want.error;
      EXPECT_EQ(got.map, want.map);
      EXPECT_EQ(got.rank_counts, want.rank_counts);
    }
    EXPECT_TRUE(got.guards);
  }
}

// CUDA graphs: the router forward (TE-compatible outputs, the bitmap, the compact weights and indices, the rank
// epilogue) captured in global mode on a stream of its own keeps the capture valid, and each launch of the graph gives
// the outputs of a call made one by one on the logits its input buffer holds then (two logit sets, alternating, the
// outputs poisoned before each launch). DeepSeek-V3's config too (groups, bias, scaling).
// The cuda backend takes memory of the device it runs on: a host pointer, and another GPU's memory, are refused
// naming the argument and the devices, with the outputs untouched; managed memory is accepted and routes as device
// memory does. The host backend refuses device memory. (Another GPU's part needs two visible devices.)
TEST(RouterGpu, BuffersInTheWrongMemorySpace) {
  REQUIRE_GPU();
  const int64_t T = 64;
  const int E = 64, MB = row_map_bytes(bitepMapBitmapU8, E);
  const bitepRouterConfig_t cfg = make_config(E, 8, bitepScoreSoftmax, 0, bitepFloat32);
  const std::vector<uint8_t> logits = make_logits(T, E, bitepFloat32, 31);
  int current = -1;
  CUDA_OK(cudaGetDevice(&current));
  DevBuf dlogits(logits.size()), map(T * MB);
  ASSERT_NE(dlogits.ptr(), nullptr);
  ASSERT_NE(map.ptr(), nullptr);
  dlogits.upload(logits.data());
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = dlogits.ptr();
  a.routing_map = map.ptr();
  a.map_format = bitepMapBitmapU8;
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<uint8_t> want = map.download<uint8_t>();
  // A refused call names the argument and the rule, and leaves the map as it was (poisoned here).
  auto expect_refused = [&](bitepBackend_t backend, const bitepRouterForwardArgs_t& bad, const char* arg,
                            const std::string& rule) {
    map.poison();
    const bitepResult_t r = bitepRouterForward(backend, &cfg, &bad, nullptr);
    const std::string msg = bitepGetLastError();
    EXPECT_EQ(r, bitepInvalidArgument) << arg << ": " << msg;
    EXPECT_NE(msg.find(arg), std::string::npos) << msg;
    EXPECT_NE(msg.find(rule), std::string::npos) << msg;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint8_t> after = map.download<uint8_t>();
    EXPECT_TRUE(std::all_of(after.begin(), after.end(), [](uint8_t b) { return b == 0xff; })) << arg;
  };
  {
    bitepRouterForwardArgs_t bad = a;
    bad.logits = logits.data();  // host memory
    expect_refused(bitepBackendCuda, bad, "args->logits", "is not device memory");
  }
  {
    std::vector<uint8_t> host_map(T * MB);
    bitepRouterForwardArgs_t bad = a;
    bad.logits = logits.data();
    bad.routing_map = host_map.data();
    bad.probs = static_cast<float*>(dlogits.ptr());  // device memory, to the host backend
    const bitepResult_t r = bitepRouterForward(bitepBackendHost, &cfg, &bad, nullptr);
    const std::string msg = bitepGetLastError();
    EXPECT_EQ(r, bitepInvalidArgument) << msg;
    EXPECT_NE(msg.find("args->probs"), std::string::npos) << msg;
    EXPECT_NE(msg.find("is device memory"), std::string::npos) << msg;
  }
  {
    void* managed = nullptr;
    CUDA_OK(cudaMallocManaged(&managed, logits.size()));
    std::memcpy(managed, logits.data(), logits.size());
    bitepRouterForwardArgs_t m = a;
    m.logits = managed;
    map.poison();
    const bitepResult_t r = bitepRouterForward(bitepBackendCuda, &cfg, &m, nullptr);
    const std::string msg = r == bitepSuccess ? "" : bitepGetLastError();
    const cudaError_t sync = cudaDeviceSynchronize();
    cudaFree(managed);
    EXPECT_EQ(r, bitepSuccess) << msg;
    ASSERT_EQ(sync, cudaSuccess);
    EXPECT_EQ(map.download<uint8_t>(), want) << "managed logits";
  }
  int count = 0;
  CUDA_OK(cudaGetDeviceCount(&count));
  if (count < 2) {
    std::cout << "[ note     ] one CUDA device visible: another GPU's memory not tried\n";
    return;
  }
  const int other = (current + 1) % count;
  void* far = nullptr;
  CUDA_OK(cudaSetDevice(other));
  const cudaError_t alloc = cudaMalloc(&far, logits.size());
  if (alloc == cudaSuccess) cudaMemcpy(far, logits.data(), logits.size(), cudaMemcpyHostToDevice);
  CUDA_OK(cudaSetDevice(current));
  ASSERT_EQ(alloc, cudaSuccess);
  bitepRouterForwardArgs_t bad = a;
  bad.logits = far;
  expect_refused(
      bitepBackendCuda, bad, "args->logits",
      "is memory of CUDA device " + std::to_string(other) + ", but the call runs on device " + std::to_string(current));
  CUDA_OK(cudaSetDevice(other));
  cudaFree(far);
  CUDA_OK(cudaSetDevice(current));
}

TEST(RouterGpu, CapturedInCudaGraph) {
  REQUIRE_GPU();
  const int64_t T = 300;
  for (const bool dsv3 : {false, true}) {
    SCOPED_TRACE(dsv3 ? "DeepSeek-V3 config" : "post-top-k softmax");
    const int E = 256, k = 8, W = 4;
    bitepRouterConfig_t cfg = make_config(E, k, dsv3 ? bitepScoreSigmoid : bitepScoreSoftmax, 0, bitepBfloat16);
    if (dsv3) cfg.num_groups = 8, cfg.group_topk = 4, cfg.scaling_factor = 2.5f;
    const std::vector<uint8_t> la = make_logits(T, E, bitepBfloat16, 71), lb = make_logits(T, E, bitepBfloat16, 72);
    std::vector<float> bias(E);
    for (int e = 0; e < E; ++e) bias[e] = 0.01f * static_cast<float>(e % 7);
    DevBuf lg(la.size()), db(sizeof(float) * E), probs(sizeof(float) * T * E), saved(sizeof(float) * T * E),
        map(static_cast<size_t>(T) * E / 8), w(sizeof(float) * T * k), ix(sizeof(int32_t) * T * k),
        rmask(static_cast<size_t>(T)), rcount(sizeof(int32_t) * W);
    ASSERT_NE(rcount.ptr(), nullptr);
    db.upload(bias.data());
    bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
    a.num_tokens = T;
    a.logits = lg.ptr();
    a.expert_bias = dsv3 ? static_cast<const float*>(db.ptr()) : nullptr;
    a.probs = static_cast<float*>(probs.ptr());
    a.saved = static_cast<float*>(saved.ptr());
    a.routing_map = map.ptr();
    a.map_format = bitepMapBitmapU8;
    a.topk_weights = static_cast<float*>(w.ptr());
    a.topk_indices = static_cast<int32_t*>(ix.ptr());
    a.num_ranks = W;
    a.rank_mask = static_cast<uint8_t*>(rmask.ptr());
    a.rank_counts = static_cast<int32_t*>(rcount.ptr());
    const DevBuf* outs[] = {&probs, &saved, &map, &w, &ix, &rmask, &rcount};
    auto outputs = [&] {
      std::vector<std::vector<uint8_t>> v;
      for (const DevBuf* b : outs) v.push_back(b->download<uint8_t>());
      return v;
    };
    auto poison = [&] {
      for (const DevBuf* b : outs) b->poison();
    };
    // Calls made one by one: the outputs each logit set must give.
    std::vector<std::vector<uint8_t>> want[2];
    for (int i = 0; i < 2; ++i) {
      lg.upload(i == 0 ? la.data() : lb.data());
      poison();
      ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
      CUDA_OK(cudaDeviceSynchronize());
      want[i] = outputs();
    }
    cudaStream_t s = nullptr;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    const bitepResult_t r = bitepRouterForward(bitepBackendCuda, &cfg, &a, reinterpret_cast<bitepStream_t>(s));
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EXPECT_EQ(cudaStreamIsCapturing(s, &status), cudaSuccess);
    EXPECT_EQ(status, cudaStreamCaptureStatusActive) << "bitepRouterForward broke the capture";
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(s, &graph);
    cudaGraphExec_t exec = nullptr;
    const bool made = r == bitepSuccess && ended == cudaSuccess && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    EXPECT_EQ(r, bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(ended, cudaSuccess);
    EXPECT_TRUE(made);
    for (int launch = 0; made && launch < 4; ++launch) {
      const int i = (launch + 1) % 2;  // b, a, b, a
      lg.upload(i == 0 ? la.data() : lb.data());
      poison();
      CUDA_OK(cudaDeviceSynchronize());
      CUDA_OK(cudaGraphLaunch(exec, s));
      CUDA_OK(cudaStreamSynchronize(s));
      const auto got = outputs();
      for (size_t o = 0; o < got.size(); ++o)
        EXPECT_TRUE(got[o] == want[i][o]) << "output " << o << " of launch " << launch << " differs from the call's";
      for (const DevBuf* b : outs) EXPECT_TRUE(b->guard_intact());
    }
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaStreamDestroy(s);
    (void)cudaGetLastError();
  }
}

// Aux loss: GPU vs host, forward and backward; the forward is bit-identical run to run.
void large_token_count_case(int E, int64_t T) {
  const int k = 8, tile = 256;
  size_t free_b = 0, total_b = 0;
  CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
  const size_t need = static_cast<size_t>(T) * E * 2 + static_cast<size_t>(T) * (E / 8 + 8 * k) + (size_t{1} << 30);
  if (free_b < need) GTEST_SKIP() << "needs " << (need >> 20) << " MiB of device memory, " << (free_b >> 20) << " free";
  // Post-top-k softmax selects on the logits themselves: no rounding, so no near-ties to excuse.
  const bitepRouterConfig_t cfg = make_config(E, k, bitepScoreSoftmax, 0, bitepBfloat16);
  const auto tl = make_logits(tile, E, bitepBfloat16, 4242);
  FwdSpec s;
  s.probs = s.saved = false;
  s.map = bitepMapBitmapU8;
  const FwdOut want = run_forward(bitepBackendHost, cfg, tile, tl, {}, s);
  ASSERT_EQ(want.rc, bitepSuccess) << want.error;

  DevBuf lg(static_cast<size_t>(T) * E * 2), mp(static_cast<size_t>(T) * E / 8), ix(static_cast<size_t>(T) * k * 4),
      w(static_cast<size_t>(T) * k * 4);
  ASSERT_NE(lg.ptr(), nullptr);
  CUDA_OK(fill_repeating(lg.ptr(), lg.bytes, tl.data(), tl.size()));
  mp.poison(), ix.poison(), w.poison();
  bitepRouterForwardArgs_t a = BITEP_ROUTER_FWD_ARGS_INIT;
  a.num_tokens = T;
  a.logits = lg.ptr();
  a.routing_map = mp.ptr();
  a.map_format = bitepMapBitmapU8;
  a.topk_indices = static_cast<int32_t*>(ix.ptr());
  a.topk_weights = static_cast<float*>(w.ptr());
  ASSERT_EQ(bitepRouterForward(bitepBackendCuda, &cfg, &a, nullptr), bitepSuccess) << bitepGetLastError();
  CUDA_OK(cudaDeviceSynchronize());
  for (int64_t first : {int64_t{0}, T - 2 * tile}) {
    std::vector<int32_t> got(2 * tile * k);
    std::vector<uint8_t> map(2 * tile * E / 8);
    CUDA_OK(
        cudaMemcpy(got.data(), static_cast<int32_t*>(ix.ptr()) + first * k, got.size() * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(
        cudaMemcpy(map.data(), static_cast<uint8_t*>(mp.ptr()) + first * E / 8, map.size(), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < 2 * tile; ++i) {
      const int64_t r = (first + i) % tile;
      ASSERT_TRUE(std::equal(got.begin() + i * k, got.begin() + (i + 1) * k, want.indices.begin() + r * k))
          << "token " << first + i;
      ASSERT_TRUE(std::equal(map.begin() + i * E / 8, map.begin() + (i + 1) * E / 8, want.map.begin() + r * E / 8))
          << "bitmap row of token " << first + i;
    }
  }
  EXPECT_TRUE(mp.guard_intact() && ix.guard_intact() && w.guard_intact());
}

// 64-bit indexing: T * E > 2^31 (bf16 logits: 4.3 GB), at E = 2048 and at E = 256 (whose post-softmax
// kernels, with 32-bit offsets, stop at (T + 256) * E < 2^31: the any-path kernel takes over past it; just
// below, the 32-bit kernels' largest offsets). Rows repeat a 256-row tile, so the expected experts of any
// row are the host's for its tile row; the first and last rows are checked.
TEST(RouterGpu, LargeTokenCount64BitIndexing) {
  REQUIRE_GPU();
  struct Shape {
    int E;
    int64_t T;
  };
  for (const Shape sh :
       {Shape{2048, (int64_t{1} << 31) / 2048 + 300}, Shape{256, (int64_t{1} << 31) / 256 + 300},
        Shape{256, (int64_t{1} << 31) / 256 - 256 - 40}, Shape{2048, (int64_t{1} << 31) / 2048 - 256 - 40}}) {
    SCOPED_TRACE("E=" + std::to_string(sh.E) + " T=" + std::to_string(sh.T));
    large_token_count_case(sh.E, sh.T);
    if (HasFatalFailure()) return;
  }
}

}  // namespace