// SPDX-License-Identifier: Apache-2.0
// bitepDispatch: layout -> count exchange (the one host synchronisation) -> offsets on the host ->
// permute (self chunk straight into the receive buffers) -> all-to-all-v -> expert-major view -> handle.
// Large dispatches (a rank moving >= split_min_bytes() of rows; every rank learns it from the flags of
// the count exchange, so all split alike) split the all-to-all: the routing slices and weights first,
// then the rows, while a side stream computes every row's expert positions and copies this rank's own
// rows into the expert-major view; the other rows' copies follow their arrival. With a peer window
// (src/ep/transport.h) the dispatches store their maps, weights and rows straight into the peers' windows
// instead (large ones in two passes, move_rows_window; small ones in one, move_rows_window_small; both in
// src/ep/dispatch_window.cc): the count exchange carries every rank's send counts, so each rank knows where
// its rows go in every window.
// BITEP_LSA_DISPATCH=0 (large) and BITEP_LSA_SMALL=0 (small dispatches and their combines) keep the
// all-to-all.
// The views: both by default; args.expert_major_only leaves out the rank-major rows (the own rows' expert copies
// read x), args.rank_major_only the expert-major rows (every expert-major call computes the positions alone; a
// large window dispatch's arrival chunks copy the peers' rows into recv_x alone as they land).
//
// Failing together. The count exchange also carries, per rank, a flags word: whether the rank failed
// before the exchange (argument checks, allocation, layout; with its error code), whether it gives
// weights, and whether it passed its own receive buffers. So:
// - a rank that fails before the exchange still takes part in it; every other rank then returns
//   bitepRemoteError naming it (no rank reaches the all-to-all);
// - after the exchange a rank can fail alone (capacity too small, allocation of the receive buffers).
//   The ranks then agree once more (a second exchange of two words a rank; through the peer window one
//   kernel, its result read by the host from mapped memory) before the all-to-all: always on the host
//   backend, and on the cuda backend when some rank passed its own buffers (the flags say so); never at
//   W = 1. Without caller buffers the cuda backend skips it to keep the exchange its only synchronisation:
//   an allocation failure there fails on that rank, and its peers wait in NCCL (see the transport's timeout).
#include "src/ep/dispatch.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "src/args.h"
#include "src/check.h"
#include "src/env.h"
#include "src/ep/arrival.h"
#include "src/ep/collective.h"
#include "src/ep/dispatch_args.h"
#include "src/ep/exec.h"
#include "src/ep/handle.h"
#include "src/trace.h"

namespace bitep::ep {

// The expert-major call after the transfer when the own rows' copies (and every row's positions) ran
// before it: the others' rows alone, positions as given, pads already zero; the gather's source table as
// given unless the first call took the bulk copies (which do not fill it) and this one does not.
bitepResult_t others_after_own(Exec* ex, bool first_bulk, kernels::ExpertMajorParams* ep) {
  ep->positions_given = true;
  ep->copy_outside = true;
  ep->zero_pads = false;
  ep->blocks_per_sm = 0;
  bool bulk = false;
  BITEP_CHECK(ex->expert_bulk(*ep, &bulk));
  ep->src_given = bulk || !first_bulk;
  return bitepSuccess;
}

namespace {

constexpr int32_t kFlagFailed = 1;    // bits 8..15: the error code
constexpr int32_t kFlagWeights = 2;   // gives weights
constexpr int32_t kFlagCapacity = 4;  // passed recv_x or expert_x
constexpr int32_t kFlagTokens = 8;    // T > 0
constexpr int32_t kFlagSplit = 16;    // moves at least split_min_bytes() of rows: split the all-to-all
constexpr int32_t kFlagNoLarge = 32;  // BITEP_LSA_DISPATCH=0 here: large dispatches by the split all-to-all
constexpr int32_t kFlagNoSmall = 64;  // BITEP_LSA_SMALL=0 here: small calls by the all-to-all
constexpr int kFlagChunksShift = 16;  // bits 16..23: the arrival chunks this rank can take (0: none)

// BITEP_FUSED_POSITIONS=0: the expert positions of many rows in three launches (count, offsets, positions), as
// before the one-launch pass (ExpertMajorParams::scratch).
bool fused_positions_off() {
  static const bool off = env_is("BITEP_FUSED_POSITIONS", "0");
  return off;
}

// BITEP_FUSED_LAYOUT=0: the layout of many tokens in four launches (count, offsets, slots, packing), as before the
// one-launch pass (LayoutParams::scratch).
bool fused_layout_off() {
  static const bool off = env_is("BITEP_FUSED_LAYOUT", "0");
  return off;
}

// BITEP_LSA_DISPATCH=0: large dispatches go by the split all-to-all even with a window.
bool large_window_off() {
  static const bool off = env_is("BITEP_LSA_DISPATCH", "0");
  return off;
}

// BITEP_LSA_SMALL=0: dispatches below the split threshold, and their combines, go by the all-to-all even
// with a window.
bool small_window_off() {
  static const bool off = env_is("BITEP_LSA_SMALL", "0");
  return off;
}

// Arrival chunks of the window's large dispatches: the rows pass raises a flag in the destination's window
// per chunk of rows landed, and the others' expert copies (and the window's copy into recv_x) wait for
// their chunk, running beside the transfer instead of after a barrier. Chunks per peer:
// BITEP_WINDOW_CHUNKS (0: off, the barrier; at most the window's max_chunks(); the least of the ranks'
// values counts).
int window_chunks() {
  static const int n = env_int("BITEP_WINDOW_CHUNKS", 0, 255, 16);
  return n;
}

}  // namespace

kernels::RoutingInput Dispatch::routing() const {
  kernels::RoutingInput in;
  in.format = to_routing_format(a_->map_format);
  in.map = a_->routing_map;
  if (a_->probs != nullptr) {
    in.weight_format = kernels::WeightFormat::kDense;
    in.weights = a_->probs;
  } else if (a_->topk_weights != nullptr) {
    in.weight_format = kernels::WeightFormat::kCompact;
    in.weights = a_->topk_weights;
  }
  return in;
}

kernels::PermuteParams Dispatch::permute_params() const {
  const bitepHandle* h = h_.get();
  kernels::PermuteParams pp = ep::permute_params(h, g_);
  pp.routing = routing();
  pp.x = a_->x;
  pp.recv_x = h->recv_x;
  pp.recv_map = h->recv_map;
  pp.recv_weights = h->recv_weights;
  return pp;
}

int32_t Dispatch::flags() const {
  // Weights count where there are tokens to weigh: a rank with none may pass pointers or not.
  return (a_->num_tokens > 0 && (a_->probs || a_->topk_weights) ? kFlagWeights : 0) |
         (a_->recv_x || a_->expert_x ? kFlagCapacity : 0) | (a_->num_tokens > 0 ? kFlagTokens : 0) |
         (W_ > 1 && static_cast<uint64_t>(a_->num_tokens) * row_bytes_ >= split_min_bytes() ? kFlagSplit : 0) |
         (large_window_off() ? kFlagNoLarge : 0) | (small_window_off() ? kFlagNoSmall : 0) |
         (chunks_ << kFlagChunksShift);
}

int Dispatch::arrival_chunks() {
  if (win_ == nullptr || !ex_.cuda() || row_bytes_ == 0) return 0;
  const int want = std::min(window_chunks(), win_->max_chunks());
  if (want <= 0) return 0;
  // The others' copies as move_rows_window makes them: out of the window (its rows at multiples of the row
  // size past an aligned base) into expert_x (the caller's, or a pool block: aligned; none when rank-major only),
  // each row also into recv_x (recv_copy: the caller's, or a pool block).
  kernels::ExpertMajorParams p = expert_major_params(h_.get(), g_);
  p.recv_x = win_->data(self_);
  p.expert_x = a_->rank_major_only ? nullptr : a_->expert_x != nullptr ? a_->expert_x : win_->data(self_);
  p.recv_copy = a_->recv_x != nullptr ? a_->recv_x : win_->data(self_);
  bool bulk = false;
  return ex_.expert_bulk(p, &bulk) == bitepSuccess && bulk ? want : 0;
}

bitepResult_t Dispatch::expert_copy_params(kernels::ExpertMajorParams* ep) {
  const bitepHandle* h = h_.get();
  *ep = expert_major_params(h, g_);
  ep->recv_x = h->recv_x;
  ep->expert_x = h->expert_x;
  void* src = nullptr;
  if (h->expert_x != nullptr) {  // rank-major only: positions alone, no copies to order
    BITEP_CHECK(ex_.temp(sizeof(int64_t) * h->num_expert_rows, &src));
    ep->expert_src = static_cast<int64_t*>(src);
  }
  const int64_t scratch = ex_.cuda() && !fused_positions_off() ? kernels::expert_scratch_ints(h->num_recv_rows, L_) : 0;
  if (scratch > 0) {  // the positions in one launch
    BITEP_CHECK(ex_.temp(sizeof(int32_t) * scratch, &src));
    ep->scratch = static_cast<int32_t*>(src);
  }
  return bitepSuccess;
}

// Layout of this rank's tokens into the exchange's send buffer (counts and flags); the handle keeps the
// slots and a copy of the map.
bitepResult_t Dispatch::before_exchange() {
  const bitepGroupConfig_t& c = g_->config;
  const int64_t T = a_->num_tokens;
  bitepHandle* h = h_.get();
  h->num_tokens = T;
  chunks_ = arrival_chunks();
  void* p = nullptr;
  BITEP_CHECK(ex_.keep(sizeof(int32_t) * T * W_, &h->blocks, &p));
  h->token_slot = static_cast<int32_t*>(p);
  const uint64_t map_bytes = routing_bytes(a_->map_format, T, c.num_experts, c.topk);
  BITEP_CHECK(ex_.keep(map_bytes, &h->blocks, &p));
  void* const map_copy = p;  // the layout copies the map there (in its own launch for few tokens)
  h->routing.format = to_routing_format(a_->map_format);
  h->routing.map = p;
  void* counts = nullptr;
  const size_t count_row = sizeof(int32_t) * (L_ + 1);
  BITEP_CHECK(ex_.temp(count_row * W_, &counts));
  if (T > 0) {
    kernels::LayoutParams lp;
    lp.num_tokens = T;
    lp.num_experts = c.num_experts;
    lp.topk = c.topk;
    lp.num_ranks = W_;
    lp.routing = routing();
    lp.routing.weight_format = kernels::WeightFormat::kNone;
    lp.routing.weights = nullptr;
    lp.counts = static_cast<int32_t*>(counts);
    lp.token_slot = h->token_slot;
    lp.pack_out = xsend_;  // the exchange's rows in the same launch (one block or the one-launch pass)
    lp.pack_row = n_;
    lp.pack_flags = flags();
    lp.map_copy = map_copy;
    const int64_t scratch = ex_.cuda() && !fused_layout_off() ? kernels::layout_scratch_ints(T, c.num_experts, W_) : 0;
    if (scratch > 0) {  // the layout in one launch
      BITEP_CHECK(ex_.temp(sizeof(int32_t) * scratch, &p));
      lp.scratch = static_cast<int32_t*>(p);
    }
    return ex_.layout(lp);
  }
  BITEP_CHECK(ex_.zero(counts, count_row * W_));
  kernels::PackCountsParams pc;
  pc.counts = static_cast<const int32_t*>(counts);
  pc.num_ranks = W_;
  pc.local_experts = L_;
  pc.out = xsend_;
  pc.row = n_;
  pc.flags = flags();
  return ex_.pack_counts(pc);
}

// Offsets, capacities and the receive buffers, from the exchanged counts.
bitepResult_t Dispatch::after_exchange() {
  const bitepGroupConfig_t& c = g_->config;
  bitepHandle* h = h_.get();
  h->send_counts.assign(W_, 0);
  h->recv_counts.assign(W_, 0);
  h->send_offsets.assign(W_, 0);
  h->recv_offsets.assign(W_, 0);
  h->expert_counts_host.assign(L_, 0);
  h->expert_offsets_host.assign(L_ + 1, 0);
  int64_t S = 0, R = 0;
  for (int r = 0; r < W_; ++r) {
    h->send_counts[r] = recv_host_[self_ * n_ + L_ + 2 + r];  // this rank's own row came back to it
    h->recv_counts[r] = recv_host_[r * n_];
    BITEP_ARG_CHECK(h->recv_counts[r] >= 0, "internal: rank %d announced %lld rows", r,
                    static_cast<long long>(h->recv_counts[r]));
    h->send_offsets[r] = S;
    if (r != self_) S += h->send_counts[r];
    h->recv_offsets[r] = R;
    R += h->recv_counts[r];
    for (int l = 0; l < L_; ++l) h->expert_counts_host[l] += recv_host_[r * n_ + 1 + l];
  }
  // Every rank's send counts (the exchange's trailing W columns): the same matrix on every rank.
  h->matrix.assign(static_cast<size_t>(W_) * W_, 0);
  for (int s = 0; s < W_; ++s)
    for (int r = 0; r < W_; ++r) h->matrix[static_cast<size_t>(s) * W_ + r] = recv_host_[s * n_ + L_ + 2 + r];
  for (int s = 0; s < W_; ++s)
    BITEP_ARG_CHECK(h->matrix[static_cast<size_t>(s) * W_ + self_] == h->recv_counts[s],
                    "internal: rank %d announced %lld rows to this rank (%d) but %lld in its count table", s,
                    static_cast<long long>(h->recv_counts[s]), self_,
                    static_cast<long long>(h->matrix[static_cast<size_t>(s) * W_ + self_]));
  const int64_t align = c.expert_alignment;
  int64_t N = 0;
  for (int l = 0; l < L_; ++l) {
    h->expert_offsets_host[l] = static_cast<int32_t>(std::min<int64_t>(N, INT32_MAX));
    N += (h->expert_counts_host[l] + align - 1) / align * align;
  }
  if (R > INT32_MAX || N > INT32_MAX)
    BITEP_FAIL(bitepNotSupported,
               "this rank (%d) would receive %lld rows (%lld expert-major rows): bitep indexes "
               "them with int32, at most 2^31 - 1",
               self_, static_cast<long long>(R), static_cast<long long>(N));
  h->expert_offsets_host[L_] = static_cast<int32_t>(N);
  h->num_send_rows = S;
  h->num_recv_rows = R;
  h->num_expert_rows = N;
  if (a_->recv_x != nullptr && R > a_->recv_x_capacity)
    BITEP_FAIL(bitepCapacityExceeded,
               "args->recv_x_capacity is %lld rows but this rank (%d) receives %lld rows; "
               "nothing was written to args->recv_x",
               static_cast<long long>(a_->recv_x_capacity), self_, static_cast<long long>(R));
  if (a_->expert_x != nullptr && N > a_->expert_x_capacity)
    BITEP_FAIL(bitepCapacityExceeded,
               "args->expert_x_capacity is %lld rows but this rank's (%d) expert-major view "
               "needs %lld rows (alignment %d); nothing was written to args->expert_x",
               static_cast<long long>(a_->expert_x_capacity), self_, static_cast<long long>(N), c.expert_alignment);
  void* p = nullptr;
  if (a_->recv_x != nullptr) {
    h->recv_x = a_->recv_x;
  } else if (a_->expert_major_only) {
    // No rank-major view. The rows still need a landing place for this call where the all-to-all brings the
    // peers' (the own rows' copies read x) and on the small window path (its unpack, as with both views); on
    // the large window path none: the peers' rows stay in the window, the own ones in x.
    const bool landing = win_ == nullptr ? R > h->recv_counts[self_] : !split_ && R > 0;
    if (landing) {
      BITEP_CHECK(ex_.temp(row_bytes_ * R, &p));
      h->recv_x = p;
    }
  } else {
    BITEP_CHECK(ex_.keep(row_bytes_ * R, &h->blocks, &p));
    h->recv_x = p;
  }
  if (a_->expert_x != nullptr) {
    h->expert_x = a_->expert_x;
  } else if (a_->rank_major_only) {
    h->expert_x = nullptr;  // the expert-major numbering (positions, counts, offsets) without its rows
  } else {
    BITEP_CHECK(ex_.keep(row_bytes_ * N, &h->blocks, &p));
    h->expert_x = p;
  }
  BITEP_CHECK(ex_.keep(static_cast<size_t>(MB_) * R, &h->blocks, &p));
  h->recv_map = static_cast<uint8_t*>(p);
  if (any_weights_) {
    BITEP_CHECK(ex_.keep(sizeof(float) * KL_ * R, &h->blocks, &p));
    h->recv_weights = static_cast<float*>(p);
  }
  BITEP_CHECK(ex_.keep(sizeof(int32_t) * KL_ * R, &h->blocks, &p));
  h->recv_expert_rows = static_cast<int32_t*>(p);
  if (win_ == nullptr) {
    BITEP_CHECK(ex_.temp(row_bytes_ * S, &send_x_));
    BITEP_CHECK(ex_.temp(static_cast<size_t>(MB_) * S, &p));
    send_map_ = static_cast<uint8_t*>(p);
    if (any_weights_) {
      BITEP_CHECK(ex_.temp(sizeof(float) * KL_ * S, &p));
      send_weights_ = static_cast<float*>(p);
    }
  }
  return bitepSuccess;
}

// The peer window's size and the permute's destinations in it, then the layout tables the kernels read (one
// upload). After the ranks agreed (when they do), so that a rank failing alone before cannot leave its peers in
// the window's collective growth.
bitepResult_t Dispatch::upload_tables() {
  const bitepGroupConfig_t& c = g_->config;
  bitepHandle* h = h_.get();
  void* p = nullptr;
  // Peer window: this rank's rows for rank r go to r's window at the rows r receives from lower ranks
  // (so each window mirrors its owner's recv_x); regions x, map, weights, sized by the largest R.
  std::vector<void*> dest;
  std::vector<int64_t> arrival;
  if (win_ != nullptr) {
    int64_t rmax = 0;
    for (int r = 0; r < W_; ++r) {
      int64_t rr = 0;
      for (int s = 0; s < W_; ++s) rr += h->matrix[static_cast<size_t>(s) * W_ + r];
      rmax = std::max(rmax, rr);
    }
    auto up = [](size_t b) { return (b + 255) / 256 * 256; };
    win_map_ = up(row_bytes_ * rmax);
    win_weights_ = win_map_ + up(static_cast<size_t>(MB_) * rmax);
    const size_t need = win_weights_ + (any_weights_ ? sizeof(float) * KL_ * rmax : 0);
    win_->dispatch_extent = need;
    BITEP_CHECK(win_->reserve(need, c.timeout_s));
    // Two permute tables: [0, 3W) the maps and weights alone (small dispatches: the rows too, one pass),
    // [3W, 6W) the rows alone; then [6W, 7W) the arrival flags of this rank's chunks in each peer's window.
    dest.assign(7 * static_cast<size_t>(W_), nullptr);
    for (int r = 0; r < W_; ++r) {
      if (r == self_) continue;
      int64_t off = 0;
      for (int s = 0; s < self_; ++s) off += h->matrix[static_cast<size_t>(s) * W_ + r];
      char* base = win_->data(r);
      dest[W_ + r] = base + win_map_ + off * MB_;
      dest[2 * W_ + r] = any_weights_ ? base + win_weights_ + off * KL_ * sizeof(float) : nullptr;
      dest[3 * W_ + r] = base + off * row_bytes_;
      if (!split_) dest[r] = dest[3 * W_ + r];
      if (chunks_ > 0) dest[6 * W_ + r] = win_->chunk_flags(r) + static_cast<size_t>(self_) * win_->max_chunks();
    }
    if (split_ && chunks_ > 0) BITEP_CHECK(arrival_pieces(&arrival));
  }
  // The layout tables the kernels read, in one block and one upload: [W] int64 send offsets, [7W] peer
  // destinations (window only), [W + 3P + 1] int64 send counts and arrival pieces (arrival chunks only), [L]
  // int32 expert counts, [L + 1] int32 expert offsets.
  const size_t dest_bytes = sizeof(void*) * dest.size(), arrival_bytes = sizeof(int64_t) * arrival.size();
  num_pieces_ = arrival.empty() ? 0 : static_cast<int>((arrival.size() - W_ - 1) / 3);
  const size_t head_bytes = sizeof(int64_t) * W_ + dest_bytes + arrival_bytes;
  const size_t table_bytes = head_bytes + sizeof(int32_t) * (2 * L_ + 1);
  BITEP_CHECK(ex_.keep(table_bytes, &h->blocks, &p));
  h->send_offsets_dev = static_cast<int64_t*>(p);
  peer_dest_ = dest.empty() ? nullptr : reinterpret_cast<void* const*>(h->send_offsets_dev + W_);
  peer_dest_host_ = dest;
  arrival_table_ = arrival.empty()
                       ? nullptr
                       : reinterpret_cast<const int64_t*>(static_cast<char*>(p) + sizeof(int64_t) * W_ + dest_bytes);
  h->expert_counts = reinterpret_cast<int32_t*>(static_cast<char*>(p) + head_bytes);
  h->expert_offsets = h->expert_counts + L_;
  std::vector<unsigned char> table(table_bytes);
  std::memcpy(table.data(), h->send_offsets.data(), sizeof(int64_t) * W_);
  if (dest_bytes > 0) std::memcpy(table.data() + sizeof(int64_t) * W_, dest.data(), dest_bytes);
  if (arrival_bytes > 0) std::memcpy(table.data() + sizeof(int64_t) * W_ + dest_bytes, arrival.data(), arrival_bytes);
  int32_t* counts32 = reinterpret_cast<int32_t*>(table.data() + head_bytes);
  for (int l = 0; l < L_; ++l) counts32[l] = static_cast<int32_t>(h->expert_counts_host[l]);
  std::memcpy(counts32 + L_, h->expert_offsets_host.data(), sizeof(int32_t) * (L_ + 1));
  BITEP_CHECK(ex_.upload_staged(h->send_offsets_dev, table.data(), table_bytes));
  return bitepSuccess;
}

// Permute into send buffers, all-to-all-v through the transport, expert-major view.
bitepResult_t Dispatch::move_rows_nccl() {
  const bitepGroupConfig_t& c = g_->config;
  bitepHandle* h = h_.get();
  const int64_t R = h->num_recv_rows;
  const int64_t own0 = h->recv_offsets[self_], own1 = own0 + h->recv_counts[self_];
  // Expert-major only: the own rows are not copied into a rank-major buffer; their expert copies read x (row
  // own0 + s is token tokens[s], the permute's self_tokens).
  const bool own_from_x = a_->expert_major_only && own1 > own0;
  void* tokens = nullptr;
  if (own_from_x) BITEP_CHECK(ex_.temp(sizeof(int32_t) * (own1 - own0), &tokens));
  if (h->num_tokens > 0) {
    kernels::PermuteParams pp = permute_params();
    pp.send_offsets = h->send_offsets_dev;
    pp.send_x = send_x_;
    pp.send_map = send_map_;
    pp.send_weights = send_weights_;
    if (own_from_x) {
      pp.recv_x = nullptr;
      pp.self_tokens = static_cast<int32_t*>(tokens);
    }
    BITEP_CHECK(ex_.permute(pp));
  }
  trace_.mark("permute");
  // Per peer: rows, then map slices and weights (the chunks pair up in this order on every rank).
  std::vector<std::vector<PeerBuffers>> rows(W_), routing(W_);
  add_route_buffers(h, self_, Route::kOut, send_x_, h->recv_x, row_bytes_, &rows);
  add_route_buffers(h, self_, Route::kOut, send_map_, h->recv_map, MB_, &routing);
  if (any_weights_)
    add_route_buffers(h, self_, Route::kOut, send_weights_, h->recv_weights, sizeof(float) * KL_, &routing);
  kernels::ExpertMajorParams ep;
  BITEP_CHECK(expert_copy_params(&ep));
  const bool expert = R > 0 || h->num_expert_rows > 0;
  // The own rows' copies (every row's positions with them): from x through the tokens, or from recv_x in place.
  auto own_rows = [&] {
    ep.copy_begin = own0;
    ep.copy_end = own1;
    if (own_from_x) {
      ep.recv_x = a_->x;
      ep.src_index = static_cast<const int32_t*>(tokens);
    }
  };
  // Then the others' (with own_from_x only while there are any: recv_x holds nothing else).
  const bool others = !own_from_x || R > own1 - own0;
  auto other_rows = [&] {
    ep.recv_x = h->recv_x;
    ep.src_index = nullptr;
  };
  if (!split_) {
    for (int p = 0; p < W_; ++p) rows[p].insert(rows[p].end(), routing[p].begin(), routing[p].end());
    BITEP_CHECK(peer_alltoallv(g_, rows, ex_.stream(), c.timeout_s));
    trace_.mark("all-to-all");
    if (expert && !own_from_x) {
      BITEP_CHECK(ex_.expert_major(ep));
    } else if (expert) {
      own_rows();
      bool first_bulk = false;
      BITEP_CHECK(ex_.expert_bulk(ep, &first_bulk));
      BITEP_CHECK(ex_.expert_major(ep));
      if (others) {
        other_rows();
        BITEP_CHECK(others_after_own(&ex_, first_bulk, &ep));
        BITEP_CHECK(ex_.expert_major(ep));
      }
    }
  } else {
    // The routing first (small); then, beside the rows' all-to-all, the positions of every row and the
    // copies of this rank's own rows (already in place); the other rows' copies once they are in.
    BITEP_CHECK(peer_alltoallv(g_, routing, ex_.stream(), c.timeout_s));
    trace_.mark("all-to-all (routing)");
    BITEP_CHECK(ex_.fork());
    own_rows();
    ep.blocks_per_sm = kSideBlocksPerSm;
    bool first_bulk = false;
    BITEP_CHECK(ex_.expert_bulk(ep, &first_bulk));
    if (expert) BITEP_CHECK(ex_.expert_major(ep));
    trace_.mark_on("expert-major (own rows)", ex_.current_stream());
    BITEP_CHECK(peer_alltoallv(g_, rows, ex_.stream(), c.timeout_s));
    trace_.mark("all-to-all (rows)");
    BITEP_CHECK(ex_.join());
    other_rows();
    BITEP_CHECK(others_after_own(&ex_, first_bulk, &ep));
    if (expert && others) BITEP_CHECK(ex_.expert_major(ep));
  }
  return bitepSuccess;
}

// Permute, all-to-all-v (or the peer window), expert-major view.
bitepResult_t Dispatch::move_rows() {
  bitepHandle* h = h_.get();
  const int64_t R = h->num_recv_rows;
  if (win_ != nullptr) {
    BITEP_CHECK(split_ ? move_rows_window() : move_rows_window_small());
  } else {
    BITEP_CHECK(move_rows_nccl());
  }
  trace_.mark("expert-major");
  if (a_->expert_major_only) h->recv_x = nullptr;  // a temporary at most: gone with this call
  bitepDispatchLayout_t& lo = h->layout;
  lo.num_ranks = W_;
  lo.num_local_experts = L_;
  lo.max_row_experts = KL_;
  lo.num_recv_rows = R;
  lo.recv_x = h->recv_x;
  lo.recv_map = h->recv_map;
  lo.recv_weights = h->recv_weights;
  lo.recv_expert_rows = h->recv_expert_rows;
  lo.num_expert_rows = h->num_expert_rows;
  lo.expert_x = h->expert_x;
  lo.expert_counts = h->expert_counts;
  lo.expert_offsets = h->expert_offsets;
  lo.expert_counts_host = h->expert_counts_host.data();
  lo.recv_counts_host = h->recv_counts.data();
  lo.send_counts_host = h->send_counts.data();
  return bitepSuccess;
}

bitepResult_t Dispatch::run(bitepHandle_t* out, const char* what) {
  const bitepResult_t r = catch_all([&] { return steps(out); });  // an exception is a failure like any other here
  return shared_verdict_ ? r : failed_alone(g_, r, what);
}

bitepResult_t Dispatch::steps(bitepHandle_t* out) {
  BITEP_CHECK(ex_.begin());
  // The exchange buffers come first: without them this rank cannot even tell its peers it failed.
  void* p = nullptr;
  // One block: [W, n_] sent, [W, n_] received, [kAgreeInts * W] the agreement's.
  BITEP_CHECK(ex_.temp(sizeof(int32_t) * W_ * (2 * static_cast<size_t>(n_) + kAgreeInts), &p));
  xsend_ = static_cast<int32_t*>(p);
  xrecv_ = xsend_ + static_cast<size_t>(W_) * n_;
  xagree_ = xrecv_ + static_cast<size_t>(W_) * n_;
  h_.reset(new bitepHandle);
  h_->life = g_->life;
  h_->group = g_;

  // A local failure from here on still takes part in the count exchange, so the peers fail with it.
  bitepResult_t local = prior_ != bitepSuccess ? prior_ : make_fence(h_.get(), ex_.cuda());
  if (W_ > 1) win_ = g_->transport->window();
  if (local == bitepSuccess && win_ != nullptr) local = win_->check();
  if (local == bitepSuccess) local = check_dispatch_args(g_, a_, out);
  if (local == bitepSuccess) local = before_exchange();
  trace_.mark("layout");
  const SavedError saved(local);
  bitepResult_t r = bitepSuccess;
  if (local != bitepSuccess) {
    // No counts; the flags name the failure (the layout packed the success flags otherwise).
    (void)ex_.zero(xsend_, sizeof(int32_t) * W_ * n_);
    const std::vector<int32_t> flag_column(W_, kFlagFailed | (static_cast<int32_t>(local) << 8));
    r = ex_.copy_rows(xsend_ + L_ + 1, sizeof(int32_t) * n_, flag_column.data(), sizeof(int32_t), sizeof(int32_t), W_,
                      true);
    if (r != bitepSuccess) return saved.restore();
  }
  recv_host_.assign(static_cast<size_t>(W_) * n_, 0);
  // Whether the exchange goes through the window is the transport's choice: its exchange count says.
  const uint64_t window_exchanges = win_ != nullptr ? win_->exchanges() : 0;
  r = g_->transport->exchange_counts(xsend_, xrecv_, recv_host_.data(), n_, ex_.stream(), g_->config.timeout_s);
  const bool exchanged_in_window = win_ != nullptr && win_->exchanges() != window_exchanges;
  trace_.mark("counts");
  if (r != bitepSuccess) {
    transport_failed(g_, r);
    return local != bitepSuccess ? saved.restore() : r;
  }
  // From here to the weights' check, a failure is every rank's: each sees the same flags.
  shared_verdict_ = true;
  if (local != bitepSuccess) return saved.restore();

  // Every rank sees the same flags, so every rank reaches the same verdict here.
  bool any_capacity = false, large_off = false, small_off = false;
  int with_weights = -1, without_weights = -1;
  int chunks = 255;
  for (int q = 0; q < W_; ++q) {
    const int32_t f = recv_host_[q * n_ + L_ + 1];
    if (f & kFlagFailed)
      BITEP_FAIL(bitepRemoteError,
                 "rank %d of %d failed its part of this dispatch with %s; see that rank's "
                 "bitepGetLastError()",
                 q, W_, bitepGetErrorString(static_cast<bitepResult_t>((f >> 8) & 0xff)));
    if (f & kFlagCapacity) any_capacity = true;
    if (f & kFlagSplit) split_ = true;
    if (f & kFlagNoLarge) large_off = true;
    if (f & kFlagNoSmall) small_off = true;
    chunks = std::min(chunks, (f >> kFlagChunksShift) & 0xff);
    if (f & kFlagWeights) {
      if (with_weights < 0) with_weights = q;
    } else if (f & kFlagTokens) {
      if (without_weights < 0) without_weights = q;
    }
  }
  any_weights_ = with_weights >= 0;
  chunks_ = chunks;
  // The window takes every dispatch and combine: small dispatches in one pass and one barrier instead of
  // an NCCL call, large ones in two passes beside the own rows' copies (measured on 2 x H200 against the
  // split all-to-all: bench/NOTES.md v11), unless some rank set BITEP_LSA_DISPATCH=0 (large dispatches) or
  // BITEP_LSA_SMALL=0 (small dispatches and their combines). Decided from the exchanged flags, so every
  // rank decides alike.
  h_->window_combine = win_ != nullptr && (split_ || !small_off);
  if (split_ ? large_off : small_off) win_ = nullptr;
  windows_idle_ = win_ != nullptr && exchanged_in_window;
  // This dispatch's bytes in the window (none when its rows go another way): a combine stores past them.
  if (PeerWindow* gw = W_ > 1 ? g_->transport->window() : nullptr) gw->dispatch_extent = 0;
  if (any_weights_ && without_weights >= 0)
    BITEP_FAIL(bitepInvalidArgument,
               "rank %d gives weights (args->probs or args->topk_weights) but rank %d, which has "
               "tokens, gives none: every rank must give weights, or none (this is rank %d)",
               with_weights, without_weights, self_);
  // Weighted combines need the weights of every token: with no token anywhere they are vacuous.
  h_->has_weights = without_weights < 0;
  shared_verdict_ = false;

  local = after_exchange();
  if (g_->agree_always || any_capacity) {
    shared_verdict_ = true;  // the agreement's verdict is every rank's
    BITEP_CHECK(agree_status_exchange(&ex_, xagree_, local, "this dispatch"));
    shared_verdict_ = false;
    trace_.mark("agreement");
  } else if (local != bitepSuccess) {
    return local;  // the peers go on into the transfer: run() records it
  }
  // Numbered once every rank is past its checks (host groups: the agreement), so a later local failure does not
  // set one rank's numbers apart from its peers'.
  h_->seq = g_->dispatches++;
  BITEP_CHECK(upload_tables());
  trace_.mark("buffers");
  BITEP_CHECK(move_rows());
  record_fence(h_.get(), ex_.stream());
  *out = release_handle(&h_);
  return bitepSuccess;
}

bitepResult_t dispatch_after_checks(
    bitepGroup* g, const bitepDispatchArgs_t* args, bitepStream_t stream, bitepHandle_t* handle, bitepResult_t prior) {
  Dispatch d(g, args, stream, prior);
  return d.run(handle, "bitepDispatchLowLatency");
}

}  // namespace bitep::ep

extern "C" bitepResult_t bitepDispatch(bitepGroup_t group,
                                       const bitepDispatchArgs_t* args,
                                       bitepStream_t stream,
                                       bitepHandle_t* handle) {
  return bitep::guard("bitepDispatch", [&]() -> bitepResult_t {
    if (handle != nullptr) *handle = nullptr;  // on every failure, the group's too
    bitep::ep::GroupCall call;
    BITEP_CHECK(call.enter(group, "bitepDispatch"));
    BITEP_CHECK(bitep::ep::check_group(group));
    // Its count exchange waits on the host. This rank returns at once (its peers, if they make the call
    // uncaptured, wait in the count exchange until the group's timeout).
    if (group->config.backend == bitepBackendCuda && bitep::ep::cuda_stream_capturing(stream)) {
      const bitepResult_t r =
          bitep::set_error(bitepNotSupported, __FILE__, __LINE__,
                           "bitepDispatch: the stream is capturing a CUDA graph, but the dispatch's count exchange "
                           "waits on the host: capture bitepDispatchLowLatency (and its combines) instead");
      return bitep::ep::failed_alone(group, r, "bitepDispatch");
    }
    bitep::ep::Dispatch d(group, args, stream);
    return d.run(handle);
  });
}
