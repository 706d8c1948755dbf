// SPDX-License-Identifier: Apache-2.0
// Links the installed libbitep from C++ through bitep.hpp and bitep_mpi.hpp, and routes one token on the host
// backend. MPI is not started: the MPI bootstrap is only linked (its address taken), as a consumer's code would.
#include <bitep/bitep.hpp>
#include <bitep/bitep_mpi.hpp>
#include <cstdio>

int main() {
  bitep::Group (*create)(MPI_Comm, const bitepGroupConfig_t&) = &bitep::group_from_mpi;
  if (create == nullptr || bitep::version() != BITEP_VERSION_CODE) return 1;
  float logits[4] = {0.1f, 3.0f, -1.0f, 2.0f};
  unsigned char bitmap[1] = {0xFF};
  bitepRouterConfig_t cfg = BITEP_ROUTER_CONFIG_INIT;
  cfg.num_experts = 4;
  cfg.topk = 2;
  bitepRouterForwardArgs_t args = BITEP_ROUTER_FWD_ARGS_INIT;
  args.num_tokens = 1;
  args.logits = logits;
  args.routing_map = bitmap;
  args.map_format = bitepMapBitmapU8;
  try {
    bitep::router_forward(bitepBackendHost, cfg, args);
  } catch (const bitep::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  std::printf("bitep %d from C++: bitmap 0x%02x\n", bitep::version(), bitmap[0]);
  return bitmap[0] == 0x0A ? 0 : 1;  // experts 1 and 3
}
