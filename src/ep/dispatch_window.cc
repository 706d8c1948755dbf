// SPDX-License-Identifier: Apache-2.0
// bitepDispatch through the peer window (src/ep/transport.h): the large dispatches' two passes with their
// arrival chunks (by the SMs, bulk copies or the copy engine), the small ones' single pass, and the copies
// out of the window. The rest of the call is src/ep/dispatch.cc.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "src/check.h"
#include "src/env.h"
#include "src/ep/arrival.h"
#include "src/ep/collective.h"
#include "src/ep/dispatch.h"

namespace bitep::ep {
namespace {

// Blocks per SM of the window's rows pass (the permute storing the rows into the peers' windows over NVLink),
// which runs beside the side stream's positions and own rows' expert copies: a persistent grid of the
// default 8 blocks fills every SM, so those copies could start only as its blocks retired.
// BITEP_WINDOW_ROW_BLOCKS=n (1-8) overrides (A/B).
int window_row_blocks() {
  static const int n = env_int("BITEP_WINDOW_ROW_BLOCKS", 1, 8, 2);
  return n;
}

// Blocks in all of the window's rows pass (BITEP_WINDOW_ROW_GRID; 0: blocks_per_sm on every SM): the pass is
// bound by the link, so a few SMs may carry it while the others copy.
int window_row_grid() {
  static const int n = env_int("BITEP_WINDOW_ROW_GRID", 0, 1 << 16, 0);
  return n;
}

// Blocks per SM of the own rows' expert copies beside the window's rows pass (BITEP_WINDOW_COPY_BLOCKS, 1-8;
// the bulk copies take at most what their shared memory allows).
int window_copy_blocks() {
  static const int n = env_int("BITEP_WINDOW_COPY_BLOCKS", 1, 8, kSideBlocksPerSm);
  return n;
}

// BITEP_WINDOW_ROWS=bulk: with arrival chunks, the window's rows pass goes by bulk (TMA) copies, one thread a
// block, and stores each own row to its expert rows from the same read (no own-row copy kernel beside it;
// the peers' copies run on arrival beside it). Default: warps (the permute kernel), own rows copied apart.
bool window_rows_bulk() {
  static const bool on = env_is("BITEP_WINDOW_ROWS", "bulk");
  return on;
}

// BITEP_WINDOW_ROWS=ce: with arrival chunks, the window's rows go by the copy engine. The rows pass stores the
// peers' rows into a local send buffer (the device's own memory) and raises a local flag per chunk; on a copy
// stream each chunk waits for its flag (cuStreamWaitValue32), is copied into its peer's window and raises the
// chunk's flag there (kernels::launch_ce_chunks). No SM stores over NVLink, so the expert copies beside the
// transfer keep every SM's memory path. Per rank: the receivers wait on the same flags whichever way the rows came.
bool window_rows_ce() {
  static const bool on = env_is("BITEP_WINDOW_ROWS", "ce");
  return on;
}

}  // namespace

bitepResult_t Dispatch::arrival_pieces(std::vector<int64_t>* out) {
  const bitepHandle* h = h_.get();
  chunk_rows_ = arrival_chunk_rows(h->matrix, W_, std::min(chunks_, win_->max_chunks()));
  out->assign(static_cast<size_t>(W_), 0);
  for (int r = 0; r < W_; ++r) (*out)[r] = h->matrix[static_cast<size_t>(self_) * W_ + r];
  const std::vector<int64_t> pieces =
      ep::arrival_pieces(h->matrix, h->recv_offsets, W_, self_, chunk_rows_, win_->max_chunks());
  out->insert(out->end(), pieces.begin(), pieces.end());
  return bitepSuccess;
}

// Peer window (large dispatches): [barrier (every window idle), unless the count exchange was one] -> the
// permute stores the maps and weights into the destinations' windows (the own rows' maps and weights into
// recv_map / recv_weights, and each own row's token) -> barrier -> on the side stream, every row's expert
// positions and the own rows' expert copies (read from x), beside the permute storing the rows into the
// peers' windows over NVLink and the own ones into recv_x. Then, with arrival chunks (chunks_), the others'
// expert copies on the side stream too, each chunk of rows read as its flag says it landed, and stored into
// recv_x from the same read; without, a barrier (every row landed) and the others' copies after it, beside
// (side stream) the window's copy into recv_x. No all-to-all call and no send buffers; each window mirrors
// its owner's recv_x rows. With BITEP_WINDOW_ROWS=ce the rows pass stores into a send buffer instead, and the
// copy engine moves each chunk into its peer's window once the rows pass flagged it (window_rows_ce).
bitepResult_t Dispatch::move_rows_window() {
  const bitepGroupConfig_t& c = g_->config;
  bitepHandle* h = h_.get();
  const int64_t R = h->num_recv_rows;
  const int64_t own0 = h->recv_offsets[self_], own1 = own0 + h->recv_counts[self_];
  const char* base = win_->data(self_);
  kernels::PermuteParams pp = permute_params();
  pp.peer_dest = peer_dest_;  // maps and weights to the peers
  kernels::ExpertMajorParams ep;
  BITEP_CHECK(expert_copy_params(&ep));
  const bool expert = R > 0 || h->num_expert_rows > 0;
  // Peer ranges of this rank's window: [0, own0) and [own1, R).
  const std::pair<int64_t, int64_t> ranges[2] = {{0, own0}, {own1, R}};
  pp.recv_x = nullptr;  // the own rows go with the rows pass
  // Arrival chunks (upload_tables made their pieces), counted with the flags' stride: [W, max_chunks()].
  const int C = std::min(chunks_, win_->max_chunks());
  const uint64_t epoch = C > 0 ? win_->next_chunk_epoch() : 0;
  void* chunk_count = nullptr;
  if (C > 0) BITEP_CHECK(ex_.temp(sizeof(int32_t) * W_ * win_->max_chunks(), &chunk_count));
  // By the copy engine (BITEP_WINDOW_ROWS=ce): the rows pass stores the peers' rows into a local send buffer and
  // raises local chunk flags; the copy engine waits for each, copies the chunk into its peer's window and raises
  // the chunk's flag there. The flags' epoch goes as a 32-bit word (their high word is 0).
  const int64_t S = h->num_send_rows;
  const bool ce = C > 0 && window_rows_ce() && h->num_tokens > 0 && S > 0 && epoch <= UINT32_MAX && ex_.ce_available();
  void *send = nullptr, *local_flags = nullptr, *local_rows = nullptr;
  const size_t flag_bytes = sizeof(uint64_t) * W_ * win_->max_chunks();
  if (ce) {
    BITEP_CHECK(ex_.temp(row_bytes_ * S, &send));
    BITEP_CHECK(ex_.temp(flag_bytes, &local_flags));  // [W, max_chunks], as the windows' flags
    BITEP_CHECK(ex_.temp(sizeof(void*) * W_, &local_rows));
  }

  // The rows alone: the own ones into recv_x (none when expert-major only), the others to the peers.
  kernels::PermuteParams rows = pp;
  rows.recv_x = h->recv_x;
  rows.recv_map = nullptr;
  rows.recv_weights = nullptr;
  rows.self_tokens = nullptr;
  rows.peer_dest = peer_dest_ + 3 * W_;
  rows.blocks_per_sm = window_row_blocks();
  rows.max_blocks = window_row_grid();
  if (ce) {
    rows.peer_dest = nullptr;
    rows.send_x = send;
    rows.send_offsets = h->send_offsets_dev;
    rows.send_map = nullptr;
    rows.send_weights = nullptr;
  }
  if (C > 0) {
    rows.chunk_count = static_cast<int32_t*>(chunk_count);
    rows.chunk_flag =
        ce ? static_cast<uint64_t* const*>(local_rows) : reinterpret_cast<uint64_t* const*>(peer_dest_ + 6 * W_);
    rows.send_counts = arrival_table_;
    rows.chunk_rows = chunk_rows_;
    rows.max_chunks = win_->max_chunks();
    rows.chunk_epoch = epoch;
  }
  // Fused (BITEP_WINDOW_ROWS=bulk): the rows pass also writes the own rows' expert copies, by bulk copies (none when
  // rank-major only).
  bool fused = false;
  if (C > 0 && !ce && window_rows_bulk() && h->num_tokens > 0 && own1 > own0 && h->expert_x != nullptr) {
    rows.bulk = true;
    rows.self_expert_rows = h->recv_expert_rows + own0 * KL_;
    rows.expert_x = h->expert_x;
    BITEP_CHECK(ex_.permute_bulk(rows, &fused));
    if (!fused) rows.bulk = false, rows.self_expert_rows = nullptr, rows.expert_x = nullptr;
  }
  // Unfused, the own rows' expert copies read x, before (beside) the rows pass writes recv_x: the maps' pass
  // records each own row's token.
  void* tokens = nullptr;
  if (!fused) {
    BITEP_CHECK(ex_.temp(sizeof(int32_t) * (own1 - own0), &tokens));
    pp.self_tokens = static_cast<int32_t*>(tokens);
  }

  BITEP_CHECK(acquire_window(g_, win_, ex_.stream()));
  if (C > 0) BITEP_CHECK(ex_.zero(chunk_count, sizeof(int32_t) * W_ * win_->max_chunks()));
  if (ce) {
    BITEP_CHECK(ex_.zero(local_flags, flag_bytes));
    std::vector<uint64_t*> flag_rows(W_);
    for (int r = 0; r < W_; ++r)
      flag_rows[r] = static_cast<uint64_t*>(local_flags) + static_cast<size_t>(r) * win_->max_chunks();
    BITEP_CHECK(ex_.upload(local_rows, flag_rows.data(), sizeof(void*) * W_));
  }
  if (!windows_idle_) {
    BITEP_CHECK(win_->barrier(ex_.stream(), c.timeout_s));
    trace_.mark("barrier");
  }
  if (h->num_tokens > 0) BITEP_CHECK(ex_.permute(pp));
  BITEP_CHECK(win_->barrier(ex_.stream(), c.timeout_s));
  BITEP_CHECK(unpack_window(false));
  trace_.mark("window (routing)");
  if (ce) BITEP_CHECK(ex_.ce_fork());  // the copy stream after the barrier: every peer's window is free
  bool first_bulk = false;
  if (fused) {
    // Every row's positions first (the rows pass reads the own ones'); no copies.
    kernels::ExpertMajorParams positions = ep;
    positions.expert_x = nullptr;
    if (expert) BITEP_CHECK(ex_.expert_major(positions));
    trace_.mark("positions");
    BITEP_CHECK(ex_.fork());
  } else {
    BITEP_CHECK(ex_.fork());
    ep.copy_begin = own0;
    ep.copy_end = own1;
    ep.blocks_per_sm = window_copy_blocks();
    ep.recv_x = a_->x;  // own row own0 + s is token tokens[s]
    ep.src_index = static_cast<const int32_t*>(tokens);
    BITEP_CHECK(ex_.expert_bulk(ep, &first_bulk));
    if (expert) BITEP_CHECK(ex_.expert_major(ep));
    ep.src_index = nullptr;
    trace_.mark_on("expert-major (own rows)", ex_.current_stream());
  }
  if (C > 0) {
    // The others' copies wait for their chunks (this rank offered chunks only where they go by the bulk
    // copies, which wait); the window's rows go into recv_x from the same read.
    ep.copy_begin = own0;
    ep.copy_end = own1;
    ep.recv_x = base;  // the window's rows sit where recv_x's do
    BITEP_CHECK(others_after_own(&ex_, first_bulk, &ep));
    if (fused) {
      ep.positions_given = true;
      ep.zero_pads = true;                                       // no own-row call zeroed them
      ep.blocks_per_sm = std::max(1, window_copy_blocks() - 1);  // room on every SM for the rows pass beside it
    }
    ep.arrival_flags = win_->chunk_flags(self_);
    ep.arrival_pieces = arrival_table_ + W_;
    ep.num_pieces = num_pieces_;
    ep.arrival_epoch = epoch;
    ep.timeout_ns = timeout_ns(c.timeout_s);
    ep.timed_out = win_->timeout_word();
    ep.recv_copy = h->recv_x;  // none when expert-major only; the only copy when rank-major only
    if (expert) BITEP_CHECK(ex_.expert_major(ep));
    trace_.mark_on("expert-major (others, on arrival)", ex_.current_stream());
  }
  ex_.launch_on_caller();
  if (h->num_tokens > 0) BITEP_CHECK(ex_.permute(rows));
  if (ce) {
    // Once the rows pass is queued (it raises what they wait for): each chunk waits for its local flag, is
    // copied into its peer's window and flagged there; every peer's chunk j before any peer's chunk j + 1 (the
    // order the receivers copy them in).
    std::vector<char*> peer_rows(W_);
    std::vector<uint64_t*> peer_flags(W_);
    for (int r = 0; r < W_; ++r) {
      peer_rows[r] = static_cast<char*>(peer_dest_host_[3 * W_ + r]);
      peer_flags[r] = static_cast<uint64_t*>(peer_dest_host_[6 * W_ + r]);
    }
    const std::vector<kernels::CeChunk> chunks = copy_engine_chunks(
        h->send_counts, h->send_offsets, self_, chunk_rows_, C, row_bytes_, static_cast<const char*>(send), peer_rows,
        peer_flags, static_cast<const uint64_t*>(local_flags), win_->max_chunks());
    BITEP_CHECK(ex_.ce_chunks(chunks, static_cast<uint32_t>(epoch)));
  }
  if (C > 0) {
    trace_.mark("window (rows)");
    BITEP_CHECK(ex_.join());
    BITEP_CHECK(ex_.ce_join());
    return win_->release(ex_.stream());
  }
  BITEP_CHECK(win_->barrier(ex_.stream(), c.timeout_s));
  trace_.mark("window (rows)");
  BITEP_CHECK(ex_.join());
  BITEP_CHECK(ex_.fork());
  for (const auto& range : ranges) {
    const int64_t i0 = range.first, n = range.second - range.first;
    if (n > 0 && h->recv_x != nullptr)  // none when expert-major only
      BITEP_CHECK(ex_.copy(static_cast<char*>(h->recv_x) + i0 * row_bytes_, base + i0 * row_bytes_, n * row_bytes_));
  }
  ex_.launch_on_caller();
  ep.recv_x = base;  // the window's rows sit where recv_x's do
  BITEP_CHECK(others_after_own(&ex_, first_bulk, &ep));
  if (expert) BITEP_CHECK(ex_.expert_major(ep));
  BITEP_CHECK(ex_.join());
  return win_->release(ex_.stream());
}

// Peer window, small dispatches (below the split threshold): [barrier, unless the count exchange was one]
// -> the permute stores every row, map slice and weights into the destinations' windows (the own rows into
// recv_x) -> barrier -> the window's rows, maps and weights copied into recv_x, recv_map, recv_weights ->
// expert-major view. One barrier instead of the all-to-all's NCCL call, and no send buffers.
bitepResult_t Dispatch::move_rows_window_small() {
  const bitepGroupConfig_t& c = g_->config;
  bitepHandle* h = h_.get();
  const int64_t R = h->num_recv_rows;
  kernels::PermuteParams pp = permute_params();
  pp.peer_dest = peer_dest_;  // rows, maps and weights to the peers
  kernels::ExpertMajorParams ep;
  BITEP_CHECK(expert_copy_params(&ep));

  BITEP_CHECK(acquire_window(g_, win_, ex_.stream()));
  if (!windows_idle_) BITEP_CHECK(win_->barrier(ex_.stream(), c.timeout_s));
  if (h->num_tokens > 0) BITEP_CHECK(ex_.permute(pp));
  trace_.mark("permute");
  BITEP_CHECK(win_->barrier(ex_.stream(), c.timeout_s));
  BITEP_CHECK(unpack_window(true));
  BITEP_CHECK(win_->release(ex_.stream()));
  trace_.mark("window");
  if (R > 0 && trace_level() == 3) {
    // Traced apart: the positions (expert_x left out), then the copies with them.
    void* const expert_x = ep.expert_x;
    ep.expert_x = nullptr;
    BITEP_CHECK(ex_.expert_major(ep));
    trace_.mark("positions");
    ep.expert_x = expert_x;
    ep.positions_given = true;
  }
  if (R > 0 || h->num_expert_rows > 0) BITEP_CHECK(ex_.expert_major(ep));
  return bitepSuccess;
}

bitepResult_t Dispatch::unpack_window(bool with_rows) {
  const bitepHandle* h = h_.get();
  const int64_t own0 = h->recv_offsets[self_], own1 = own0 + h->recv_counts[self_];
  const char* base = win_->data(self_);
  const std::pair<int64_t, int64_t> ranges[2] = {{0, own0}, {own1, h->num_recv_rows}};
  kernels::CopyBatchParams unpack;
  static_assert(kernels::CopyBatchParams::kMaxPieces >= 6, "two ranges of rows, maps and weights");
  for (const auto& range : ranges) {
    const int64_t i0 = range.first, n = range.second - range.first;
    if (n <= 0) continue;
    if (with_rows) unpack.add(static_cast<char*>(h->recv_x) + i0 * row_bytes_, base + i0 * row_bytes_, n * row_bytes_);
    unpack.add(h->recv_map + i0 * MB_, base + win_map_ + i0 * MB_, n * MB_);
    if (any_weights_)
      unpack.add(h->recv_weights + i0 * KL_, base + win_weights_ + i0 * KL_ * sizeof(float), n * KL_ * sizeof(float));
  }
  return ex_.copy_batch(unpack);
}

}  // namespace bitep::ep
