// SPDX-License-Identifier: Apache-2.0
// The arrival chunks of the large window dispatch (src/ep/arrival.h): every rank cuts alike, and a rank's
// pieces hold each peer row of its window exactly once, chunk-major, each naming the flag its sender raises
// for that chunk (the sender's chunk c of rows [c * chunk_rows, ...) of its block in this window).
#include "src/ep/arrival.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace {

using bitep::ep::arrival_chunk_rows;
using bitep::ep::arrival_pieces;
using bitep::ep::copy_engine_chunks;

constexpr int kMaxChunks = 64;

// Checks rank self's pieces against the matrix; returns the number of pieces.
size_t check_pieces(const std::vector<int64_t>& m, int W, int self, int chunks) {
  std::vector<int64_t> off(W + 1, 0);
  for (int s = 0; s < W; ++s) off[s + 1] = off[s] + m[size_t(s) * W + self];
  const int64_t cr = arrival_chunk_rows(m, W, chunks);
  EXPECT_GE(cr, 1);
  // The sender's side: no pair needs more than `chunks` chunks of cr rows.
  for (int s = 0; s < W; ++s)
    for (int r = 0; r < W; ++r)
      if (r != s) EXPECT_LE((m[size_t(s) * W + r] + cr - 1) / cr, chunks) << "pair " << s << " -> " << r;
  const std::vector<int64_t> v =
      arrival_pieces(m, std::vector<int64_t>(off.begin(), off.end() - 1), W, self, cr, kMaxChunks);
  EXPECT_EQ((v.size() - 1) % 3, 0u);
  const size_t P = (v.size() - 1) / 3;
  const int64_t* seq = v.data();
  const int64_t* start = seq + P + 1;
  const int64_t* flag = start + P;
  EXPECT_EQ(seq[0], 0);
  std::vector<int> seen(off[W], 0);
  int64_t last_j = -1;
  for (size_t q = 0; q < P; ++q) {
    const int64_t n = seq[q + 1] - seq[q];
    const int s = static_cast<int>(flag[q] / kMaxChunks);
    const int64_t j = flag[q] % kMaxChunks;
    EXPECT_GT(n, 0) << "piece " << q;
    EXPECT_LE(n, cr) << "piece " << q;
    EXPECT_NE(s, self) << "piece " << q;
    EXPECT_LT(j, chunks) << "piece " << q;
    EXPECT_GE(j, last_j) << "piece " << q << ": chunk-major";
    last_j = j;
    // The sender's chunk j: rows [j * cr, min((j + 1) * cr, count)) of its block.
    EXPECT_EQ(start[q], off[s] + j * cr) << "piece " << q;
    EXPECT_EQ(n, std::min(cr, off[s + 1] - off[s] - j * cr)) << "piece " << q;
    for (int64_t i = start[q]; i < start[q] + n && i < off[W]; ++i) ++seen[i];
  }
  // Every peer row once, no own row.
  for (int64_t i = 0; i < off[W]; ++i) EXPECT_EQ(seen[i], i >= off[self] && i < off[self + 1] ? 0 : 1) << "row " << i;
  return P;
}

// check(m, W, self, chunks) over random rank-to-rank matrices ([W, W], row s = what rank s sends each rank) of
// four patterns (random; every token to rank 0; empty ranks; a few rows, so chunks of one row), for every world
// size in Ws, chunk count and rank.
template <class Check>
void for_each_world(std::initializer_list<int> Ws, Check check) {
  std::mt19937_64 rng(11);
  for (int W : Ws)
    for (int chunks : {1, 4, 16, 64})
      for (int pattern = 0; pattern < 4; ++pattern) {
        std::vector<int64_t> m(size_t(W) * W, 0);
        for (int s = 0; s < W; ++s)
          for (int r = 0; r < W; ++r) {
            int64_t v = static_cast<int64_t>(rng() % 300);
            if (pattern == 1) v = r == 0 ? 1000 + v : 0;  // every token to rank 0
            if (pattern == 2 && s % 2 == 1) v = 0;        // empty ranks
            if (pattern == 3) v = v % 3;                  // a few rows: chunks of one row
            m[size_t(s) * W + r] = v;
          }
        for (int self = 0; self < W; ++self) {
          SCOPED_TRACE("W " + std::to_string(W) + " chunks " + std::to_string(chunks) + " pattern " +
                       std::to_string(pattern) + " self " + std::to_string(self));
          check(m, W, self, chunks);
        }
      }
}

TEST(ArrivalChunks, PiecesHoldEveryPeerRowOnceChunkMajor) {
  for_each_world({1, 2, 3, 8, 64},
                 [](const std::vector<int64_t>& m, int W, int self, int chunks) { check_pieces(m, W, self, chunks); });
}

TEST(ArrivalChunks, OneRankAndNoRowsMakeNoPieces) {
  EXPECT_EQ(check_pieces({500}, 1, 0, 16), 0u);
  EXPECT_EQ(check_pieces({0, 0, 0, 0}, 2, 1, 16), 0u);
  EXPECT_EQ(arrival_chunk_rows({0, 0, 0, 0}, 2, 16), 1);
}

TEST(ArrivalChunks, TwoRanksInOrder) {
  // Rank 1 receives 10 rows from rank 0 (its rows [0, 10)) and keeps 7 ([10, 17)); rank 0 sends 10 and
  // receives 5, so the largest pair is 10 rows: 4 chunks of 3 rows. Pieces: [0, 3) [3, 6) [6, 9) [9, 10).
  const std::vector<int64_t> m = {4, 10, 5, 7};
  const std::vector<int64_t> v = arrival_pieces(m, {0, 10}, 2, 1, arrival_chunk_rows(m, 2, 4), kMaxChunks);
  const std::vector<int64_t> want = {0, 3, 6, 9, 10, /* starts */ 0, 3, 6, 9, /* flags */ 0, 1, 2, 3};
  EXPECT_EQ(v, want);
}

// The copy engine's chunks of sender `self` (BITEP_WINDOW_ROWS=ce): each peer's rows once, chunk-major, each chunk
// from its place in the send buffer to its place in the peer's window, waiting on its local flag and raising the
// flag that the receiver's piece of the same rows waits on.
void check_copy_engine_chunks(const std::vector<int64_t>& m, int W, int self, int chunks) {
  constexpr uint64_t rb = 16;
  const int64_t cr = arrival_chunk_rows(m, W, chunks);
  std::vector<int64_t> counts(W), offsets(W, 0);
  int64_t S = 0;
  for (int r = 0; r < W; ++r) {
    counts[r] = m[size_t(self) * W + r];
    offsets[r] = S;
    if (r != self) S += counts[r];
  }
  std::vector<char> send(size_t(S) * rb + 1);
  std::vector<std::vector<char>> windows(W);
  std::vector<char*> rows(W);
  std::vector<std::vector<uint64_t>> peer_flag_rows(W, std::vector<uint64_t>(kMaxChunks));
  std::vector<uint64_t*> peer_flags(W);
  for (int r = 0; r < W; ++r) {
    windows[r].resize(size_t(counts[r]) * rb + 1);
    rows[r] = windows[r].data();
    peer_flags[r] = peer_flag_rows[r].data();
  }
  std::vector<uint64_t> local(size_t(W) * kMaxChunks);
  const auto v = copy_engine_chunks(counts, offsets, self, cr, chunks, rb, send.data(), rows, peer_flags, local.data(),
                                    kMaxChunks);
  std::vector<int64_t> bytes(W, 0);
  int64_t last = -1;
  for (const auto& k : v) {
    int r = -1;
    for (int q = 0; q < W; ++q)
      if (k.flag >= peer_flags[q] && k.flag < peer_flags[q] + kMaxChunks) r = q;
    ASSERT_GE(r, 0) << "a chunk raising no peer's flag";
    ASSERT_NE(r, self) << "a chunk to the sender itself";
    const int64_t j = k.flag - peer_flags[r], first = j * cr;
    EXPECT_GE(j * W + r, last) << "not chunk-major";
    last = j * W + r;
    EXPECT_LT(first, counts[r]);
    EXPECT_EQ(k.bytes, uint64_t(std::min(cr, counts[r] - first)) * rb);
    EXPECT_EQ(static_cast<const char*>(k.src), send.data() + (offsets[r] + first) * rb);
    EXPECT_EQ(static_cast<char*>(k.dst), rows[r] + first * rb);
    EXPECT_EQ(k.wait, local.data() + size_t(r) * kMaxChunks + j);
    EXPECT_EQ(bytes[r], first * int64_t(rb)) << "peer " << r << "'s chunks out of order";
    bytes[r] += k.bytes;
    // The receiver r has a piece of exactly these rows that waits on this flag (sender self's chunk j).
    std::vector<int64_t> roff(W, 0);
    for (int s = 1; s < W; ++s) roff[s] = roff[s - 1] + m[size_t(s - 1) * W + r];
    const std::vector<int64_t> pv = arrival_pieces(m, roff, W, r, cr, kMaxChunks);
    const size_t P = (pv.size() - 1) / 3;
    bool found = false;
    for (size_t q = 0; q < P; ++q)
      if (pv[2 * P + 1 + q] == int64_t(self) * kMaxChunks + j) {
        found = true;
        EXPECT_EQ(pv[P + 1 + q], roff[self] + first);
        EXPECT_EQ(uint64_t(pv[q + 1] - pv[q]) * rb, k.bytes);
      }
    EXPECT_TRUE(found) << "no piece of receiver " << r << " waits on chunk " << j << " of rank " << self;
  }
  for (int r = 0; r < W; ++r) EXPECT_EQ(bytes[r], r == self ? 0 : counts[r] * int64_t(rb)) << "peer " << r;
}

TEST(ArrivalChunks, CopyEngineChunksMatchTheReceiversPieces) {
  for_each_world({1, 2, 3, 5, 8}, check_copy_engine_chunks);
}

}  // namespace
