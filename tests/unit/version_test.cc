// SPDX-License-Identifier: Apache-2.0
#include <gtest/gtest.h>

#include <cstring>

#include "bitep/bitep.h"

TEST(Version, MatchesHeader) {
  int v = 0;
  ASSERT_EQ(bitepGetVersion(&v), bitepSuccess);
  EXPECT_EQ(v, BITEP_VERSION_CODE);
  EXPECT_EQ(bitepGetVersion(nullptr), bitepInvalidArgument);
  EXPECT_NE(std::strstr(bitepGetLastError(), "version is NULL"), nullptr) << bitepGetLastError();
}

TEST(ErrorString, EveryCodeHasText) {
  for (int r = 0; r < bitepNumResults; ++r) {
    const char* s = bitepGetErrorString(static_cast<bitepResult_t>(r));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(std::strncmp(s, "bitep", 5), 0) << s;
  }
  EXPECT_STREQ(bitepGetErrorString(static_cast<bitepResult_t>(999)), "unknown bitepResult_t value");
}
