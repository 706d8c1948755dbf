// SPDX-License-Identifier: Apache-2.0
// The peer window's flags, barriers and count exchange (comm/flag_window.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "comm/flag_window.h"
#include "kernels/sync.cuh"
#include "src/check.h"
#include "src/env.h"
#include "src/trace.h"

namespace bitep::ep {
namespace {

using kernels::global_ns;
using kernels::load_acquire_sys;
using kernels::store_release_sys;

// The flags of one barrier, by the block's threads (thread p for rank p): epoch into flag[self] of every
// rank's window, then the wait for every rank's flag in this rank's window to reach it (or the timeout).
// Stores the caller made before (ordered by a fence) are visible to every rank after it.
__device__ void signal_and_wait(
    char* const* bases, int nranks, int self, uint64_t epoch, uint64_t timeout_ns, volatile int* timed_out) {
  for (int p = threadIdx.x; p < nranks; p += blockDim.x)
    store_release_sys(reinterpret_cast<uint64_t*>(bases[p]) + self, epoch);
  const uint64_t* mine = reinterpret_cast<const uint64_t*>(bases[self]);
  const uint64_t start = global_ns();
  for (int p = threadIdx.x; p < nranks; p += blockDim.x) {
    while (load_acquire_sys(mine + p) < epoch) {
      if (global_ns() - start > timeout_ns) {
        *timed_out = 1;
        break;
      }
      __nanosleep(100);
    }
  }
  __threadfence_system();
}

// The epoch of this barrier: the window's count on the device plus one, read by thread 0 for the block.
// end_epoch() stores it back once every thread's wait is over, so the next barrier (and the low-latency
// kernels' slot parity, ep_params.h SlotParity) reads it: a CUDA graph replaying the barrier counts on.
__device__ uint64_t begin_epoch(const uint64_t* count, uint64_t* shared) {
  if (threadIdx.x == 0) *shared = *reinterpret_cast<const volatile uint64_t*>(count) + 1;
  __syncthreads();
  return *shared;
}
__device__ void end_epoch(uint64_t* count, uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) *reinterpret_cast<volatile uint64_t*>(count) = epoch;
}

// bases[p]: rank p's buffer (flags first). One thread per rank.
__global__ void barrier_kernel(
    char* const* bases, int nranks, int self, uint64_t* count, uint64_t timeout_ns, volatile int* timed_out) {
  __shared__ uint64_t shared_epoch;
  // A kernel launched dependent on this one (the low-latency receive) may take its place now; it waits for
  // this grid's end inside.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  const uint64_t epoch = begin_epoch(count, &shared_epoch);
  // Everything this rank stored before (earlier kernels on the stream) is ordered before the flags.
  __threadfence_system();
  signal_and_wait(bases, nranks, self, epoch, timeout_ns, timed_out);
  end_epoch(count, epoch);
}

// barrier_kernel with a payload: row p of send [nranks, n] into slot `slot` of rank p's exchange area at row
// self, then the flags, then recv (and recv_mapped, when not null) = this rank's slot. One block.
__global__ void exchange_kernel(char* const* bases,
                                int nranks,
                                int self,
                                const int32_t* send,
                                int32_t* recv,
                                int32_t* recv_mapped,
                                int n,
                                size_t slot,
                                uint64_t* count,
                                uint64_t timeout_ns,
                                volatile int* timed_out) {
  __shared__ uint64_t shared_epoch;
  const uint64_t epoch = begin_epoch(count, &shared_epoch);
  const int64_t total = static_cast<int64_t>(nranks) * n;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int p = static_cast<int>(i / n);
    int32_t* dst =
        reinterpret_cast<int32_t*>(bases[p] + FlagWindow::kFlagBytes + slot) + static_cast<int64_t>(self) * n;
    dst[i - static_cast<int64_t>(p) * n] = send[i];
  }
  __threadfence_system();  // each thread's stores before the flags (stored by other threads after the sync)
  __syncthreads();
  signal_and_wait(bases, nranks, self, epoch, timeout_ns, timed_out);
  __syncthreads();
  const volatile int32_t* in = reinterpret_cast<const int32_t*>(bases[self] + FlagWindow::kFlagBytes + slot);
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int32_t v = in[i];
    recv[i] = v;
    if (recv_mapped != nullptr) recv_mapped[i] = v;
  }
  end_epoch(count, epoch);
}

}  // namespace

FlagWindow::FlagWindow(int rank, int nranks, size_t fixed_bytes)
    : rank_(rank), nranks_(nranks), fixed_bytes_(fixed_bytes), bases_(nranks, nullptr) {}

FlagWindow::~FlagWindow() {
  if (bases_dev_ != nullptr) (void)cudaFree(bases_dev_);
  if (epoch_dev_ != nullptr) (void)cudaFree(epoch_dev_);
  if (timed_out_ != nullptr) (void)cudaFreeHost(const_cast<int*>(timed_out_));
  (void)cudaGetLastError();
}

bitepResult_t FlagWindow::init() {
  void* p = nullptr;
  BITEP_CUDA_CHECK(cudaHostAlloc(&p, sizeof(int), cudaHostAllocMapped));
  timed_out_ = static_cast<volatile int*>(p);
  *timed_out_ = 0;
  BITEP_CUDA_CHECK(cudaHostGetDevicePointer(&p, p, 0));
  timed_out_dev_ = static_cast<volatile int*>(p);
  BITEP_CUDA_CHECK(cudaMalloc(&bases_dev_, sizeof(char*) * nranks_));
  BITEP_CUDA_CHECK(cudaMalloc(&p, sizeof(uint64_t)));
  epoch_dev_ = static_cast<uint64_t*>(p);
  BITEP_CUDA_CHECK(cudaMemset(epoch_dev_, 0, sizeof(uint64_t)));
  BITEP_CUDA_CHECK(cudaDeviceSynchronize());  // before any barrier, on whatever stream, reads it
  return bitepSuccess;
}

void FlagWindow::unmap_all() {
  if (mapped_) unmap();
  mapped_ = false;
  data_bytes_ = 0;
}

bitepResult_t FlagWindow::reserve(size_t bytes, double timeout_s) {
  timeout_s_ = timeout_s;
  if (mapped_ && bytes <= data_bytes_) return bitepSuccess;
  if (fixed_bytes_ > 0 && (mapped_ || bytes > fixed_bytes_))
    BITEP_FAIL(bitepInternalError, "a fixed peer window of %zu bytes asked for %zu", fixed_bytes_, bytes);
  size_t want = bytes + bytes / 2;  // room to grow: a window is replaced, not resized
  if (want < kInitialBytes) want = kInitialBytes;
  if (fixed_bytes_ > 0) want = fixed_bytes_;
  want = (want + kHeaderBytes + kGranularity - 1) / kGranularity * kGranularity;
  BITEP_CUDA_CHECK(cudaDeviceSynchronize());  // the old window may still be read or written
  unmap_all();
  const bitepResult_t r = map(want, timeout_s, static_cast<char**>(bases_dev_), &bases_);
  if (r != bitepSuccess) {
    // Nothing is mapped: the old addresses go, and check() refuses every later call on the window.
    std::fill(bases_.begin(), bases_.end(), nullptr);
    (void)cudaMemset(bases_dev_, 0, sizeof(char*) * nranks_);
    (void)cudaGetLastError();
    return r;
  }
  mapped_ = true;
  data_bytes_ = want - kHeaderBytes;
  BITEP_CUDA_CHECK(cudaMemcpy(bases_dev_, bases_.data(), sizeof(char*) * nranks_, cudaMemcpyHostToDevice));
  // A copy from pageable memory may return before it lands, and the barriers run on the caller's streams, which
  // need not wait for the legacy stream's copies (non-blocking streams): without this wait a barrier read the old
  // bases, the peers' buffers already unmapped (an illegal address, caught by ep_bench over the IPC window).
  BITEP_CUDA_CHECK(cudaDeviceSynchronize());
  // The flags start at 0 in every new window; the epochs go on counting.
  return bitepSuccess;
}

int FlagWindow::max_chunks() const {
  return static_cast<int>(std::min<size_t>(kMaxChunks, kChunkFlagBytes / sizeof(uint64_t) / nranks_));
}

bitepResult_t FlagWindow::barrier(bitepStream_t stream, double timeout_s) {
  barrier_kernel<<<1, threads(), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<char* const*>(bases_dev_), nranks_, rank_, epoch_dev_, timeout_ns(timeout_s), timed_out_dev_);
  BITEP_CUDA_CHECK(cudaGetLastError());
  return bitepSuccess;
}

bool FlagWindow::can_exchange(int n) const {
  return mapped_ && exchange_on_ && n > 0 && sizeof(int32_t) * static_cast<size_t>(nranks_) * n <= kExchangeBytes;
}

bitepResult_t FlagWindow::exchange(
    const int32_t* send, int32_t* recv, int32_t* recv_mapped, int n, bitepStream_t stream, double timeout_s) {
  if (!can_exchange(n))
    BITEP_FAIL(bitepInternalError, "peer window: an exchange of %d x %d int32 (the exchange area holds %zu bytes)",
               nranks_, n, kExchangeBytes);
  // In call order with every other use of the window (the flags' epochs must be reached in order),
  // whatever stream the previous one ran on.
  BITEP_CHECK(acquire(stream));
  const size_t slot = (exchanges_++ % 2) * kExchangeBytes;
  // More threads than ranks: the rows are stored by all of them.
  exchange_kernel<<<1, std::max(256, threads()), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<char* const*>(bases_dev_), nranks_, rank_, send, recv, recv_mapped, n, slot, epoch_dev_,
      timeout_ns(timeout_s), timed_out_dev_);
  BITEP_CUDA_CHECK(cudaGetLastError());
  return release(stream);
}

bitepResult_t FlagWindow::check() {
  if (!mapped_)
    BITEP_FAIL(bitepInvalidUsage,
               "rank %d of %d: the peer window is not mapped (an earlier dispatch or combine failed to grow it): "
               "destroy the group",
               rank_, nranks_);
  if (*timed_out_ != 0)
    BITEP_FAIL(bitepTimeout,
               "rank %d of %d: a peer did not reach a peer-window barrier of an earlier dispatch or combine within "
               "the group's timeout (it failed or stalled); the data of that call is incomplete: destroy the group",
               rank_, nranks_);
  return bitepSuccess;
}

bitepResult_t open_flag_window(Transport* t,
                               bool ok,
                               const char* off_reason,
                               std::unique_ptr<FlagWindow> w,
                               size_t fixed_bytes,
                               double timeout_s,
                               std::unique_ptr<PeerWindow>* out,
                               const char* exchange_elsewhere) {
  out->reset();
  const int W = t->nranks(), self = t->rank();
  if (static_cast<size_t>(W) * sizeof(uint64_t) > FlagWindow::kFlagBytes && ok) {
    ok = false;
    off_reason = "more ranks than the window's flags";
  }
  // Every rank decides alike: its own verdict, then the agreement of all. Bit 0: a window; bit 1: the
  // count exchange through it (BITEP_LSA_EXCHANGE=0 turns that off).
  const int32_t exchange_bit = exchange_elsewhere != nullptr || env_is("BITEP_LSA_EXCHANGE", "0") ? 0 : 2;
  const int32_t mine = ok ? 1 | exchange_bit : 0;
  std::vector<int32_t> all(W, 0);
  BITEP_CHECK(t->allgather_host(&mine, all.data(), sizeof(int32_t)));
  const bool trace = trace_level() != 0;
  bool exchange = true;
  for (int q = 0; q < W; ++q) exchange = exchange && (all[q] & 2) != 0;
  for (int q = 0; q < W; ++q)
    if ((all[q] & 1) == 0) {
      if (trace && W > 1)
        std::fprintf(stderr, "bitep: rank %d: peer window off (%s)\n", self,
                     q == self ? (off_reason != nullptr ? off_reason : "not offered") : "another rank offered none");
      return bitepSuccess;
    }
  w->set_exchange(exchange);
  int32_t ready = w->init() == bitepSuccess ? 1 : 0;
  BITEP_CHECK(t->allgather_host(&ready, all.data(), sizeof(int32_t)));
  for (int32_t v : all)
    if (v == 0) return bitepSuccess;  // a rank could not make its host word or table: none uses a window
  BITEP_CHECK(w->reserve(fixed_bytes, timeout_s));
  if (trace)
    std::fprintf(stderr, "bitep: rank %d: %s window on (%d ranks, %zu bytes; count exchange %s)\n", self,
                 fixed_bytes > 0 ? "low-latency" : "peer", W, w->bytes(),
                 exchange                        ? "through it"
                 : exchange_elsewhere != nullptr ? exchange_elsewhere
                                                 : "by the transport: BITEP_LSA_EXCHANGE=0");
  *out = std::move(w);
  return bitepSuccess;
}

}  // namespace bitep::ep
