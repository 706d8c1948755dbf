// SPDX-License-Identifier: Apache-2.0
// The NCCL transport (src/ep/transport.h) over one communicator on one device; see nccl_transport.cc.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "src/ep/transport.h"

namespace bitep::ep {

class NcclTransport final : public Transport {
 public:
  // owned: the transport finalizes and destroys comm (or aborts it after a failure); borrowed: never.
  // timeout_s: used by allgather_host until a later call passes its own.
  NcclTransport(ncclComm_t comm, bool owned, int rank, int nranks, int device, double timeout_s);
  ~NcclTransport() override;
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  // Creates the event and the private stream (of allgather_host).
  bitepResult_t init();
  // Forgets comm: the destructor leaves it alone.
  void release() { comm_ = nullptr; }
  // The communicator was aborted (or forgotten) after a failure: nothing more may be called on it.
  bool unusable() const { return aborted_ || comm_ == nullptr; }

  int rank() const override { return rank_; }
  int nranks() const override { return nranks_; }
  // ncclAllGather through a small device buffer on the private stream, then a wait (the timeout is the
  // last one given to exchange_counts / alltoallv; before any, nccl_comm_init's, or 300 s for a borrowed
  // communicator).
  bitepResult_t allgather_host(const void* in, void* out, size_t bytes) override;
  // Grouped ncclSend/ncclRecv of n int32 per peer on `stream`, self slot by cudaMemcpyAsync, download to
  // pinned staging, then a poll of the event and of the communicator until done or timeout_s.
  bitepResult_t exchange_counts(
      const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t stream, double timeout_s) override;
  // One NCCL group of ncclSend/ncclRecv (bytes, split in chunks of at most 2^31 - 1), enqueued on stream.
  bitepResult_t alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                          bitepStream_t stream,
                          double timeout_s) override;
  // comm/nccl_window.cu (when NCCL has its device API): a peer window when every rank is in this rank's
  // load/store team.
  bitepResult_t open_window(double timeout_s) override;
  PeerWindow* window() override { return window_.get(); }
  // A second window of exactly `bytes` (never replaced) for the low-latency dispatches; only after
  // open_window() gave one.
  bitepResult_t open_low_latency_window(size_t bytes, double timeout_s) override;
  PeerWindow* low_latency_window() override { return ll_window_.get(); }

  // r of a non-blocking NCCL call: ncclInProgress is polled to completion against timeout_s.
  bitepResult_t nccl_call(ncclResult_t r, const char* call, const char* what, double timeout_s);

 private:
  bitepResult_t check_usable(const char* call) const;
  // Aborts an owned communicator; the error names rank, call and why.
  bitepResult_t fail(bitepResult_t code, const char* call, const char* why);
  // Waits for event_ (recorded by the caller), watching the communicator's asynchronous error.
  bitepResult_t wait_event(const char* call, double timeout_s);
  bitepResult_t reserve_host(size_t bytes);
  bitepResult_t reserve_device(size_t bytes);

  ncclComm_t comm_;
  bool owned_;
  bool aborted_ = false;
  int rank_, nranks_, device_;
  double timeout_s_;
  cudaEvent_t event_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* host_buf_ = nullptr;     // pinned staging (mapped)
  void* host_mapped_ = nullptr;  // host_buf_ as the device addresses it (null: not mapped)
  size_t host_bytes_ = 0;
  void* dev_buf_ = nullptr;  // allgather_host
  size_t dev_bytes_ = 0;
  std::unique_ptr<PeerWindow> window_;     // released before the communicator
  std::unique_ptr<PeerWindow> ll_window_;  // likewise
};

#ifdef BITEP_HAVE_NCCL_DEVICE
// comm/nccl_window.cu: *out = a window over t's communicator, or null where not every rank can have one.
// fixed_bytes > 0: a window of that many data bytes that is never replaced (reserve() beyond it fails).
bitepResult_t open_nccl_window(NcclTransport* t,
                               ncclComm_t comm,
                               bool owned,
                               double timeout_s,
                               std::unique_ptr<PeerWindow>* out,
                               size_t fixed_bytes = 0);
#endif

}  // namespace bitep::ep
