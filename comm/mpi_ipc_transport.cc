// SPDX-License-Identifier: Apache-2.0
// The cuda backend over MPI and CUDA IPC (comm/mpi_ipc_transport.h).
#include "comm/mpi_ipc_transport.h"

#include <cstring>
#include <vector>

#include "src/check.h"
#include "src/env.h"
#include "src/ep/local_window.h"

#ifdef BITEP_HAVE_CUDA
#include <cuda_runtime.h>

#include "comm/flag_window.h"
#endif

namespace bitep::ep {

bool mpi_ipc_requested() { return env_is("BITEP_CUDA_TRANSPORT", "ipc"); }

#ifdef BITEP_HAVE_CUDA
namespace {

// A rank's window buffer by cudaMalloc, the peers' opened from their IPC handles (allgathered over MPI).
class IpcWindow final : public FlagWindow {
 public:
  IpcWindow(Transport* t, size_t fixed_bytes) : FlagWindow(t->rank(), t->nranks(), fixed_bytes), t_(t) {}
  ~IpcWindow() override { unmap_all(); }

 private:
  struct Offer {
    int32_t status;
    cudaIpcMemHandle_t handle;
  };

  bitepResult_t map(size_t bytes, double timeout_s, char** bases_dev, std::vector<char*>* bases) override {
    (void)timeout_s;  // the MPI transport's own bounds the allgathers
    (void)bases_dev;
    Offer mine{};
    void* mem = nullptr;
    // Zeroed before the handle leaves this rank: no peer can store a flag into it before.
    bool ok = cudaMalloc(&mem, bytes) == cudaSuccess && cudaMemset(mem, 0, bytes) == cudaSuccess &&
              cudaDeviceSynchronize() == cudaSuccess && cudaIpcGetMemHandle(&mine.handle, mem) == cudaSuccess;
    const cudaError_t why = ok ? cudaSuccess : cudaGetLastError();
    mine.status = ok ? 1 : 0;
    std::vector<Offer> all(nranks_);
    const bitepResult_t r = t_->allgather_host(&mine, all.data(), sizeof(Offer));
    for (const Offer& o : all) ok = ok && r == bitepSuccess && o.status == 1;
    std::vector<char*> opened(nranks_, nullptr);
    opened[rank_] = static_cast<char*>(mem);
    cudaError_t open_error = cudaSuccess;
    for (int p = 0; p < nranks_ && ok; ++p) {
      if (p == rank_) continue;
      void* peer = nullptr;
      open_error = cudaIpcOpenMemHandle(&peer, all[p].handle, cudaIpcMemLazyEnablePeerAccess);
      ok = open_error == cudaSuccess;
      opened[p] = static_cast<char*>(peer);
    }
    // Every rank learns whether all opened every peer's buffer.
    int32_t done = ok ? 1 : 0;
    std::vector<int32_t> dones(nranks_, 0);
    const bitepResult_t r2 = r == bitepSuccess ? t_->allgather_host(&done, dones.data(), sizeof(int32_t)) : r;
    for (int32_t d : dones) ok = ok && r2 == bitepSuccess && d == 1;
    mem_ = mem;
    peers_ = opened;
    if (ok) {
      *bases = opened;
      return bitepSuccess;
    }
    unmap();
    if (r2 != bitepSuccess) return r2;
    if (why != cudaSuccess)
      BITEP_FAIL(bitepCudaError, "rank %d of %d: the IPC window's buffer of %zu bytes: %s", rank_, nranks_, bytes,
                 cudaGetErrorString(why));
    if (open_error != cudaSuccess)
      BITEP_FAIL(bitepCudaError, "rank %d of %d: cudaIpcOpenMemHandle of a peer's window: %s", rank_, nranks_,
                 cudaGetErrorString(open_error));
    BITEP_FAIL(bitepRemoteError, "rank %d of %d: another rank could not make or open an IPC window", rank_, nranks_);
  }

  // Called on every rank alike (a replacement, the destruction, or a map() every rank failed).
  void unmap() override {
    (void)cudaDeviceSynchronize();
    for (int p = 0; p < nranks_; ++p)
      if (p != rank_ && peers_.size() == static_cast<size_t>(nranks_) && peers_[p] != nullptr)
        (void)cudaIpcCloseMemHandle(peers_[p]);
    peers_.clear();
    // No peer may still map this rank's buffer when it is freed: every rank has closed its handles first. A
    // rank that cannot agree leaves the buffer allocated.
    int32_t one = 1;
    std::vector<int32_t> all(nranks_, 0);
    if (t_->allgather_host(&one, all.data(), sizeof(int32_t)) == bitepSuccess && mem_ != nullptr) (void)cudaFree(mem_);
    (void)cudaGetLastError();
    mem_ = nullptr;
  }

  Transport* t_;
  void* mem_ = nullptr;
  std::vector<char*> peers_;  // the ranks' buffers as opened here (this rank's own at its index)
};

// The count exchange goes through MPI, never through a window (the trace of a window's opening says so).
constexpr const char* kCountsByMpi = "by MPI (the IPC transport's)";

class MpiIpcTransport final : public Transport {
 public:
  explicit MpiIpcTransport(std::unique_ptr<Transport> mpi) : mpi_(std::move(mpi)) {}
  ~MpiIpcTransport() override {
    // The windows first (their unmapping agrees over mpi_); staging MPI may still own after a failure stays.
    ll_window_.reset();
    window_.reset();
    if (broken_) {
      new std::vector<char>(std::move(send_));
      new std::vector<char>(std::move(recv_));
    }
  }

  int rank() const override { return mpi_->rank(); }
  int nranks() const override { return mpi_->nranks(); }
  bitepResult_t enter_call(const char* call, bool teardown) override { return mpi_->enter_call(call, teardown); }
  void leave_call() override { mpi_->leave_call(); }
  bitepResult_t allgather_host(const void* in, void* out, size_t bytes) override {
    return mpi_->allgather_host(in, out, bytes);
  }

  bitepResult_t exchange_counts(
      const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t stream, double timeout_s) override {
    BITEP_CHECK(check_usable("exchange_counts"));
    const size_t bytes = sizeof(int32_t) * static_cast<size_t>(n) * nranks();
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    send_.resize(bytes);
    BITEP_CUDA_CHECK(cudaMemcpyAsync(send_.data(), send, bytes, cudaMemcpyDeviceToHost, s));
    BITEP_CUDA_CHECK(cudaStreamSynchronize(s));
    const bitepResult_t r = mpi_->exchange_counts(reinterpret_cast<const int32_t*>(send_.data()), recv_host, recv_host,
                                                  n, stream, timeout_s);
    broken_ = broken_ || r != bitepSuccess;
    BITEP_CHECK(r);
    BITEP_CUDA_CHECK(cudaMemcpyAsync(recv, recv_host, bytes, cudaMemcpyHostToDevice, s));
    BITEP_CUDA_CHECK(cudaStreamSynchronize(s));
    return bitepSuccess;
  }

  bitepResult_t alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                          bitepStream_t stream,
                          double timeout_s) override {
    BITEP_CHECK(check_usable("alltoallv"));
    BITEP_ARG_CHECK(static_cast<int>(per_peer.size()) == nranks(), "internal: alltoallv with %zu peers, expected %d",
                    per_peer.size(), nranks());
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    uint64_t send_total = 0, recv_total = 0;
    for (const auto& list : per_peer)
      for (const PeerBuffers& b : list) send_total += b.send_bytes, recv_total += b.recv_bytes;
    send_.resize(send_total);
    recv_.resize(recv_total);
    // The host copies of every buffer, in the order of per_peer.
    std::vector<std::vector<PeerBuffers>> host(per_peer.size());
    uint64_t so = 0, ro = 0;
    for (size_t p = 0; p < per_peer.size(); ++p)
      for (const PeerBuffers& b : per_peer[p]) {
        if (b.send_bytes > 0)
          BITEP_CUDA_CHECK(cudaMemcpyAsync(send_.data() + so, b.send, b.send_bytes, cudaMemcpyDeviceToHost, s));
        host[p].push_back({send_.data() + so, b.send_bytes, recv_.data() + ro, b.recv_bytes});
        so += b.send_bytes;
        ro += b.recv_bytes;
      }
    BITEP_CUDA_CHECK(cudaStreamSynchronize(s));
    const bitepResult_t r = mpi_->alltoallv(host, stream, timeout_s);
    broken_ = broken_ || r != bitepSuccess;
    BITEP_CHECK(r);
    for (size_t p = 0; p < per_peer.size(); ++p)
      for (size_t i = 0; i < per_peer[p].size(); ++i)
        if (per_peer[p][i].recv_bytes > 0)
          BITEP_CUDA_CHECK(cudaMemcpyAsync(per_peer[p][i].recv, host[p][i].recv, per_peer[p][i].recv_bytes,
                                           cudaMemcpyHostToDevice, s));
    BITEP_CUDA_CHECK(cudaStreamSynchronize(s));  // the staging is reused by the next call
    return bitepSuccess;
  }

  bitepResult_t open_window(double timeout_s) override {
    const bool off = env_is("BITEP_LSA", "0");
    return open_flag_window(this, nranks() > 1 && !off, nranks() > 1 ? "BITEP_LSA=0" : "one rank",
                            std::make_unique<IpcWindow>(this, 0), 0, timeout_s, &window_, kCountsByMpi);
  }
  PeerWindow* window() override { return window_.get(); }

  bitepResult_t open_low_latency_window(size_t bytes, double timeout_s) override {
    if (ll_window_ != nullptr) return bitepSuccess;
    // As the NCCL transport: one rank has a window of its own memory; else one where the peer window is.
    if (nranks() == 1) return env_is("BITEP_LSA", "0") ? bitepSuccess : make_local_window(bytes, &ll_window_);
    if (window_ == nullptr) return bitepSuccess;
    return open_flag_window(this, true, nullptr, std::make_unique<IpcWindow>(this, bytes), bytes, timeout_s,
                            &ll_window_, kCountsByMpi);
  }
  PeerWindow* low_latency_window() override { return ll_window_.get(); }

 private:
  // After an MPI failure the staging buffers may still be MPI's (abandoned requests): never touched again.
  bitepResult_t check_usable(const char* op) const {
    if (broken_)
      BITEP_FAIL(bitepInvalidUsage, "IPC transport: %s after an earlier MPI failure of this group (destroy it)", op);
    return bitepSuccess;
  }

  std::unique_ptr<Transport> mpi_;
  bool broken_ = false;
  std::vector<char> send_, recv_;  // host staging
  std::unique_ptr<PeerWindow> window_, ll_window_;
};

}  // namespace

bitepResult_t make_mpi_ipc_transport(std::unique_ptr<Transport> mpi, int device, std::unique_ptr<Transport>* out) {
  int current = -1;
  BITEP_CUDA_CHECK(cudaGetDevice(&current));
  BITEP_ARG_CHECK(current == device, "internal: the IPC transport's device %d is not the current one (%d)", device,
                  current);
  *out = std::make_unique<MpiIpcTransport>(std::move(mpi));
  return bitepSuccess;
}
#else
bitepResult_t make_mpi_ipc_transport(std::unique_ptr<Transport> mpi, int device, std::unique_ptr<Transport>* out) {
  (void)mpi, (void)device, (void)out;
  BITEP_FAIL(bitepNotSupported, "BITEP_CUDA_TRANSPORT=ipc needs a CUDA build");
}
#endif

}  // namespace bitep::ep
