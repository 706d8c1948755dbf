// SPDX-License-Identifier: Apache-2.0
// The host reference of the EP primitives (kernels/ep_params.h) on hand-made single-process cases, and a
// W-rank round trip simulated in one process (the transport is a memcpy). Linked against bitep_internal.
#include "src/host/ep_host.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "src/host/dtype_host.h"

namespace {

using bitep::host::bf16_to_float;
using bitep::host::float_to_bf16;
using bitep::kernels::DType;
using bitep::kernels::RoutingFormat;
using bitep::kernels::RoutingInput;
using bitep::kernels::WeightFormat;

std::vector<uint8_t> bitmap(const std::vector<std::vector<int>>& rows, int E) {
  const int nb = (E + 7) / 8;
  std::vector<uint8_t> m(rows.size() * nb, 0);
  for (size_t t = 0; t < rows.size(); ++t)
    for (int e : rows[t]) m[t * nb + e / 8] |= static_cast<uint8_t>(1u << (e % 8));
  return m;
}

struct Layout {
  std::vector<int32_t> counts, slot;
};

Layout layout(const RoutingInput& in, int64_t T, int E, int k, int W) {
  Layout l;
  l.counts.assign(W * (E / W + 1), -7);
  l.slot.assign(T * W, -7);
  bitep::kernels::LayoutParams p;
  p.num_tokens = T;
  p.num_experts = E;
  p.topk = k;
  p.num_ranks = W;
  p.routing = in;
  p.counts = l.counts.data();
  p.token_slot = l.slot.data();
  bitep::host::ep_layout(p);
  return l;
}

TEST(EpHostLayout, CountsAndSlotsInTokenOrder) {
  // E = 12, W = 3, L = 4, k = 2.
  const std::vector<std::vector<int>> rows = {{0, 5}, {4, 7}, {1, 2}, {8, 11}, {3, 9}};
  const std::vector<uint8_t> m = bitmap(rows, 12);
  RoutingInput in{RoutingFormat::kBitmap, m.data(), WeightFormat::kNone, nullptr};
  const Layout l = layout(in, 5, 12, 2, 3);
  // rank 0 gets tokens 0, 2, 4; rank 1 tokens 0, 1; rank 2 tokens 3, 4.
  EXPECT_EQ(l.counts, (std::vector<int32_t>{3, 1, 1, 1, 1, /**/ 2, 1, 1, 0, 1, /**/ 2, 1, 1, 0, 1}));
  EXPECT_EQ(l.slot, (std::vector<int32_t>{0, 0, -1, /**/ -1, 1, -1, /**/ 1, -1, -1, /**/ -1, -1, 0, /**/ 2, -1, 1}));
}

TEST(EpHostLayout, FirstKSetBitsOnlyAndPadBitsIgnored) {
  // E = 10 (2 pad bits in byte 1), k = 2: row 0 has 3 experts (0, 1, 9) and pad bits set.
  std::vector<uint8_t> m = {0x03, 0x02 | 0xc0};
  RoutingInput in{RoutingFormat::kBitmap, m.data(), WeightFormat::kNone, nullptr};
  const Layout l = layout(in, 1, 10, 2, 2);  // L = 5
  EXPECT_EQ(l.counts, (std::vector<int32_t>{1, 1, 1, 0, 0, 0, /**/ 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(l.slot, (std::vector<int32_t>{0, -1}));
}

TEST(EpHostLayout, IndicesOutOfRangeAndDuplicatesIgnored) {
  const std::vector<int32_t> idx = {7, -1, 7, 2, /**/ 3, 0, 99, 6};  // k = 4, E = 8, W = 2
  RoutingInput in{RoutingFormat::kTopkIndices, idx.data(), WeightFormat::kNone, nullptr};
  const Layout l = layout(in, 2, 8, 4, 2);
  // token 0: {2, 7}; token 1: {0, 3, 6}
  EXPECT_EQ(l.counts, (std::vector<int32_t>{2, 1, 0, 1, 1, /**/ 2, 0, 0, 1, 1}));
  EXPECT_EQ(l.slot, (std::vector<int32_t>{0, 0, 1, 1}));
}

TEST(EpHostLayout, BytemapNonzeroIsRouted) {
  const std::vector<uint8_t> m = {0, 3, 0, 1, /**/ 1, 0, 0, 0};  // E = 4, k = 2 (row 1 has one expert)
  RoutingInput in{RoutingFormat::kBytemap, m.data(), WeightFormat::kNone, nullptr};
  const Layout l = layout(in, 2, 4, 2, 4);  // L = 1
  EXPECT_EQ(l.counts, (std::vector<int32_t>{1, 1, 1, 1, 0, 0, 1, 1}));
  EXPECT_EQ(l.slot, (std::vector<int32_t>{-1, 0, -1, 0, 0, -1, -1, -1}));
}

TEST(EpHostLayout, ZeroTokensWritesNothing) {
  RoutingInput in{RoutingFormat::kBitmap, nullptr, WeightFormat::kNone, nullptr};
  const Layout l = layout(in, 0, 8, 2, 2);
  for (int32_t c : l.counts) EXPECT_EQ(c, -7);
}

// Permute for W = 2, E = 8 (L = 4), k = 3, H = 2 fp32; self rank 1.
struct PermuteCase {
  std::vector<float> x = {10, 11, 20, 21, 30, 31};
  std::vector<int32_t> slot;
  std::vector<int64_t> send_offsets = {0, 0};
  std::vector<float> send_x, recv_x, send_w, recv_w;
  std::vector<uint8_t> send_map, recv_map;

  // The case's shape (3 tokens, E = 8, k = 3, W = 2, self rank 1, H = 2 fp32, self chunk at row 1) over
  // x and the slots of the last run(); no buffers.
  bitep::kernels::PermuteParams params(const RoutingInput& in) const {
    bitep::kernels::PermuteParams p;
    p.num_tokens = 3;
    p.num_experts = 8;
    p.topk = 3;
    p.num_ranks = 2;
    p.self_rank = 1;
    p.hidden = 2;
    p.dtype = DType::kF32;
    p.routing = in;
    p.x = x.data();
    p.token_slot = slot.data();
    p.self_recv_offset = 1;
    return p;
  }

  void run(const RoutingInput& in, bool maps = true) {
    const Layout l = layout(in, 3, 8, 3, 2);
    slot = l.slot;
    const int S = l.counts[0], R = l.counts[5];
    send_x.assign(S * 2, -1);
    recv_x.assign((R + 1) * 2, -1);  // the self chunk starts at row 1
    send_w.assign(S * 3, -1);
    recv_w.assign((R + 1) * 3, -1);
    send_map.assign(S, 0xee);
    recv_map.assign(R + 1, 0xee);
    bitep::kernels::PermuteParams p = params(in);
    p.send_offsets = send_offsets.data();
    p.send_x = send_x.data();
    p.recv_x = recv_x.data();
    p.send_map = maps ? send_map.data() : nullptr;
    p.recv_map = maps ? recv_map.data() : nullptr;
    p.send_weights = send_w.data();
    p.recv_weights = recv_w.data();
    bitep::host::ep_permute(p);
  }
};

TEST(EpHostPermute, RowsMapsAndCompactWeights) {
  // token 0: {1, 4, 6}, token 1: {0, 2, 3}, token 2: {5, 6, 7}
  const std::vector<uint8_t> m = bitmap({{1, 4, 6}, {0, 2, 3}, {5, 6, 7}}, 8);
  const std::vector<float> w = {0.1f, 0.4f, 0.6f, 1.0f, 1.2f, 1.3f, 2.5f, 2.6f, 2.7f};
  PermuteCase c;
  c.run({RoutingFormat::kBitmap, m.data(), WeightFormat::kCompact, w.data()});
  // To rank 0 (send): token 0 (slice {1}), token 1 (slice {0, 2, 3}).
  EXPECT_EQ(c.send_x, (std::vector<float>{10, 11, 20, 21}));
  EXPECT_EQ(c.send_map, (std::vector<uint8_t>{0x02, 0x0d}));
  EXPECT_EQ(c.send_w, (std::vector<float>{0.1f, 0, 0, 1.0f, 1.2f, 1.3f}));
  // To self (rank 1, receive rows 1..): token 0 (slice {0, 2}), token 2 (slice {1, 2, 3}).
  EXPECT_EQ(c.recv_x, (std::vector<float>{-1, -1, 10, 11, 30, 31}));
  EXPECT_EQ(c.recv_map, (std::vector<uint8_t>{0xee, 0x05, 0x0e}));
  EXPECT_EQ(c.recv_w, (std::vector<float>{-1, -1, -1, 0.4f, 0.6f, 0, 2.5f, 2.6f, 2.7f}));
}

TEST(EpHostPermute, DenseWeightsAndUnsortedIndices) {
  // Same routing as indices in a scrambled order; compact weights follow the index order.
  const std::vector<int32_t> idx = {6, 1, 4, /**/ 3, 0, 2, /**/ 7, 5, 6};
  const std::vector<float> wc = {0.6f, 0.1f, 0.4f, 1.3f, 1.0f, 1.2f, 2.7f, 2.5f, 2.6f};
  PermuteCase c;
  c.run({RoutingFormat::kTopkIndices, idx.data(), WeightFormat::kCompact, wc.data()});
  EXPECT_EQ(c.send_w, (std::vector<float>{0.1f, 0, 0, 1.0f, 1.2f, 1.3f}));
  EXPECT_EQ(c.recv_w, (std::vector<float>{-1, -1, -1, 0.4f, 0.6f, 0, 2.5f, 2.6f, 2.7f}));
  std::vector<float> dense(3 * 8, 9.0f);
  const std::vector<std::vector<int>> ex = {{1, 4, 6}, {0, 2, 3}, {5, 6, 7}};
  for (int t = 0; t < 3; ++t)
    for (int e : ex[t]) dense[t * 8 + e] = t + e / 10.0f;
  const std::vector<uint8_t> m = bitmap(ex, 8);
  PermuteCase d;
  d.run({RoutingFormat::kBitmap, m.data(), WeightFormat::kDense, dense.data()});
  EXPECT_EQ(d.send_w, (std::vector<float>{0.1f, 0, 0, 1.0f, 1.2f, 1.3f}));
  EXPECT_EQ(d.recv_w, (std::vector<float>{-1, -1, -1, 0.4f, 0.6f, 0, 2.5f, 2.6f, 2.7f}));
}

TEST(EpHostPermute, NullMapsAndNoWeightsCopyRowsOnly) {
  const std::vector<uint8_t> m = bitmap({{1, 4, 6}, {0, 2, 3}, {5, 6, 7}}, 8);
  PermuteCase c;
  c.run({RoutingFormat::kBitmap, m.data(), WeightFormat::kNone, nullptr}, /*maps=*/false);
  EXPECT_EQ(c.send_x, (std::vector<float>{10, 11, 20, 21}));
  EXPECT_EQ(c.recv_x, (std::vector<float>{-1, -1, 10, 11, 30, 31}));
  for (uint8_t b : c.send_map) EXPECT_EQ(b, 0xee);
  for (float w : c.send_w) EXPECT_EQ(w, -1);
}

// peer_dest: rank 0's chunk goes to its own destination row 0 (the peer's window), the same rows, maps and
// weights as the send buffers'; a pass with the maps alone, then one with the rows alone, add up to it.
TEST(EpHostPermute, PeerDestinationsMetaThenRows) {
  const std::vector<uint8_t> m = bitmap({{1, 4, 6}, {0, 2, 3}, {5, 6, 7}}, 8);
  const std::vector<float> w = {0.1f, 0.4f, 0.6f, 1.0f, 1.2f, 1.3f, 2.5f, 2.6f, 2.7f};
  const RoutingInput in{RoutingFormat::kBitmap, m.data(), WeightFormat::kCompact, w.data()};
  PermuteCase ref;
  ref.run(in);
  std::vector<float> dx(4, -1), dw(6, -1);
  std::vector<uint8_t> dm(2, 0xee);
  std::vector<float> recv_x(6, -1), recv_w(9, -1);
  std::vector<uint8_t> recv_map(3, 0xee);
  std::vector<void*> meta = {nullptr, nullptr, dm.data(), nullptr, dw.data(), nullptr};  // [x | map | w] x W
  std::vector<void*> rows = {dx.data(), nullptr, nullptr, nullptr, nullptr, nullptr};
  bitep::kernels::PermuteParams p = ref.params(in);
  p.recv_x = recv_x.data();
  p.recv_map = recv_map.data();
  p.recv_weights = recv_w.data();
  p.peer_dest = meta.data();
  bitep::host::ep_permute(p);
  EXPECT_EQ(dx, (std::vector<float>{-1, -1, -1, -1}));  // no rows yet
  EXPECT_EQ(dm, ref.send_map);
  EXPECT_EQ(dw, ref.send_w);
  EXPECT_EQ(recv_x, ref.recv_x);  // the self chunk whole
  EXPECT_EQ(recv_map, ref.recv_map);
  EXPECT_EQ(recv_w, ref.recv_w);
  p.recv_x = nullptr, p.recv_map = nullptr, p.recv_weights = nullptr;
  p.routing.weight_format = WeightFormat::kNone;
  p.peer_dest = rows.data();
  bitep::host::ep_permute(p);
  EXPECT_EQ(dx, ref.send_x);
  EXPECT_EQ(dm, ref.send_map);  // untouched by the rows' pass
  EXPECT_EQ(dw, ref.send_w);
}

TEST(EpHostPackCounts, CountsThenTheWholeSendVector) {
  // W = 3, L = 2: counts [r][0] rows to r, [r][1..2] per local expert; rows of 3 + 2 + 1 ints.
  const std::vector<int32_t> counts = {5, 1, 4, /**/ 7, 6, 2, /**/ 0, 0, 0};
  std::vector<int32_t> out(3 * 8, -9);
  bitep::kernels::PackCountsParams p;
  p.counts = counts.data();
  p.num_ranks = 3;
  p.local_experts = 2;
  p.out = out.data();
  p.row = 8;
  p.flags = 0x2a;
  bitep::host::ep_pack_counts(p);
  EXPECT_EQ(out, (std::vector<int32_t>{5,      1, 4, 0x2a, 5, 7, 0, -9, /**/ 7, 6, 2, 0x2a, 5, 7, 0, -9,
                                       /**/ 0, 0, 0, 0x2a, 5, 7, 0, -9}));
}

TEST(EpHostPackCounts, LayoutPacksItsOwnCounts) {
  // The layout of CountsAndSlotsInTokenOrder (E = 12, W = 3, L = 4), packed by the layout itself.
  const std::vector<std::vector<int>> rows = {{0, 5}, {4, 7}, {1, 2}, {8, 11}, {3, 9}};
  const std::vector<uint8_t> m = bitmap(rows, 12);
  std::vector<int32_t> counts(3 * 5, -7), slot(5 * 3, -7), out(3 * 10, -9);
  bitep::kernels::LayoutParams p;
  p.num_tokens = 5;
  p.num_experts = 12;
  p.topk = 2;
  p.num_ranks = 3;
  p.routing = RoutingInput{RoutingFormat::kBitmap, m.data(), WeightFormat::kNone, nullptr};
  p.counts = counts.data();
  p.token_slot = slot.data();
  p.pack_out = out.data();
  p.pack_row = 10;
  p.pack_flags = 0x11;
  bitep::host::ep_layout(p);
  const std::vector<int32_t> tail = {0x11, 3, 2, 2, -9};  // flags, the send-count vector, one column untouched
  std::vector<int32_t> want;
  for (int r = 0; r < 3; ++r) {
    want.insert(want.end(), counts.begin() + r * 5, counts.begin() + r * 5 + 5);
    want.insert(want.end(), tail.begin(), tail.end());
  }
  EXPECT_EQ(out, want);
}

// Expert-major parameters over fp32 rows of one element (H = 1): R rows, L local experts, KL per row.
bitep::kernels::ExpertMajorParams expert_major_f32(int64_t R,
                                                   int L,
                                                   int KL,
                                                   int64_t N,
                                                   const std::vector<uint8_t>& map,
                                                   const std::vector<int32_t>& offsets,
                                                   const std::vector<int32_t>& counts,
                                                   const std::vector<float>& x) {
  bitep::kernels::ExpertMajorParams p;
  p.num_recv_rows = R;
  p.num_local_experts = L;
  p.max_row_experts = KL;
  p.hidden = 1;
  p.dtype = DType::kF32;
  p.recv_map = map.data();
  p.expert_offsets = offsets.data();
  p.expert_counts = counts.data();
  p.recv_x = x.data();
  p.num_expert_rows = N;
  return p;
}

TEST(EpHostExpertMajor, PositionsPadRowsAndWeightedScatter) {
  // L = 3, KL = 2, alignment 2: received rows' maps {0, 2}, {2}, {0, 1}, {0}.
  const std::vector<uint8_t> map = {0x05, 0x04, 0x03, 0x01};
  const std::vector<int32_t> counts = {3, 1, 2}, offsets = {0, 4, 6, 8};
  const std::vector<float> x = {1, 2, 3, 4};  // H = 1
  std::vector<int32_t> rows(8, 99);
  std::vector<float> ex(9, -5.0f);  // one guard row
  bitep::kernels::ExpertMajorParams p = expert_major_f32(4, 3, 2, 8, map, offsets, counts, x);
  p.recv_expert_rows = rows.data();
  p.expert_x = ex.data();
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(rows, (std::vector<int32_t>{0, 6, 7, -1, 1, 4, 2, -1}));
  EXPECT_EQ(ex, (std::vector<float>{1, 3, 4, 0, 3, 0, 1, 2, -5}));
  // Weighted (combine backward): expert_x[pos] = round(w * x).
  const std::vector<float> w = {0.5f, 2.0f, 3.0f, 0, 1.5f, 0.25f, 4.0f, 0};
  p.recv_weights = w.data();
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(ex, (std::vector<float>{0.5f, 4.5f, 16.0f, 0, 0.75f, 0, 2.0f, 6.0f, -5}));
  // Positions given (combine backward reuses the dispatch's): the same scatter, rows read and left as
  // they are, the map not read; a position past the view moves nothing.
  std::vector<float> ex2(9, -7.0f);
  rows[7] = 8;  // past num_expert_rows: must not be written (the guard row stays -7)
  const std::vector<int32_t> rows_before = rows;
  p.expert_x = ex2.data();
  p.recv_map = nullptr;
  p.positions_given = true;
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(rows, rows_before);
  EXPECT_EQ(ex2, (std::vector<float>{0.5f, 4.5f, 16.0f, 0, 0.75f, 0, 2.0f, 6.0f, -7}));
}

TEST(EpHostExpertMajor, SplitCallsWriteEveryCopyOnce) {
  // As a split dispatch calls it: positions, the copies of rows [1, 3) and the pad rows; then, from the
  // same positions, the copies of the other rows and no pad row. Together: the single call's result.
  const std::vector<uint8_t> map = {0x05, 0x01, 0x06, 0x03};  // rows use experts {0,2} {0} {1,2} {0,1}
  const std::vector<int32_t> counts = {3, 2, 2}, offsets = {0, 4, 6, 8};
  const std::vector<float> x = {1, 2, 3, 4};
  bitep::kernels::ExpertMajorParams p = expert_major_f32(4, 3, 2, 8, map, offsets, counts, x);
  std::vector<int32_t> rows_one(8, 99), rows_split(8, 99);
  std::vector<float> one(8, -5.0f), split(8, -5.0f);
  p.recv_expert_rows = rows_one.data();
  p.expert_x = one.data();
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(one, (std::vector<float>{1, 2, 4, 0, 3, 4, 1, 3}));

  p.recv_expert_rows = rows_split.data();
  p.expert_x = split.data();
  p.copy_begin = 1;
  p.copy_end = 3;
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(split, (std::vector<float>{-5, 2, -5, 0, 3, -5, -5, 3})) << "rows 1, 2 and the pad row only";
  p.positions_given = true;
  p.copy_outside = true;
  p.zero_pads = false;
  split[3] = -6.0f;  // a pad row: the second call must leave it
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(rows_split, rows_one);
  EXPECT_EQ(split, (std::vector<float>{1, 2, 4, -6, 3, 4, 1, 3}));
}

TEST(EpHostExpertMajor, RangeReadThroughAnIndex) {
  // The dispatch's own rows: the copies of rows [1, 3) read another array (x in token order) at
  // src_index[i - 1]; the positions still come from the rows' maps.
  const std::vector<uint8_t> map = {0x05, 0x01, 0x06, 0x03};  // rows use experts {0,2} {0} {1,2} {0,1}
  const std::vector<int32_t> counts = {3, 2, 2}, offsets = {0, 4, 6, 8};
  const std::vector<float> tokens = {30, 7, 20};  // rows 1, 2 are tokens 2, 0
  const std::vector<int32_t> index = {2, 0};
  bitep::kernels::ExpertMajorParams p = expert_major_f32(4, 3, 2, 8, map, offsets, counts, tokens);
  std::vector<int32_t> rows(8, 99);
  std::vector<float> ex(8, -5.0f);
  p.recv_expert_rows = rows.data();
  p.expert_x = ex.data();
  p.copy_begin = 1;
  p.copy_end = 3;
  p.src_index = index.data();
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(ex, (std::vector<float>{-5, 20, -5, 0, 30, -5, -5, 30}));
}

TEST(EpHostExpertMajor, InconsistentCountsNeverWriteOutside) {
  // The map says two rows use expert 0 but counts say one: the second gets -1 and moves nothing.
  const std::vector<uint8_t> map = {0x01, 0x01};
  const std::vector<int32_t> counts = {1}, offsets = {0, 1};
  const std::vector<float> x = {1, 2};
  std::vector<int32_t> rows(2, 99);
  std::vector<float> ex(2, -5.0f);
  bitep::kernels::ExpertMajorParams p = expert_major_f32(2, 1, 1, 1, map, offsets, counts, x);
  p.recv_expert_rows = rows.data();
  p.expert_x = ex.data();
  bitep::host::ep_expert_major(p);
  EXPECT_EQ(rows, (std::vector<int32_t>{0, -1}));
  EXPECT_EQ(ex, (std::vector<float>{1, -5}));
}

TEST(EpHostReduce, FmaChainInAscendingOrderOneRounding) {
  // bf16, H = 1: row 0 = w0*y[2] + w1*y[0] with fmaf, then one rounding; row 1 unweighted.
  const std::vector<uint16_t> y = {float_to_bf16(1.0078125f), float_to_bf16(3.0f), float_to_bf16(-0.3359375f)};
  const std::vector<int32_t> rows = {2, 0, 1, -1};
  const std::vector<float> w = {0.1f, 0.7f, 5.0f, 0};
  std::vector<uint16_t> out(2);
  bitep::kernels::ReduceParams p;
  p.num_recv_rows = 2;
  p.max_row_experts = 2;
  p.hidden = 1;
  p.dtype = DType::kBF16;
  p.y = y.data();
  p.recv_expert_rows = rows.data();
  p.recv_weights = w.data();
  p.out = out.data();
  bitep::host::ep_reduce(p);
  const float want0 = std::fmaf(0.7f, bf16_to_float(y[0]), std::fmaf(0.1f, bf16_to_float(y[2]), 0.0f));
  EXPECT_EQ(out[0], float_to_bf16(want0));
  EXPECT_EQ(out[1], float_to_bf16(5.0f * 3.0f));
  p.recv_weights = nullptr;
  bitep::host::ep_reduce(p);
  EXPECT_EQ(out[0], float_to_bf16(bf16_to_float(y[2]) + bf16_to_float(y[0])));
  EXPECT_EQ(out[1], float_to_bf16(3.0f));
}

// fp32 rows: one rounding a product-sum (fmaf), where a bf16 output's own rounding hides a separate product.
// 1/3 * 3 - 1 is about 3e-8 with the fma, 0 with the product rounded first.
TEST(EpHostReduce, Fp32FmaKeepsTheProductsBits) {
  const std::vector<float> y = {-1.0f, 3.0f};
  const std::vector<int32_t> rows = {0, 1};
  const std::vector<float> w = {1.0f, 1.0f / 3.0f};
  std::vector<float> out(1, NAN);
  bitep::kernels::ReduceParams p;
  p.num_recv_rows = 1;
  p.max_row_experts = 2;
  p.hidden = 1;
  p.dtype = DType::kF32;
  p.y = y.data();
  p.recv_expert_rows = rows.data();
  p.recv_weights = w.data();
  p.out = out.data();
  bitep::host::ep_reduce(p);
  EXPECT_EQ(out[0], std::fmaf(w[1], y[1], std::fmaf(w[0], y[0], 0.0f)));
  EXPECT_NE(out[0], 0.0f);
}

// skip_empty_rows (the low-latency combine's): a row with no expert is left as it is; a row whose first slot holds an
// expert is written, whatever its other slots hold.
TEST(EpHostReduce, SkipEmptyRowsSkipsOnlyRowsWithoutExperts) {
  const std::vector<float> y = {2.0f, 5.0f};
  const std::vector<int32_t> rows = {1, -1, -1, -1};
  std::vector<float> out = {NAN, 7.0f};
  bitep::kernels::ReduceParams p;
  p.num_recv_rows = 2;
  p.max_row_experts = 2;
  p.hidden = 1;
  p.dtype = DType::kF32;
  p.y = y.data();
  p.recv_expert_rows = rows.data();
  p.out = out.data();
  p.skip_empty_rows = true;
  bitep::host::ep_reduce(p);
  EXPECT_EQ(out[0], 5.0f);
  EXPECT_EQ(out[1], 7.0f);  // untouched
}

// The host's bf16 and fp16 conversions round to nearest, ties to even (as __float2bfloat16_rn / __float2half_rn),
// subnormal fp16 included: the exact ties random data almost never hits.
TEST(EpHostDtype, RoundingTiesToEven) {
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3F80);      // tie, even below: stays
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);  // tie, odd below: up
  EXPECT_EQ(float_to_bf16(-(1.0f + 3 * 0x1p-8f)), 0xBF82);
  EXPECT_EQ(bitep::host::float_to_half(1.0f + 0x1p-11f), 0x3C00);      // tie, even below
  EXPECT_EQ(bitep::host::float_to_half(1.0f + 3 * 0x1p-11f), 0x3C02);  // tie, odd below
  EXPECT_EQ(bitep::host::float_to_half(0x1p-25f), 0x0000);             // half the smallest subnormal: to 0 (even)
  EXPECT_EQ(bitep::host::float_to_half(2.5f * 0x1p-24f), 0x0002);      // a subnormal tie, even above
  EXPECT_EQ(bitep::host::float_to_half(3.5f * 0x1p-24f), 0x0004);      // a subnormal tie, odd below: up
}

TEST(EpHostReduce, WeightGradientsOnly) {
  const std::vector<float> y = {1, 2, 3, 4, 5, 6};  // 3 rows, H = 2
  const std::vector<int32_t> rows = {2, 0, -1, 1};
  const std::vector<float> g = {0.5f, -1, 2, 0.25f};
  std::vector<float> gw(4, 9);
  bitep::kernels::ReduceParams p;
  p.num_recv_rows = 2;
  p.max_row_experts = 2;
  p.hidden = 2;
  p.dtype = DType::kF32;
  p.y = y.data();
  p.recv_expert_rows = rows.data();
  p.grad_rows = g.data();
  p.grad_weights = gw.data();
  bitep::host::ep_reduce(p);  // out is null: weight gradients only
  EXPECT_EQ(gw, (std::vector<float>{5 * 0.5f - 6, 1 * 0.5f - 2, 0, 3 * 2 + 4 * 0.25f}));
}

// A reduce of fp32 rows (H = 1) into per-source destinations: sources = offsets.size() - 1, R = offsets.back().
bitep::kernels::ReduceParams per_source_params(const std::vector<float>& y,
                                               const std::vector<int32_t>& rows,
                                               int KL,
                                               const std::vector<void*>& outs,
                                               const std::vector<int64_t>& offsets,
                                               int self) {
  bitep::kernels::ReduceParams p;
  p.num_recv_rows = offsets.back();
  p.max_row_experts = KL;
  p.hidden = 1;
  p.dtype = DType::kF32;
  p.y = y.data();
  p.recv_expert_rows = rows.data();
  p.num_sources = static_cast<int>(offsets.size()) - 1;
  p.outs = outs.data();
  p.row_offsets = offsets.data();
  p.self_source = self;
  return p;
}

TEST(EpHostReduce, PerSourceDestinations) {
  // 5 rows from 4 sources: rows [0, 2) of source 0, none of source 1, [2, 4) of source 2 (not written:
  // null destination), [4, 5) of source 3; each source's rows land at its own buffer from row 0.
  const std::vector<float> y = {1, 2, 3, 4, 5};  // 5 expert rows, H = 1
  const std::vector<int32_t> rows = {0, -1, 1, 2, 3, -1, 4, 0, -1, 4};
  std::vector<float> out0(2, -9), out3(2, -9), unused(4, -9);
  std::vector<void*> outs = {out0.data(), unused.data(), nullptr, out3.data()};
  const std::vector<int64_t> offsets = {0, 2, 2, 4, 5};
  bitep::host::ep_reduce(per_source_params(y, rows, 2, outs, offsets, 3));
  EXPECT_EQ(out0, (std::vector<float>{1, 2 + 3}));
  EXPECT_EQ(out3, (std::vector<float>{5, -9}));
  EXPECT_EQ(unused, (std::vector<float>(4, -9)));
}

// The low-latency calls' slot parity (kernels::SlotParity: (*count + add) & 1): outs holds two tables of
// num_sources, and the parity picks one; no count: the first.
TEST(EpHostReduce, SlotParityPicksTheTable) {
  const std::vector<float> y = {1, 2};
  const std::vector<int32_t> rows = {0, 1};  // row 0 -> y[0], row 1 -> y[1] (KL = 1)
  const std::vector<int64_t> offsets = {0, 1, 2};
  for (const int parity_case : {-1, 0, 1, 2, 3}) {  // -1: no count; else count = case / 2 ... add = case % 2
    std::vector<float> a0(1, -9), a1(1, -9), b0(1, -9), b1(1, -9);
    std::vector<void*> outs = {a0.data(), a1.data(), b0.data(), b1.data()};  // [2][W = 2]
    const uint64_t count = parity_case < 0 ? 0 : static_cast<uint64_t>(7 + parity_case / 2);
    bitep::kernels::ReduceParams p = per_source_params(y, rows, 1, outs, offsets, 0);  // 2 sources: the first table
    if (parity_case >= 0) {
      p.outs_parity.count = &count;
      p.outs_parity.add = static_cast<uint32_t>(parity_case % 2);
    }
    bitep::host::ep_reduce(p);
    const bool second = parity_case >= 0 && ((count + p.outs_parity.add) & 1) != 0;
    SCOPED_TRACE("case " + std::to_string(parity_case));
    EXPECT_EQ(second ? b0 : a0, (std::vector<float>{1}));
    EXPECT_EQ(second ? b1 : a1, (std::vector<float>{2}));
    EXPECT_EQ(second ? a0 : b0, (std::vector<float>{-9}));
    EXPECT_EQ(second ? a1 : b1, (std::vector<float>{-9}));
  }
}

// A final sum of fp32 rows (H = 1): W = send_offsets.size() ranks, T = out->size() tokens.
bitep::kernels::FinalSumParams final_sum_params(const std::vector<int32_t>& slot,
                                                const std::vector<int64_t>& send_offsets,
                                                const std::vector<float>& ret,
                                                const std::vector<float>& self_ret,
                                                int self,
                                                std::vector<float>* out) {
  bitep::kernels::FinalSumParams p;
  p.num_tokens = static_cast<int64_t>(out->size());
  p.num_ranks = static_cast<int>(send_offsets.size());
  p.self_rank = self;
  p.hidden = 1;
  p.dtype = DType::kF32;
  p.token_slot = slot.data();
  p.send_offsets = send_offsets.data();
  p.ret = ret.data();
  p.self_ret = self_ret.data();
  p.out = out->data();
  return p;
}

TEST(EpHostFinalSum, SlotParityMovesTheReturnedRows) {
  // W = 2, self = 0, H = 1, one token to both ranks; parity 1 reads ret and self_ret ret_parity_bytes further.
  const std::vector<int32_t> slot = {0, 0};
  const std::vector<int64_t> send_offsets = {0, 0};
  const std::vector<float> ret = {10.0f, 20.0f};  // rank 1's row: parity 0, then parity 1
  const std::vector<float> self = {1.0f, 2.0f};   // own row: parity 0, then parity 1
  for (const uint64_t count : {uint64_t{4}, uint64_t{5}}) {
    for (const uint32_t add : {0u, 1u}) {
      std::vector<float> out(1, -9.0f);
      bitep::kernels::FinalSumParams p = final_sum_params(slot, send_offsets, ret, self, 0, &out);
      p.ret_parity.count = &count;
      p.ret_parity.add = add;
      p.ret_parity_bytes = sizeof(float);
      bitep::host::ep_final_sum(p);
      EXPECT_EQ(out[0], ((count + add) & 1) != 0 ? 22.0f : 11.0f) << "count " << count << " add " << add;
    }
  }
}

TEST(EpHostFinalSum, AscendingRanksSelfRowsAndUnroutedZeros) {
  // W = 3, self = 1, H = 1; token 0 -> ranks 0, 1, 2; token 1 -> rank 2; token 2 -> nowhere.
  const std::vector<int32_t> slot = {0, 0, 0, /**/ -1, -1, 1, /**/ -1, -1, -1};
  const std::vector<int64_t> send_offsets = {0, 1, 1};
  const std::vector<float> ret = {1e8f, 1.0f, -7.0f};  // rank 0: [0]; rank 2: [1, 2]
  const std::vector<float> self = {0, 0, -1e8f};       // self chunk at offset 2
  std::vector<float> out(3, 5.0f);
  bitep::kernels::FinalSumParams p = final_sum_params(slot, send_offsets, ret, self, 1, &out);
  p.self_ret_offset = 2;
  bitep::host::ep_final_sum(p);
  EXPECT_EQ(out[0], (1e8f + -1e8f) + 1.0f);  // rank order 0, 1, 2: exactly 1
  EXPECT_EQ(out[1], -7.0f);
  EXPECT_EQ(out[2], 0.0f);
}

TEST(EpHostWeightGrad, DenseAndCompactFromReturnedRows) {
  // W = 2, E = 4 (L = 2), k = 2, self = 0. Token 0: {1, 2}; token 1: {2, 3}. KL = 2.
  const std::vector<int32_t> idx = {2, 1, /**/ 3, 2};  // indices: compact order = index order
  RoutingInput in{RoutingFormat::kTopkIndices, idx.data(), WeightFormat::kDense, nullptr};
  const std::vector<int32_t> slot = {0, 0, /**/ -1, 1};
  const std::vector<int64_t> send_offsets = {0, 0};
  const std::vector<float> self_gw = {0, 0, 0.5f, 0};       // self chunk at 1: token 0's slice {1}
  const std::vector<float> ret_gw = {2.0f, 0, 3.0f, 4.0f};  // rank 1: token 0 {2}, token 1 {2, 3}
  std::vector<float> dense(8, 9), compact(4, 9);
  bitep::kernels::WeightGradParams p;
  p.num_tokens = 2;
  p.num_experts = 4;
  p.topk = 2;
  p.num_ranks = 2;
  p.self_rank = 0;
  p.routing = in;
  p.token_slot = slot.data();
  p.send_offsets = send_offsets.data();
  p.ret_grad_w = ret_gw.data();
  p.self_grad_w = self_gw.data();
  p.self_offset = 1;
  p.grad_dense = dense.data();
  bitep::host::ep_weight_grad(p);
  EXPECT_EQ(dense, (std::vector<float>{0, 0.5f, 2.0f, 0, /**/ 0, 0, 3.0f, 4.0f}));
  p.routing.weight_format = WeightFormat::kCompact;
  p.grad_dense = nullptr;
  p.grad_compact = compact.data();
  bitep::host::ep_weight_grad(p);
  EXPECT_EQ(compact, (std::vector<float>{2.0f, 0.5f, /**/ 4.0f, 3.0f}));
}

}  // namespace
