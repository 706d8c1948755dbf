// SPDX-License-Identifier: Apache-2.0
// The header-only C++ layer: exceptions carry the code and the detail; RAII wrappers are movable.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "bitep/bitep.hpp"

TEST(CppApi, ErrorCarriesCodeAndDetail) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 4;
  cfg.topk = 5;
  bitepRouterForwardArgs_t args = BITEP_ROUTER_FWD_ARGS_INIT;
  try {
    bitep::router_forward(bitepBackendHost, cfg, args);
    FAIL() << "no exception";
  } catch (const bitep::Error& e) {
    EXPECT_EQ(e.result(), bitepInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("config->topk is 5"), std::string::npos) << e.what();
  }
}

TEST(CppApi, VersionAndEmptyWrappers) {
  EXPECT_EQ(bitep::version(), BITEP_VERSION_CODE);
  bitep::Group g;  // empty: destroying it is a no-op
  bitep::Handle h;
  bitep::Group g2(std::move(g));
  EXPECT_EQ(g2.get(), nullptr);
  EXPECT_EQ(h.get(), nullptr);
}

// Handle::destroy() reports what bitepHandleDestroy returns (reset() and the destructor drop it), and leaves the
// wrapper empty either way: here a pointer that is no live handle (bitepHandleDestroy checks its registry first and
// touches nothing else).
TEST(CppApi, HandleDestroyReportsTheFailure) {
  bitep::Handle empty;
  EXPECT_NO_THROW(empty.destroy());
  int not_a_handle = 0;
  bitep::Handle h(reinterpret_cast<bitepHandle_t>(&not_a_handle));
  try {
    h.destroy();
    FAIL() << "no exception";
  } catch (const bitep::Error& e) {
    EXPECT_EQ(e.result(), bitepInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("not a live bitep handle"), std::string::npos) << e.what();
  }
  EXPECT_EQ(h.get(), nullptr);
}

TEST(CppApi, RouterThroughWrapper) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 10;
  cfg.topk = 3;
  std::vector<float> logits = {0, 9, 1, 8, 2, 7, 3, 6, 4, 5};
  std::vector<uint8_t> bitmap(2, 0xFF);
  bitepRouterForwardArgs_t args = BITEP_ROUTER_FWD_ARGS_INIT;
  args.num_tokens = 1;
  args.logits = logits.data();
  args.routing_map = bitmap.data();
  args.map_format = bitepMapBitmapU8;
  bitep::router_forward(bitepBackendHost, cfg, args);
  EXPECT_EQ(bitmap[0], (1u << 1) | (1u << 3) | (1u << 5));  // experts 1, 3, 5 (logits 9, 8, 7)
  EXPECT_EQ(bitmap[1], 0u);                                 // pad bits stay 0
}

// The aux-loss wrappers: scores over all experts with their top-k map, the scores' backward, and the loss forward and
// backward on values whose sums are exact in fp32; a bad argument throws with the detail.
TEST(CppApi, AuxLossThroughWrappers) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 4;
  cfg.topk = 2;
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 0.0f};
  std::vector<float> scores(4, -1.0f), saved(4, -1.0f);
  std::vector<uint8_t> bitmap(1, 0xFF);
  bitepRouterForwardArgs_t fa = BITEP_ROUTER_FWD_ARGS_INIT;
  fa.num_tokens = 1;
  fa.logits = logits.data();
  fa.probs = scores.data();
  fa.saved = saved.data();
  fa.routing_map = bitmap.data();
  fa.map_format = bitepMapBitmapU8;
  bitep::aux_scores_forward(bitepBackendHost, cfg, fa);
  EXPECT_EQ(bitmap[0], (1u << 1) | (1u << 2));  // experts 1 and 2 (logits 3 and 2)
  double z = 0.0;
  for (float x : logits) z += std::exp(static_cast<double>(x));
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(scores[e], std::exp(static_cast<double>(logits[e])) / z, 1e-6) << e;

  // Softmax backward of a constant gradient: p (g - sum p g) = 0 at every expert.
  const std::vector<float> ones(4, 1.0f);
  std::vector<float> grad_logits(4, -1.0f);
  bitepRouterBackwardArgs_t ba = BITEP_ROUTER_BWD_ARGS_INIT;
  ba.num_tokens = 1;
  ba.grad_probs = ones.data();
  ba.saved = saved.data();
  ba.grad_logits = grad_logits.data();
  bitep::aux_scores_backward(bitepBackendHost, cfg, ba);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(grad_logits[e], 0.0, 1e-7) << e;

  // loss = C sum_e n_e sum_t p[t, e], C = E coeff / (k N^2) = 4 * 0.5 / (2 * 4) = 0.25; each column sums to 0.5.
  const std::vector<float> probs = {0.125f, 0.25f, 0.375f, 0.25f, 0.375f, 0.25f, 0.125f, 0.25f};
  const std::vector<int32_t> tokens_per_expert = {1, 2, 3, 4};
  const float grad_loss = 2.0f;
  float loss = -1.0f;
  std::vector<float> grad_probs(8, -1.0f);
  bitepAuxLossArgs_t la = BITEP_AUX_LOSS_ARGS_INIT;
  la.num_tokens = 2;
  la.num_experts = 4;
  la.topk = 2;
  la.total_num_tokens = 2;
  la.coeff = 0.5f;
  la.probs = probs.data();
  la.tokens_per_expert = tokens_per_expert.data();
  la.loss = &loss;
  la.grad_loss = &grad_loss;
  la.grad_probs = grad_probs.data();
  bitep::aux_loss_forward(bitepBackendHost, la);
  EXPECT_EQ(loss, 1.25f);  // 0.25 * 0.5 * (1 + 2 + 3 + 4)
  bitep::aux_loss_backward(bitepBackendHost, la);
  for (int t = 0; t < 2; ++t)
    for (int e = 0; e < 4; ++e) EXPECT_EQ(grad_probs[t * 4 + e], 0.5f * tokens_per_expert[e]) << t << "," << e;

  la.topk = 5;  // k > E
  try {
    bitep::aux_loss_forward(bitepBackendHost, la);
    FAIL() << "no exception";
  } catch (const bitep::Error& e) {
    EXPECT_EQ(e.result(), bitepInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("topk"), std::string::npos) << e.what();
  }
}
