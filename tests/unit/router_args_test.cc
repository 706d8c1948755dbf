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

// r is `want` (bitepInvalidArgument unless said), and the last error starts with "api: " and names `what`.
void expect_refused(bitepResult_t r, const char* api, const char* what, bitepResult_t want = bitepInvalidArgument) {
  EXPECT_EQ(r, want) << bitepGetErrorString(r);
  const std::string msg = bitepGetLastError();
  EXPECT_NE(msg.find(what), std::string::npos) << "message does not name '" << what << "': " << msg;
  EXPECT_EQ(msg.rfind(std::string(api) + ": ", 0), 0u) << msg;
}

// p moved 2 bytes on: a pointer misaligned for any element wider than 2 bytes.
template <typename T>
T* two_bytes_on(T* p) {
  return reinterpret_cast<T*>(reinterpret_cast<char*>(p) + 2);
}

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
    expect_rejected_by(bitepRouterForward, "bitepRouterForward", what, want);
  }
  // The same through bitepAuxScoresForward.
  void expect_aux_scores_rejected(const char* what) {
    expect_rejected_by(bitepAuxScoresForward, "bitepAuxScoresForward", what, bitepInvalidArgument);
  }
  void expect_rejected_by(
      bitepResult_t (*fn)(bitepBackend_t, const bitepRouterConfig_t*, const bitepRouterForwardArgs_t*, bitepStream_t),
      const char* api,
      const char* what,
      bitepResult_t want) {
    expect_refused(fn(bitepBackendHost, &cfg, &args, nullptr), api, what, want);
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
TEST_F(RouterArgs, ArgsWrongSize) {
  args.size = sizeof(args) + 8;
  expect_rejected("args->size");
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
TEST_F(RouterArgs, GroupTopkZeroWithGroups) {
  cfg.num_groups = 4;
  cfg.group_topk = 0;
  expect_rejected("config->group_topk is 0");
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
  args.probs = two_bytes_on(big.data());
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
  expect_aux_scores_rejected("args->probs");
}
TEST_F(RouterArgs, AuxScoresTakeNoTopkOutputs) {
  std::vector<int32_t> indices(kT * 2, -7);
  args.topk_indices = indices.data();
  expect_aux_scores_rejected("args->topk_indices");
  EXPECT_EQ(indices, std::vector<int32_t>(kT * 2, -7)) << "topk_indices written on a rejected call";
  args.topk_indices = nullptr;
  args.num_ranks = 2;
  expect_aux_scores_rejected("args->num_ranks");
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
  // Expects bitepInvalidArgument naming `what` from bitepRouterBackward (bitepAuxScoresBackward with aux_scores), and
  // grad_logits and grad_probs untouched.
  void expect_backward_rejected(const bitepRouterBackwardArgs_t& b, const char* what, bool aux_scores = false) {
    expect_refused(aux_scores ? bitepAuxScoresBackward(bitepBackendHost, &cfg, &b, nullptr)
                              : bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr),
                   aux_scores ? "bitepAuxScoresBackward" : "bitepRouterBackward", what);
    for (float v : gl) ASSERT_EQ(v, -3.0f) << "an output was written on a rejected call";
    for (float v : gp) ASSERT_EQ(v, 1.0f) << "an input was written on a rejected call";
  }
  std::vector<float> gp, gl;
};

TEST_F(RouterBackwardArgs, ValidCallsSucceed) {
  ASSERT_EQ(bitepRouterForward(bitepBackendHost, &cfg, &args, nullptr), bitepSuccess) << bitepGetLastError();
  bitepRouterBackwardArgs_t b = backward_args();
  ASSERT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, &b, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_NE(gl, std::vector<float>(kT * kE, -3.0f));
  b = backward_args();  // the aux-loss scores' backward needs no map
  b.routing_map = nullptr;
  b.map_format = bitepMapNone;
  ASSERT_EQ(bitepAuxScoresBackward(bitepBackendHost, &cfg, &b, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_NE(gl, std::vector<float>(kT * kE, -3.0f));
}

TEST_F(RouterBackwardArgs, NullArgs) {
  EXPECT_EQ(bitepRouterBackward(bitepBackendHost, &cfg, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args is NULL"), std::string::npos) << bitepGetLastError();
  EXPECT_EQ(bitepAuxScoresBackward(bitepBackendHost, &cfg, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args is NULL"), std::string::npos) << bitepGetLastError();
}
TEST_F(RouterBackwardArgs, ArgsNotInitialised) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.magic = BITEP_ROUTER_FWD_ARGS_MAGIC;
  expect_backward_rejected(b, "BITEP_ROUTER_BWD_ARGS_INIT");
  expect_backward_rejected(b, "BITEP_ROUTER_BWD_ARGS_INIT", /*aux_scores=*/true);
}
TEST_F(RouterBackwardArgs, ArgsWrongSize) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.size = sizeof(b) - 8;
  expect_backward_rejected(b, "args->size");
  expect_backward_rejected(b, "args->size", /*aux_scores=*/true);
}
TEST_F(RouterBackwardArgs, UnknownMapFormat) {
  bitepRouterBackwardArgs_t b = backward_args();
  for (bitepMapFormat_t f : {static_cast<bitepMapFormat_t>(77), bitepMapTopkIndices}) {
    b.map_format = f;
    expect_backward_rejected(b, "args->map_format");
  }
}
TEST_F(RouterBackwardArgs, NeedsSavedOrLogits) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.logits = nullptr;
  expect_backward_rejected(b, "args->saved and args->logits");
  expect_backward_rejected(b, "args->saved and args->logits", /*aux_scores=*/true);
}
TEST_F(RouterBackwardArgs, NullGradProbs) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.grad_probs = nullptr;
  expect_backward_rejected(b, "args->grad_probs");
  expect_backward_rejected(b, "args->grad_probs", /*aux_scores=*/true);
}
TEST_F(RouterBackwardArgs, NullGradLogits) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.grad_logits = nullptr;
  expect_backward_rejected(b, "args->grad_logits");
  expect_backward_rejected(b, "args->grad_logits", /*aux_scores=*/true);
}
TEST_F(RouterBackwardArgs, MisalignedGradLogits) {
  std::vector<float> big(kT * kE + 1, -3.0f);
  bitepRouterBackwardArgs_t b = backward_args();
  b.grad_logits = reinterpret_cast<char*>(big.data()) + 2;
  expect_backward_rejected(b, "args->grad_logits");
  expect_backward_rejected(b, "args->grad_logits", /*aux_scores=*/true);
  EXPECT_EQ(big, std::vector<float>(kT * kE + 1, -3.0f)) << "grad_logits written on a rejected call";
}
TEST_F(RouterBackwardArgs, GradLogitsOverlapsGradProbs) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.grad_logits = gp.data();
  expect_backward_rejected(b, "args->grad_logits overlaps args->grad_probs");
}
TEST_F(RouterBackwardArgs, GradLogitsOverlapsTheMap) {
  std::vector<float> map_and_grad(kT * kE + 1, -3.0f);  // the map: the first 8 bytes
  bitepRouterBackwardArgs_t b = backward_args();
  b.routing_map = map_and_grad.data();
  b.grad_logits = map_and_grad.data() + 1;
  expect_backward_rejected(b, "args->grad_logits overlaps args->routing_map");
  EXPECT_EQ(map_and_grad, std::vector<float>(kT * kE + 1, -3.0f)) << "written on a rejected call";
}
TEST_F(RouterBackwardArgs, GradLogitsOverlapsSaved) {
  std::vector<float> saved(kT * kE, 0.25f);
  bitepRouterBackwardArgs_t b = backward_args();
  b.saved = saved.data();
  b.grad_logits = saved.data();
  expect_backward_rejected(b, "args->grad_logits overlaps args->saved");
  EXPECT_EQ(saved, std::vector<float>(kT * kE, 0.25f)) << "saved written on a rejected call";
}
TEST_F(RouterBackwardArgs, GradLogitsOverlapsLogits) {
  const std::vector<float> want = logits;
  bitepRouterBackwardArgs_t b = backward_args();
  b.grad_logits = logits.data();
  expect_backward_rejected(b, "args->grad_logits overlaps args->logits");
  EXPECT_EQ(logits, want) << "logits written on a rejected call";
}

TEST_F(RouterBackwardArgs, NeedsTheMap) {
  bitepRouterBackwardArgs_t b = backward_args();
  b.routing_map = nullptr;
  b.map_format = bitepMapNone;
  expect_backward_rejected(b, "args->map_format is bitepMapNone");
}
TEST_F(RouterBackwardArgs, NeedsTheMapWithAFormat) {  // the format given, the map NULL
  bitepRouterBackwardArgs_t b = backward_args();
  b.routing_map = nullptr;
  expect_backward_rejected(b, "args->routing_map is NULL");
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
  // A valid aux-loss backward of the same shape into gp (-3 everywhere).
  bitepAuxLossArgs_t backward_args() {
    bitepAuxLossArgs_t a = forward_args();
    a.probs = nullptr;
    a.loss = nullptr;
    a.grad_loss = &grad_loss;
    a.grad_probs = gp.data();
    return a;
  }
  // Expects bitepInvalidArgument naming `what` from bitepAuxLossForward (fwd) or bitepAuxLossBackward, and nothing
  // written.
  void expect_rejected(const bitepAuxLossArgs_t& a, bool fwd, const char* what) {
    expect_refused(
        fwd ? bitepAuxLossForward(bitepBackendHost, &a, nullptr) : bitepAuxLossBackward(bitepBackendHost, &a, nullptr),
        fwd ? "bitepAuxLossForward" : "bitepAuxLossBackward", what);
    EXPECT_EQ(loss, -1.0f) << "an output was written on a rejected call";
    for (float g : gp) ASSERT_EQ(g, -3.0f) << "an output was written on a rejected call";
    for (float p : probs) ASSERT_EQ(p, 0.1f) << "an input was written on a rejected call";
    for (int32_t n : tpe) ASSERT_EQ(n, 1) << "an input was written on a rejected call";
    EXPECT_EQ(grad_loss, 1.0f) << "an input was written on a rejected call";
  }
  // The same change to a valid forward and to a valid backward: both rejected, naming `what`.
  template <class F>
  void expect_both_rejected(F change, const char* what) {
    bitepAuxLossArgs_t f = forward_args();
    change(f);
    expect_rejected(f, true, what);
    bitepAuxLossArgs_t b = backward_args();
    change(b);
    expect_rejected(b, false, what);
  }
  std::vector<float> probs = std::vector<float>(8, 0.1f);
  std::vector<int32_t> tpe = std::vector<int32_t>(4, 1);
  float loss = -1.0f;
  float grad_loss = 1.0f;
  std::vector<float> gp = std::vector<float>(8, -3.0f);
};

TEST_F(AuxLossArgs, ValidCallsSucceed) {
  bitepAuxLossArgs_t a = forward_args();
  ASSERT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_NE(loss, -1.0f);
  a = backward_args();
  ASSERT_EQ(bitepAuxLossBackward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
  for (float g : gp) EXPECT_NE(g, -3.0f);
}
// Without tokens the scores and their gradient are not needed; the loss is still written (0).
TEST_F(AuxLossArgs, ZeroTokensNeedNoProbs) {
  bitepAuxLossArgs_t a = forward_args();
  a.num_tokens = 0;
  a.probs = nullptr;
  ASSERT_EQ(bitepAuxLossForward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(loss, 0.0f);
  a = backward_args();
  a.num_tokens = 0;
  a.grad_probs = nullptr;
  EXPECT_EQ(bitepAuxLossBackward(bitepBackendHost, &a, nullptr), bitepSuccess) << bitepGetLastError();
}
TEST_F(AuxLossArgs, NullArgs) {
  EXPECT_EQ(bitepAuxLossForward(bitepBackendHost, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args is NULL"), std::string::npos) << bitepGetLastError();
  EXPECT_EQ(bitepAuxLossBackward(bitepBackendHost, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("args is NULL"), std::string::npos) << bitepGetLastError();
}
TEST_F(AuxLossArgs, NotInitialised) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.magic = 0; }, "BITEP_AUX_LOSS_ARGS_INIT");
}
TEST_F(AuxLossArgs, WrongSize) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.size = sizeof(a) - 8; }, "args->size");
}
TEST_F(AuxLossArgs, ZeroExperts) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.num_experts = 0; }, "args->num_experts");
}
TEST_F(AuxLossArgs, TopkZero) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.topk = 0; }, "args->topk");
}
TEST_F(AuxLossArgs, TopkAboveExperts) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.topk = 5; }, "args->topk");
}
TEST_F(AuxLossArgs, NegativeTokens) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.num_tokens = -1; }, "args->num_tokens");
}
TEST_F(AuxLossArgs, TokenCountOverflow) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.num_tokens = INT64_MAX / 8; }, "args->num_experts (4) overflows");
}
TEST_F(AuxLossArgs, NonFiniteCoeff) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.coeff = NAN; }, "args->coeff");
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.coeff = -INFINITY; }, "args->coeff");
}
TEST_F(AuxLossArgs, NullTokensPerExpert) {
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.tokens_per_expert = nullptr; }, "args->tokens_per_expert");
}
TEST_F(AuxLossArgs, MisalignedTokensPerExpert) {
  std::vector<int32_t> big(5, 1);
  const int32_t* misaligned = two_bytes_on(big.data());
  expect_both_rejected([&](bitepAuxLossArgs_t& a) { a.tokens_per_expert = misaligned; }, "args->tokens_per_expert");
}
TEST_F(AuxLossArgs, NullLoss) {
  bitepAuxLossArgs_t a = forward_args();
  a.loss = nullptr;
  expect_rejected(a, true, "args->loss");
}
TEST_F(AuxLossArgs, NullProbs) {
  bitepAuxLossArgs_t a = forward_args();
  a.probs = nullptr;
  expect_rejected(a, true, "args->probs");
}
TEST_F(AuxLossArgs, MisalignedProbs) {
  std::vector<float> big(9, 0.1f);
  bitepAuxLossArgs_t a = forward_args();
  a.probs = two_bytes_on(big.data());
  expect_rejected(a, true, "args->probs");
}
TEST_F(AuxLossArgs, MisalignedLoss) {
  std::vector<float> big(2, -1.0f);
  bitepAuxLossArgs_t a = forward_args();
  a.loss = two_bytes_on(big.data());
  expect_rejected(a, true, "args->loss");
  EXPECT_EQ(big, std::vector<float>(2, -1.0f)) << "loss written on a rejected call";
}
TEST_F(AuxLossArgs, LossOverlapsProbs) {
  bitepAuxLossArgs_t a = forward_args();
  a.loss = probs.data() + 3;
  expect_rejected(a, true, "args->loss overlaps args->probs");
}
TEST_F(AuxLossArgs, LossOverlapsTokensPerExpert) {
  bitepAuxLossArgs_t a = forward_args();
  a.loss = reinterpret_cast<float*>(tpe.data() + 1);
  expect_rejected(a, true, "args->loss overlaps args->tokens_per_expert");
}
TEST_F(AuxLossArgs, NullGradLoss) {
  bitepAuxLossArgs_t a = backward_args();
  a.grad_loss = nullptr;
  expect_rejected(a, false, "args->grad_loss");
}
TEST_F(AuxLossArgs, NullGradProbs) {
  bitepAuxLossArgs_t a = backward_args();
  a.grad_probs = nullptr;
  expect_rejected(a, false, "args->grad_probs");
}
TEST_F(AuxLossArgs, MisalignedGradLoss) {
  std::vector<float> big(2, 1.0f);
  bitepAuxLossArgs_t a = backward_args();
  a.grad_loss = two_bytes_on(big.data());
  expect_rejected(a, false, "args->grad_loss");
}
TEST_F(AuxLossArgs, MisalignedGradProbs) {
  std::vector<float> big(9, -3.0f);
  bitepAuxLossArgs_t a = backward_args();
  a.grad_probs = two_bytes_on(big.data());
  expect_rejected(a, false, "args->grad_probs");
  EXPECT_EQ(big, std::vector<float>(9, -3.0f)) << "grad_probs written on a rejected call";
}
TEST_F(AuxLossArgs, GradProbsOverlapsGradLoss) {
  bitepAuxLossArgs_t a = backward_args();
  a.grad_loss = gp.data() + 5;
  expect_rejected(a, false, "args->grad_probs overlaps args->grad_loss");
}
TEST_F(AuxLossArgs, GradProbsOverlapsTokensPerExpert) {
  std::vector<int32_t> buf(12, 1);  // grad_probs: [4, 12), tokens_per_expert: [8, 12)
  bitepAuxLossArgs_t a = backward_args();
  a.tokens_per_expert = buf.data() + 8;
  a.grad_probs = reinterpret_cast<float*>(buf.data() + 4);
  expect_rejected(a, false, "args->grad_probs overlaps args->tokens_per_expert");
  EXPECT_EQ(buf, std::vector<int32_t>(12, 1)) << "written on a rejected call";
}

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
  expect_both_rejected([](bitepAuxLossArgs_t& a) { a.total_num_tokens = 0; }, "args->total_num_tokens");
}

}  // namespace
