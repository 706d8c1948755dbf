// SPDX-License-Identifier: Apache-2.0
// A dispatch handle: the layout of one dispatch (counts, offsets, slots), the received rows and the
// expert-major view, in pool blocks it owns until bitepHandleDestroy. Combines and backward passes reuse
// it, so they need no count exchange.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "kernels/ep_params.h"
#include "src/ep/group.h"

struct bitepHandle {
  uint32_t magic = bitep::ep::kHandleMagic;
  std::shared_ptr<bitep::ep::Life> life;  // the group's; alive == false once the group is destroyed
  const bitepGroup* group = nullptr;      // compared only, never dereferenced once the group is gone
  // cuda: an event recorded on the stream of every call that used the handle's blocks, after its work;
  // the blocks go back to the pool ordered by it, so the handle may outlive the streams it was used on.
  std::shared_ptr<void> fence;
  uint64_t fence_key = 0;                // cudaStreamGetId + 1 of the stream it was last recorded on (0: not known)
  std::vector<bitep::ep::Block> blocks;  // pool blocks the handle owns

  uint64_t seq = 0;        // its dispatch's number in its group: the same on every rank for one collective call
  int64_t num_tokens = 0;  // T of the dispatch on this rank
  bool has_weights = false;
  bool window_combine = false;      // its combines go through the peer window (decided alike on every rank)
  bool low_latency = false;         // from bitepDispatchLowLatency: expert-major only, no backward
  bool low_latency_window = false;  // ... through the low-latency window (its combines too)
  // cuda: a call on it was captured into a CUDA graph, whose replays the fence does not see: its blocks go back
  // to the pool only after a device synchronisation (bitepHandleDestroy).
  bool captured = false;
  bitep::kernels::RoutingInput routing;  // the dispatch's map, copied into a handle block (weights not kept)

  // Backend memory.
  int32_t* token_slot = nullptr;        // [T, W]
  int64_t* send_offsets_dev = nullptr;  // [W]
  void* recv_x = nullptr;               // [R, H] (caller's when given)
  uint8_t* recv_map = nullptr;          // [R, MB]
  float* recv_weights = nullptr;        // [R, KL] or null
  int32_t* recv_expert_rows = nullptr;  // [R, KL]
  void* expert_x = nullptr;             // [N, H] (caller's when given)
  int32_t* expert_counts = nullptr;     // [L]
  int32_t* expert_offsets = nullptr;    // [L + 1]
  int32_t* expert_sources = nullptr;    // [N]: bitepHandleGetExpertSources' gather index, once asked for

  // Host.
  int64_t num_send_rows = 0;                        // S: rows sent to peers (self chunk excluded)
  int64_t num_recv_rows = 0;                        // R: rows received, self chunk included
  int64_t num_expert_rows = 0;                      // N
  std::vector<int64_t> send_counts, recv_counts;    // [W]
  std::vector<int64_t> send_offsets, recv_offsets;  // [W] (send_offsets[self] = where it would go; unused)
  std::vector<int64_t> matrix;                      // [W * W]: rows rank s sends rank r at [s * W + r]
  std::vector<int64_t> expert_counts_host;          // [L]
  std::vector<int32_t> expert_offsets_host;         // [L + 1]
  bitepDispatchLayout_t layout{};
};

namespace bitep::ep {

// Validates a handle for use with `group` (group may be null for handle-only calls): non-null, not
// destroyed, its group alive (else bitepInvalidUsage), and the same group.
bitepResult_t check_handle(bitepHandle_t handle, bitepGroup_t group);

// Returns the handle's blocks to the pool (if the group is alive) and deletes it.
// returned: the handle reached the caller (bitepHandleDestroy); false on a call's error path (HandlePtr).
bitepResult_t destroy_handle(bitepHandle_t handle, bool returned);

// A handle under construction: destroyed (destroy_handle) unless released to the caller.
struct HandleDeleter {
  void operator()(bitepHandle* h) const { (void)destroy_handle(h, /*returned=*/false); }
};
using HandlePtr = std::unique_ptr<bitepHandle, HandleDeleter>;

// Gives a finished handle to the caller: it joins the live handles, the registry check_handle and
// bitepHandleDestroy look a pointer up in before reading through it, so a destroyed or foreign pointer is
// refused without touching freed memory (a new handle may take a destroyed one's address: no pointer check
// tells those apart).
bitepHandle_t release_handle(HandlePtr* handle);

// Peer lists of an all-to-all along the handle's routes: one rank-major buffer pair of `row` bytes a row
// (per_peer: one list per rank, the self rank's left empty). Out (dispatch direction): send rows
// [send_offsets[p], + send_counts[p]) go to recv rows [recv_offsets[p], + recv_counts[p]) of peer p;
// back (combine direction): the receive side's rows return, the roles swapped.
enum class Route { kOut, kBack };

// The expert-major primitive's parameters for this handle's layout (rows, map, offsets, counts,
// positions); the caller sets what moves (recv_x, expert_x, weights, the source table, the range).
kernels::ExpertMajorParams expert_major_params(const bitepHandle* h, const bitepGroup* g);
// The permute primitive's parameters for this handle's layout (tokens, shape, ranks, slots, the self chunk's
// offset); the caller sets what moves (routing, x, the send and receive buffers, the peers' destinations).
kernels::PermuteParams permute_params(const bitepHandle* h, const bitepGroup* g);
// The most warps sharing a token's row in the permute (kernels::PermuteParams::max_row_pieces):
// BITEP_PERMUTE_PIECES (1-1024; unset: 0, as many as fill the device), a launch shape only (bench/NOTES.md).
int permute_row_pieces();
void add_route_buffers(const bitepHandle* h,
                       int self,
                       Route route,
                       const void* send,
                       void* recv,
                       size_t row,
                       std::vector<std::vector<PeerBuffers>>* per_peer);

// cuda: creates the handle's fence event (a no-op on the host backend).
bitepResult_t make_fence(bitepHandle_t handle, bool cuda);
// Records the fence on `stream` after the work queued so far (and the stream's key: a later dispatch on that
// stream reuses the blocks without waiting on the fence); when that fails, waits for the stream instead, so
// the blocks are idle by the time the handle may be destroyed. A stream capturing a CUDA graph gets no record
// (an event recorded there cannot be waited on outside the graph): the handle becomes `captured`.
void record_fence(bitepHandle_t handle, bitepStream_t stream);

// Records the handle's fence on scope exit: every return path of a call that queued work on its blocks.
class FenceOnExit {
 public:
  // before_fence, when given, runs first (it joins side-stream work into `stream`).
  FenceOnExit(bitepHandle_t h, bitepStream_t stream, std::function<void()> before_fence = {})
      : h_(h), stream_(stream), before_(std::move(before_fence)) {}
  ~FenceOnExit() {
    if (before_) before_();
    record_fence(h_, stream_);
  }
  FenceOnExit(const FenceOnExit&) = delete;
  FenceOnExit& operator=(const FenceOnExit&) = delete;

 private:
  bitepHandle_t h_;
  bitepStream_t stream_;
  std::function<void()> before_;
};

}  // namespace bitep::ep
