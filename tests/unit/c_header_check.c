/* SPDX-License-Identifier: Apache-2.0 */
/* Compiled as C: the public header is valid C, and its INIT macros initialise the structs. */
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
