// SPDX-License-Identifier: Apache-2.0
// Faults: configs that differ across ranks, bad arguments on one rank, handles outliving their group,
// a stalled peer. Every collective call fails on every rank (no hang), the failing rank with the error
// naming the argument, the others with bitepRemoteError naming that rank; the group stays usable after
// an argument error.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>

#include "bitep/bitep_mpi.hpp"
#include "tests/multirank/ep_checks.h"

namespace ept {
namespace {

bool has(const std::string& text, const std::string& what) { return text.find(what) != std::string::npos; }

// What a combine on handle h needs: the identity experts' outputs y (toy_expert_outputs, expert-major), an out
// buffer of this rank's tokens, and combine args over them (weighted, as BITEP_COMBINE_ARGS_INIT).
struct CombineInputs {
  std::vector<uint8_t> y, out;
  bitepCombineArgs_t args = BITEP_COMBINE_ARGS_INIT;
};
void combine_inputs(const Spec& s, int W, int rank, const Input& in, bitepHandle_t h, CombineInputs* c) {
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h, &lo), bitepSuccess) << bitepGetLastError();
  c->y = toy_expert_outputs(s, W, rank, lo);
  c->out.assign(in.T * s.H * dsize(s.dtype), 0);
  c->args.y = c->y.data();
  c->args.out = c->out.data();
}

// One dispatch of a Spec's world on a host group, and its combine's inputs: the set-up of the combine fault tests.
// run()'s fatal failures are the caller's (ASSERT_NO_FATAL_FAILURE).
struct Dispatched {
  Spec s;
  int W = world_size(), rank = world_rank();
  std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  HandleGuard h;
  CombineInputs ci;
  void run() {
    ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
    const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
    ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
    ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  }
};

// ---- group creation -----------------------------------------------------------------------------------

void expect_create_fails_everywhere(const std::function<void(bitepGroupConfig_t*)>& tweak,
                                    const char* field,
                                    bitepResult_t victim_code,
                                    bool on_victim_only_message = false) {
  Spec s;
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  bitepGroupConfig_t c = group_config(s, W);
  if (rank == victim) tweak(&c);
  bitepGroup_t g = reinterpret_cast<bitepGroup_t>(&c);
  const bitepResult_t r = bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g);
  const std::string err = bitepGetLastError();
  EXPECT_EQ(g, nullptr);
  if (g != nullptr) bitepGroupDestroy(g);
  if (rank == victim || !on_victim_only_message) {
    EXPECT_EQ(r, rank == victim ? victim_code : bitepInvalidArgument) << err;
    EXPECT_TRUE(has(err, field)) << err;
  } else {
    EXPECT_EQ(r, bitepRemoteError) << err;
    EXPECT_TRUE(has(err, "rank " + std::to_string(victim))) << err;
  }
}

TEST(EpFaults, MismatchedHiddenFailsEveryRank) {
  if (world_size() < 2) GTEST_SKIP() << "a mismatch needs 2 ranks (run with mpirun -np >= 2)";
  expect_create_fails_everywhere([](bitepGroupConfig_t* c) { c->hidden += 1; }, "config->hidden differs",
                                 bitepInvalidArgument);
}

TEST(EpFaults, MismatchedExpertsFailsEveryRank) {
  if (world_size() < 2) GTEST_SKIP() << "a mismatch needs 2 ranks (run with mpirun -np >= 2)";
  expect_create_fails_everywhere([](bitepGroupConfig_t* c) { c->num_experts *= 2; }, "config->num_experts differs",
                                 bitepInvalidArgument);
}

TEST(EpFaults, MismatchedDtypeFailsEveryRank) {
  if (world_size() < 2) GTEST_SKIP() << "a mismatch needs 2 ranks (run with mpirun -np >= 2)";
  expect_create_fails_everywhere([](bitepGroupConfig_t* c) { c->dtype = bitepFloat32; }, "config->dtype differs",
                                 bitepInvalidArgument);
}

TEST(EpFaults, InvalidConfigOnOneRankFailsEveryRank) {
  expect_create_fails_everywhere([](bitepGroupConfig_t* c) { c->topk = 0; }, "config->topk", bitepInvalidArgument,
                                 true);
}

TEST(EpFaults, UninitialisedConfigOnOneRankFailsEveryRank) {
  expect_create_fails_everywhere([](bitepGroupConfig_t* c) { c->magic = 0; }, "BITEP_GROUP_CONFIG_INIT",
                                 bitepInvalidArgument, true);
}

// The cuda backend's transport (BITEP_CUDA_TRANSPORT=ipc or NCCL) differs on one rank: every rank fails at once
// instead of one waiting in NCCL's init and the other in the IPC transport's. Decided before any device is used,
// so it runs without a GPU (skipped in a build without NCCL, where the cuda backend is refused first).
TEST(EpFaults, CudaTransportDiffersAcrossRanks) {
  if (world_size() < 2) GTEST_SKIP() << "a mismatch needs 2 ranks (run with mpirun -np >= 2)";
  const int W = world_size(), rank = world_rank();
  const char* before = std::getenv("BITEP_CUDA_TRANSPORT");
  const std::string saved = before != nullptr ? before : "";
  const bool ipc = saved == "ipc";
  if (rank == W - 1) {  // the last rank flips it
    if (ipc)
      unsetenv("BITEP_CUDA_TRANSPORT");
    else
      setenv("BITEP_CUDA_TRANSPORT", "ipc", 1);
  }
  Spec s;
  bitepGroupConfig_t c = group_config(s, W);
  c.backend = bitepBackendCuda;
  bitepGroup_t g = nullptr;
  const bitepResult_t r = bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g);
  const std::string err = bitepGetLastError();
  if (before != nullptr)
    setenv("BITEP_CUDA_TRANSPORT", saved.c_str(), 1);
  else
    unsetenv("BITEP_CUDA_TRANSPORT");
  if (g != nullptr) bitepGroupDestroy(g);
  // A build without the cuda backend (BITEP_CUDA=OFF or no toolkit) or without NCCL refuses the backend first.
  if (r == bitepNotSupported && (has(err, "without CUDA") || has(err, "without NCCL"))) GTEST_SKIP() << err;
  EXPECT_EQ(g, nullptr);
  EXPECT_EQ(r, bitepInvalidUsage) << err;
  EXPECT_TRUE(has(err, "BITEP_CUDA_TRANSPORT")) << err;
  EXPECT_TRUE(has(err, "every rank must set it alike")) << err;
}

// A rank that never calls bitepGroupCreateMpi (refused before it, or gone): its peers' duplication of the
// communicator is polled against the config's timeout, so they fail with bitepTimeout naming it instead of waiting
// in MPI_Comm_dup for good. Then the missing rank makes its part of the duplication (a nonblocking one, as bitep's),
// which the peers' requests complete with while they wait in a barrier; the communicators are left to MPI.
TEST(EpFaults, CreateWithoutOneRankTimesOut) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int W = world_size(), rank = world_rank();
  MPI_Comm comm = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_dup(MPI_COMM_WORLD, &comm), MPI_SUCCESS);
  const double timeout = 2.0;
  Spec s;
  const bitepGroupConfig_t c = group_config(s, W, timeout);
  if (rank != 0) {
    bitepGroup_t g = nullptr;
    const auto t0 = std::chrono::steady_clock::now();
    const bitepResult_t r = bitepGroupCreateMpi(comm, &c, &g);
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string err = bitepGetLastError();
    EXPECT_EQ(r, bitepTimeout) << err;
    EXPECT_TRUE(has(err, "did not call bitepGroupCreateMpi")) << err;
    EXPECT_EQ(g, nullptr);
    EXPECT_GE(took, timeout);
    EXPECT_LT(took, 10 * timeout) << err;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) {
    MPI_Comm late = MPI_COMM_NULL;
    MPI_Request req = MPI_REQUEST_NULL;
    ASSERT_EQ(MPI_Comm_idup(comm, &late, &req), MPI_SUCCESS);
    EXPECT_EQ(MPI_Wait(&req, MPI_STATUS_IGNORE), MPI_SUCCESS);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(EpFaults, ExpertsNotDivisibleByRanks) {
  if (world_size() < 2) GTEST_SKIP() << "E % W != 0 needs W >= 2";
  Spec s;
  bitepGroupConfig_t c = group_config(s, world_size());
  c.num_experts = world_size() + 1;
  bitepGroup_t g = nullptr;
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "nranks")) << bitepGetLastError();
  EXPECT_EQ(g, nullptr);
}

// A low-latency dispatch's expert rows (nranks x low_latency_max_tokens x experts a row, plus each local
// expert's alignment padding) must fit the kernels' int32 offsets: refused at creation on every rank alike.
TEST(EpFaults, LowLatencyRowsPastInt32) {
  Spec s;
  s.L = 4000;
  s.k = 1;
  bitepGroupConfig_t c = group_config(s, world_size());
  c.low_latency_max_tokens = 1;
  c.expert_alignment = 1 << 20;  // 4000 x (2^20 - 1) padding rows
  bitepGroup_t g = nullptr;
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "config->expert_alignment (1048576)")) << bitepGetLastError();
  EXPECT_EQ(g, nullptr);
  c.expert_alignment = 1 << 10;  // 4000 x 1023: fits
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(bitepGroupDestroy(g), bitepSuccess);
}

TEST(EpFaults, BadCreateArguments) {
  Spec s;
  bitepGroupConfig_t c = group_config(s, world_size());
  bitepGroup_t g = nullptr;
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_NULL, &c, &g), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "comm is MPI_COMM_NULL")) << bitepGetLastError();
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, nullptr, &g), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "config is NULL")) << bitepGetLastError();
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "group is NULL")) << bitepGetLastError();
  c.timeout_s = -1;
  EXPECT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "config->timeout_s")) << bitepGetLastError();
  EXPECT_EQ(g, nullptr);
}

TEST(EpFaults, GroupQueries) {
  Spec s;
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  int rank = -1, n = -1;
  EXPECT_EQ(bitepGroupGetRank(g.g, &rank, &n), bitepSuccess);
  EXPECT_EQ(rank, world_rank());
  EXPECT_EQ(n, world_size());
  EXPECT_EQ(bitepGroupGetRank(g.g, nullptr, nullptr), bitepSuccess);
  EXPECT_EQ(bitepGroupGetRank(nullptr, &rank, &n), bitepInvalidArgument);
  size_t bytes = 1;
  EXPECT_EQ(bitepGroupMemoryBytes(g.g, nullptr), bitepInvalidArgument);
  EXPECT_EQ(bitepGroupMemoryBytes(g.g, &bytes), bitepSuccess);
  EXPECT_EQ(bitepGroupDestroy(nullptr), bitepSuccess);
  EXPECT_EQ(bitepHandleDestroy(nullptr), bitepSuccess);
}

// ---- dispatch / combine arguments -----------------------------------------------------------------------

// The victim (last rank) breaks one argument; every rank fails, then the group still works.
void expect_dispatch_fails(const std::function<void(bitepDispatchArgs_t*, bitepHandle_t**)>& breaker,
                           const char* field,
                           bitepResult_t code = bitepInvalidArgument) {
  Spec s;
  s.weights = Weights::kDense;
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  bitepHandle_t h = nullptr;
  bitepHandle_t* hp = &h;
  const bitepDispatchArgs_t* ap = &a;
  std::vector<uint8_t> bad_map;
  if (rank == victim) {
    breaker(&a, &hp);
    if (a.size == 0) ap = nullptr;  // the breaker's way of saying "args = NULL"
  }
  const bitepResult_t r = bitepDispatch(g.g, ap, nullptr, hp);
  const std::string err = bitepGetLastError();
  EXPECT_EQ(h, nullptr);
  if (rank == victim) {
    EXPECT_EQ(r, code) << err;
    EXPECT_TRUE(has(err, field)) << err;
  } else {
    EXPECT_EQ(r, bitepRemoteError) << err;
    EXPECT_TRUE(has(err, "rank " + std::to_string(victim))) << err;
  }
  dispatch_and_check(g.g, s, W, rank, world);
}

TEST(EpFaults, DispatchArgsNull) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->size = 0; }, "args is NULL");
}
TEST(EpFaults, DispatchArgsNotInitialised) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->magic = 0x1234; }, "BITEP_DISPATCH_ARGS_INIT");
}
TEST(EpFaults, DispatchHandleNull) {
  expect_dispatch_fails([](bitepDispatchArgs_t*, bitepHandle_t** hp) { *hp = nullptr; }, "handle is NULL");
}
TEST(EpFaults, DispatchXNull) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->x = nullptr; }, "args->x is NULL");
}
TEST(EpFaults, DispatchNegativeTokens) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->num_tokens = -3; }, "args->num_tokens");
}
TEST(EpFaults, DispatchBadMapFormat) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->map_format = bitepMapNone; },
                        "args->map_format");
}
TEST(EpFaults, DispatchTwoWeightForms) {
  static float dummy[1024];
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->topk_weights = dummy; },
                        "args->probs and args->topk_weights");
}
TEST(EpFaults, DispatchCapacityWithoutBuffer) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->recv_x_capacity = 4; },
                        "args->recv_x_capacity");
}
TEST(EpFaults, DispatchExpertMajorOnlyNotABool) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->expert_major_only = 2; },
                        "args->expert_major_only is 2");
}
TEST(EpFaults, DispatchExpertMajorOnlyWithRecvX) {
  static std::vector<uint8_t> buf(1 << 16);
  expect_dispatch_fails(
      [](bitepDispatchArgs_t* a, bitepHandle_t**) {
        a->expert_major_only = 1;
        a->recv_x = buf.data();
        a->recv_x_capacity = 1;
      },
      "args->recv_x is set but args->expert_major_only is 1");
}
TEST(EpFaults, DispatchRankMajorOnlyNotABool) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->rank_major_only = -1; },
                        "args->rank_major_only is -1");
}
TEST(EpFaults, DispatchRankMajorOnlyWithExpertMajorOnly) {
  expect_dispatch_fails(
      [](bitepDispatchArgs_t* a, bitepHandle_t**) {
        a->rank_major_only = 1;
        a->expert_major_only = 1;
      },
      "args->rank_major_only and args->expert_major_only are both 1");
}
TEST(EpFaults, DispatchRankMajorOnlyWithExpertX) {
  static std::vector<uint8_t> buf(1 << 16);
  expect_dispatch_fails(
      [](bitepDispatchArgs_t* a, bitepHandle_t**) {
        a->rank_major_only = 1;
        a->expert_x = buf.data();
        a->expert_x_capacity = 1;
      },
      "args->expert_x is set (capacity 1) but args->rank_major_only is 1");
}
TEST(EpFaults, DispatchOverlappingOutput) {
  expect_dispatch_fails(
      [](bitepDispatchArgs_t* a, bitepHandle_t**) {
        a->recv_x = const_cast<void*>(a->x);
        a->recv_x_capacity = 1;
      },
      "overlaps");
}
TEST(EpFaults, DispatchMisalignedX) {
  expect_dispatch_fails([](bitepDispatchArgs_t* a, bitepHandle_t**) { a->x = static_cast<const char*>(a->x) + 1; },
                        "not aligned");
}
// The host backend's routing checks (bitep.h: each row names exactly k distinct experts in [0, E)), on the victim's map
// given in `fmt` and changed by `change` (expect_routing_fails): a bitmap row with too many experts and one with too
// few, a bytemap with a 2, and indices out of range and repeated.
// routing_rows: the victim's bitmap rows (k = 2 experts each, E = 4 W) as bytes of the given format, in `map`.
void routing_rows(const bitepDispatchArgs_t* a, bitepMapFormat_t fmt, std::vector<uint8_t>* map) {
  const int E = 4 * world_size(), nb = (E + 7) / 8, k = 2;
  const uint8_t* bits = static_cast<const uint8_t*>(a->routing_map);
  const int64_t T = a->num_tokens;
  if (fmt == bitepMapBitmapU8) {
    map->assign(bits, bits + T * nb);
  } else if (fmt == bitepMapBytemap) {
    map->assign(T * E, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) (*map)[t * E + e] = (bits[t * nb + e / 8] >> (e % 8)) & 1;
  } else {
    map->assign(T * k * sizeof(int32_t), 0);
    int32_t* idx = reinterpret_cast<int32_t*>(map->data());
    for (int64_t t = 0; t < T; ++t) {
      int j = 0;
      for (int e = 0; e < E; ++e)
        if ((bits[t * nb + e / 8] >> (e % 8)) & 1) idx[t * k + j++] = e;
      ASSERT_EQ(j, k) << "token " << t;
    }
  }
}
void expect_routing_fails(bitepMapFormat_t fmt,
                          const std::function<void(std::vector<uint8_t>*)>& change,
                          const char* field) {
  std::vector<uint8_t> map;
  expect_dispatch_fails(
      [&](bitepDispatchArgs_t* a, bitepHandle_t**) {
        routing_rows(a, fmt, &map);
        change(&map);
        a->routing_map = map.data();
        a->map_format = fmt;
      },
      field);
}
TEST(EpFaults, DispatchRowWithTooManyExperts) {
  // token 0 now routes to min(8, E) experts
  expect_routing_fails(
      bitepMapBitmapU8, [](std::vector<uint8_t>* m) { (*m)[0] = 0xff; }, "row 0 routes to");
}
TEST(EpFaults, DispatchRowWithTooFewExperts) {
  expect_routing_fails(
      bitepMapBitmapU8,
      [](std::vector<uint8_t>* m) {
        std::fill(m->begin(), m->begin() + (4 * world_size() + 7) / 8, 0);
        (*m)[0] = 0x01;  // token 0 now routes to expert 0 alone
      },
      "row 0 routes to 1 experts, expected topk = 2");
}
TEST(EpFaults, DispatchBytemapValueNotZeroOrOne) {
  expect_routing_fails(
      bitepMapBytemap,
      [](std::vector<uint8_t>* m) {
        // still nonzero: the first k nonzero bytes would be the same experts
        *std::find_if(m->begin(), m->end(), [](uint8_t v) { return v != 0; }) = 2;
      },
      "must be 0 or 1");
}
TEST(EpFaults, DispatchIndexOutOfRange) {
  expect_routing_fails(
      bitepMapTopkIndices,
      [](std::vector<uint8_t>* m) { reinterpret_cast<int32_t*>(m->data())[1] = 4 * world_size(); },  // token 0: E
      "must be in [0, num_experts");
}
TEST(EpFaults, DispatchIndexRepeated) {
  expect_routing_fails(
      bitepMapTopkIndices,
      [](std::vector<uint8_t>* m) {
        int32_t* idx = reinterpret_cast<int32_t*>(m->data());
        idx[1] = idx[0];  // token 0 names its first expert twice
      },
      "twice");
}

TEST(EpFaults, WeightsOnSomeRanksOnly) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  if (rank == 1) a.topk_weights = nullptr;
  HandleGuard h;
  EXPECT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "every rank must give weights")) << bitepGetLastError();
}

// After a good dispatch, the victim breaks one combine argument.
void expect_combine_fails(const std::function<void(bitepCombineArgs_t*)>& breaker,
                          const char* field,
                          Weights weights = Weights::kCompact) {
  Spec s;
  s.weights = weights;
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  CombineInputs ci;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  ci.args.weighted = weights != Weights::kNone;
  bitepCombineArgs_t c = ci.args;  // the victim's, broken; ci.args stays whole for the retry
  const bitepCombineArgs_t* cp = &c;
  if (rank == victim) {
    breaker(&c);
    if (c.size == 0) cp = nullptr;
  }
  const bitepResult_t r = bitepCombine(g.g, h.h, cp, nullptr);
  const std::string err = bitepGetLastError();
  if (rank == victim) {
    EXPECT_EQ(r, bitepInvalidArgument) << err;
    EXPECT_TRUE(has(err, field)) << err;
  } else {
    EXPECT_EQ(r, bitepRemoteError) << err;
    EXPECT_TRUE(has(err, "rank " + std::to_string(victim))) << err;
  }
  ASSERT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, ci.out, reference_combine(s, W, rank, world[rank], ci.args.weighted), "out");
}

TEST(EpFaults, CombineArgsNull) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->size = 0; }, "args is NULL");
}
TEST(EpFaults, CombineOutNull) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->out = nullptr; }, "args->out is NULL");
}
TEST(EpFaults, CombineYNull) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->y = nullptr; }, "args->y is NULL");
}
TEST(EpFaults, CombineBadLayout) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->layout = static_cast<bitepLayout_t>(7); }, "args->layout");
}
TEST(EpFaults, CombineWeightedWithoutWeights) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->weighted = 1; }, "the dispatch had no weights", Weights::kNone);
}
TEST(EpFaults, CombineOutOverlapsY) {
  expect_combine_fails([](bitepCombineArgs_t* c) { c->out = const_cast<void*>(c->y); }, "overlaps");
}

TEST(EpFaults, CombineBackwardYOnSomeRanksOnly) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  s.tokens = [](int, int) { return int64_t{12}; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lo);
  std::vector<uint8_t> grad_out(world[rank].T * s.H * dsize(s.dtype), 0), grad_y(y.size() + 2);
  bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
  b.grad_out = grad_out.data();
  b.y = rank == 0 ? y.data() : nullptr;
  b.grad_y = grad_y.data();
  const bitepResult_t r = bitepCombineBackward(g.g, h.h, &b, nullptr);
  bool others_have_rows = false;
  int any = lo.num_expert_rows > 0 && rank != 0, all = 0;
  MPI_Allreduce(&any, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  others_have_rows = all != 0;
  if (others_have_rows) {
    EXPECT_EQ(r, bitepInvalidArgument) << bitepGetLastError();
    EXPECT_TRUE(has(bitepGetLastError(), "give y on every rank")) << bitepGetLastError();
  } else {
    EXPECT_EQ(r, bitepSuccess) << bitepGetLastError();
  }
  b.weighted = rank == 0 ? 1 : 0;
  b.y = y.data();
  EXPECT_EQ(bitepCombineBackward(g.g, h.h, &b, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "args->weighted differs")) << bitepGetLastError();
}

// ---- handles ---------------------------------------------------------------------------------------------

TEST(EpFaults, HandleOfDestroyedGroupIsInvalidUsage) {
  Spec s;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  bitepGroup_t g = nullptr;
  const bitepGroupConfig_t c = group_config(s, W);
  ASSERT_EQ(bitepGroupCreateMpi(MPI_COMM_WORLD, &c, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  bitepHandle_t h = nullptr;
  ASSERT_EQ(bitepDispatch(g, &a, nullptr, &h), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepGroupDestroy(g), bitepSuccess);
  bitepDispatchLayout_t lo;
  EXPECT_EQ(bitepHandleGetLayout(h, &lo), bitepInvalidUsage);
  EXPECT_TRUE(has(bitepGetLastError(), "group was destroyed")) << bitepGetLastError();
  std::vector<uint8_t> out(world[rank].T * s.H * 2 + 2);
  bitepCombineArgs_t cargs = BITEP_COMBINE_ARGS_INIT;
  cargs.y = out.data();
  cargs.out = out.data();
  // The group pointer is stale: the calls must not look at it once the handle says its group is gone.
  EXPECT_EQ(bitepCombine(g, h, &cargs, nullptr), bitepInvalidUsage);
  EXPECT_EQ(bitepDispatchBackward(g, h, out.data(), bitepLayoutRankMajor, out.data(), nullptr), bitepInvalidUsage);
  bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
  EXPECT_EQ(bitepCombineBackward(g, h, &b, nullptr), bitepInvalidUsage);
  const int32_t* sources = nullptr;
  EXPECT_EQ(bitepHandleGetExpertSources(g, h, nullptr, &sources), bitepInvalidUsage);
  EXPECT_TRUE(has(bitepGetLastError(), "group was destroyed")) << bitepGetLastError();
  EXPECT_EQ(bitepHandleDestroy(h), bitepSuccess);
}

TEST(EpFaults, HandleOfAnotherGroup) {
  Spec s;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g1, g2;
  ASSERT_EQ(make_group(s, &g1), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(make_group(s, &g2), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g1.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  EXPECT_EQ(bitepCombine(g2.g, h.h, &c, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "another group")) << bitepGetLastError();
  EXPECT_EQ(bitepCombine(g1.g, nullptr, &c, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "handle is NULL")) << bitepGetLastError();
  // Before the failing dispatch below, which sets h.h to NULL.
  const int32_t* sources = nullptr;
  EXPECT_EQ(bitepHandleGetExpertSources(g2.g, h.h, nullptr, &sources), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "another group")) << bitepGetLastError();
  EXPECT_EQ(bitepHandleGetExpertSources(g1.g, nullptr, nullptr, &sources), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "handle is NULL")) << bitepGetLastError();
  EXPECT_EQ(bitepHandleGetExpertSources(g1.g, h.h, nullptr, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "sources is NULL")) << bitepGetLastError();
  EXPECT_EQ(sources, nullptr);
  EXPECT_EQ(bitepDispatch(nullptr, &a, nullptr, &h.h), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "group is NULL")) << bitepGetLastError();
  EXPECT_EQ(bitepHandleGetLayout(h.h, nullptr), bitepInvalidArgument);
}

// One rank gives a handle it cannot use (NULL, another group's, or one whose group was destroyed) while its peers give
// the right one: it fails naming the handle, the peers at once with bitepRemoteError naming it (not after the group's
// timeout, which would leave the group broken), in a combine, a dispatch backward and a combine backward; then the
// group still combines.
TEST(EpFaults, BadHandleOnOneRank) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  const double timeout = 20.0;
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g, other;
  ASSERT_EQ(make_group(s, &g, timeout), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(make_group(s, &other), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h, h_other, h_stale;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepDispatch(other.g, &a, nullptr, &h_other.h), bitepSuccess) << bitepGetLastError();
  {  // a handle that outlives its group
    GroupGuard gone;
    ASSERT_EQ(make_group(s, &gone), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(bitepDispatch(gone.g, &a, nullptr, &h_stale.h), bitepSuccess) << bitepGetLastError();
  }
  CombineInputs ci;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  const std::vector<uint8_t>& y = ci.y;
  std::vector<uint8_t>& out = ci.out;
  bitepCombineArgs_t& c = ci.args;
  std::vector<uint8_t> grad_x(out.size()), grad_y(y.size());
  bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
  b.grad_out = out.data();
  b.grad_y = grad_y.data();
  const char* calls[] = {"bitepCombine", "bitepDispatchBackward", "bitepCombineBackward"};
  const char* bad_what[] = {" with a NULL handle", " with another group's", " with a destroyed group's"};
  for (int bad = 0; bad < 3; ++bad)
    for (int call = 0; call < 3; ++call) {
      const bitepHandle_t hv = rank != victim ? h.h : (bad == 0 ? nullptr : bad == 1 ? h_other.h : h_stale.h);
      const auto t0 = std::chrono::steady_clock::now();
      const bitepResult_t r =
          call == 0   ? bitepCombine(g.g, hv, &c, nullptr)
          : call == 1 ? bitepDispatchBackward(g.g, hv, y.data(), bitepLayoutExpertMajor, grad_x.data(), nullptr)
                      : bitepCombineBackward(g.g, hv, &b, nullptr);
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string err = bitepGetLastError();
      const std::string what = std::string(calls[call]) + bad_what[bad];
      if (rank == victim) {
        EXPECT_EQ(r, bad == 2 ? bitepInvalidUsage : bitepInvalidArgument) << what << ": " << err;
        EXPECT_TRUE(has(err, bad == 0   ? "handle is NULL"
                             : bad == 1 ? "another group"
                                        : "group was destroyed"))
            << what << ": " << err;
      } else {
        EXPECT_EQ(r, bitepRemoteError) << what << ": " << err;
        EXPECT_TRUE(has(err, "rank " + std::to_string(victim))) << what << ": " << err;
      }
      EXPECT_LT(waited, timeout / 2) << what << ": the call waited for the group's timeout";
    }
  ASSERT_EQ(bitepCombine(g.g, h.h, &c, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, out, reference_combine(s, W, rank, world[rank], c.weighted != 0), "out");
}

// Ranks out of step on one group: every rank but 0 makes a dispatch alone and times out in it (MPI keeps its abandoned
// messages), then rank 0 combines an earlier dispatch. Rank 0 must fail with bitepTimeout naming a peer, after about
// the group's timeout: its agreement must not pair with the peers' abandoned count exchange. With MPI's nonblocking
// collectives it did, and Open MPI 4 raised the MPI_ERR_TRUNCATE on MPI_COMM_WORLD, aborting the job (seen through
// the cuda backend's IPC transport, whose window release met a peer's timed-out count exchange).
TEST(EpFaults, RanksOutOfStepTimeOutNotAbort) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  const int W = world_size(), rank = world_rank();
  const double timeout = 1.0;
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g, timeout), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  CombineInputs ci;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  if (rank != 0) {
    HandleGuard alone;
    EXPECT_EQ(bitepDispatch(g.g, &a, nullptr, &alone.h), bitepTimeout) << bitepGetLastError();
    EXPECT_TRUE(has(bitepGetLastError(), "waiting on: 0")) << bitepGetLastError();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) {
    const auto t0 = std::chrono::steady_clock::now();
    const bitepResult_t r = bitepCombine(g.g, h.h, &ci.args, nullptr);
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string err = bitepGetLastError();
    EXPECT_EQ(r, bitepTimeout) << err;
    EXPECT_TRUE(has(err, "rank 0: an allgather (argument agreement) did not complete")) << err;
    EXPECT_TRUE(has(err, "waiting on: 1")) << err;
    EXPECT_GE(waited, timeout);
    EXPECT_LT(waited, 10 * timeout) << err;
  }
  // Every rank's group is unusable now (a transport that gave up on a peer): the next call says so at once.
  HandleGuard next;
  EXPECT_EQ(bitepDispatch(g.g, &a, nullptr, &next.h), bitepInvalidUsage) << bitepGetLastError();
  EXPECT_TRUE(has(bitepGetLastError(), "unusable")) << bitepGetLastError();
  MPI_Barrier(MPI_COMM_WORLD);
}

// Two dispatches in flight, combined in different orders on different ranks: the rows would pair up with
// another dispatch's. Every rank fails (host groups compare the dispatches' numbers in the agreement), then the
// combines in the same order give the right values.
TEST(EpFaults, CombinesOfDifferentDispatches) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  // The two dispatches route different tokens (another seed and count), so a combine that paired the rows of one with
  // the other's handle would give other values.
  Spec s2 = s;
  s2.seed = s.seed + 17;
  s2.tokens = [](int r, int) { return int64_t{9} + 2 * r; };
  const std::vector<Input> world = make_world(s, W), world2 = make_world(s2, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]), a2 = dispatch_args(s2, world2[rank]);
  HandleGuard h1, h2;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h1.h), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepDispatch(g.g, &a2, nullptr, &h2.h), bitepSuccess) << bitepGetLastError();
  CombineInputs c1, c2;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h1.h, &c1));
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s2, W, rank, world2[rank], h2.h, &c2));
  CombineInputs& first = rank == victim ? c2 : c1;
  const bitepHandle_t first_h = rank == victim ? h2.h : h1.h;
  EXPECT_EQ(bitepCombine(g.g, first_h, &first.args, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "the same dispatch")) << bitepGetLastError();
  std::vector<uint8_t> grad_y(first.y.size());
  bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
  b.grad_out = first.out.data();
  b.grad_y = grad_y.data();
  EXPECT_EQ(bitepCombineBackward(g.g, first_h, &b, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "the same dispatch")) << bitepGetLastError();
  // In the same order on every rank, the second dispatch first: each gives its own tokens' values.
  ASSERT_EQ(bitepCombine(g.g, h2.h, &c2.args, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s2, c2.out, reference_combine(s2, W, rank, world2[rank], c2.args.weighted != 0), "out of dispatch 2");
  ASSERT_EQ(bitepCombine(g.g, h1.h, &c1.args, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, c1.out, reference_combine(s, W, rank, world[rank], c1.args.weighted != 0), "out of dispatch 1");
}

// The same, beside a rank that passes rank-major y (whose flag is not used): rank 0 weighted = 0 and the middle ranks
// weighted = 1, both expert-major, the last rank rank-major. Every rank fails at once, the rank-major one too (it
// would go on into the transfer and wait there), and then the combine works.
TEST(EpFaults, CombineWeightedDiffersBesideARankMajorRank) {
  if (world_size() < 3) GTEST_SKIP() << "needs 3 ranks";
  Dispatched d;
  ASSERT_NO_FATAL_FAILURE(d.run());
  const Spec& s = d.s;
  const int W = d.W, rank = d.rank;
  const std::vector<Input>& world = d.world;
  GroupGuard& g = d.g;
  HandleGuard& h = d.h;
  CombineInputs& ci = d.ci;
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  std::vector<uint8_t> rank_rows(std::max<int64_t>(lo.num_recv_rows, 1) * s.H * dsize(s.dtype), 0);
  bitepCombineArgs_t c = ci.args;
  c.weighted = rank == 0 ? 0 : 1;
  if (rank == W - 1) {
    c.y = rank_rows.data();
    c.layout = bitepLayoutRankMajor;
  }
  const bitepResult_t r = bitepCombine(g.g, h.h, &c, nullptr);
  const std::string err = bitepGetLastError();
  EXPECT_EQ(r, bitepInvalidArgument) << err;
  EXPECT_TRUE(has(err, "weighted")) << err;
  EXPECT_TRUE(has(err, "rank 0 gives")) << err;
  ci.args.weighted = 1;
  ASSERT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, ci.out, reference_combine(s, W, rank, world[rank], true), "out");
}

// Different calls on one handle: the last rank makes bitepDispatchBackward while the others make bitepCombine, with
// the same layout, flags and buffers, so that the agreement's other bits match (the other ranks' combine would take
// the victim's gradient rows for partial sums, as after a call refused on one rank by the MPI thread rules). Every
// rank fails naming both calls, nothing is written, and then the combine on every rank gives the right values.
TEST(EpFaults, DifferentCallsOnOneHandle) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Dispatched d;
  ASSERT_NO_FATAL_FAILURE(d.run());
  const Spec& s = d.s;
  const int W = d.W, rank = d.rank;
  const std::vector<Input>& world = d.world;
  GroupGuard& g = d.g;
  HandleGuard& h = d.h;
  CombineInputs& ci = d.ci;
  const int victim = W - 1;
  ci.args.weighted = 0;
  const std::vector<uint8_t> before = ci.out;
  const bitepResult_t r = rank == victim
                              ? bitepDispatchBackward(g.g, h.h, ci.args.y, bitepLayoutExpertMajor, ci.args.out, nullptr)
                              : bitepCombine(g.g, h.h, &ci.args, nullptr);
  const std::string err = bitepGetLastError();
  EXPECT_EQ(r, bitepInvalidArgument) << err;
  EXPECT_TRUE(has(err, rank == victim ? "rank 0 makes bitepCombine where this rank"
                                      : "makes bitepDispatchBackward where this rank"))
      << err;
  EXPECT_TRUE(has(err, "every rank must make the same calls")) << err;
  EXPECT_EQ(ci.out, before) << "a refused call wrote its output";
  ASSERT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, ci.out, reference_combine(s, W, rank, world[rank], false), "out");
}

// A combine whose ranks pass different `weighted`: each rank weights the rows it sums for the others by its own flag,
// so the outputs would mix weighted and unweighted sums. Every rank of a host group fails naming it; then the combine
// with one flag gives the right values.
TEST(EpFaults, CombineWeightedDiffersAcrossRanks) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Dispatched d;
  ASSERT_NO_FATAL_FAILURE(d.run());
  const Spec& s = d.s;
  const int W = d.W, rank = d.rank;
  const std::vector<Input>& world = d.world;
  GroupGuard& g = d.g;
  HandleGuard& h = d.h;
  CombineInputs& ci = d.ci;
  const int victim = W - 1;
  ci.args.weighted = rank == victim ? 0 : 1;
  const std::vector<uint8_t> before = ci.out;
  EXPECT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepInvalidArgument);
  const std::string err = bitepGetLastError();
  EXPECT_TRUE(has(err, "weighted")) << err;
  EXPECT_TRUE(has(err, "rank " + std::to_string(rank == victim ? 0 : victim))) << err;
  EXPECT_EQ(ci.out, before) << "a refused combine wrote its output";
  for (int weighted : {0, 1}) {
    ci.args.weighted = weighted;
    ASSERT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepSuccess) << bitepGetLastError();
    expect_values(s, ci.out, reference_combine(s, W, rank, world[rank], weighted != 0), "out");
  }
}

// The C++ layer's MPI bootstrap (bitep_mpi.hpp): bitep::group_from_mpi makes a group over the communicator, and throws
// bitep::Error with the C API's code and detail on every rank where a config is bad.
TEST(EpFaults, CppGroupFromMpi) {
  Spec s;
  const int W = world_size(), rank = world_rank();
  bitepGroupConfig_t cfg = group_config(s, W);
  bitep::Group g = bitep::group_from_mpi(MPI_COMM_WORLD, cfg);
  ASSERT_NE(g.get(), nullptr);
  EXPECT_EQ(g.rank(), rank);
  EXPECT_EQ(g.nranks(), W);
  const int victim = W - 1;
  if (rank == victim) cfg.topk = 0;  // a bad config on the last rank
  try {
    (void)bitep::group_from_mpi(MPI_COMM_WORLD, cfg);
    ADD_FAILURE() << "a bad config on rank " << victim << " made a group";
  } catch (const bitep::Error& e) {
    EXPECT_EQ(e.result(), rank == victim ? bitepInvalidArgument : bitepRemoteError) << e.what();
    EXPECT_TRUE(has(e.what(), rank == victim ? "topk" : "rank " + std::to_string(victim))) << e.what();
  }
  g.reset();
  EXPECT_EQ(g.get(), nullptr);
}

// Weights count only where there are tokens: a rank with none may pass weight pointers while the ranks with
// tokens pass none. The dispatch then has no weights (a weighted combine says so on every rank), and an
// unweighted combine sums the rows.
TEST(EpFaults, WeightsOnATokenlessRankOnly) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Spec s;
  s.tokens = [](int r, int) { return r == 0 ? int64_t{0} : int64_t{6}; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  static float dummy[16];
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  a.probs = nullptr;
  a.topk_weights = rank == 0 ? dummy : nullptr;
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  CombineInputs ci;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  bitepCombineArgs_t& c = ci.args;
  c.weighted = 1;
  EXPECT_EQ(bitepCombine(g.g, h.h, &c, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "the dispatch had no weights")) << bitepGetLastError();
  c.weighted = 0;
  ASSERT_EQ(bitepCombine(g.g, h.h, &c, nullptr), bitepSuccess) << bitepGetLastError();
  expect_values(s, ci.out, reference_combine(s, W, rank, world[rank], false), "out");
}

// A destroyed handle is refused by every call that takes one, bitepHandleDestroy included (a second destroy),
// without reading the freed handle (the live handles' registry); the group goes on.
TEST(EpFaults, DestroyedHandle) {
  Spec s;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  bitepHandle_t h = nullptr;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepHandleDestroy(h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  EXPECT_EQ(bitepHandleGetLayout(h, &lo), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "not a live bitep handle")) << bitepGetLastError();
  bitepCombineArgs_t c = BITEP_COMBINE_ARGS_INIT;
  EXPECT_EQ(bitepCombine(g.g, h, &c, nullptr), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "not a live bitep handle")) << bitepGetLastError();
  EXPECT_EQ(bitepHandleDestroy(h), bitepInvalidArgument);
  EXPECT_TRUE(has(bitepGetLastError(), "destroyed twice")) << bitepGetLastError();
  dispatch_and_check(g.g, s, W, rank, world);
}

// ---- a stalled peer ---------------------------------------------------------------------------------------

// The last rank joins a combine late: the others give up after the group's timeout with bitepTimeout
// (naming what they waited for) instead of hanging, and their group refuses later calls.
TEST(EpFaults, StalledPeerTimesOut) {
  if (world_size() < 2) GTEST_SKIP() << "needs a peer (run with mpirun -np >= 2)";
  Spec s;
  s.tokens = [](int, int) { return int64_t{3}; };
  const int W = world_size(), rank = world_rank(), late = W - 1;
  const double timeout = 0.5;
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g, timeout), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  CombineInputs ci;
  ASSERT_NO_FATAL_FAILURE(combine_inputs(s, W, rank, world[rank], h.h, &ci));
  if (rank == late) std::this_thread::sleep_for(std::chrono::duration<double>(6 * timeout));
  const auto t0 = std::chrono::steady_clock::now();
  const bitepResult_t r = bitepCombine(g.g, h.h, &ci.args, nullptr);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r, bitepTimeout) << bitepGetLastError();
  EXPECT_TRUE(has(bitepGetLastError(), "did not complete within")) << bitepGetLastError();
  EXPECT_LT(took, 20 * timeout);
  EXPECT_EQ(bitepCombine(g.g, h.h, &ci.args, nullptr), bitepInvalidUsage);
  EXPECT_TRUE(has(bitepGetLastError(), "unusable")) << bitepGetLastError();
  // A trim frees nothing now: a peer may still write into the group's blocks.
  size_t held = 0, freed = 1;
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &held), bitepSuccess);
  EXPECT_EQ(bitepGroupTrimMemory(g.g, &freed), bitepSuccess) << bitepGetLastError();
  EXPECT_EQ(freed, 0u);
  size_t after = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &after), bitepSuccess);
  EXPECT_EQ(after, held);
}

}  // namespace
}  // namespace ept
