// SPDX-License-Identifier: Apache-2.0
// Caller-provided receive buffers and their capacities, the one-view dispatches (expert-major only, rank-major only)
// with the gather index, and the group's pool in steady state and trimmed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "bitep/bitep.hpp"
#include "tests/multirank/ep_checks.h"

namespace ept {
namespace {

TEST(EpBuffers, CallerBuffersOfExactCapacity) {
  Spec s;
  s.align = 4;
  s.tokens = [](int r, int) { return r == 0 ? int64_t{0} : int64_t{7} + r; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Expected x = expected_receive(s, W, rank, world);
  const size_t row = s.H * dsize(s.dtype);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  // One sentinel row past each capacity: nothing may touch it.
  std::vector<uint8_t> recv((x.R + 1) * row, 0xab), expert((x.N + 1) * row, 0xab);
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  a.recv_x = recv.data();
  a.recv_x_capacity = x.R;
  a.expert_x = expert.data();
  a.expert_x_capacity = x.N;
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  if (x.R > 0) EXPECT_EQ(lo.recv_x, recv.data());
  if (x.N > 0) EXPECT_EQ(lo.expert_x, expert.data());
  check_received(s, W, rank, world, lo);
  for (size_t b = 0; b < row; ++b) {
    EXPECT_EQ(recv[x.R * row + b], 0xab) << "recv_x written past its capacity";
    EXPECT_EQ(expert[x.N * row + b], 0xab) << "expert_x written past its capacity";
  }
  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lo);
  bitepResult_t r;
  const std::vector<uint8_t> out = combine(g.g, h.h, y.data(), bitepLayoutExpertMajor, 1, world[rank].T, s, &r);
  ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
  expect_values(s, out, reference_combine(s, W, rank, world[rank], true), "out");
}

// A dispatch with one view against the both-views dispatch of the same input: the same row counts, expert counts and
// offsets, maps, weights and positions (the rows of each view are each test's own). lb's weights must be there.
void expect_same_numbering(const bitepDispatchLayout_t& lo, const bitepDispatchLayout_t& lb, int W, int rank) {
  const int64_t R = lb.num_recv_rows, N = lb.num_expert_rows;
  const int L = lb.num_local_experts, KL = lb.max_row_experts, MB = (L + 7) / 8;
  ASSERT_EQ(lo.num_recv_rows, R);
  ASSERT_EQ(lo.num_expert_rows, N);
  for (int l = 0; l <= L; ++l) EXPECT_EQ(lo.expert_offsets[l], lb.expert_offsets[l]) << "expert " << l;
  for (int l = 0; l < L; ++l) {
    EXPECT_EQ(lo.expert_counts[l], lb.expert_counts[l]) << "expert " << l;
    EXPECT_EQ(lo.expert_counts_host[l], lb.expert_counts_host[l]) << "expert " << l;
  }
  for (int r = 0; r < W; ++r) {
    EXPECT_EQ(lo.recv_counts_host[r], lb.recv_counts_host[r]) << "from rank " << r;
    EXPECT_EQ(lo.send_counts_host[r], lb.send_counts_host[r]) << "to rank " << r;
  }
  EXPECT_EQ(std::memcmp(lo.recv_map, lb.recv_map, R * MB), 0) << "recv_map differs, rank " << rank;
  EXPECT_EQ(std::memcmp(lo.recv_expert_rows, lb.recv_expert_rows, R * KL * 4), 0)
      << "recv_expert_rows differs, rank " << rank;
  ASSERT_NE(lo.recv_weights, nullptr);
  EXPECT_EQ(std::memcmp(lo.recv_weights, lb.recv_weights, R * KL * 4), 0) << "recv_weights differs, rank " << rank;
}

// Expert-major only (args->expert_major_only, on some ranks only): the layout has no rank-major rows, and the
// same expert-major rows, maps, weights, positions and counts as a dispatch with both views; combines (weighted
// and not) give the same bits; a caller's expert_x works with it.
TEST(EpBuffers, ExpertMajorOnlyMatchesBothViews) {
  Spec s;
  s.align = 4;
  s.weights = Weights::kCompact;
  s.tokens = [](int r, int) { return r == 1 ? int64_t{0} : int64_t{9} + 3 * r; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Expected x = expected_receive(s, W, rank, world);
  const size_t row = s.H * dsize(s.dtype);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  HandleGuard both;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &both.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lb;
  ASSERT_EQ(bitepHandleGetLayout(both.h, &lb), bitepSuccess);
  check_received(s, W, rank, world, lb);
  for (int caller : {0, 1}) {
    SCOPED_TRACE(caller ? "caller's expert_x" : "pool's expert_x");
    bitepDispatchArgs_t o = a;
    o.expert_major_only = rank % 2 == 0 || W == 1;  // the odd ranks keep both views
    std::vector<uint8_t> expert((x.N + 1) * row, 0xab);
    if (caller) {
      o.expert_x = expert.data();
      o.expert_x_capacity = x.N;
    }
    HandleGuard only;
    ASSERT_EQ(bitepDispatch(g.g, &o, nullptr, &only.h), bitepSuccess) << bitepGetLastError();
    bitepDispatchLayout_t lo;
    ASSERT_EQ(bitepHandleGetLayout(only.h, &lo), bitepSuccess);
    if (o.expert_major_only) {
      EXPECT_EQ(lo.recv_x, nullptr);
    } else {
      check_received(s, W, rank, world, lo);
    }
    if (caller && x.N > 0) EXPECT_EQ(lo.expert_x, expert.data());
    expect_same_numbering(lo, lb, W, rank);
    EXPECT_EQ(std::memcmp(lo.expert_x, lb.expert_x, lb.num_expert_rows * row), 0) << "expert_x differs, rank " << rank;
    if (caller) EXPECT_EQ(expert[x.N * row], 0xab) << "expert_x written past its capacity";
    const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lb);
    for (int weighted : {1, 0}) {
      bitepResult_t r1, r2;
      const std::vector<uint8_t> ob =
          combine(g.g, both.h, y.data(), bitepLayoutExpertMajor, weighted, world[rank].T, s, &r1);
      ASSERT_EQ(r1, bitepSuccess) << bitepGetLastError();
      const std::vector<uint8_t> oo =
          combine(g.g, only.h, y.data(), bitepLayoutExpertMajor, weighted, world[rank].T, s, &r2);
      ASSERT_EQ(r2, bitepSuccess) << bitepGetLastError();
      EXPECT_EQ(oo, ob) << (weighted ? "weighted" : "unweighted") << " combine, rank " << rank;
      if (weighted) expect_values(s, oo, reference_combine(s, W, rank, world[rank], true), "out");
    }
  }
}

// Rank-major only (args->rank_major_only, on some ranks only): the layout has no expert-major rows (expert_x NULL)
// and the same rank-major rows, maps, weights, positions, counts and offsets as a dispatch with both views; a
// caller's recv_x holds them with nothing past its capacity; combines of an expert-major y (weighted and not) and of
// a rank-major y, the dispatch backward and the combine backward give the same bits as on the both-views handle.
TEST(EpBuffers, RankMajorOnlyMatchesBothViews) {
  Spec s;
  s.align = 4;
  s.weights = Weights::kCompact;
  s.tokens = [](int r, int) { return r == 1 ? int64_t{0} : int64_t{11} + 2 * r; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Input& in = world[rank];
  const Expected x = expected_receive(s, W, rank, world);
  const size_t row = s.H * dsize(s.dtype);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  bitepDispatchArgs_t a = dispatch_args(s, in);
  HandleGuard both;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &both.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lb;
  ASSERT_EQ(bitepHandleGetLayout(both.h, &lb), bitepSuccess);
  check_received(s, W, rank, world, lb);
  const int64_t R = lb.num_recv_rows, N = lb.num_expert_rows;
  const int L = lb.num_local_experts, KL = lb.max_row_experts;
  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lb);
  // A rank-major y: each received row's toy outputs summed over its local experts would do; any [R, H] rows do.
  std::vector<uint8_t> y_rank(R * row + 1);
  if (R > 0) std::memcpy(y_rank.data(), lb.recv_x, R * row);
  std::vector<uint8_t> grad_out(in.T * row);
  for (int64_t t = 0; t < in.T; ++t)
    for (int hh = 0; hh < s.H; ++hh) store(s.dtype, grad_out.data(), t * s.H + hh, grad_value(s, rank, t, hh));
  for (int caller : {0, 1}) {
    SCOPED_TRACE(caller ? "caller's recv_x" : "pool's recv_x");
    bitepDispatchArgs_t o = a;
    o.rank_major_only = rank % 2 == 0 || W == 1;  // the odd ranks keep both views
    std::vector<uint8_t> recv((x.R + 1) * row, 0xab);
    if (caller) {
      o.recv_x = recv.data();
      o.recv_x_capacity = x.R;
    }
    HandleGuard only;
    ASSERT_EQ(bitepDispatch(g.g, &o, nullptr, &only.h), bitepSuccess) << bitepGetLastError();
    bitepDispatchLayout_t lo;
    ASSERT_EQ(bitepHandleGetLayout(only.h, &lo), bitepSuccess);
    if (o.rank_major_only) {
      EXPECT_EQ(lo.expert_x, nullptr);
    } else {
      check_received(s, W, rank, world, lo);
    }
    if (caller && x.R > 0) EXPECT_EQ(lo.recv_x, recv.data());
    expect_same_numbering(lo, lb, W, rank);
    ASSERT_TRUE(R == 0 || lo.recv_x != nullptr);
    if (R > 0) EXPECT_EQ(std::memcmp(lo.recv_x, lb.recv_x, R * row), 0) << "recv_x differs, rank " << rank;
    if (caller) EXPECT_EQ(recv[x.R * row], 0xab) << "recv_x written past its capacity";
    // The gather index: the same for both handles, each entry's received row, -1 on the pad rows, and on the
    // both-views handle each expert row is its source's received row; asked again, the same pointer.
    const int32_t *src_b = nullptr, *src_o = nullptr, *again = nullptr;
    ASSERT_EQ(bitepHandleGetExpertSources(g.g, both.h, nullptr, &src_b), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(bitepHandleGetExpertSources(g.g, only.h, nullptr, &src_o), bitepSuccess) << bitepGetLastError();
    ASSERT_EQ(bitepHandleGetExpertSources(g.g, only.h, nullptr, &again), bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(again, src_o);
    ASSERT_TRUE(N == 0 || (src_b != nullptr && src_o != nullptr));
    if (N > 0) EXPECT_EQ(std::memcmp(src_o, src_b, N * 4), 0) << "expert sources differ, rank " << rank;
    std::vector<int32_t> want(N, -1);
    for (int64_t i = 0; i < R; ++i)
      for (int j = 0; j < KL; ++j)
        if (lb.recv_expert_rows[i * KL + j] >= 0) want[lb.recv_expert_rows[i * KL + j]] = static_cast<int32_t>(i);
    for (int64_t e = 0; e < N; ++e) {
      ASSERT_EQ(src_b[e], want[e]) << "expert row " << e << ", rank " << rank;
      if (want[e] >= 0)
        EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(lb.expert_x) + e * row,
                              static_cast<const uint8_t*>(lb.recv_x) + want[e] * row, row),
                  0)
            << "expert row " << e << " is not received row " << want[e];
    }
    int pads = 0;
    for (int l = 0; l < L; ++l)
      pads += static_cast<int>(lb.expert_offsets[l + 1] - lb.expert_offsets[l] - lb.expert_counts[l]);
    EXPECT_EQ(std::count(want.begin(), want.end(), -1), pads) << "rank " << rank;
    bitepResult_t r1, r2;
    for (int weighted : {1, 0}) {
      const std::vector<uint8_t> ob = combine(g.g, both.h, y.data(), bitepLayoutExpertMajor, weighted, in.T, s, &r1);
      ASSERT_EQ(r1, bitepSuccess) << bitepGetLastError();
      const std::vector<uint8_t> oo = combine(g.g, only.h, y.data(), bitepLayoutExpertMajor, weighted, in.T, s, &r2);
      ASSERT_EQ(r2, bitepSuccess) << bitepGetLastError();
      EXPECT_EQ(oo, ob) << (weighted ? "weighted" : "unweighted") << " combine, rank " << rank;
      if (weighted) expect_values(s, oo, reference_combine(s, W, rank, in, true), "out");
    }
    const std::vector<uint8_t> rb = combine(g.g, both.h, y_rank.data(), bitepLayoutRankMajor, 0, in.T, s, &r1);
    ASSERT_EQ(r1, bitepSuccess) << bitepGetLastError();
    const std::vector<uint8_t> ro = combine(g.g, only.h, y_rank.data(), bitepLayoutRankMajor, 0, in.T, s, &r2);
    ASSERT_EQ(r2, bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(ro, rb) << "rank-major combine, rank " << rank;
    std::vector<uint8_t> gxb(in.T * row + 1, 0xcd), gxo(in.T * row + 1, 0xcd);
    ASSERT_EQ(bitepDispatchBackward(g.g, both.h, y.data(), bitepLayoutExpertMajor, gxb.data(), nullptr), bitepSuccess)
        << bitepGetLastError();
    ASSERT_EQ(bitepDispatchBackward(g.g, only.h, y.data(), bitepLayoutExpertMajor, gxo.data(), nullptr), bitepSuccess)
        << bitepGetLastError();
    EXPECT_EQ(gxo, gxb) << "dispatch backward, rank " << rank;
    EXPECT_EQ(gxb.back(), 0xcd) << "dispatch backward (both views) wrote past grad_x, rank " << rank;
    EXPECT_EQ(gxo.back(), 0xcd) << "dispatch backward (one view) wrote past grad_x, rank " << rank;
    std::vector<uint8_t> gyb(N * row + 1, 0xcd), gyo(N * row + 1, 0xcd);
    std::vector<float> gwb(in.T * config_topk(s, W) + 1, -5.0f), gwo(gwb);
    bitepCombineBackwardArgs_t cb = BITEP_COMBINE_BWD_ARGS_INIT;
    cb.grad_out = grad_out.data();
    cb.y = y.data();
    cb.grad_y = gyb.data();
    cb.grad_topk_weights = gwb.data();
    ASSERT_EQ(bitepCombineBackward(g.g, both.h, &cb, nullptr), bitepSuccess) << bitepGetLastError();
    cb.grad_y = gyo.data();
    cb.grad_topk_weights = gwo.data();
    ASSERT_EQ(bitepCombineBackward(g.g, only.h, &cb, nullptr), bitepSuccess) << bitepGetLastError();
    EXPECT_EQ(gyo, gyb) << "combine backward grad_y, rank " << rank;
    EXPECT_EQ(gwo, gwb) << "combine backward weight gradients, rank " << rank;
    EXPECT_EQ(gyb.back(), 0xcd) << "combine backward (both views) wrote past grad_y, rank " << rank;
    EXPECT_EQ(gyo.back(), 0xcd) << "combine backward (one view) wrote past grad_y, rank " << rank;
    EXPECT_EQ(gwb.back(), -5.0f) << "combine backward (both views) wrote past grad_topk_weights, rank " << rank;
    EXPECT_EQ(gwo.back(), -5.0f) << "combine backward (one view) wrote past grad_topk_weights, rank " << rank;
  }
}

// The C++ layer (bitep.hpp): a rank-major-only dispatch through bitep::Group, its gather index by
// Group::expert_sources, which throws bitep::Error for a handle of another group.
TEST(EpBuffers, CppLayerRankMajorOnly) {
  Spec s;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard raw, other;
  ASSERT_EQ(make_group(s, &raw), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(make_group(s, &other), bitepSuccess) << bitepGetLastError();
  bitep::Group g(std::exchange(raw.g, nullptr));  // owns it from here
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  a.rank_major_only = 1;
  const bitep::Handle h = g.dispatch(a);
  const bitepDispatchLayout_t lo = h.layout();
  EXPECT_EQ(lo.expert_x, nullptr);
  const int32_t* src = g.expert_sources(h);
  const int KL = lo.max_row_experts;
  for (int64_t i = 0; i < lo.num_recv_rows; ++i)
    for (int j = 0; j < KL; ++j)
      if (lo.recv_expert_rows[i * KL + j] >= 0) EXPECT_EQ(src[lo.recv_expert_rows[i * KL + j]], i) << "row " << i;
  bitep::Group wrong(std::exchange(other.g, nullptr));
  EXPECT_THROW((void)wrong.expert_sources(h), bitep::Error);
}

// Capacity one row short on one rank: that rank fails with bitepCapacityExceeded, every other rank with
// bitepRemoteError naming it; nothing is written to the caller's buffer, no rank hangs, and the group
// works afterwards.
void capacity_too_small(bool expert_major) {
  Spec s;
  s.route = Route::kOneRank;  // every token goes to the victim, so it receives rows
  const int W = world_size(), rank = world_rank(), victim = W - 1;
  s.target = victim;
  const std::vector<Input> world = make_world(s, W);
  const Expected x = expected_receive(s, W, rank, world);
  const size_t row = s.H * dsize(s.dtype);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
  std::vector<uint8_t> buf((x.N + x.R + 1) * row, 0xab);
  if (rank == victim) {
    ASSERT_GT(x.R, 0);
    if (expert_major) {
      a.expert_x = buf.data();
      a.expert_x_capacity = x.N - 1;
    } else {
      a.recv_x = buf.data();
      a.recv_x_capacity = x.R - 1;
    }
  }
  bitepHandle_t h = reinterpret_cast<bitepHandle_t>(&buf);  // must come back NULL
  const bitepResult_t r = bitepDispatch(g.g, &a, nullptr, &h);
  EXPECT_EQ(h, nullptr);
  const std::string err = bitepGetLastError();
  if (rank == victim) {
    EXPECT_EQ(r, bitepCapacityExceeded) << err;
    EXPECT_NE(err.find(expert_major ? "args->expert_x_capacity" : "args->recv_x_capacity"), std::string::npos) << err;
  } else {
    EXPECT_EQ(r, bitepRemoteError) << err;
    EXPECT_NE(err.find("rank " + std::to_string(victim)), std::string::npos) << err;
  }
  for (uint8_t b : buf) ASSERT_EQ(b, 0xab) << "the caller's buffer was written by a failed dispatch";
  // The group is fine: the same dispatch with pool buffers succeeds everywhere.
  dispatch_and_check(g.g, s, W, rank, world);
}

TEST(EpBuffers, RecvCapacityTooSmallFailsEveryRank) { capacity_too_small(false); }
TEST(EpBuffers, ExpertCapacityTooSmallFailsEveryRank) { capacity_too_small(true); }

// Repeated dispatch + combine of the same sizes: after the first round the pool allocates nothing. The group's memory
// is read twice a round: with the round's handle alive, and after it is destroyed, when its blocks and the calls'
// temporaries are cached, so still held. A pool that freed its blocks on release and allocated them again on the next
// call would hold the same bytes each round while a handle lives, but fewer once it is gone.
TEST(EpBuffers, SteadyStateAllocatesNothing) {
  Spec s;
  s.tokens = [](int r, int) { return int64_t{40} + 5 * r; };
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  size_t before = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &before), bitepSuccess);
  std::vector<size_t> live, idle;
  for (int it = 0; it < 5; ++it) {
    {
      const bitepDispatchArgs_t a = dispatch_args(s, world[rank]);
      HandleGuard h;
      ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
      bitepDispatchLayout_t lo;
      ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
      const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lo);
      bitepResult_t r;
      (void)combine(g.g, h.h, y.data(), bitepLayoutExpertMajor, 1, world[rank].T, s, &r);
      ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
      size_t held = 0;
      ASSERT_EQ(bitepGroupMemoryBytes(g.g, &held), bitepSuccess);
      live.push_back(held);
    }  // the handle is destroyed here
    size_t held = 0;
    ASSERT_EQ(bitepGroupMemoryBytes(g.g, &held), bitepSuccess);
    idle.push_back(held);
  }
  EXPECT_GT(live[0], before) << "the first round allocated nothing";
  for (int it = 0; it < 5; ++it) {
    EXPECT_EQ(live[it], live[0]) << "iteration " << it << " changed the pool (handle alive)";
    EXPECT_EQ(idle[it], live[0]) << "iteration " << it << ": destroying the handle freed pool memory";
  }
}

// bitepGroupTrimMemory: a large call's idle blocks go, a live handle's stay (its layout still reads and
// combines right), the count it returns is what bitepGroupMemoryBytes loses, and the group works on.
TEST(EpBuffers, TrimMemoryFreesIdleBlocksOnly) {
  Spec big, small;  // one group config (E, k, H, dtype), two sizes of traffic
  big.tokens = [](int r, int) { return int64_t{300} + 7 * r; };
  small.tokens = [](int r, int) { return int64_t{6} + r; };
  big.H = small.H = 64;
  small.seed = 2;
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> big_world = make_world(big, W), small_world = make_world(small, W);
  GroupGuard g;
  ASSERT_EQ(make_group(big, &g), bitepSuccess) << bitepGetLastError();
  dispatch_and_check(g.g, big, W, rank, big_world);
  size_t held_big = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &held_big), bitepSuccess);

  const bitepDispatchArgs_t a = dispatch_args(small, small_world[rank]);
  HandleGuard live;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &live.h), bitepSuccess) << bitepGetLastError();
  size_t before = 0, freed = 0, after = 0;
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &before), bitepSuccess);
  ASSERT_EQ(bitepGroupTrimMemory(g.g, &freed), bitepSuccess) << bitepGetLastError();
  ASSERT_EQ(bitepGroupMemoryBytes(g.g, &after), bitepSuccess);
  EXPECT_GT(freed, 0u) << "the large call's blocks were not freed";
  EXPECT_EQ(after, before - freed);
  EXPECT_LT(after, held_big);
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(live.h, &lo), bitepSuccess);
  check_received(small, W, rank, small_world, lo);
  const std::vector<uint8_t> y = toy_expert_outputs(small, W, rank, lo);
  bitepResult_t r;
  const std::vector<uint8_t> out =
      combine(g.g, live.h, y.data(), bitepLayoutExpertMajor, 1, small_world[rank].T, small, &r);
  ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
  expect_values(small, out, reference_combine(small, W, rank, small_world[rank], true), "out");
  ASSERT_EQ(bitepHandleDestroy(live.h), bitepSuccess);
  live.h = nullptr;

  EXPECT_EQ(bitepGroupTrimMemory(g.g, nullptr), bitepSuccess);  // freed may be NULL
  dispatch_and_check(g.g, big, W, rank, big_world);             // the group works on
  EXPECT_EQ(bitepGroupTrimMemory(nullptr, &freed), bitepInvalidArgument);
  EXPECT_NE(std::string(bitepGetLastError()).find("group"), std::string::npos) << bitepGetLastError();
}

}  // namespace
}  // namespace ept
