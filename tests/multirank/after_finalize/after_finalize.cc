// SPDX-License-Identifier: Apache-2.0
// A host group outliving MPI (the order RAII wrappers and exit handlers often give): after MPI_Finalize a dispatch is
// refused naming it, before any MPI call (which MPI would abort on), and bitepGroupDestroy still succeeds, making no
// MPI call. Its own main(): gtest's runs inside MPI. Exit status 0 when both hold on this rank.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "bitep/bitep.h"
#include "bitep/bitep_mpi.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  bitepGroupConfig_t c = BITEP_GROUP_CONFIG_INIT;
  c.backend = bitepBackendHost;
  c.num_experts = 8;
  c.topk = 2;
  c.hidden = 4;
  c.dtype = bitepFloat32;
  bitepGroup_t g = nullptr;
  if (bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g) != bitepSuccess) {
    std::fprintf(stderr, "[rank %d] bitepGroupCreateMpi: %s\n", rank, bitepGetLastError());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();

  int failures = 0;
  std::vector<float> x(4, 1.0f);
  const uint8_t map = 0x3;  // experts 0 and 1
  bitepDispatchArgs_t a = BITEP_DISPATCH_ARGS_INIT;
  a.num_tokens = 1;
  a.x = x.data();
  a.routing_map = &map;
  bitepHandle_t h = nullptr;
  const bitepResult_t d = bitepDispatch(g, &a, nullptr, &h);
  if (d != bitepInvalidUsage || std::strstr(bitepGetLastError(), "MPI is finalized") == nullptr || h != nullptr) {
    std::fprintf(stderr, "[rank %d] bitepDispatch after MPI_Finalize: %s (%s), expected bitepInvalidUsage naming it\n",
                 rank, bitepGetErrorString(d), bitepGetLastError());
    ++failures;
  }
  const bitepResult_t r = bitepGroupDestroy(g);
  if (r != bitepSuccess) {
    std::fprintf(stderr, "[rank %d] bitepGroupDestroy after MPI_Finalize: %s (%s)\n", rank, bitepGetErrorString(r),
                 bitepGetLastError());
    ++failures;
  }
  if (failures == 0) std::printf("[rank %d] after MPI_Finalize: dispatch refused, group destroyed\n", rank);
  return failures == 0 ? 0 : 1;
}
