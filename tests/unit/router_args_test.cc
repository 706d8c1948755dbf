// SPDX-License-Identifier: Apache-2.0
// Bad arguments through the C API: bitepInvalidArgument with a message naming the argument, and
// nothing written. One test per rule.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "bitep/bitep.h"

namespace {

constexpr int64_t kT = 4;
constexpr int kE = 16;

class RouterArgs : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg = BITEP_ROUTER_CONFIG_INIT;
    cfg.num_experts = kE;
    cfg.topk = 2;
    logits.assign(kT * kE, 0.5f);
    for (int i = 0; i < kT * kE; ++i) logits[i] = static_cast<float>((i * 7) % 13);
    probs.assign(kT * kE, -3.0f);
    bitmap.assign(kT * 2, 0xEE);
    args = BITEP_ROUTER_FWD_ARGS_INIT;
    args.num_tokens = kT;
    args.logits = logits.data();
    args.probs = probs.data();
    args.routing_map = bitmap.data();
    args.map_format = bitepMapBitmapU8;
  }

  // Expects bitepInvalidArgument naming `what`, and the outputs untouched.
  void expect_rejected(const char* what, bitepResult_t want = bitepInvalidArgument) {
    const bitepResult_t r = bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr);
    EXPECT_EQ(r, want) << bitepGetErrorString(r);
    const std::string msg = bitepGetLastError();
    EXPECT_NE(msg.find(what), std::string::npos) << "message does not name '" << what << "': " << msg;
    EXPECT_EQ(msg.rfind("bitepRouterForward: ", 0), 0u) << msg;
    for (float p : probs) ASSERT_EQ(p, -3.0f) << "an output was written on a rejected call";
    for (uint8_t b : bitmap) ASSERT_EQ(b, 0xEE) << "an output was written on a rejected call";
  }

  bitepRouterConfig_t cfg;
  bitepRouterForwardArgs_t args;
  std::vector<float> logits, probs;
  std::vector<uint8_t> bitmap;
};

TEST_F(RouterArgs, ValidCallSucceeds) {
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr), bitepSuccess) << bitepGetLastError();
  int set = 0;
  for (uint8_t b : bitmap) set += __builtin_popcount(b);
  EXPECT_EQ(set, kT * 2);
}

TEST_F(RouterArgs, NullConfig) {
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, nullptr, &args, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("config is NULL"), std::string::npos) << bitepGetLastError();
}
TEST_F(RouterArgs, NullArgs) {
  EXPECT_EQ(bitepRouterForward(bitepBackendHost, &cfg, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args is NULL"), std::string::npos) << bitepGetLastError();
}
TEST_F(RouterArgs, ConfigNotInitialised) {
  cfg.magic = 0;
  expect_rejected("BITEP_ROUTER_CONFIG_INIT");
}
TEST_F(RouterArgs, ConfigWrongSize) {
  cfg.size = sizeof(cfg) - 4;
  expect_rejected("config->size");
}
TEST_F(RouterArgs, ArgsNotInitialised) {
  args.magic = 1;
  expect_rejected("BITEP_ROUTER_FWD_ARGS_INIT");
}
TEST_F(RouterArgs, ZeroExperts) {
  cfg.num_experts = 0;
  expect_rejected("config->num_experts");
}
TEST_F(RouterArgs, TopkAboveExperts) {
  cfg.topk = kE + 1;
  expect_rejected("config->topk");
}
TEST_F(RouterArgs, TopkZero) {
  cfg.topk = 0;
  expect_rejected("config->topk");
}
TEST_F(RouterArgs, UnknownScoreFunction) {
  cfg.score_function = static_cast<bitepScoreFunction_t>(7);
  expect_rejected("config->score_function");
}
TEST_F(RouterArgs, UnknownLogitsDtype) {
  cfg.logits_dtype = static_cast<bitepDataType_t>(9);
  expect_rejected("config->logits_dtype");
}
TEST_F(RouterArgs, UnknownBackend) {
  const bitepResult_t r = bitepRouterForward(static_cast<bitepBackend_t>(5), &cfg, &args, nullptr);
  EXPECT_EQ(r, bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("backend"), std::string::npos);
}
TEST_F(RouterArgs, UnknownMapFormat) {
  args.map_format = static_cast<bitepMapFormat_t>(11);
  expect_rejected("args->map_format");
}
TEST_F(RouterArgs, TopkIndicesIsNotARouterOutputFormat) {
  args.map_format = bitepMapTopkIndices;
  expect_rejected("args->map_format");
}
TEST_F(RouterArgs, MapWithoutFormat) {
  args.map_format = bitepMapNone;
  expect_rejected("args->map_format");
}
TEST_F(RouterArgs, FormatWithoutMap) {
  args.routing_map = nullptr;
  expect_rejected("args->routing_map");
}
TEST_F(RouterArgs, PreSoftmaxWithSigmoid) {
  cfg.score_function = bitepScoreSigmoid;
  cfg.use_pre_softmax = 1;
  expect_rejected("use_pre_softmax");
}
TEST_F(RouterArgs, ExpertsNotDivisibleByGroups) {
  cfg.num_groups = 3;
  cfg.group_topk = 1;
  expect_rejected("config->num_groups");
}
TEST_F(RouterArgs, GroupTopkAboveGroups) {
  cfg.num_groups = 4;
  cfg.group_topk = 5;
  expect_rejected("config->group_topk");
}
TEST_F(RouterArgs, GroupTopkAboveTopk) {
  cfg.num_groups = 4;
  cfg.group_topk = 3;
  expect_rejected("config->group_topk");
}
TEST_F(RouterArgs, GroupTopkWithoutGroups) {
  cfg.group_topk = 2;
  expect_rejected("config->group_topk");
}
TEST_F(RouterArgs, PerGroupAboveGroupSize) {
  cfg.topk = 8;
  cfg.num_groups = 8;  // 2 experts per group; a kept group's score would sum its best 8 / 2 = 4
  cfg.group_topk = 2;
  expect_rejected("experts per group");
}
TEST_F(RouterArgs, TooFewCandidates) {
  cfg.topk = 5;
  cfg.num_groups = 8;  // 2 experts per group, 2 groups kept: 4 candidates < k (each group's score: its best 2)
  cfg.group_topk = 2;
  expect_rejected("too few candidate experts");
}
TEST_F(RouterArgs, NonFiniteScaling) {
  cfg.scaling_factor = INFINITY;
  expect_rejected("config->scaling_factor");
}
TEST_F(RouterArgs, NegativeTokens) {
  args.num_tokens = -1;
  expect_rejected("args->num_tokens");
}
TEST_F(RouterArgs, TokenCountOverflow) {
  args.num_tokens = INT64_MAX / 8;
  expect_rejected("overflows");
}
TEST_F(RouterArgs, NullLogits) {
  args.logits = nullptr;
  expect_rejected("args->logits");
}
TEST_F(RouterArgs, BiasWithSoftmax) {
  std::vector<float> bias(kE, 0.0f);
  args.expert_bias = bias.data();
  expect_rejected("args->expert_bias");
}
TEST_F(RouterArgs, RanksNotDividingExperts) {
  std::vector<int32_t> counts(3);
  args.num_ranks = 3;
  args.rank_counts = counts.data();
  expect_rejected("args->num_ranks");
}
TEST_F(RouterArgs, RankCountsPastInt32) {  // checked before any buffer: the pointers need not hold 2^31 rows
  std::vector<int32_t> counts(4, 7);
  args.num_tokens = int64_t{1} << 31;
  args.num_ranks = 4;
  args.rank_counts = counts.data();
  expect_rejected("INT32_MAX with args->rank_counts");
  EXPECT_EQ(counts, std::vector<int32_t>(4, 7)) << "rank_counts written on a rejected call";
}
TEST_F(RouterArgs, RankOutputsWithoutRanks) {
  std::vector<int32_t> counts(3);
  args.rank_counts = counts.data();
  expect_rejected("args->num_ranks");
}
TEST_F(RouterArgs, MisalignedProbs) {
  std::vector<float> big(kT * kE + 1, -3.0f);
  args.probs = reinterpret_cast<float*>(reinterpret_cast<char*>(big.data()) + 2);
  expect_rejected("args->probs");
}
TEST_F(RouterArgs, OutputOverlapsInput) {
  args.probs = const_cast<float*>(logits.data());
  expect_rejected("overlaps");
}
TEST_F(RouterArgs, OutputsOverlapEachOther) {
  std::vector<float> saved_and_weights(kT * kE, 0.0f);
  args.saved = saved_and_weights.data();
  args.topk_weights = saved_and_weights.data() + 8;
  expect_rejected("overlaps");
}
TEST_F(RouterArgs, AuxScoresNeedScores) {
  args.probs = nullptr;
  const bitepResult_t r = bitepAuxScoresForward(bitepBackendHost, &cfg, &args, nullptr);
  EXPECT_EQ(r, bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->probs"), std::string::npos) << bitepGetLastError();
}
TEST_F(RouterArgs, UnknownLaunchFlag) {
  args.launch_flags = BITEP_LAUNCH_PDL | 0x4;
  expect_rejected("args->launch_flags is 0x5");
}
TEST_F(RouterArgs, UnknownLaunchFlagWithZeroTokens) {  // checked before a call without tokens returns
  args.num_tokens = 0;
  args.launch_flags = -1;
  expect_rejected("args->launch_flags");
}
// The host backend takes BITEP_LAUNCH_PDL and ignores it: the same outputs.
TEST_F(RouterArgs, PdlFlagOnTheHostBackend) {
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr), bitepSuccess) << bitepGetLastError();
  const std::vector<float> want_probs = probs;
  const std::vector<uint8_t> want_map = bitmap;
  probs.assign(probs.size(), -3.0f);
  bitmap.assign(bitmap.size(), 0xEE);
  args.launch_flags = BITEP_LAUNCH_PDL;
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(probs, want_probs);
  EXPECT_EQ(bitmap, want_map);
}
TEST_F(RouterArgs, ZeroTokensReturnsAtOnceAndZeroesCounts) {
  std::vector<int32_t> counts(4, 99);
  args.num_tokens = 0;
  args.num_ranks = 4;
  args.rank_counts = counts.data();
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(counts, std::vector<int32_t>(4, 0));
  for (float p : probs) EXPECT_EQ(p, -3.0f);
}

TEST_F(RouterArgs, CudaBackendWithoutCuda) {
  int avail = -1;
  ASSERT_EQ(bitepCudaAvailable(&avail), bitepSuccess);
  if (avail) GTEST_SKIP() << "SKIPPED: a CUDA device is visible, this test covers builds and machines without one";
  const bitepResult_t r = bitepRouterForward(bitepBackendCuda, &cfg, &args, nullptr);
  // Without CUDA in the build: bitepNotSupported; with CUDA but host pointers: bitepInvalidArgument.
  EXPECT_TRUE(r == bitepNotSupported || r == bitepInvalidArgument) << bitepGetErrorString(r);
  EXPECT_FALSE(std::string(bitepGetLastError()).empty());
}

class RouterBackwardArgs : public RouterArgs {
 protected:
  // A valid recompute-mode backward over the fixture's bitmap and logits, into gl (-3 everywhere).
  bitepRouterBackwardArgs_t backward_args() {
    gp.assign(kT * kE, 1.0f);
    gl.assign(kT * kE, -3.0f);
    bitepRouterBackwardArgs_t b = BITEP_ROUTER_BWD_ARGS_INIT;
    b.num_tokens = kT;
    b.grad_probs = gp.data();
    b.routing_map = bitmap.data();
    b.map_format = bitepMapBitmapU8;
    b.logits = logits.data();
    b.grad_logits = gl.data();
    return b;
  }
  std::vector<float> gp, gl;
};

TEST_F(RouterBackwardArgs, NeedsSavedOrLogits) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.logits = nullptr;
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->saved and args->logits"), std::string::npos)
      << bitepGetLastError();
  for (float v : gl) ASSERT_EQ(v, -3.0f);
}

TEST_F(RouterBackwardArgs, NeedsTheMap) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.routing_map = nullptr;
  b.map_format = bitepMapNone;
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("map"), std::string::npos) << bitepGetLastError();
}

TEST_F(RouterBackwardArgs, UnknownLaunchFlag) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.launch_flags = 2;
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->launch_flags is 0x2"), std::string::npos)
      << bitepGetLastError();
  for (float v : gl) ASSERT_EQ(v, -3.0f);
  b.launch_flags = BITEP_LAUNCH_PDL;  // taken, and ignored by the host backend
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr), bitepSuccess) << bitepGetLastError();
}

class AuxLossArgs : public ::testing::Test {
 protected:
  // A valid aux-loss forward of 2 tokens over 4 experts into loss (-1).
  bitepAuxLossArgs_t forward_args() {
    bitepAuxLossArgs_t a = BITEP_AUX_LOSS_ARGS_INIT;
    a.num_tokens = 2;
    a.num_experts = 4;
    a.topk = 1;
    a.total_num_tokens = 2;
    a.probs = probs.data();
    a.tokens_per_expert = tpe.data();
    a.loss = &loss;
    return a;
  }
  std::vector<float> probs = std::vector<float>(8, 0.1f);
  std::vector<int32_t> tpe = std::vector<int32_t>(4, 1);
  float loss = -1.0f;
};

TEST_F(AuxLossArgs, UnknownLaunchFlag) {
  bitepAuxLossArgs_t a = forward_args();
  a.launch_flags = 8;
  EXPECT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->launch_flags"), std::string::npos);
  EXPECT_EQ(loss, -1.0f);
  a.launch_flags = BITEP_LAUNCH_PDL;
  EXPECT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_NE(loss, -1.0f);
}

TEST_F(AuxLossArgs, RejectsZeroTotalTokens) {
  bitepAuxLossArgs_t a = forward_args();
  a.total_num_tokens = 0;
  EXPECT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args->total_num_tokens"), std::string::npos);
  EXPECT_EQ(loss, -1.0f);
}

}  // namespace
