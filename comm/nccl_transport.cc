// SPDX-License-Identifier: Apache-2.0
// Transport over an NCCL communicator (src/ep/transport.h) for device memory, and the NCCL bootstrap
// hooks: unique id, non-blocking communicator init (blocking with BITEP_NCCL_BLOCKING=1, a tuning knob:
// each call enqueued on the caller's thread, but init, connection setup and finalisation unguarded).
//
// Every wait is a poll against the caller's timeout: cudaEventQuery for the work, and
// ncclCommGetAsyncError for the communicator (a peer that failed shows up there). On a timeout or an
// asynchronous NCCL error, an owned communicator is aborted (ncclCommAbort also stops its kernels, so
// the stream drains) and the call fails naming the rank and the call; a borrowed communicator is never
// aborted: the error says so, and the caller decides. Once aborted, every later call fails at once.
// Only point-to-point and all-gather operations are used (no NVLS / multicast).
#include "comm/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "src/check.h"
#include "src/env.h"
#include "src/ep/local_window.h"

namespace bitep::ep {
namespace {

static_assert(sizeof(ncclUniqueId) == BITEP_UNIQUE_ID_BYTES, "bitepUniqueId must hold an ncclUniqueId");

constexpr uint64_t kMaxChunkBytes = INT_MAX;  // one ncclSend / ncclRecv moves at most 2^31 - 1 bytes

using Clock = std::chrono::steady_clock;

// The timeout nccl_comm_init was given, per communicator it made: the transport over it starts with it
// (allgather_host, the config agreement at group creation, has no timeout argument).
std::mutex g_init_timeouts_mu;
std::unordered_map<const ncclComm*, double> g_init_timeouts;

double take_init_timeout(const ncclComm* comm) {
  std::lock_guard<std::mutex> lock(g_init_timeouts_mu);
  auto it = g_init_timeouts.find(comm);
  if (it == g_init_timeouts.end()) return kDefaultTimeoutS;
  const double t = it->second;
  g_init_timeouts.erase(it);
  return t;
}

bool nccl_blocking() {
  static const bool blocking = env_is("BITEP_NCCL_BLOCKING", "1");
  return blocking;
}

// Yields the core between polls for the first 50 ms, then sleeps 100 us between polls. Never a bare
// spin: a non-blocking communicator launches its work from NCCL's own threads, and mpirun binds a rank
// to one core by default, so a spinning caller holds that work back (measured on 2 x H200: every wait
// lasted exactly the spin window, 2 ms). A sleep costs 50-100 us of timer slack, too much for the
// latency-bound waits of a dispatch.
class Poller {
 public:
  explicit Poller(double timeout_s) : start_(Clock::now()), timeout_s_(timeout_s) {}
  bool expired() const { return elapsed() > timeout_s_; }
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  void pause() const {
    if (elapsed() < 50e-3) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

 private:
  Clock::time_point start_;
  double timeout_s_;
};

// Waits until a non-blocking communicator leaves ncclInProgress. *state: its final state.
// Returns false on timeout (state then ncclInProgress).
bool poll_comm(ncclComm_t comm, double timeout_s, ncclResult_t* state) {
  Poller poll(timeout_s);
  for (;;) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &st);
    if (r != ncclSuccess) {
      *state = r;
      return true;
    }
    if (st != ncclInProgress) {
      *state = st;
      return true;
    }
    if (poll.expired()) {
      *state = ncclInProgress;
      return false;
    }
    poll.pause();
  }
}

}  // namespace

NcclTransport::NcclTransport(ncclComm_t comm, bool owned, int rank, int nranks, int device, double timeout_s)
    : comm_(comm), owned_(owned), rank_(rank), nranks_(nranks), device_(device), timeout_s_(timeout_s) {}

NcclTransport::~NcclTransport() {
  int prev = -1;
  const bool switch_device = cudaGetDevice(&prev) == cudaSuccess && prev != device_;
  if (switch_device) (void)cudaSetDevice(device_);
  if (window_ != nullptr || ll_window_ != nullptr) {
    (void)cudaDeviceSynchronize();
    ll_window_.reset();
    window_.reset();
  }
  if (comm_ != nullptr && owned_ && !aborted_) {
    // Finalize flushes the issued work and reaches global quiescence; a peer that never gets there
    // (failed, stalled) ends in an abort after the timeout instead of a hang.
    ncclResult_t r = ncclCommFinalize(comm_);
    ncclResult_t state = r;
    bool done = r == ncclSuccess;
    if (r == ncclInProgress || r == ncclSuccess) done = poll_comm(comm_, timeout_s_, &state);
    if (done && state == ncclSuccess)
      (void)ncclCommDestroy(comm_);
    else
      (void)ncclCommAbort(comm_);
  }
  if (dev_buf_ != nullptr) (void)cudaFree(dev_buf_);
  if (host_buf_ != nullptr) (void)cudaFreeHost(host_buf_);
  if (event_ != nullptr) (void)cudaEventDestroy(event_);
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  (void)cudaGetLastError();
  if (switch_device) (void)cudaSetDevice(prev);
}

bitepResult_t NcclTransport::init() {
  BITEP_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  BITEP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  return bitepSuccess;
}

bitepResult_t NcclTransport::check_usable(const char* call) const {
  if (aborted_)
    BITEP_FAIL(bitepNcclError,
               "rank %d: %s: the NCCL communicator was aborted after an earlier failure; destroy the group and "
               "create a new one",
               rank_, call);
  return bitepSuccess;
}

bitepResult_t NcclTransport::fail(bitepResult_t code, const char* call, const char* why) {
  if (owned_ && !aborted_) {
    (void)ncclCommAbort(comm_);
    aborted_ = true;
    BITEP_FAIL(code,
               "rank %d of %d: %s %s; the NCCL communicator was aborted (destroy the group; NCCL_DEBUG=WARN "
               "tells more)",
               rank_, nranks_, call, why);
  }
  BITEP_FAIL(code,
             "rank %d of %d: %s %s; the communicator is the caller's: bitep did not abort it (call ncclCommAbort "
             "before reusing it or its streams)",
             rank_, nranks_, call, why);
}

bitepResult_t NcclTransport::nccl_call(ncclResult_t r, const char* call, const char* what, double timeout_s) {
  if (r == ncclSuccess) return bitepSuccess;
  if (r != ncclInProgress) {
    char why[256];
    std::snprintf(why, sizeof(why), "failed: %s failed: %s (%s)", what, ncclGetErrorString(r), ncclGetLastError(comm_));
    return fail(bitepNcclError, call, why);
  }
  ncclResult_t state = ncclInProgress;
  if (!poll_comm(comm_, timeout_s, &state)) {
    char why[256];
    std::snprintf(why, sizeof(why), "did not complete within %.3g s (%s still in progress: a peer failed or stalled)",
                  timeout_s, what);
    return fail(bitepTimeout, call, why);
  }
  if (state != ncclSuccess) {
    char why[256];
    std::snprintf(why, sizeof(why), "failed: %s: %s (%s)", what, ncclGetErrorString(state), ncclGetLastError(comm_));
    return fail(bitepNcclError, call, why);
  }
  return bitepSuccess;
}

bitepResult_t NcclTransport::wait_event(const char* call, double timeout_s) {
  Poller poll(timeout_s);
  for (;;) {
    const cudaError_t q = cudaEventQuery(event_);
    if (q == cudaSuccess) return bitepSuccess;
    if (q != cudaErrorNotReady) return cuda_error(q, "cudaEventQuery", __FILE__, __LINE__);
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
      const ncclResult_t e = r != ncclSuccess ? r : state;
      char why[256];
      std::snprintf(why, sizeof(why), "failed: NCCL reported %s (%s): a peer failed or the network broke",
                    ncclGetErrorString(e), ncclGetLastError(comm_));
      return fail(bitepNcclError, call, why);
    }
    if (poll.expired()) {
      char why[160];
      std::snprintf(why, sizeof(why), "did not complete within %.3g s: a peer failed or stalled", timeout_s);
      return fail(bitepTimeout, call, why);
    }
    poll.pause();
  }
}

bitepResult_t NcclTransport::reserve_host(size_t bytes) {
  if (bytes <= host_bytes_) return bitepSuccess;
  if (host_buf_ != nullptr) BITEP_CUDA_CHECK(cudaFreeHost(host_buf_));
  host_buf_ = host_mapped_ = nullptr;
  host_bytes_ = 0;
  BITEP_CUDA_CHECK(cudaHostAlloc(&host_buf_, bytes, cudaHostAllocMapped));
  host_bytes_ = bytes;
  // The window's count exchange stores into it from its kernel (no copy after it); without a device address
  // the exchange copies as the NCCL path does.
  if (cudaHostGetDevicePointer(&host_mapped_, host_buf_, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    host_mapped_ = nullptr;
  }
  return bitepSuccess;
}

bitepResult_t NcclTransport::reserve_device(size_t bytes) {
  if (bytes <= dev_bytes_) return bitepSuccess;
  if (dev_buf_ != nullptr) {
    BITEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    BITEP_CUDA_CHECK(cudaFree(dev_buf_));
  }
  dev_buf_ = nullptr;
  dev_bytes_ = 0;
  BITEP_CUDA_CHECK(cudaMalloc(&dev_buf_, bytes));
  dev_bytes_ = bytes;
  return bitepSuccess;
}

bitepResult_t NcclTransport::allgather_host(const void* in, void* out, size_t bytes) {
  static const char* kCall = "allgather_host";
  BITEP_CHECK(check_usable(kCall));
  if (bytes == 0) return bitepSuccess;
  const size_t total = bytes * static_cast<size_t>(nranks_);
  BITEP_CHECK(reserve_device(total));
  BITEP_CHECK(reserve_host(total));
  char* dev = static_cast<char*>(dev_buf_);
  BITEP_CUDA_CHECK(cudaMemcpyAsync(dev + bytes * rank_, in, bytes, cudaMemcpyHostToDevice, stream_));
  BITEP_CHECK(nccl_call(ncclAllGather(dev + bytes * rank_, dev, bytes, ncclUint8, comm_, stream_), kCall,
                        "ncclAllGather", timeout_s_));
  BITEP_CUDA_CHECK(cudaMemcpyAsync(host_buf_, dev, total, cudaMemcpyDeviceToHost, stream_));
  BITEP_CUDA_CHECK(cudaEventRecord(event_, stream_));
  BITEP_CHECK(wait_event(kCall, timeout_s_));
  std::memcpy(out, host_buf_, total);
  return bitepSuccess;
}

bitepResult_t NcclTransport::exchange_counts(
    const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t stream, double timeout_s) {
  static const char* kCall = "count exchange";
  BITEP_CHECK(check_usable(kCall));
  BITEP_ARG_CHECK(n >= 0, "exchange_counts: n is %d", n);
  if (timeout_s > 0) timeout_s_ = timeout_s;
  if (n == 0) return bitepSuccess;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const size_t per_peer = sizeof(int32_t) * static_cast<size_t>(n);
  const size_t total = per_peer * static_cast<size_t>(nranks_);
  BITEP_CHECK(reserve_host(total));
  if (window_ != nullptr && window_->can_exchange(n)) {
    // Through the peer windows: one kernel of NVLink stores and flags, no NCCL call.
    int32_t* mapped = static_cast<int32_t*>(host_mapped_);
    BITEP_CHECK(window_->exchange(send, recv, mapped, n, stream, timeout_s_));
    if (mapped == nullptr) BITEP_CUDA_CHECK(cudaMemcpyAsync(host_buf_, recv, total, cudaMemcpyDeviceToHost, s));
    BITEP_CUDA_CHECK(cudaEventRecord(event_, s));
    BITEP_CHECK(wait_event(kCall, timeout_s_));
    if (window_->check() != bitepSuccess) {
      char why[160];
      std::snprintf(why, sizeof(why),
                    "did not complete within %.3g s: a peer did not reach the exchange in the peer window (it failed "
                    "or stalled)",
                    timeout_s_);
      return fail(bitepTimeout, kCall, why);
    }
    std::memcpy(recv_host, host_buf_, total);
    return bitepSuccess;
  }
  if (nranks_ > 1) {
    BITEP_NCCL_CHECK(ncclGroupStart());
    ncclResult_t first = ncclSuccess;
    for (int p = 0; p < nranks_ && first == ncclSuccess; ++p) {
      if (p == rank_) continue;
      first = ncclSend(send + static_cast<size_t>(p) * n, n, ncclInt32, p, comm_, s);
      if (first == ncclSuccess || first == ncclInProgress)
        first = ncclRecv(recv + static_cast<size_t>(p) * n, n, ncclInt32, p, comm_, s);
      if (first == ncclInProgress) first = ncclSuccess;
    }
    const ncclResult_t end = ncclGroupEnd();
    BITEP_CHECK(nccl_call(first != ncclSuccess ? first : end, kCall, "ncclSend/ncclRecv group", timeout_s_));
  }
  if (nranks_ == 1) {
    // Nothing received: the own row straight to the host, one copy (recv is the transport's scratch).
    BITEP_CUDA_CHECK(cudaMemcpyAsync(host_buf_, send, total, cudaMemcpyDeviceToHost, s));
  } else {
    BITEP_CUDA_CHECK(cudaMemcpyAsync(recv + static_cast<size_t>(rank_) * n, send + static_cast<size_t>(rank_) * n,
                                     per_peer, cudaMemcpyDeviceToDevice, s));
    BITEP_CUDA_CHECK(cudaMemcpyAsync(host_buf_, recv, total, cudaMemcpyDeviceToHost, s));
  }
  BITEP_CUDA_CHECK(cudaEventRecord(event_, s));
  BITEP_CHECK(wait_event(kCall, timeout_s_));
  std::memcpy(recv_host, host_buf_, total);
  return bitepSuccess;
}

bitepResult_t NcclTransport::alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                                       bitepStream_t stream,
                                       double timeout_s) {
  static const char* kCall = "all-to-all";
  BITEP_CHECK(check_usable(kCall));
  if (timeout_s > 0) timeout_s_ = timeout_s;
  if (per_peer.size() != static_cast<size_t>(nranks_))
    BITEP_FAIL(bitepInternalError, "alltoallv: %zu peer lists for %d ranks", per_peer.size(), nranks_);
  bool any = false;
  for (int p = 0; p < nranks_; ++p)
    for (const PeerBuffers& b : per_peer[p]) {
      if (p == rank_ && (b.send_bytes != 0 || b.recv_bytes != 0))
        BITEP_FAIL(bitepInternalError, "alltoallv: rank %d lists %llu / %llu bytes for itself", rank_,
                   static_cast<unsigned long long>(b.send_bytes), static_cast<unsigned long long>(b.recv_bytes));
      if ((b.send_bytes != 0 && b.send == nullptr) || (b.recv_bytes != 0 && b.recv == nullptr))
        BITEP_FAIL(bitepInternalError, "alltoallv: NULL buffer for %s bytes with peer %d",
                   b.send_bytes != 0 && b.send == nullptr ? "send" : "receive", p);
      any = any || b.send_bytes != 0 || b.recv_bytes != 0;
    }
  if (!any) return bitepSuccess;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  BITEP_NCCL_CHECK(ncclGroupStart());
  ncclResult_t first = ncclSuccess;
  auto keep = [&first](ncclResult_t r) {
    if (first == ncclSuccess && r != ncclSuccess && r != ncclInProgress) first = r;
  };
  for (int p = 0; p < nranks_ && first == ncclSuccess; ++p) {
    if (p == rank_) continue;
    // Both sides list the same buffers in the same order with matching sizes: the chunks pair up in order.
    for (const PeerBuffers& b : per_peer[p]) {
      for (uint64_t off = 0; off < b.send_bytes; off += kMaxChunkBytes)
        keep(ncclSend(static_cast<const char*>(b.send) + off, std::min(kMaxChunkBytes, b.send_bytes - off), ncclUint8,
                      p, comm_, s));
      for (uint64_t off = 0; off < b.recv_bytes; off += kMaxChunkBytes)
        keep(ncclRecv(static_cast<char*>(b.recv) + off, std::min(kMaxChunkBytes, b.recv_bytes - off), ncclUint8, p,
                      comm_, s));
    }
  }
  const ncclResult_t end = ncclGroupEnd();
  return nccl_call(first != ncclSuccess ? first : end, kCall, "ncclSend/ncclRecv group", timeout_s_);
}

bitepResult_t NcclTransport::open_window(double timeout_s) {
  BITEP_CHECK(check_usable("peer window"));
#ifdef BITEP_HAVE_NCCL_DEVICE
  return open_nccl_window(this, comm_, owned_, timeout_s, &window_);
#else
  (void)timeout_s;
  return bitepSuccess;
#endif
}

bitepResult_t NcclTransport::open_low_latency_window(size_t bytes, double timeout_s) {
  BITEP_CHECK(check_usable("low-latency window"));
  if (ll_window_ != nullptr) return bitepSuccess;
  // One rank: no peer to store into, so a window of its own device memory (off with BITEP_LSA=0, as the
  // peer windows are).
  if (nranks_ == 1) return env_is("BITEP_LSA", "0") ? bitepSuccess : make_local_window(bytes, &ll_window_);
  if (window_ == nullptr) return bitepSuccess;  // where the peer window is, so every rank alike
#ifdef BITEP_HAVE_NCCL_DEVICE
  return open_nccl_window(this, comm_, owned_, timeout_s, &ll_window_, bytes);
#else
  (void)bytes;
  (void)timeout_s;
  return bitepSuccess;
#endif
}

// ---- hooks of src/ep/transport.h -----------------------------------------------------------------------

bitepResult_t make_nccl_transport(struct ncclComm* comm,
                                  bool owned,
                                  std::unique_ptr<Transport>* out,
                                  double timeout_s) {
  BITEP_ARG_CHECK(comm != nullptr, "NCCL communicator is NULL");
  int nranks = 0, rank = 0, comm_dev = -1, dev = -1;
  BITEP_NCCL_CHECK(ncclCommCount(comm, &nranks));
  BITEP_NCCL_CHECK(ncclCommUserRank(comm, &rank));
  BITEP_NCCL_CHECK(ncclCommCuDevice(comm, &comm_dev));
  BITEP_CUDA_CHECK(cudaGetDevice(&dev));
  BITEP_ARG_CHECK(dev == comm_dev, "the current CUDA device (%d) is not the NCCL communicator's device (%d)", dev,
                  comm_dev);
  const double init_timeout = take_init_timeout(comm);
  std::unique_ptr<NcclTransport> t(
      new NcclTransport(comm, owned, rank, nranks, dev, timeout_s > 0 ? timeout_s : init_timeout));
  const bitepResult_t r = t->init();
  if (r != bitepSuccess) {
    t->release();  // the caller keeps comm on failure
    return r;
  }
  *out = std::move(t);
  return bitepSuccess;
}

bitepResult_t nccl_get_unique_id(bitepUniqueId* id) {
  BITEP_ARG_CHECK(id != nullptr, "id is NULL");
  ncclUniqueId uid;
  BITEP_NCCL_CHECK(ncclGetUniqueId(&uid));
  std::memcpy(id->internal, &uid, sizeof(uid));
  return bitepSuccess;
}

bitepResult_t nccl_comm_init(const bitepUniqueId* id, int nranks, int rank, double timeout_s, struct ncclComm** out) {
  BITEP_ARG_CHECK(id != nullptr && out != nullptr, "id or out is NULL");
  BITEP_ARG_CHECK(nranks >= 1 && rank >= 0 && rank < nranks, "rank %d of %d is out of range", rank, nranks);
  BITEP_ARG_CHECK(timeout_s > 0, "timeout_s is %g, must be > 0", timeout_s);
  *out = nullptr;
  ncclUniqueId uid;
  std::memcpy(&uid, id->internal, sizeof(uid));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  // Non-blocking: init and every later call return at once and are polled against the timeout.
  // BITEP_NCCL_BLOCKING=1 (tuning): a blocking communicator, which enqueues each call on the caller's
  // thread instead of handing it to NCCL's; a stalled peer then hangs in NCCL's init, connection setup
  // or finalisation instead of timing out (the waits for the GPU's work stay polled).
  config.blocking = nccl_blocking() ? 1 : 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, nranks, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    BITEP_FAIL(bitepNcclError, "rank %d of %d: ncclCommInitRankConfig failed: %s (%s)", rank, nranks,
               ncclGetErrorString(r), ncclGetLastError(nullptr));
  }
  ncclResult_t state = ncclInProgress;
  if (!poll_comm(comm, timeout_s, &state)) {
    (void)ncclCommAbort(comm);
    BITEP_FAIL(bitepTimeout,
               "rank %d of %d: NCCL communicator init did not complete within %.3g s (does every rank call it with "
               "the same unique id and nranks? NCCL_DEBUG=WARN tells more); the communicator was aborted",
               rank, nranks, timeout_s);
  }
  if (state != ncclSuccess) {
    const bitepResult_t res =
        set_error(bitepNcclError, __FILE__, __LINE__, "rank %d of %d: NCCL communicator init failed: %s (%s)", rank,
                  nranks, ncclGetErrorString(state), ncclGetLastError(comm));
    (void)ncclCommAbort(comm);
    return res;
  }
  {
    std::lock_guard<std::mutex> lock(g_init_timeouts_mu);
    g_init_timeouts[comm] = timeout_s;
  }
  *out = comm;
  return bitepSuccess;
}

}  // namespace bitep::ep
