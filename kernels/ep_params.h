// SPDX-License-Identifier: Apache-2.0
// Parameters of the expert-parallel primitives (layout, permute, expert-major scatter, reduce,
// final sum). Plain C++, no CUDA types: the host reference (src/host/ep_host.cc) and the CUDA
// kernels (kernels/layout.cu, permute.cu, expert_major.cu, combine.cu) implement the same functions on the same
// structs, so the orchestration in src/ep/ is shared. Pointers live in the backend's memory unless
// a field says "host".
//
// Shapes: T tokens on this rank, E experts, k top-k, W ranks, L = E / W local experts,
// KL = min(k, L) (most experts of one rank a token can use), H hidden, MB = ceil(L / 8).
// A "row" sent to rank r carries: x [H] (token dtype), its local routing slice over r's experts as
// BITMAP_U8 [MB], and the weights of the set bits in ascending expert order [KL] fp32 (0-padded).
//
// Normative semantics (the host reference is the oracle; every primitive stays in bounds on any input):
// - Routed experts of token t ("its experts"), whatever the map holds:
//     bitmap:  the first k set bits among bits [0, E) of its row, ascending (pad bits >= E are ignored);
//     bytemap: the first k nonzero bytes of its row, ascending;
//     indices: entries j in [0, k) with 0 <= idx[t][j] < E that do not repeat an earlier entry of the row.
//   Valid input has exactly k distinct experts per row (the host API checks it; the cuda API trusts it).
// - Local slice of t on rank r: its experts e in [r*L, (r+1)*L) as local bits l = e - r*L; at most KL.
//   t goes to r iff the slice is not empty.
// - Weight of expert e of token t: dense: weights[t*E + e]; compact with a map: weights[t*k + j] where e
//   is the j-th (0-based, ascending) of t's experts; compact with indices: weights[t*k + j] where
//   idx[t][j] == e (its first occurrence).
// - Arithmetic: fp32; "round" is one round-to-nearest-even to the token dtype (src/host/dtype_host.h).
//   Multiply-adds are fmaf (CUDA: __fmaf_rn), in the order stated, so results are bit-identical.
// - Zero tokens / rows: nothing is read or written (pointers may be null).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/router_params.h"

namespace bitep::kernels {

enum class RoutingFormat : int { kBitmap = 0, kBytemap = 1, kTopkIndices = 2 };
enum class WeightFormat : int { kNone = 0, kDense = 1, kCompact = 2 };

struct RoutingInput {
  RoutingFormat format = RoutingFormat::kBitmap;
  const void* map = nullptr;  // BITMAP_U8 [T, ceil(E/8)] | BYTEMAP [T, E] | int32 [T, k]
  WeightFormat weight_format = WeightFormat::kNone;
  const float* weights = nullptr;  // dense [T, E] | compact [T, k] (bit order; indices: index order)
};

// 1. Layout: routing map -> per destination rank counts and each token's slot in each destination
// chunk, in ascending token order (deterministic). counts is overwritten in full (all W*(L+1) entries,
// zeros included), never accumulated, when T > 0 (T = 0 writes nothing: the orchestration zeroes counts
// itself); token_slot[t][r] = number of tokens t' < t that go to r, or -1.
// counts[r][1 + l] counts the tokens whose slice on r has bit l. routing.weights is not read.
struct LayoutParams {
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  int num_ranks = 0;
  RoutingInput routing;
  int32_t* counts = nullptr;      // [W, L + 1]: [r][0] rows to rank r, [r][1 + l] rows using r's local expert l
  int32_t* token_slot = nullptr;  // [T, W]: row of token t inside chunk r, or -1 when t does not go to r
  // Optional (T > 0): then also the count exchange's send rows, as PackCountsParams{counts, W, L, pack_out,
  // pack_row, pack_flags} (2. below) would write them; in the same launch where one block lays out the tokens.
  int32_t* pack_out = nullptr;
  int pack_row = 0;
  int32_t pack_flags = 0;
  // Optional, cuda: layout_scratch_ints(T, E, W) int32 of backend memory (no contents needed). Where the tokens
  // take several segments and E <= kLayoutOneLaunchMaxExperts it lets one launch do the layout (and the packing)
  // instead of four. Null: four launches.
  // The host backend does not use it.
  int32_t* scratch = nullptr;
  // Optional (T > 0): the routing map's bytes (routing_map_bytes) copied here, as the dispatch's handle keeps
  // them for its combine; the one-block layout copies them in its own launch.
  void* map_copy = nullptr;
};

// Bytes of T tokens' routing input: BITMAP_U8 [T, ceil(E / 8)], BYTEMAP [T, E], int32 [T, k].
inline uint64_t routing_map_bytes(RoutingFormat f, uint64_t T, int E, int k) {
  return f == RoutingFormat::kBytemap       ? T * static_cast<uint64_t>(E)
         : f == RoutingFormat::kTopkIndices ? T * static_cast<uint64_t>(k) * sizeof(int32_t)
                                            : T * ((static_cast<uint64_t>(E) + 7) / 8);
}

// 2. The count exchange's send rows (row = ints per peer, >= L + 2 + W): out[p * row + c] = counts[p][c]
// for c in [0, L + 1), and out[p * row + L + 2 + r] = counts[r][0] for every r: the sender's whole
// send-count vector goes to every peer, so after the exchange every rank knows how many rows each rank
// sends each rank; out[p * row + L + 1] = flags (the orchestration's word for every peer). Columns past
// L + 2 + W are not written.
struct PackCountsParams {
  const int32_t* counts = nullptr;  // [W, L + 1] from the layout
  int num_ranks = 0;
  int local_experts = 0;
  int32_t* out = nullptr;  // [W, row]
  int row = 0;
  int32_t flags = 0;
};

// The packing a layout with pack_out does (LayoutParams::pack_out).
inline PackCountsParams layout_pack(const LayoutParams& p) {
  PackCountsParams pc;
  pc.counts = p.counts;
  pc.num_ranks = p.num_ranks;
  pc.local_experts = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 0;
  pc.out = p.pack_out;
  pc.row = p.pack_row;
  pc.flags = p.pack_flags;
  return pc;
}

// 3. Permute: each token row goes once per destination rank, with its local slice and weights.
// Rows for rank `self_rank` go straight into the receive buffers (the self chunk never leaves).
// Destinations of t: the ranks r with token_slot[t][r] >= 0. Row q = send_offsets[r] + slot in the send
// buffers (r != self_rank; send_offsets[self_rank] is not read), or self_recv_offset + slot in the
// receive buffers (r == self_rank). At row q: x[t] copied bit for bit; map row (MB bytes) = the slice on
// r, written only when send_map / recv_map is not null; weight row (KL floats) = the weights of the slice
// bits in ascending l, then 0, written only when routing.weight_format != kNone and send_weights /
// recv_weights is not null. With null maps and kNone weights (combine backward: gradients along the
// dispatch routes) the routing map is not read at all.
// One chunk of rows for the copy engine (launch_ce_chunks in kernels/ep.h): `bytes` from src to dst, device to
// device (dst may be a peer's memory mapped here: its window), then the arrival flag `flag` raised (a uint64
// whose high word is 0, as the window's chunk flags are: epochs below 2^32).
struct CeChunk {
  void* dst = nullptr;
  const void* src = nullptr;
  uint64_t bytes = 0;
  uint64_t* flag = nullptr;
  // Optional: the copy first waits until this flag's low word is at least the value (the chunk's rows are in
  // src: the permute raised it, PermuteParams::chunk_flag into the send buffer).
  const uint64_t* wait = nullptr;
};

struct PermuteParams {
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  int num_ranks = 0;
  int self_rank = 0;
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  RoutingInput routing;
  const void* x = nullptr;                // [T, H]
  const int32_t* token_slot = nullptr;    // [T, W] from the layout
  const int64_t* send_offsets = nullptr;  // [W] first row of chunk r in the send buffers (backend memory)
  int64_t self_recv_offset = 0;           // first row of the self chunk in the receive buffers
  void* send_x = nullptr;                 // [S, H]
  uint8_t* send_map = nullptr;            // [S, MB]
  float* send_weights = nullptr;          // [S, KL] or null (no weights)
  void* recv_x = nullptr;                 // [R, H]
  uint8_t* recv_map = nullptr;            // [R, MB]
  float* recv_weights = nullptr;          // [R, KL] or null
  // Optional (backend memory), [3 * W]: when not null, chunk r != self_rank is written at row `slot` of
  // peer_dest[r] (x), peer_dest[W + r] (map), peer_dest[2W + r] (weights) instead of the send buffers
  // (send_offsets and send_* are then not read): the peers' windows, stored into over NVLink.
  // A null x destination (recv_x, or an x entry of peer_dest) skips those rows' x, a null map or weights
  // destination their meta: a call may move the maps and weights alone, or the rows alone.
  void* const* peer_dest = nullptr;
  // Optional [rows of the self chunk] out: self_tokens[slot] = t for every token t with a self slot (the
  // source of each own received row, for an expert-major copy that reads x before recv_x is written).
  int32_t* self_tokens = nullptr;
  // cuda: blocks per SM of the persistent grid (0: the default). A pass beside other work on the device
  // (the window's rows over NVLink beside the expert copies) takes fewer and leaves the SMs to it.
  int blocks_per_sm = 0;
  // cuda: at most this many blocks in all (0: no cap): a pass that is bound by the link, not by the SMs (the
  // window's rows over NVLink), on a few SMs, leaving the others' memory paths to the copies beside it.
  int max_blocks = 0;
  // cuda: at most this many warps share one token's row (0: as many as fill the device, few tokens; 1: a warp a token).
  // A launch shape only: each piece is whole passes of a warp's vectors, the map slice and weights the first piece's.
  // Rows counted into arrival chunks (chunk_count) are never split.
  int max_row_pieces = 0;
  // Optional, cuda, with peer_dest or the send buffers: arrival flags per chunk of chunk_rows rows of each
  // peer's chunk (the window's rows pass: ExpertMajorParams::arrival_flags waits for them in the peers'
  // windows; or, into the send buffer, local flags the copy engine waits for: CeChunk::wait). Once a row for rank r !=
  // self_rank (slot s, chunk c = s / chunk_rows) is stored, chunk_count[r * max_chunks + c] is raised; the row that
  // completes the chunk (min(chunk_rows, send_counts[r] - c * chunk_rows) rows) stores chunk_epoch into
  // chunk_flag[r][c] (release, system scope), ordered after every store of the chunk's rows.
  // send_counts[r] <= max_chunks * chunk_rows.
  int32_t* chunk_count = nullptr;         // [W, max_chunks], zeroed before the call
  uint64_t* const* chunk_flag = nullptr;  // [W] (backend memory): rank r's flags of this rank's chunks
  const int64_t* send_counts = nullptr;   // [W] (backend memory): rows this rank sends to each rank
  int64_t chunk_rows = 0;
  int max_chunks = 0;
  uint64_t chunk_epoch = 0;
  // cuda, rows alone (no map or weights destination: recv_map, recv_weights, send_map, send_weights null;
  // peer_dest's map and weight entries are not read): true moves them by bulk (TMA) copies where
  // permute_takes_bulk says so (sm_90, rows of 16-byte multiples up to 24 KiB, 16-byte aligned x and
  // destinations), one thread a block: each token's row read once into shared memory and stored to every
  // destination. With self_expert_rows, each own row (slot s) is also stored to expert_x rows
  // self_expert_rows[s * KL + j] >= 0, j < KL = max_row_experts(topk, E / W): the expert-major view's copies of
  // the own rows, from the same read. self_tokens is not written.
  bool bulk = false;
  const int32_t* self_expert_rows = nullptr;  // [rows of the self chunk, KL] (backend memory)
  void* expert_x = nullptr;
};

// 5. Expert-major view: for each local expert, its rows in receive order (source rank, then source
// token): recv_expert_rows[i][j] = row in expert_x of the j-th set bit of received row i; then
// expert_x[that row] = recv_x[i]. Pad rows (alignment) are zeroed.
// Exactly: only the first KL set bits (l < L) of map row i count. The row of bit l of row i is
// pos = expert_offsets[l] + (number of rows i' < i whose map has bit l among its first KL set bits);
// bits with pos >= expert_offsets[l] + expert_counts[l] (inconsistent input only) get -1 and move
// nothing. recv_expert_rows[i] = the positions in ascending l, then -1 up to KL.
// With recv_x and expert_x: expert_x[pos] = recv_x[i] bit for bit, or, when recv_weights is not null,
// round(recv_weights[i][j] * float(recv_x[i])) (one fp32 multiply). Pad rows
// [expert_offsets[l] + expert_counts[l], expert_offsets[l + 1]) are zeroed; no other row is written.
struct ExpertMajorParams {
  int64_t num_recv_rows = 0;  // R
  int num_local_experts = 0;  // L
  int max_row_experts = 0;    // KL
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  const uint8_t* recv_map = nullptr;        // [R, MB]
  const int32_t* expert_offsets = nullptr;  // [L + 1] aligned block starts (backend memory)
  const int32_t* expert_counts = nullptr;   // [L] rows per expert (backend memory)
  int32_t* recv_expert_rows = nullptr;      // [R, KL] out, -1 padded
  const void* recv_x = nullptr;             // [R, H] (null: positions only)
  void* expert_x = nullptr;                 // [N, H] out (null: positions only)
  int64_t num_expert_rows = 0;              // N = expert_offsets[L]
  // Combine backward uses the same scatter with weights: expert_x[pos] = w * recv_x[i].
  const float* recv_weights = nullptr;  // [R, KL] or null (unweighted copy)
  // true: recv_expert_rows already holds this layout's positions (the dispatch computed them): they are
  // read, not recomputed or written, and only the scatter and the pad-row zeroing run.
  bool positions_given = false;
  // [N] int64 scratch, backend memory: the cuda backend needs it when rows are copied (expert_x given,
  // hidden > 0, N > 0) by the gather. It copies in gather order, one expert row after the other
  // (sequential writes): expert_src[pos] = i * KL + j for the entry recv_expert_rows[i][j] = pos, -1 for
  // pad rows. The bulk copies (below) neither fill nor read it. The host backend does not use it.
  int64_t* expert_src = nullptr;
  // true: expert_src already holds this layout's table (an earlier call on it filled it): not refilled.
  bool src_given = false;
  // Rows of expert_x that are padding (sum over l of the block's rows past expert_counts[l]), when the
  // caller knows it: 0 skips the bulk path's pad launch. -1: not known.
  int64_t num_pad_rows = -1;
  // The copies this call writes: those of received rows i in [copy_begin, copy_end) (copy_end < 0: up
  // to R), or, with copy_outside, of the rows outside that range. Two calls with the same range, one
  // with copy_outside, write every copy once: the dispatch copies its own rows beside the all-to-all
  // that brings the others. Pad rows are zeroed when zero_pads.
  int64_t copy_begin = 0, copy_end = -1;
  bool copy_outside = false;
  // Optional (backend memory, copy_outside false): the copies of row i read row src_index[i - copy_begin]
  // of recv_x instead of row i (recv_x then being another array, e.g. the dispatch's x with the permute's
  // self_tokens); positions still come from row i's map.
  const int32_t* src_index = nullptr;
  bool zero_pads = true;
  // cuda: blocks per SM of the copy's persistent grid (0: the default). Work beside an all-to-all takes
  // fewer and leaves SMs to NCCL's kernel.
  int blocks_per_sm = 0;
  // cuda, unweighted copies: true lets the copies go in source order by bulk (TMA) copies where the row
  // size and pointers allow it (16-byte multiples, at most 24 KiB a row; sm_90 and later): each received
  // row read once into shared memory and stored to each of its expert rows. false: the gather always.
  bool bulk = true;
  // Optional, cuda bulk copies only (expert_major_takes_bulk; src_index null): the rows arrive while the
  // copies run (PermuteParams::chunk_*), in pieces: piece q is rows [row_start[q], + seq[q + 1] - seq[q]),
  // landed once arrival_flags[flag[q]] >= arrival_epoch (acquire, system scope). arrival_pieces holds
  // seq [P + 1] (seq[0] = 0), row_start [P] and flag [P], int64 (backend memory). The pieces hold exactly
  // the rows the copy range selects, in the order the copies take them (positions_given): the dispatch orders
  // them by chunk, every sender's first chunk before any sender's second. A wait past timeout_ns raises
  // *timed_out and reads the rows as they are.
  const uint64_t* arrival_flags = nullptr;  // this rank's [W, max_chunks] (its window)
  const int64_t* arrival_pieces = nullptr;  // [3P + 1]
  int num_pieces = 0;                       // P
  uint64_t arrival_epoch = 0, timeout_ns = 0;
  volatile int* timed_out = nullptr;
  // Optional: each row whose copies this call writes is also stored at its own row i of recv_copy
  // ([R, H]; the rank-major view out of a window). cuda: the bulk copies only, which store it from the same
  // shared memory and need it 16-byte aligned (expert_major_takes_bulk is false where it is not). With expert_x
  // null the rows go to recv_copy alone (a rank-major-only dispatch's rows out of the window as they land).
  void* recv_copy = nullptr;
  // Optional, cuda (positions not given): expert_scratch_ints(R, L) int32 of backend memory (no contents
  // needed). Where the rows take several segments it lets one launch compute the positions instead of three
  // (expert_scratch_ints). Null: three launches. The host backend does not use it.
  int32_t* scratch = nullptr;
};

// The gather index of a handle's expert-major view (bitepHandleGetExpertSources): sources[pos] = i for every entry
// recv_expert_rows[i][j] = pos in [0, N), -1 for the rows no entry names (the pad rows).
struct ExpertSourcesParams {
  int64_t num_recv_rows = 0;                  // R
  int max_row_experts = 0;                    // KL
  const int32_t* recv_expert_rows = nullptr;  // [R, KL], -1 padded
  int64_t num_expert_rows = 0;                // N
  int32_t* sources = nullptr;                 // [N] out
};

// The one-launch expert positions' scratch (ExpertMajorParams::scratch): a header of kScanHeaderInts, [0] the
// segment ticket, the segments' flags from [kScanHeaderInts] (lines of their own, polled), then each segment's
// L counts. Segments are tiles of kScanSegmentRows rows or more; up to kScanSingleRows rows one block does it all.
constexpr int kScanHeaderInts = 64;
constexpr int64_t kScanSingleRows = 256, kScanSegmentRows = 256;

// Scratch ints the positions of R received rows over L local experts take in one launch (0: none needed, or
// the segments' counts would be too many for one launch to sum).
inline int64_t expert_scratch_ints(int64_t R, int L) {
  if (R <= kScanSingleRows || R < 2 * kScanSegmentRows) return 0;  // one block: rows for fewer than two segments
  const int64_t segs = (R + kScanSegmentRows - 1) / kScanSegmentRows;
  if ((segs - 1) * L > (int64_t{1} << 16)) return 0;  // a block sums at most 64 K earlier counts
  return kScanHeaderInts + segs * (1 + static_cast<int64_t>(L));
}

// The one-launch layout up to this many experts. Past it the launch was slower than the four it replaces (H200,
// T = 2048, alone: 16.3 against 20.9 us at E = 64, 24.8 / 24.0 at E = 128, 34.4 / 22.0 at E = 256; its slot pass
// grows with E where the four launches' does not, cause not yet found: bench/NOTES.md).
constexpr int kLayoutOneLaunchMaxExperts = 128;

// Scratch ints the layout of T tokens, E experts, W ranks takes in one launch (LayoutParams::scratch; 0: none
// needed, or the segments' totals would be too many for one launch to sum): the header, a flag and W totals a
// segment.
inline int64_t layout_scratch_ints(int64_t T, int E, int W) {
  if (T <= kScanSingleRows || E > kLayoutOneLaunchMaxExperts) return 0;
  const int64_t segs = (T + kScanSegmentRows - 1) / kScanSegmentRows;
  if ((segs - 1) * W > (int64_t{1} << 16)) return 0;  // a block sums at most 64 K earlier totals a rank group
  return kScanHeaderInts + segs * (1 + static_cast<int64_t>(W));
}

// The parity of a low-latency call's window slots, read by its kernels when they start: (*count + add) & 1, or 0
// when count is null. count is the window's barrier count on the device (PeerWindow::epoch_word), so that a CUDA
// graph replaying the calls alternates its slots as calls made one by one do: the kernels before the call's
// barrier add 0, those after it add 1 (the barrier has counted itself by then).
struct SlotParity {
  const uint64_t* count = nullptr;  // backend memory
  uint32_t add = 0;
};
inline int host_slot_parity(const SlotParity& p) {
  return p.count == nullptr ? 0 : static_cast<int>((*p.count + p.add) & 1u);
}

// 6. Reduce: partial[i] = sum over the set bits j of row i, ascending, of w_ij * y[recv_expert_rows[i][j]]
// (w = 1 when unweighted), fp32 accumulation, one rounding to the token dtype at the end.
// Exactly, per element h: acc = 0; for j = 0..KL-1 with pos = recv_expert_rows[i][j] >= 0:
// acc = fmaf(w_ij, float(y[pos][h]), acc); out[i][h] = round(acc). A row with no position gets zeros.
// out may be null (weight gradients only). grad_weights (with grad_rows): for j with pos >= 0,
// grad_weights[i][j] = dot(y[pos], grad_rows[i]) in fp32, host order: d = 0; for h ascending
// d = fmaf(float(y[pos][h]), float(grad_rows[i][h]), d) (CUDA may use another fixed order: compare with a
// tolerance); for j with pos < 0, 0.
struct ReduceParams {
  int64_t num_recv_rows = 0;
  int max_row_experts = 0;  // KL
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  const void* y = nullptr;                    // [N, H] expert-major
  const int32_t* recv_expert_rows = nullptr;  // [R, KL]
  const float* recv_weights = nullptr;        // [R, KL] or null (unweighted)
  void* out = nullptr;                        // [R, H] partial rows, rank-major
  // Weight gradients for the combine backward: grad_w[i][j] = dot(y[pos_ij], g[i]) in fp32.
  const void* grad_rows = nullptr;  // [R, H] or null
  float* grad_weights = nullptr;    // [R, KL] or null
  int blocks_per_sm = 0;            // cuda: blocks per SM of the persistent grid (0: the default)
  // Per source rank destinations (the peer window's combine: the peers' partial rows go straight into
  // their windows, the own ones into a local buffer, in one launch). With num_sources > 0, `out` is not
  // read: row i of source s (row_offsets[s] <= i < row_offsets[s + 1]; row_offsets[0] = 0,
  // row_offsets[num_sources] = num_recv_rows) goes to outs[s] row i - row_offsets[s]. cuda takes the rows
  // of self_source (>= 0) interleaved with the others', so that the others' stores over NVLink and the
  // own rows' reads share the time; the results do not depend on the order.
  int num_sources = 0;
  void* const* outs = nullptr;           // [num_sources] (backend memory; null: that source's rows not written)
  const int64_t* row_offsets = nullptr;  // [num_sources + 1] (backend memory)
  int self_source = -1;
  int outs_align = 1;  // a power of two (<= 16) dividing every outs[s]: bounds the vector width
  // With outs_parity.count set, outs holds two tables of num_sources back to back and the call's parity picks one.
  SlotParity outs_parity;
  // Rows without a local expert (recv_expert_rows[i][0] < 0) are not written (the low-latency combine's
  // empty slots); otherwise they get zero rows.
  bool skip_empty_rows = false;
  // cuda: the most warps sharing a row (pieces of its vectors) when the rows are too few to fill the device; 0: as
  // many as fill it, 1: one warp a row. A launch shape only: the results do not depend on it.
  int max_row_pieces = 0;
};

// 8. Final sum: out[t] = sum over ranks r ascending with token_slot[t][r] >= 0 of
// ret[send_offsets[r] + token_slot[t][r]], fp32, one rounding; tokens routed nowhere get zeros.
// The self rank's partial rows never travel: they are read from self_ret (the reduce output) at
// self_ret_offset (the self chunk's first receive row) + slot.
// Exactly: acc = 0; for r ascending: acc = acc + float(row) (plain fp32 add); out[t][h] = round(acc).
// send_offsets[self_rank] is not read.
struct FinalSumParams {
  int64_t num_tokens = 0;
  int num_ranks = 0;
  int self_rank = 0;
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  const int32_t* token_slot = nullptr;
  const int64_t* send_offsets = nullptr;  // [W] (backend memory)
  const void* ret = nullptr;              // [S, H] rows returned by the peers, send layout
  const void* self_ret = nullptr;         // partial rows of the self chunk
  int64_t self_ret_offset = 0;
  void* out = nullptr;  // [T, H]
  // ret and self_ret move by ret_parity_bytes when the call's parity is 1 (the low-latency combine's regions).
  SlotParity ret_parity;
  int64_t ret_parity_bytes = 0;
  int max_row_pieces = 0;  // cuda: as ReduceParams::max_row_pieces
};

// Scatter of returned weight gradients to the source layout: for token t, rank r, row
// q = send_offsets[r] + slot, the j-th set bit of t's slice on r gets ret_grad_w[q][j].
// (self rank: row self_offset + slot of self_grad_w.) The j-th set bit is expert e = r*L + l; it goes to
// grad_dense[t][e] when weight_format == kDense, or to grad_compact[t][c] when kCompact, where c is e's
// compact position (see "Weight of expert e" above). routing.weights is not read. Dense: the caller
// zeroes grad_dense first (the host reference also writes the unrouted entries as 0); compact: entries
// of invalid indices are 0. The orchestration calls it once per wanted output, with the one pointer set.
struct WeightGradParams {
  int64_t num_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  int num_ranks = 0;
  int self_rank = 0;
  RoutingInput routing;  // weight_format says which output: dense or compact
  const int32_t* token_slot = nullptr;
  const int64_t* send_offsets = nullptr;
  const float* ret_grad_w = nullptr;   // [S, KL]
  const float* self_grad_w = nullptr;  // self chunk rows
  int64_t self_offset = 0;
  float* grad_dense = nullptr;    // [T, E] or null
  float* grad_compact = nullptr;  // [T, k] or null
};

// Several device-to-device copies in one launch (the peer window's unpacking: a few ranges of rows, maps
// and weights, one launch instead of one copy each). Pieces of 0 bytes are skipped; pieces must not
// overlap each other's destinations or a source another piece writes.
struct CopyBatchParams {
  static constexpr int kMaxPieces = 8;
  int count = 0;
  void* dst[kMaxPieces] = {};
  const void* src[kMaxPieces] = {};
  int64_t bytes[kMaxPieces] = {};
  // Appends a piece (false when full; nothing appended for 0 bytes).
  bool add(void* d, const void* s, int64_t n) {
    if (n <= 0) return true;
    if (count == kMaxPieces) return false;
    dst[count] = d;
    src[count] = s;
    bytes[count] = n;
    ++count;
    return true;
  }
};

// 9. Low-latency dispatch (src/ep/low_latency.cc), cuda only. Every rank's low-latency window holds, per
// source rank s, a block of C slots (C = capacity): rows [C, H], local map slices [C, MB], weights [C, KL]
// (fp32, bit order, 0-padded) and ranks [C, KL] (int32); and a header: per source its T (int64 [W]) and its
// count of tokens per local expert (int32 [W, L]). Token t of rank s uses slot t of s's block in every rank's
// window.
struct LowLatencyBlock {
  int64_t header = 0;   // offset of the [W] int64 header (T per source) in a region
  int64_t counts = 0;   // offset of the [W, L] int32 counts (tokens per source and local expert) in a region
  int64_t first = 0;    // offset of source 0's block
  int64_t stride = 0;   // bytes between two sources' blocks
  int64_t map = 0;      // offset of the maps in a block (rows at 0)
  int64_t weights = 0;  // offset of the weights in a block
  int64_t ranks = 0;    // offset of the ranks in a block
};

// Send: for each token t < T and each rank r, slot t of this rank's block in r's region gets the map slice of
// r's experts (zero when none) and, when the slice is not empty, the row, the slice's weights
// (ExpertMajorParams' "first KL set bits" and the permute's weight rule) and, for its j-th expert l, the
// number of tokens t' < t of this rank using l (ranks[t][j]; entries past the slice's experts not written);
// the header of r's region gets this rank's T and its tokens per expert of r (counts[self][l]);
// token_slot[t][r] = t when t goes to r, else -1 (the combine's final sum).
struct LowLatencySendParams {
  int64_t num_tokens = 0;  // T <= capacity
  int num_experts = 0;
  int topk = 0;
  int num_ranks = 0;
  int self_rank = 0;
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  RoutingInput routing;
  const void* x = nullptr;         // [T, H]
  int64_t capacity = 0;            // C
  char* const* regions = nullptr;  // [2][W] (backend memory): rank r's region of each parity, as mapped here
  SlotParity parity;               // picks the row of regions (0 when parity.count is null)
  LowLatencyBlock block;
  int32_t* token_slot = nullptr;  // [T, W] out
  int max_pieces = 32;            // cuda: at most this many warps share a token's row
};

// Receive, after the barrier (one kernel): this rank's region -> the expert-major view, as ExpertMajorParams
// with the received rows taken in slot order (source rank, then token; slots t >= the source's T are empty),
// plus the offsets and counts (from the header's counts): expert_counts[l], expert_offsets (aligned blocks
// back to back, [L + 1]), recv_expert_rows [W * C, KL] (per slot, -1 padded) and recv_weights [W * C, KL]
// (0-padded, when not null). The row of a slot's j-th expert l is expert_offsets[l] + the counts of l of the
// sources before it + the slot's ranks[j]. Pad rows zeroed; rows past expert_offsets[L] not written.
// The kernel keeps (W + 2) L + W + 2 int32 in dynamic shared memory, at most kLowLatencyMaxSmem, and numbers the
// W * C slots in int32: low_latency_receive_fits says whether a group's shape can take this path. Its static shared
// memory (the block scan's) comes on top, past the 48 KiB a kernel gets without opting in: the launcher opts it in
// (low_latency_receive_supported, kernels/ep.h, also checks the device's opt-in maximum).
constexpr size_t kLowLatencyMaxSmem = 48 * 1024;
inline size_t low_latency_receive_smem(int num_ranks, int num_local_experts) {
  const size_t W = static_cast<size_t>(num_ranks), L = static_cast<size_t>(num_local_experts);
  return sizeof(int) * ((W + 2) * L + W + 2);
}
inline bool low_latency_receive_fits(int num_ranks, int num_local_experts, int64_t capacity) {
  return num_ranks >= 1 && num_local_experts >= 1 && capacity >= 1 &&
         low_latency_receive_smem(num_ranks, num_local_experts) <= kLowLatencyMaxSmem &&
         static_cast<int64_t>(num_ranks) * capacity <= INT32_MAX;
}
struct LowLatencyReceiveParams {
  int num_ranks = 0;
  int num_local_experts = 0;  // L
  int max_row_experts = 0;    // KL
  int64_t capacity = 0;       // C
  int64_t hidden = 0;
  DType dtype = DType::kBF16;
  int alignment = 1;
  const char* region = nullptr;  // this rank's region of parity 0; parity 1's is region_parity_bytes further
  int64_t region_parity_bytes = 0;
  SlotParity parity;
  LowLatencyBlock block;
  void* expert_x = nullptr;             // [capacity rows, H]
  int64_t expert_capacity = 0;          // rows of expert_x (offsets past it: rows not written)
  int32_t* expert_counts = nullptr;     // [L]
  int32_t* expert_offsets = nullptr;    // [L + 1]
  int32_t* recv_expert_rows = nullptr;  // [W * C, KL]
  float* recv_weights = nullptr;        // [W * C, KL] or null
  int copy_warps_per_sm = 32;           // cuda: the copies' warps (about this many an SM over the W * C slots)
};

inline int local_map_bytes(int num_local_experts) { return (num_local_experts + 7) / 8; }
inline int max_row_experts(int topk, int num_local_experts) {
  return topk < num_local_experts ? topk : num_local_experts;
}

}  // namespace bitep::kernels
