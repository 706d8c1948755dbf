// SPDX-License-Identifier: Apache-2.0
// The header-only C++ layer: exceptions carry the code and the detail; RAII wrappers are movable.
#include <gtest/gtest.h>

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
