// SPDX-License-Identifier: Apache-2.0
// The group's buffer pool: a caching allocator of backend memory (host: aligned malloc, cuda: cudaMalloc)
// keyed by size class. A request is rounded up to its class (at most 1.125x the bytes asked for); a
// released block goes back to the free list of its class and is handed out again to the next request of
// that class, so a steady stream of dispatches of similar sizes allocates nothing.
// cuda: release records an event on the releasing stream, and the next user's stream waits on it, so a
// block is never reused before the work queued on it has finished; a user on the releasing stream itself
// needs no wait (stream order) and makes none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "bitep/bitep.h"

namespace bitep::ep {

struct Block {
  void* ptr = nullptr;          // null for a zero-byte request
  size_t bytes = 0;             // the class size
  void* event = nullptr;        // cudaEvent_t recorded at release (cuda only), created on first release
  std::shared_ptr<void> fence;  // cuda: instead of event, a shared event recorded after its last use
  uint64_t stream_key = 0;      // cuda: cudaStreamGetId + 1 of the releasing stream (0: not known)
  uint64_t last_use = 0;        // pool tick of the last release
};

// cuda: cudaStreamGetId(stream) + 1, the key of the pool's same-stream reuse (ids are never reused, unlike
// stream handles); 0 when not known (without CUDA, the call failed, or the stream captures a CUDA graph, which
// cudaStreamGetId would invalidate).
uint64_t cuda_stream_key(bitepStream_t stream);

// cuda: whether `stream` is capturing a CUDA graph now (false without CUDA, or when the query fails).
bool cuda_stream_capturing(bitepStream_t stream);

// cuda: the order of the calls that share one resource (a window) whatever streams they run on. acquire() makes
// `stream` wait for the last release() (no wait on that release's own stream: stream order is enough).
class StreamOrder {
 public:
  StreamOrder() = default;
  ~StreamOrder();
  StreamOrder(const StreamOrder&) = delete;
  StreamOrder& operator=(const StreamOrder&) = delete;
  bitepResult_t acquire(bitepStream_t stream);
  bitepResult_t release(bitepStream_t stream);

 private:
  // cudaEvent_t, created at the first release (before it there is nothing to wait for)
  [[maybe_unused]] void* event_ = nullptr;
  [[maybe_unused]] uint64_t last_key_ = 0;  // the stream key of the last release (0: none or not known)
};

class Pool {
 public:
  Pool(bitepBackend_t backend, int device);
  ~Pool();  // frees every block, in use or cached (unless leak() was called)
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Smallest class >= bytes: 256 bytes at least, then 8 classes per power of two (class < 1.125 x bytes).
  static size_t size_class(size_t bytes);

  // A block of at least `bytes` (bytes = 0: an empty block, no memory). cuda: stream waits on the
  // block's release event unless stream_key (cudaStreamGetId + 1 of stream; 0: not known) says it was
  // released on this very stream. Fails with bitepOutOfMemory (after dropping the cache and retrying once).
  bitepResult_t acquire(size_t bytes, bitepStream_t stream, Block* out, uint64_t stream_key = 0);

  // For work being captured into a CUDA graph (cuda), which may not wait on events recorded outside the capture:
  // a cached block whose last use has finished, else a new allocation (made with the thread's capture mode
  // relaxed: the memory belongs to the graph's handle, not to the graph). Nothing is queued on any stream.
  bitepResult_t acquire_captured(size_t bytes, Block* out);

  // Returns the block to the cache (cuda: after the work queued on stream). Empty blocks are ignored.
  void release(Block* block, bitepStream_t stream);
  // Every block of `blocks` (then cleared), after the work queued on stream: one event for all of them.
  void release_all(std::vector<Block>* blocks, bitepStream_t stream, uint64_t stream_key = 0);
  // The same, ordered by `fence` (a cudaEvent_t already recorded after the block's last use) instead
  // of a stream, which may be gone by now (a handle destroyed after its stream). fence_key: the key of the
  // stream the fence was recorded on (0: not known), whose next user needs no wait. A null fence: nothing to
  // wait for (the caller synchronised the device since the block's last use).
  void release(Block* block, std::shared_ptr<void> fence, uint64_t fence_key = 0);

  // Whether nothing queued on the pool's blocks is left: every block is back in the cache and, cuda, the work queued
  // before each one's release has finished (cudaEventQuery, no wait; a query that fails counts as not finished).
  bool idle() const;
  // Whether a block is in use (acquired and not yet released).
  bool blocks_in_use() const;
  // Bytes held now: blocks in use and cached.
  size_t held_bytes() const;
  // Frees every cached block (blocks in use stay); returns the bytes freed. Nothing after leak().
  size_t trim();
  // Real allocations made so far (tests: steady state allocates nothing).
  uint64_t num_allocations() const;

  // After a transport failure a peer may still write into our blocks: never free them.
  void leak() { leak_ = true; }
  bool leaking() const { return leak_; }

 private:
  bitepResult_t allocate(size_t bytes, void** ptr);
  // A new block of class cls, in use (mu_ held); may_trim: on running out, drop the cache and retry once.
  bitepResult_t new_block(size_t cls, bool may_trim, Block* out);
  void free_block(Block* b);
  void trim_locked(uint64_t older_than);

  bitepBackend_t backend_;
  [[maybe_unused]] int device_;  // cuda builds
  mutable std::mutex mu_;
  std::multimap<size_t, Block> cached_;  // class size -> free blocks
  std::map<void*, Block> in_use_;
  size_t held_ = 0;
  uint64_t tick_ = 0;
  uint64_t allocations_ = 0;
  bool leak_ = false;
  std::map<void*, std::shared_ptr<void>> stream_events_;  // cuda: release_all's event per stream
};

}  // namespace bitep::ep
