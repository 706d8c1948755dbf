// SPDX-License-Identifier: Apache-2.0
#include <gtest/gtest.h>

#include <cstring>
#include <new>
#include <stdexcept>

#include "bitep/bitep.h"
#include "src/check.h"

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

// No exception crosses the C boundary, and each maps to the code its text names: a failed host allocation is
// bitepOutOfMemory (not bitepInternalError), anything else bitepInternalError; the API's name leads the text.
TEST(ErrorString, GuardMapsExceptions) {
  EXPECT_EQ(bitep::guard("bitepTest", []() -> bitepResult_t { throw std::bad_alloc(); }), bitepOutOfMemory);
  EXPECT_NE(std::strstr(bitepGetLastError(), "bitepTest"), nullptr) << bitepGetLastError();
  EXPECT_NE(std::strstr(bitepGetLastError(), "host allocation failed"), nullptr) << bitepGetLastError();
  EXPECT_EQ(bitep::guard("bitepTest", []() -> bitepResult_t { throw std::runtime_error("boom"); }), bitepInternalError);
  EXPECT_NE(std::strstr(bitepGetLastError(), "boom"), nullptr) << bitepGetLastError();
  EXPECT_EQ(bitep::guard("bitepTest", []() -> bitepResult_t { return bitepSuccess; }), bitepSuccess);
}
