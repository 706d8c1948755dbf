/* SPDX-License-Identifier: Apache-2.0 */
/* Links the installed libbitep from plain C and routes one token on the host backend. */
#include <bitep/bitep.h>
#include <stdio.h>

int main(void) {
  int version = 0;
  float logits[4] = {0.1f, 3.0f, -1.0f, 2.0f};
  unsigned char bitmap[1] = {0xFF};
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  bitepRouterForwardArgs_t args = BITEP_ROUTER_FWD_ARGS_INIT;
  if (bitepGetVersion(&version) != bitepSuccess || version != BITEP_VERSION_CODE) return 1;
  cfg.num_experts = 4;
  cfg.topk = 2;
  args.num_tokens = 1;
  args.logits = logits;
  args.routing_map = bitmap;
  args.map_format = bitepMapBitmapU8;
  if (bitepRouterForward(bitepBackendHost, &cfg, &args, NULL) != bitepSuccess) {
    fprintf(stderr, "%s\n", bitepGetLastError());
    return 1;
  }
  printf("bitep %d: bitmap 0x%02x\n", version, bitmap[0]);
  return bitmap[0] == 0x0A ? 0 : 1; /* experts 1 and 3 */
}
