// SPDX-License-Identifier: Apache-2.0
#include "src/ep/exec.h"

#include <cstdlib>
#include <cstring>

#include "src/check.h"
#include "src/host/ep_host.h"

#ifdef BITEP_HAVE_CUDA
#include "kernels/ep.h"
#endif

namespace bitep::ep {

#ifdef BITEP_HAVE_CUDA
namespace {
inline cudaStream_t cu(bitepStream_t s) { return reinterpret_cast<cudaStream_t>(s); }

// `to` waits for the work queued on `from` so far, through `event`.
bitepResult_t wait_for(cudaStream_t to, cudaStream_t from, void* event) {
  cudaEvent_t ev = static_cast<cudaEvent_t>(event);
  BITEP_CUDA_CHECK(cudaEventRecord(ev, from));
  BITEP_CUDA_CHECK(cudaStreamWaitEvent(to, ev, 0));
  return bitepSuccess;
}
}  // namespace
#endif

uint64_t split_min_bytes() {
  static const uint64_t bytes = [] {
    const char* v = std::getenv("BITEP_SPLIT_MIN_BYTES");
    if (v == nullptr || *v == '\0') return uint64_t{8} << 20;
    char* end = nullptr;
    const unsigned long long n = std::strtoull(v, &end, 10);
    return end != nullptr && *end == '\0' ? static_cast<uint64_t>(n) : uint64_t{8} << 20;
  }();
  return bytes;
}

Exec::Exec(bitepGroup* group, bitepStream_t stream) : group_(group), stream_(stream) {}

Exec::~Exec() {
  if (forked_) (void)join();
  if (ce_pending_) (void)ce_join();
  Pool* pool = group_->life->pool.get();
  pool->release_all(&temps_, stream_, stream_key_);
#ifdef BITEP_HAVE_CUDA
  if (prev_device_ >= 0 && prev_device_ != group_->device) {
    cudaSetDevice(prev_device_);
    (void)cudaGetLastError();
  }
#endif
}

bitepResult_t Exec::begin() {
  if (!cuda()) return bitepSuccess;
#ifdef BITEP_HAVE_CUDA
  // First: while the stream captures, none of the calls below may count against the capture.
  capturing_ = cuda_stream_capturing(stream_);
  if (capturing_) relaxed_.emplace();
  BITEP_CUDA_CHECK(cudaGetDevice(&prev_device_));
  if (prev_device_ != group_->device) BITEP_CUDA_CHECK(cudaSetDevice(group_->device));
  stream_key_ = cuda_stream_key(stream_);  // 0 (not known): every pool block waits on its release event
  return bitepSuccess;
#else
  BITEP_FAIL(bitepNotSupported, "this bitep was built without CUDA");
#endif
}

// Zero-byte requests still get a (minimal) block: the launchers take a null pointer for a missing
// argument, so every buffer they are given is real, even with no rows.
bitepResult_t Exec::temp(size_t bytes, void** out) {
  if (capturing_)
    BITEP_FAIL(bitepInternalError,
               "a temporary buffer in a call being captured into a CUDA graph (a path that "
               "should have refused the capture)");
  Block b;
  BITEP_CHECK(group_->life->pool->acquire(bytes > 0 ? bytes : 1, stream_, &b, stream_key_));
  if (b.ptr != nullptr) temps_.push_back(b);
  *out = b.ptr;
  return bitepSuccess;
}

bitepResult_t Exec::keep(size_t bytes, std::vector<Block>* owner, void** out) {
  Block b;
  if (capturing_) {
    BITEP_CHECK(group_->life->pool->acquire_captured(bytes > 0 ? bytes : 1, &b));
  } else {
    BITEP_CHECK(group_->life->pool->acquire(bytes > 0 ? bytes : 1, stream_, &b, stream_key_));
  }
  if (b.ptr != nullptr) owner->push_back(b);
  *out = b.ptr;
  return bitepSuccess;
}

bitepResult_t Exec::zero(void* dst, size_t bytes) {
  if (bytes == 0) return bitepSuccess;
  if (!cuda()) {
    std::memset(dst, 0, bytes);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, cu(stream_)));
#endif
  return bitepSuccess;
}

bitepResult_t Exec::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return bitepSuccess;
  if (!cuda()) {
    std::memcpy(dst, src, bytes);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(launch_stream())));
#endif
  return bitepSuccess;
}

bitepResult_t Exec::upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return bitepSuccess;
  if (!cuda()) {
    std::memcpy(dst, host_src, bytes);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  // From pageable memory the copy is staged before cudaMemcpyAsync returns: the source may go away.
  BITEP_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, cu(stream_)));
#endif
  return bitepSuccess;
}

bitepResult_t Exec::upload_staged(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return bitepSuccess;
  if (!cuda()) {
    std::memcpy(dst, host_src, bytes);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  bitepGroup* g = group_;
  if (bytes > g->upload_bytes) {
    if (g->upload_staging != nullptr) {
      BITEP_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(g->upload_event)));
      BITEP_CUDA_CHECK(cudaFreeHost(g->upload_staging));
      g->upload_staging = nullptr;
      g->upload_bytes = 0;
    }
    BITEP_CUDA_CHECK(cudaMallocHost(&g->upload_staging, bytes));
    g->upload_bytes = bytes;
  } else {
    BITEP_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(g->upload_event)));
  }
  std::memcpy(g->upload_staging, host_src, bytes);
  BITEP_CUDA_CHECK(cudaMemcpyAsync(dst, g->upload_staging, bytes, cudaMemcpyHostToDevice, cu(stream_)));
  BITEP_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(g->upload_event), cu(stream_)));
#endif
  return bitepSuccess;
}

bitepResult_t Exec::copy_rows(
    void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows, bool src_host) {
  if (rows == 0 || width == 0) return bitepSuccess;
  if (!cuda()) {
    for (size_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<char*>(dst) + i * dst_pitch, static_cast<const char*>(src) + i * src_pitch, width);
    return bitepSuccess;
  }
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                     src_host ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice, cu(stream_)));
#else
  (void)src_host;
#endif
  return bitepSuccess;
}

bitepResult_t Exec::fork() {
  if (!cuda()) return bitepSuccess;
#ifdef BITEP_HAVE_CUDA
  BITEP_CHECK(wait_for(static_cast<cudaStream_t>(group_->side_stream), cu(stream_), group_->fork_event));
  forked_ = side_ = true;
#endif
  return bitepSuccess;
}

bitepResult_t Exec::join() {
  side_ = false;
  if (!forked_) return bitepSuccess;
  forked_ = false;
#ifdef BITEP_HAVE_CUDA
  BITEP_CHECK(wait_for(cu(stream_), static_cast<cudaStream_t>(group_->side_stream), group_->join_event));
#endif
  return bitepSuccess;
}

bitepResult_t Exec::ce_fork() {
  if (!cuda()) BITEP_FAIL(bitepInternalError, "copy-engine chunks on the host backend");
#ifdef BITEP_HAVE_CUDA
  bitepGroup* g = group_;
  if (g->ce_stream == nullptr) {
    cudaStream_t s = nullptr;
    BITEP_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t ev = nullptr;
    const cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess) cudaStreamDestroy(s);
    BITEP_CUDA_CHECK(e);
    g->ce_stream = s;
    g->ce_event = ev;
  }
  BITEP_CHECK(wait_for(static_cast<cudaStream_t>(g->ce_stream), cu(stream_), g->ce_event));
  ce_pending_ = true;
#endif
  return bitepSuccess;
}

bitepResult_t Exec::ce_chunks(const std::vector<kernels::CeChunk>& chunks, uint32_t value) {
  if (!ce_pending_) BITEP_FAIL(bitepInternalError, "copy-engine chunks without ce_fork()");
#ifdef BITEP_HAVE_CUDA
  BITEP_CUDA_CHECK(kernels::launch_ce_chunks(chunks.data(), static_cast<int>(chunks.size()), value,
                                             static_cast<cudaStream_t>(group_->ce_stream)));
#else
  (void)chunks, (void)value;
#endif
  return bitepSuccess;
}

bool Exec::ce_available() const {
#ifdef BITEP_HAVE_CUDA
  return cuda() && kernels::ce_chunks_available();
#else
  return false;
#endif
}

bitepResult_t Exec::ce_join() {
  if (!ce_pending_) return bitepSuccess;
  ce_pending_ = false;
#ifdef BITEP_HAVE_CUDA
  BITEP_CHECK(wait_for(cu(stream_), static_cast<cudaStream_t>(group_->ce_stream), group_->ce_event));
#endif
  return bitepSuccess;
}

#ifdef BITEP_HAVE_CUDA
void* Exec::launch_stream() const { return side_ ? group_->side_stream : static_cast<void*>(stream_); }
#endif

// host::ep_<name> on the host backend, kernels::launch_ep_<name> on the launch stream for cuda.
#ifdef BITEP_HAVE_CUDA
#define BITEP_EP_PRIMITIVE(name, Params)                                                        \
  bitepResult_t Exec::name(const kernels::Params& p) {                                          \
    if (!cuda()) {                                                                              \
      host::ep_##name(p);                                                                       \
      return bitepSuccess;                                                                      \
    }                                                                                           \
    BITEP_CUDA_CHECK(kernels::launch_ep_##name(p, static_cast<cudaStream_t>(launch_stream()))); \
    return bitepSuccess;                                                                        \
  }
#else
#define BITEP_EP_PRIMITIVE(name, Params)               \
  bitepResult_t Exec::name(const kernels::Params& p) { \
    host::ep_##name(p);                                \
    return bitepSuccess;                               \
  }
#endif

BITEP_EP_PRIMITIVE(layout, LayoutParams)
BITEP_EP_PRIMITIVE(pack_counts, PackCountsParams)
BITEP_EP_PRIMITIVE(permute, PermuteParams)
BITEP_EP_PRIMITIVE(expert_major, ExpertMajorParams)
BITEP_EP_PRIMITIVE(copy_batch, CopyBatchParams)
BITEP_EP_PRIMITIVE(expert_sources, ExpertSourcesParams)
BITEP_EP_PRIMITIVE(reduce, ReduceParams)
BITEP_EP_PRIMITIVE(final_sum, FinalSumParams)
BITEP_EP_PRIMITIVE(weight_grad, WeightGradParams)

// Whether a primitive takes its bulk copies: the cuda launcher's answer, false on the host backend.
#ifdef BITEP_HAVE_CUDA
#define BITEP_EP_TAKES_BULK(name, Params, query)                  \
  bitepResult_t Exec::name(const kernels::Params& p, bool* out) { \
    *out = false;                                                 \
    if (cuda()) BITEP_CUDA_CHECK(kernels::query(p, out));         \
    return bitepSuccess;                                          \
  }
#else
#define BITEP_EP_TAKES_BULK(name, Params, query)                  \
  bitepResult_t Exec::name(const kernels::Params& p, bool* out) { \
    (void)p;                                                      \
    *out = false;                                                 \
    return bitepSuccess;                                          \
  }
#endif

BITEP_EP_TAKES_BULK(expert_bulk, ExpertMajorParams, expert_major_takes_bulk)
BITEP_EP_TAKES_BULK(permute_bulk, PermuteParams, permute_takes_bulk)

}  // namespace bitep::ep
