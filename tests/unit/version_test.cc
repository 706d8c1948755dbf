// SPDX-License-Identifier: Apache-2.0
#include <gtest/gtest.h>

#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>

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

// The C API's enums hold any int in C++ too (their underlying type is fixed to int): a value a caller stored outside
// the enumerators is one the argument checks can read and refuse, not undefined behaviour.
TEST(Enums, HoldAnyInt) {
  static_assert(std::is_same<std::underlying_type<bitepResult_t>::type, int>::value, "bitepResult_t");
  static_assert(std::is_same<std::underlying_type<bitepDataType_t>::type, int>::value, "bitepDataType_t");
  static_assert(std::is_same<std::underlying_type<bitepBackend_t>::type, int>::value, "bitepBackend_t");
  static_assert(std::is_same<std::underlying_type<bitepScoreFunction_t>::type, int>::value, "bitepScoreFunction_t");
  static_assert(std::is_same<std::underlying_type<bitepMapFormat_t>::type, int>::value, "bitepMapFormat_t");
  static_assert(std::is_same<std::underlying_type<bitepLayout_t>::type, int>::value, "bitepLayout_t");
  for (int v : {-1, 3, 1 << 30}) {
    volatile bitepDataType_t d = static_cast<bitepDataType_t>(v);  // a load of the stored value, as the checks do
    EXPECT_EQ(static_cast<int>(d), v);
  }
  EXPECT_STREQ(bitepGetErrorString(static_cast<bitepResult_t>(-1)), "unknown bitepResult_t value");
}

// The header as C sees it (unit/c_header_check.c, compiled as C99) and as C++ does: every enum and struct the same
// size, so the enums' fixed type in C++ changes no layout.
extern "C" size_t bitep_c_header_sizeof(int i);
TEST(CHeader, SizesAgreeWithCpp) {
  const size_t cpp[] = {
      sizeof(bitepResult_t),         sizeof(bitepDataType_t),          sizeof(bitepBackend_t),
      sizeof(bitepScoreFunction_t),  sizeof(bitepMapFormat_t),         sizeof(bitepLayout_t),
      sizeof(bitepRouterConfig_t),   sizeof(bitepRouterForwardArgs_t), sizeof(bitepRouterBackwardArgs_t),
      sizeof(bitepAuxLossArgs_t),    sizeof(bitepGroupConfig_t),       sizeof(bitepDispatchArgs_t),
      sizeof(bitepDispatchLayout_t), sizeof(bitepCombineArgs_t),       sizeof(bitepCombineBackwardArgs_t),
  };
  const int n = static_cast<int>(sizeof(cpp) / sizeof(cpp[0]));
  for (int i = 0; i < n; ++i) EXPECT_EQ(bitep_c_header_sizeof(i), cpp[i]) << "type " << i << " of the list";
  EXPECT_EQ(bitep_c_header_sizeof(n), 0u);  // the lists are as long
  for (int i = 0; i < 6; ++i) EXPECT_EQ(cpp[i], sizeof(int)) << "enum " << i;
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
