/* SPDX-License-Identifier: Apache-2.0 */
/* Embedding bitep from plain C: a host-backend group over MPI_COMM_WORLD, one dispatch with top-k indices
 * and compact weights, identity experts, one weighted combine. With weights summing to 1 per token the
 * combine gives back x. Run: mpirun -np N ./build/examples/embed_c */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "bitep/bitep_mpi.h"

#define CHECK(call)                                                                                                  \
  do {                                                                                                               \
    bitepResult_t r_ = (call);                                                                                       \
    if (r_ != bitepSuccess) {                                                                                        \
      fprintf(stderr, "[rank %d] %s failed: %s\n  %s\n", rank, #call, bitepGetErrorString(r_), bitepGetLastError()); \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                                                  \
    }                                                                                                                \
  } while (0)

int main(int argc, char** argv) {
  int rank = 0, nranks = 1;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);

  const int E = 2 * nranks, k = 2, H = 4;
  const int64_t T = 3 + rank;
  bitepGroupConfig_t config = BITEP_GROUP_CONFIG_INIT;
  config.backend = bitepBackendHost;
  config.num_experts = E;
  config.topk = k;
  config.hidden = H;
  config.dtype = bitepFloat32;
  bitepGroup_t group = NULL;
  CHECK(bitepGroupCreateMpi(MPI_COMM_WORLD, &config, &group));

  float* x = malloc(sizeof(float) * T * H);
  float* out = malloc(sizeof(float) * T * H);
  int32_t* idx = malloc(sizeof(int32_t) * T * k);
  float* w = malloc(sizeof(float) * T * k);
  if (x == NULL || out == NULL || idx == NULL || w == NULL) {
    fprintf(stderr, "[rank %d] out of host memory\n", rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h) x[t * H + h] = (float)(100 * rank + t) + 0.25f * (float)h;
    idx[t * k + 0] = (int32_t)((t + rank + 1) % E); /* any order: weight j belongs to index j */
    idx[t * k + 1] = (int32_t)((t + rank) % E);
    w[t * k + 0] = 0.75f;
    w[t * k + 1] = 0.25f;
  }
  bitepDispatchArgs_t args = BITEP_DISPATCH_ARGS_INIT;
  args.num_tokens = T;
  args.x = x;
  args.routing_map = idx;
  args.map_format = bitepMapTopkIndices;
  args.topk_weights = w;
  bitepHandle_t handle = NULL;
  CHECK(bitepDispatch(group, &args, NULL, &handle));
  bitepDispatchLayout_t layout;
  CHECK(bitepHandleGetLayout(handle, &layout));

  /* Identity experts: y = expert_x. */
  bitepCombineArgs_t comb = BITEP_COMBINE_ARGS_INIT;
  comb.y = layout.expert_x;
  comb.layout = bitepLayoutExpertMajor;
  comb.weighted = 1;
  comb.out = out;
  CHECK(bitepCombine(group, handle, &comb, NULL));

  int wrong = 0;
  for (int64_t i = 0; i < T * H; ++i)
    if (fabsf(out[i] - x[i]) > 1e-4f * fabsf(x[i])) ++wrong;
  printf("embed_c: rank %d of %d: %lld tokens, received %lld rows, %d experts here, %s\n", rank, nranks, (long long)T,
         (long long)layout.num_recv_rows, layout.num_local_experts, wrong ? "WRONG" : "OK");
  CHECK(bitepHandleDestroy(handle));
  CHECK(bitepGroupDestroy(group));
  free(x);
  free(out);
  free(idx);
  free(w);
  int any = 0;
  MPI_Allreduce(&wrong, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any ? 1 : 0;
}
