// SPDX-License-Identifier: Apache-2.0
#include "src/ep/pool.h"

#include <cstdlib>
#include <vector>

#include "src/capture.h"
#include "src/check.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep::ep {
namespace {
constexpr size_t kMinClass = 256;
constexpr size_t kHostAlign = 256;
// A cached block not reused for this many acquisitions is freed on the next miss, so that the cache
// follows the traffic instead of keeping every size it ever saw.
constexpr uint64_t kTrimAge = 256;

#ifdef BITEP_HAVE_CUDA
// The event after a cached block's last use: its fence, else its own release event (null: nothing to wait for).
cudaEvent_t release_event(const Block& b) { return static_cast<cudaEvent_t>(b.fence ? b.fence.get() : b.event); }

// Whether the work queued before a cached block's release has finished (no wait; a query that fails: not finished).
bool last_use_done(const Block& b) {
  const cudaEvent_t ev = release_event(b);
  if (ev == nullptr || cudaEventQuery(ev) == cudaSuccess) return true;
  (void)cudaGetLastError();
  return false;
}
#endif
}  // namespace

bool cuda_stream_capturing(bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &status) == cudaSuccess)
    return status != cudaStreamCaptureStatusNone;
  (void)cudaGetLastError();
#else
  (void)stream;
#endif
  return false;
}

uint64_t cuda_stream_key(bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  // cudaStreamGetId on a capturing stream invalidates the capture, whatever the thread's capture mode (seen on
  // CUDA 13.0 with an H200: bitepCombine's call broke the caller's graph): no key there.
  if (cuda_stream_capturing(stream)) return 0;
  unsigned long long id = 0;
  if (cudaStreamGetId(reinterpret_cast<cudaStream_t>(stream), &id) == cudaSuccess) return static_cast<uint64_t>(id) + 1;
  (void)cudaGetLastError();
#else
  (void)stream;
#endif
  return 0;
}

StreamOrder::~StreamOrder() {
#ifdef BITEP_HAVE_CUDA
  if (event_ != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event_));
#endif
}

bitepResult_t StreamOrder::acquire(bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  const uint64_t key = cuda_stream_key(stream);
  if (event_ == nullptr || (key != 0 && key == last_key_)) return bitepSuccess;
  BITEP_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0));
#else
  (void)stream;
#endif
  return bitepSuccess;
}

bitepResult_t StreamOrder::release(bitepStream_t stream) {
#ifdef BITEP_HAVE_CUDA
  last_key_ = 0;
  if (event_ == nullptr) {
    cudaEvent_t ev = nullptr;
    BITEP_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    event_ = ev;
  }
  BITEP_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event_), reinterpret_cast<cudaStream_t>(stream)));
  last_key_ = cuda_stream_key(stream);
#else
  (void)stream;
#endif
  return bitepSuccess;
}

Pool::Pool(bitepBackend_t backend, int device) : backend_(backend), device_(device) {}

Pool::~Pool() {
  if (leak_) return;
  for (auto& kv : cached_) free_block(&kv.second);
  for (auto& kv : in_use_) free_block(&kv.second);
}

size_t Pool::size_class(size_t bytes) {
  if (bytes <= kMinClass) return kMinClass;
  // 8 classes per octave: step = 2^(floor(log2(bytes)) - 3), so class / bytes < 1 + 1/8.
  int msb = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));
  const size_t step = size_t{1} << (msb - 3);
  return (bytes + step - 1) / step * step;
}

bitepResult_t Pool::allocate(size_t bytes, void** ptr) {
  *ptr = nullptr;
  if (backend_ == bitepBackendHost) {
    if (posix_memalign(ptr, kHostAlign, bytes) != 0 || *ptr == nullptr) {
      *ptr = nullptr;
      BITEP_FAIL(bitepOutOfMemory, "host allocation of %zu bytes for the group's buffer pool failed", bytes);
    }
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  cudaError_t err = cudaMalloc(ptr, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    *ptr = nullptr;
    BITEP_FAIL(err == cudaErrorMemoryAllocation ? bitepOutOfMemory : bitepCudaError,
               "cudaMalloc of %zu bytes on device %d for the group's buffer pool failed: %s", bytes, device_,
               cudaGetErrorString(err));
  }
  return bitepSuccess;
#else
  BITEP_FAIL(bitepNotSupported, "cuda pool without CUDA support");
#endif
}

void Pool::free_block(Block* b) {
  if (b->ptr == nullptr) return;
  if (backend_ == bitepBackendHost) {
    std::free(b->ptr);
  } else {
#ifdef BITEP_HAVE_CUDA
    // cudaFree waits for the device; the event only orders reuse.
    if (b->event) cudaEventDestroy(static_cast<cudaEvent_t>(b->event));
    cudaFree(b->ptr);
    (void)cudaGetLastError();
#endif
  }
  b->ptr = nullptr;
  b->event = nullptr;
  b->fence.reset();
}

void Pool::trim_locked(uint64_t older_than) {
  for (auto it = cached_.begin(); it != cached_.end();) {
    if (it->second.last_use + older_than <= tick_) {
      held_ -= it->second.bytes;
      free_block(&it->second);
      it = cached_.erase(it);
    } else {
      ++it;
    }
  }
}

bitepResult_t Pool::acquire(size_t bytes, bitepStream_t stream, Block* out, [[maybe_unused]] uint64_t stream_key) {
  *out = Block{};
  if (bytes == 0) return bitepSuccess;
  const size_t cls = size_class(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  ++tick_;
  auto it = cached_.find(cls);
  if (it != cached_.end()) {
    Block b = it->second;
    cached_.erase(it);
#ifdef BITEP_HAVE_CUDA
    const cudaEvent_t ev = release_event(b);
    // Released on this stream (ids are never reused, unlike stream handles): stream order is enough.
    const bool same_stream = stream_key != 0 && b.stream_key == stream_key;
    if (backend_ == bitepBackendCuda && ev != nullptr && !same_stream) {
      cudaError_t err = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), ev, 0);
      if (err != cudaSuccess) {
        cached_.emplace(cls, b);
        return cuda_error(err, "cudaStreamWaitEvent(stream, pool block release event)", __FILE__, __LINE__);
      }
    }
#else
    (void)stream;
#endif
    b.fence.reset();
    b.stream_key = 0;
    in_use_.emplace(b.ptr, b);
    *out = b;
    return bitepSuccess;
  }
  trim_locked(kTrimAge);
  return new_block(cls, /*may_trim=*/true, out);
}

bitepResult_t Pool::new_block(size_t cls, bool may_trim, Block* out) {
  Block b;
  b.bytes = cls;
  bitepResult_t r = allocate(cls, &b.ptr);
  if (r == bitepOutOfMemory && may_trim && !cached_.empty()) {  // drop the whole cache and retry once
    trim_locked(0);
    r = allocate(cls, &b.ptr);
  }
  if (r != bitepSuccess) return r;
  ++allocations_;
  held_ += cls;
  in_use_.emplace(b.ptr, b);
  *out = b;
  return bitepSuccess;
}

bitepResult_t Pool::acquire_captured(size_t bytes, Block* out) {
  *out = Block{};
  if (bytes == 0) return bitepSuccess;
#ifdef BITEP_HAVE_CUDA
  if (backend_ != bitepBackendCuda) BITEP_FAIL(bitepInternalError, "a captured pool block on the host backend");
  const size_t cls = size_class(bytes);
  RelaxedCaptureMode relaxed;  // the allocation and the queries are not the graph's
  std::lock_guard<std::mutex> lock(mu_);
  ++tick_;
  for (auto it = cached_.lower_bound(cls); it != cached_.end() && it->first == cls; ++it) {
    if (!last_use_done(it->second)) continue;  // not finished (or not queryable): not this one
    Block b = it->second;
    cached_.erase(it);
    b.fence.reset();
    b.stream_key = 0;
    in_use_.emplace(b.ptr, b);
    *out = b;
    return bitepSuccess;
  }
  // No trimming: freeing cached blocks (cudaFree) would synchronise the device in the middle of a capture.
  return new_block(cls, /*may_trim=*/false, out);
#else
  (void)bytes;
  BITEP_FAIL(bitepNotSupported, "this bitep was built without CUDA");
#endif
}

void Pool::release(Block* block, bitepStream_t stream) {
  if (block->ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_use_.find(block->ptr);
  if (it == in_use_.end()) return;  // not ours (never happens): leave it alone
  Block b = it->second;
  in_use_.erase(it);
#ifdef BITEP_HAVE_CUDA
  if (backend_ == bitepBackendCuda) {
    if (b.event == nullptr) {
      cudaEvent_t ev = nullptr;
      if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) == cudaSuccess) b.event = ev;
    }
    if (b.event == nullptr ||
        cudaEventRecord(static_cast<cudaEvent_t>(b.event), reinterpret_cast<cudaStream_t>(stream)) != cudaSuccess) {
      // Without an event the block cannot be reused safely: wait for the stream, or drop the block.
      (void)cudaGetLastError();
      if (cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)) != cudaSuccess) {
        (void)cudaGetLastError();
        held_ -= b.bytes;
        free_block(&b);
        *block = Block{};
        return;
      }
    }
  }
#else
  (void)stream;
#endif
  b.fence.reset();
  b.last_use = tick_;
  cached_.emplace(b.bytes, b);
  *block = Block{};
}

void Pool::release_all(std::vector<Block>* blocks, [[maybe_unused]] bitepStream_t stream, uint64_t stream_key) {
  if (blocks->empty()) return;
  std::shared_ptr<void> fence;
#ifdef BITEP_HAVE_CUDA
  if (backend_ == bitepBackendCuda) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // One event per stream, recorded again at each release_all: a later record on the same stream only
      // makes a waiter wait for more, never for less.
      std::shared_ptr<void>& ev = stream_events_[static_cast<void*>(stream)];
      if (!ev) {
        cudaEvent_t e = nullptr;
        if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess)
          ev.reset(e, [](void* x) { cudaEventDestroy(static_cast<cudaEvent_t>(x)); });
        (void)cudaGetLastError();
      }
      fence = ev;
    }
    if (!fence ||
        cudaEventRecord(static_cast<cudaEvent_t>(fence.get()), reinterpret_cast<cudaStream_t>(stream)) != cudaSuccess) {
      (void)cudaGetLastError();
      for (Block& b : *blocks) release(&b, stream);  // one event each (or a synchronisation)
      blocks->clear();
      return;
    }
  }
#endif
  std::lock_guard<std::mutex> lock(mu_);
  for (Block& blk : *blocks) {
    auto it = in_use_.find(blk.ptr);
    if (it == in_use_.end()) continue;
    Block b = it->second;
    in_use_.erase(it);
    b.fence = fence;
    b.stream_key = stream_key;
    b.last_use = tick_;
    cached_.emplace(b.bytes, b);
  }
  blocks->clear();
}

void Pool::release(Block* block, std::shared_ptr<void> fence, uint64_t fence_key) {
  if (block->ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_use_.find(block->ptr);
  if (it == in_use_.end()) return;
  Block b = it->second;
  in_use_.erase(it);
  b.fence = std::move(fence);
  b.stream_key = fence_key;
  b.last_use = tick_;
  cached_.emplace(b.bytes, b);
  *block = Block{};
}

bool Pool::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!in_use_.empty()) return false;
#ifdef BITEP_HAVE_CUDA
  if (backend_ == bitepBackendCuda) {
    for (const auto& kv : cached_)
      if (!last_use_done(kv.second)) return false;
  }
#endif
  return true;
}

bool Pool::blocks_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !in_use_.empty();
}

size_t Pool::held_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_;
}

size_t Pool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  if (leak_) return 0;
  const size_t before = held_;
  trim_locked(0);
  return before - held_;
}

uint64_t Pool::num_allocations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return allocations_;
}

}  // namespace bitep::ep
