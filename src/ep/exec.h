// SPDX-License-Identifier: Apache-2.0
// One call's execution context: the backend's memory operations and primitives (host::ep_* or
// kernels::launch_ep_*), pool blocks for temporaries, and the cuda device guard. The orchestration in
// dispatch.cc / combine.cc / combine_backward.cc is written once against it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/ep_params.h"
#include "src/capture.h"
#include "src/ep/group.h"

namespace bitep::ep {

// Grids of the copies that run beside an all-to-all take this many blocks per SM (of 8): room for NCCL's
// kernel on every SM.
constexpr int kSideBlocksPerSm = 4;

// Dispatch and combine overlap their own rows' copies with the all-to-all of the others' rows when a
// rank moves at least this many bytes of rows: BITEP_SPLIT_MIN_BYTES, default 8 MiB (0: always). Below
// it the extra all-to-all of a split dispatch (the routing ahead of the rows) costs more than it hides.
uint64_t split_min_bytes();

class Exec {
 public:
  Exec(bitepGroup* group, bitepStream_t stream);
  ~Exec();  // releases the temporaries (cuda: after the work queued so far), restores the device
  Exec(const Exec&) = delete;
  Exec& operator=(const Exec&) = delete;

  // cuda: makes the group's device current. Call first.
  bitepResult_t begin();
  bool cuda() const { return group_->config.backend == bitepBackendCuda; }
  bitepGroup* group() const { return group_; }
  bitepStream_t stream() const { return stream_; }

  // cuda: whether the caller's stream is capturing a CUDA graph (known after begin()). Then keep() takes blocks
  // that wait for nothing (Pool::acquire_captured) and temp() refuses: a temporary would go back to the pool
  // when the call returns, while every replay of the graph still uses it.
  bool capturing() const { return capturing_; }

  // Pool memory (never null, even for 0 bytes): temp() is released when the Exec ends; keep() hands the
  // block to `owner`.
  bitepResult_t temp(size_t bytes, void** out);
  bitepResult_t keep(size_t bytes, std::vector<Block>* owner, void** out);

  // Backend memory operations (cuda: enqueued on the stream; host: done at return).
  bitepResult_t zero(void* dst, size_t bytes);
  // Device to device; between fork() and launch_on_caller() / join() on the side stream, as the primitives.
  bitepResult_t copy(void* dst, const void* src, size_t bytes);
  // host -> backend; the host source may be reused once this returns.
  bitepResult_t upload(void* dst, const void* host_src, size_t bytes);
  // The same through the group's pinned staging buffer (cuda: an asynchronous copy, no staging by the
  // driver); waits first for the previous staged upload, which may be on another stream.
  bitepResult_t upload_staged(void* dst, const void* host_src, size_t bytes);
  // Strided copy of `rows` rows of `width` bytes (src_host: the source is host memory).
  bitepResult_t copy_rows(
      void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows, bool src_host);

  // Work beside the caller's stream (cuda; the host backend runs everything in call order, and these
  // are no-ops there). fork(): the group's side stream waits for what the caller's stream holds so far,
  // and the primitives launch on it until launch_on_caller() or join() (a fork() while forked makes it wait
  // again, for what the caller's stream holds now); join() makes the caller's stream
  // wait for the side stream's work. stream() stays the caller's (the transport's calls go there).
  // Temporaries must be taken before fork(); the destructor joins a fork left open (an error path)
  // before it releases them.
  bitepResult_t fork();
  void launch_on_caller() { side_ = false; }
  bitepResult_t join();
  // cuda, the copy engine's chunks (kernels::launch_ce_chunks) on the group's copy stream: ce_fork() makes that
  // stream wait for the work queued on the caller's stream so far; ce_chunks() queues chunks there (value: the
  // flags' epoch, below 2^32); ce_join() makes the caller's stream wait for them (the destructor too, on an
  // error path, before it releases the temporaries). A chunk that waits on a flag is queued only once the
  // launch that raises it was queued: a wait nothing will end would hang the stream.
  bitepResult_t ce_fork();
  bitepResult_t ce_chunks(const std::vector<kernels::CeChunk>& chunks, uint32_t value);
  bitepResult_t ce_join();
  // Whether ce_chunks() can run here (cuda, with the driver's stream memory operations).
  bool ce_available() const;
  // The stream the primitives launch on now (the side stream between fork() and launch_on_caller()).
  bitepStream_t current_stream() const { return side_ ? static_cast<bitepStream_t>(group_->side_stream) : stream_; }

  // The primitives of kernels/ep_params.h on this backend.
  bitepResult_t layout(const kernels::LayoutParams& p);
  bitepResult_t pack_counts(const kernels::PackCountsParams& p);
  bitepResult_t permute(const kernels::PermuteParams& p);
  bitepResult_t expert_major(const kernels::ExpertMajorParams& p);
  bitepResult_t copy_batch(const kernels::CopyBatchParams& p);
  bitepResult_t expert_sources(const kernels::ExpertSourcesParams& p);
  bitepResult_t reduce(const kernels::ReduceParams& p);
  bitepResult_t final_sum(const kernels::FinalSumParams& p);
  bitepResult_t weight_grad(const kernels::WeightGradParams& p);
  // Whether expert_major(p) copies by bulk copies (cuda), which leave ExpertMajorParams::expert_src unfilled.
  bitepResult_t expert_bulk(const kernels::ExpertMajorParams& p, bool* out);
  // Whether permute(p) moves the rows by bulk copies (cuda; PermuteParams::bulk).
  bitepResult_t permute_bulk(const kernels::PermuteParams& p, bool* out);

 private:
  bitepGroup* group_;
  bitepStream_t stream_;
  std::vector<Block> temps_;
  [[maybe_unused]] int prev_device_ = -1;  // cuda builds
  uint64_t stream_key_ = 0;                // cuda: cudaStreamGetId(stream) + 1 after begin() (0: not known)
  bool capturing_ = false;                 // cuda: the stream captures a graph (begin())
  // While capturing: the thread's capture mode relaxed for the call (the launchers' attribute queries and the
  // pool's allocations are not part of the graph).
  std::optional<RelaxedCaptureMode> relaxed_;
  bool forked_ = false;      // between fork() and join()
  bool side_ = false;        // the primitives launch on the side stream
  bool ce_pending_ = false;  // copy-engine chunks queued that the caller's stream has not waited for
#ifdef BITEP_HAVE_CUDA
  void* launch_stream() const;  // cudaStream_t of the primitives: the side stream between fork and join
#endif
};

}  // namespace bitep::ep
