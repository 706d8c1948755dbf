// SPDX-License-Identifier: Apache-2.0
// The one-rank window (src/ep/local_window.h).
#include "src/ep/local_window.h"

#include "src/check.h"
#include "src/ep/pool.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace bitep::ep {

#ifdef BITEP_HAVE_CUDA
namespace {

class LocalWindow final : public PeerWindow {
 public:
  explicit LocalWindow(size_t bytes) : bytes_(bytes) {}
  ~LocalWindow() override {
    if (data_ != nullptr) (void)cudaFree(data_);  // waits for the device's work (cudaFree synchronises)
    (void)cudaGetLastError();
  }

  bitepResult_t init() {
    BITEP_CUDA_CHECK(cudaMalloc(&data_, bytes_ > 0 ? bytes_ : 1));
    BITEP_CUDA_CHECK(cudaMemset(data_, 0, bytes_ > 0 ? bytes_ : 1));
    BITEP_CUDA_CHECK(cudaDeviceSynchronize());
    return bitepSuccess;
  }

  uint64_t exchanges() const override { return 0; }
  bitepResult_t reserve(size_t bytes, double timeout_s) override {
    (void)timeout_s;
    if (bytes > bytes_) BITEP_FAIL(bitepInternalError, "a one-rank window of %zu bytes asked for %zu", bytes_, bytes);
    return bitepSuccess;
  }
  size_t bytes() const override { return bytes_; }
  char* data(int r) const override {
    (void)r;  // the only rank
    return static_cast<char*>(data_);
  }
  // No peer: the stores queued before it on the stream are visible to the work queued after it.
  bitepResult_t barrier(bitepStream_t stream, double timeout_s) override {
    (void)stream;
    (void)timeout_s;
    return bitepSuccess;
  }
  bitepResult_t check() override { return bitepSuccess; }
  bool can_exchange(int n) const override {
    (void)n;
    return false;
  }
  bitepResult_t exchange(const int32_t*, int32_t*, int32_t*, int, bitepStream_t, double) override {
    BITEP_FAIL(bitepInternalError, "a one-rank window has no count exchange");
  }
  // As the peer window's: the next call's stream waits for the last one's release, unless it is that stream.
  bitepResult_t acquire(bitepStream_t stream) override { return order_.acquire(stream); }
  bitepResult_t release(bitepStream_t stream) override { return order_.release(stream); }

 private:
  size_t bytes_;
  void* data_ = nullptr;
  StreamOrder order_;
};

}  // namespace

bitepResult_t make_local_window(size_t bytes, std::unique_ptr<PeerWindow>* out) {
  std::unique_ptr<LocalWindow> w(new LocalWindow(bytes));
  BITEP_CHECK(w->init());
  *out = std::move(w);
  return bitepSuccess;
}
#else
bitepResult_t make_local_window(size_t bytes, std::unique_ptr<PeerWindow>* out) {
  (void)bytes;
  (void)out;
  BITEP_FAIL(bitepNotSupported, "a one-rank window needs a CUDA build");
}
#endif

}  // namespace bitep::ep
