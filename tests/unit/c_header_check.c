/* SPDX-License-Identifier: Apache-2.0 */
/* Compiled as C: the public header is valid C, and its INIT macros initialise the structs. */
#include <stddef.h>

#include "bitep/bitep.h"

int bitep_c_header_check(void) {
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  bitepRouterForwardArgs_t fwd = BITEP_ROUTER_FWD_ARGS_INIT;
  bitepRouterBackwardArgs_t bwd = BITEP_ROUTER_BWD_ARGS_INIT;
  bitepAuxLossArgs_t aux = BITEP_AUX_LOSS_ARGS_INIT;
  bitepGroupConfig_t group = BITEP_GROUP_CONFIG_INIT;
  bitepDispatchArgs_t disp = BITEP_DISPATCH_ARGS_INIT;
  bitepCombineArgs_t comb = BITEP_COMBINE_ARGS_INIT;
  bitepCombineBackwardArgs_t combw = BITEP_COMBINE_BWD_ARGS_INIT;
  return (int)(cfg.size + fwd.size + bwd.size + aux.size + group.size + disp.size + comb.size + combw.size) > 0;
}

/* The size of each of the header's enums and structs as C lays them out, in the order of the list in
 * tests/unit/version_test.cc (CHeader.SizesAgreeWithCpp), which compares them with C++'s; 0 past the list. */
size_t bitep_c_header_sizeof(int i) {
  static const size_t sizes[] = {
      sizeof(bitepResult_t),         sizeof(bitepDataType_t),          sizeof(bitepBackend_t),
      sizeof(bitepScoreFunction_t),  sizeof(bitepMapFormat_t),         sizeof(bitepLayout_t),
      sizeof(bitepRouterConfig_t),   sizeof(bitepRouterForwardArgs_t), sizeof(bitepRouterBackwardArgs_t),
      sizeof(bitepAuxLossArgs_t),    sizeof(bitepGroupConfig_t),       sizeof(bitepDispatchArgs_t),
      sizeof(bitepDispatchLayout_t), sizeof(bitepCombineArgs_t),       sizeof(bitepCombineBackwardArgs_t),
  };
  return i >= 0 && i < (int)(sizeof(sizes) / sizeof(sizes[0])) ? sizes[i] : 0;
}
