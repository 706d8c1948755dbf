// SPDX-License-Identifier: Apache-2.0
// Dispatch and combine on the host backend over a grid of shapes: every rank checks exactly what it
// received (rows, maps, weights, counts, the expert-major view with its alignment and zero pad rows), and
// the round trip dispatch -> toy experts (y = a_e * x + b_e) -> combine against a single-process
// reference with the library's exact rounding points. Backward passes against their definitions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <sstream>

#include "tests/multirank/ep_checks.h"

namespace ept {
namespace {

// Rank-major y for the tests: y_i = round(2 x_i + 1) per received row.
std::vector<uint8_t> rank_major_y(const Spec& s, const bitepDispatchLayout_t& lo) {
  std::vector<uint8_t> y(lo.num_recv_rows * s.H * dsize(s.dtype));
  for (int64_t i = 0; i < lo.num_recv_rows * s.H; ++i)
    store(s.dtype, y.data(), i, round_to(s.dtype, std::fmaf(2.0f, load(s.dtype, lo.recv_x, i), 1.0f)));
  return y;
}

std::vector<float> rank_major_reference(const Spec& s, int W, int rank, const Input& in) {
  std::vector<float> out(in.T * s.H);
  for (int64_t t = 0; t < in.T; ++t) {
    int ranks = 0;
    std::vector<char> to(W, 0);
    for (int e : in.experts[t]) to[e / s.L] = 1;
    for (int r = 0; r < W; ++r) ranks += to[r];
    for (int h = 0; h < s.H; ++h) {
      const float y = round_to(s.dtype, std::fmaf(2.0f, x_value(s, rank, t, h), 1.0f));
      float acc = 0.0f;
      for (int r = 0; r < ranks; ++r) acc = acc + y;
      out[t * s.H + h] = round_to(s.dtype, acc);
    }
  }
  return out;
}

class EpGrid : public testing::TestWithParam<Spec> {};

TEST_P(EpGrid, DispatchAndCombine) {
  const Spec& s = GetParam();
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Input& mine = world[rank];
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, mine);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess) << bitepGetLastError();
  check_received(s, W, rank, world, lo);

  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lo);
  bitepResult_t r;
  if (s.weights != Weights::kNone) {
    const std::vector<uint8_t> out1 = combine(g.g, h.h, y.data(), bitepLayoutExpertMajor, 1, mine.T, s, &r);
    ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
    expect_values(s, out1, reference_combine(s, W, rank, mine, true), "weighted out");
    const std::vector<uint8_t> out2 = combine(g.g, h.h, y.data(), bitepLayoutExpertMajor, 1, mine.T, s, &r);
    ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
    EXPECT_TRUE(out1 == out2) << "two combines of the same inputs differ";
  }
  const std::vector<uint8_t> out_u = combine(g.g, h.h, y.data(), bitepLayoutExpertMajor, 0, mine.T, s, &r);
  ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
  expect_values(s, out_u, reference_combine(s, W, rank, mine, false), "unweighted out");

  const std::vector<uint8_t> y_rm = rank_major_y(s, lo);
  const std::vector<uint8_t> out_rm = combine(g.g, h.h, y_rm.data(), bitepLayoutRankMajor, 1, mine.T, s, &r);
  ASSERT_EQ(r, bitepSuccess) << bitepGetLastError();
  expect_values(s, out_rm, rank_major_reference(s, W, rank, mine), "rank-major out");

  // Dispatch backward is the unweighted combine of the gradients, bit for bit.
  std::vector<uint8_t> gx(out_u.size() + 1, 0xcd);
  ASSERT_EQ(bitepDispatchBackward(g.g, h.h, y.data(), bitepLayoutExpertMajor, gx.data(), nullptr), bitepSuccess)
      << bitepGetLastError();
  EXPECT_EQ(gx.back(), 0xcd) << "dispatch backward (expert-major) wrote past grad_x";
  gx.pop_back();
  EXPECT_TRUE(gx == out_u) << "dispatch backward (expert-major) differs from the unweighted combine";
  std::vector<uint8_t> gx_rm(out_rm.size() + 1, 0xcd);
  ASSERT_EQ(bitepDispatchBackward(g.g, h.h, y_rm.data(), bitepLayoutRankMajor, gx_rm.data(), nullptr), bitepSuccess)
      << bitepGetLastError();
  EXPECT_EQ(gx_rm.back(), 0xcd) << "dispatch backward (rank-major) wrote past grad_x";
  gx_rm.pop_back();
  EXPECT_TRUE(gx_rm == out_rm) << "dispatch backward (rank-major) differs from the rank-major combine";
}

TEST_P(EpGrid, CombineBackward) {
  const Spec& s = GetParam();
  const int W = world_size(), rank = world_rank();
  const std::vector<Input> world = make_world(s, W);
  const Input& mine = world[rank];
  const int E = s.E(W), k = config_topk(s, W);
  GroupGuard g;
  ASSERT_EQ(make_group(s, &g), bitepSuccess) << bitepGetLastError();
  const bitepDispatchArgs_t a = dispatch_args(s, mine);
  HandleGuard h;
  ASSERT_EQ(bitepDispatch(g.g, &a, nullptr, &h.h), bitepSuccess) << bitepGetLastError();
  bitepDispatchLayout_t lo;
  ASSERT_EQ(bitepHandleGetLayout(h.h, &lo), bitepSuccess);
  const Expected x = expected_receive(s, W, rank, world);
  const std::vector<uint8_t> y = toy_expert_outputs(s, W, rank, lo);
  std::vector<uint8_t> grad_out(mine.T * s.H * dsize(s.dtype));
  for (int64_t t = 0; t < mine.T; ++t)
    for (int hh = 0; hh < s.H; ++hh) store(s.dtype, grad_out.data(), t * s.H + hh, grad_value(s, rank, t, hh));
  const size_t row = s.H * dsize(s.dtype);

  for (int weighted = 0; weighted <= (s.weights != Weights::kNone ? 1 : 0); ++weighted) {
    SCOPED_TRACE(weighted ? "weighted" : "unweighted");
    std::vector<uint8_t> grad_y(lo.num_expert_rows * row, 0xcd);
    std::vector<float> gw_compact(mine.T * k, -5.0f), gw_dense(mine.T * E, -5.0f);
    bitepCombineBackwardArgs_t b = BITEP_COMBINE_BWD_ARGS_INIT;
    b.grad_out = grad_out.data();
    b.weighted = weighted;
    b.y = y.data();
    b.grad_y = grad_y.data();
    b.grad_topk_weights = gw_compact.data();
    b.grad_probs = gw_dense.data();
    ASSERT_EQ(bitepCombineBackward(g.g, h.h, &b, nullptr), bitepSuccess) << bitepGetLastError();
    // grad_y: the source token's gradient row, times its router weight when weighted; pad rows zero.
    Mismatches m;
    for (int64_t i = 0; i < x.R; ++i)
      for (size_t j = 0; j < x.local[i].size(); ++j) {
        const int32_t pos = lo.recv_expert_rows[i * lo.max_row_experts + j];
        for (int hh = 0; hh < s.H; ++hh) {
          const float gv = grad_value(s, x.src_rank[i], x.src_token[i], hh);
          const float want = weighted ? round_to(s.dtype, x.wrow[i][j] * gv) : gv;
          const float got = load(s.dtype, grad_y.data(), pos * s.H + hh);
          MISMATCH(m, got == want, "grad_y[" << pos << "][" << hh << "] = " << got << ", expected " << want);
        }
      }
    for (int l = 0; l < s.L; ++l)
      for (int64_t r = x.expert_offsets[l] + x.expert_counts[l]; r < x.expert_offsets[l + 1]; ++r)
        for (int hh = 0; hh < s.H; ++hh)
          MISMATCH(m, load(s.dtype, grad_y.data(), r * s.H + hh) == 0.0f, "grad_y pad row " << r << " not zero");
    // Weight gradients: dot(y_e(x_t), grad_out_t) (analytic, fp64), 0 where not routed / unweighted.
    check_weight_grads(s, W, rank, mine, grad_out, weighted, gw_compact.data(), gw_dense.data(), &m);
    EXPECT_EQ(m.n, 0) << "on rank " << rank << ":" << m.first;
  }
}

INSTANTIATE_TEST_SUITE_P(Host, EpGrid, testing::ValuesIn(spec_grid()), [](const testing::TestParamInfo<Spec>& info) {
  return info.param.name;
});
// Shapes and option combinations the named scenarios do not pick, drawn (seeded) on the host backend.
INSTANTIATE_TEST_SUITE_P(HostRandom,
                         EpGrid,
                         testing::ValuesIn(random_specs(64, 20261204)),
                         [](const testing::TestParamInfo<Spec>& info) { return info.param.name; });

}  // namespace
}  // namespace ept
