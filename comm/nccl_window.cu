// SPDX-License-Identifier: Apache-2.0
// The peer window (src/ep/transport.h) over NCCL's symmetric memory: one ncclMemAlloc buffer per rank,
// registered with ncclCommWindowRegister (NCCL_WIN_COLL_SYMMETRIC), every peer's buffer mapped here
// through ncclGetPeerPointer. Used when NCCL puts every rank of the communicator in one load/store
// accessible team (ncclTeamLsa: one NVLink domain): by default over the communicators bitep creates,
// over a borrowed one with BITEP_LSA=1; BITEP_LSA=0 turns it off.
//
// Layout of a rank's buffer: [kFlagBytes: one uint64 flag per rank (W <= kFlagBytes / 8)][two exchange
// slots of kExchangeBytes][kChunkFlagBytes: the dispatch's arrival flags, [W][max_chunks()] uint64][data area].
// barrier(): epoch e = the number of barriers so far on this group, the same on every rank. Thread p
// stores e to flag[self] of rank p's window (release, system scope), then waits until flag[p] of its own
// window reaches e (acquire). Flags only grow, so a peer already one barrier ahead satisfies the wait.
// exchange() is a barrier that first stores this rank's rows into slot (x % 2) of every peer, x = the
// number of exchanges so far: a peer can be one exchange ahead (storing into the other slot), never two,
// since it cannot pass exchange x + 1 before this rank has entered it, after reading slot x % 2 (the
// host waits for each exchange's result before it issues the next).
// A peer missing for timeout_s ends the wait and raises a mapped host word that check() reports; the
// stream moves on instead of hanging (the data of that call is then incomplete, and the call after it
// fails).
//
// A window is replaced (never resized in place) when a call needs more: the device is synchronised, the
// old one deregistered and freed, the new one zeroed *before* it is registered (registration is
// collective, so no peer can store a flag into it before it is zero).
#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "comm/nccl_transport.h"
#include "kernels/sync.cuh"
#include "src/check.h"
#include "src/env.h"
#include "src/ep/pool.h"
#include "src/trace.h"

namespace bitep::ep {
namespace {

constexpr size_t kFlagBytes = 4096;                   // up to 512 ranks
constexpr size_t kExchangeBytes = size_t{256} << 10;  // per slot: W * n int32 (W = 64: n <= 1024)
constexpr size_t kChunkFlagBytes = size_t{64} << 10;  // W * max_chunks() uint64
constexpr int kMaxChunks = 64;                        // per sender, at most
constexpr size_t kChunkFlagOffset = kFlagBytes + 2 * kExchangeBytes;
constexpr size_t kHeaderBytes = kChunkFlagOffset + kChunkFlagBytes;
constexpr size_t kGranularity = size_t{2} << 20;
constexpr size_t kInitialBytes = size_t{4} << 20;

using kernels::global_ns;
using kernels::load_acquire_sys;
using kernels::store_release_sys;

__global__ void peer_bases_kernel(ncclWindow_t win, int nranks, char** out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < nranks) out[p] = static_cast<char*>(ncclGetPeerPointer(win, 0, p));
}

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

// bases[p]: rank p's buffer (flags first). One thread per rank.
__global__ void barrier_kernel(
    char* const* bases, int nranks, int self, uint64_t epoch, uint64_t timeout_ns, volatile int* timed_out) {
  // A kernel launched dependent on this one (the low-latency receive) may take its place now; it waits for
  // this grid's end inside.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  // Everything this rank stored before (earlier kernels on the stream) is ordered before the flags.
  __threadfence_system();
  signal_and_wait(bases, nranks, self, epoch, timeout_ns, timed_out);
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
                                uint64_t epoch,
                                uint64_t timeout_ns,
                                volatile int* timed_out) {
  const int64_t total = static_cast<int64_t>(nranks) * n;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int p = static_cast<int>(i / n);
    int32_t* dst = reinterpret_cast<int32_t*>(bases[p] + kFlagBytes + slot) + static_cast<int64_t>(self) * n;
    dst[i - static_cast<int64_t>(p) * n] = send[i];
  }
  __threadfence_system();  // each thread's stores before the flags (stored by other threads after the sync)
  __syncthreads();
  signal_and_wait(bases, nranks, self, epoch, timeout_ns, timed_out);
  __syncthreads();
  const volatile int32_t* in = reinterpret_cast<const int32_t*>(bases[self] + kFlagBytes + slot);
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int32_t v = in[i];
    recv[i] = v;
    if (recv_mapped != nullptr) recv_mapped[i] = v;
  }
}

// ncclSuccess of a call on a non-blocking communicator may still be in progress: ncclInProgress makes
// nccl_call poll the communicator until it is idle (a blocking one is idle at once).
ncclResult_t settle(ncclResult_t r) { return r == ncclSuccess ? ncclInProgress : r; }

class NcclWindow final : public PeerWindow {
 public:
  NcclWindow(NcclTransport* t, ncclComm_t comm, int rank, int nranks, bool exchange, size_t fixed_bytes)
      : t_(t),
        comm_(comm),
        rank_(rank),
        nranks_(nranks),
        exchange_on_(exchange),
        fixed_bytes_(fixed_bytes),
        bases_(nranks, nullptr) {}
  ~NcclWindow() override {
    release();
    if (bases_dev_ != nullptr) (void)cudaFree(bases_dev_);
    if (timed_out_ != nullptr) (void)cudaFreeHost(const_cast<int*>(timed_out_));
    (void)cudaGetLastError();
  }

  bitepResult_t init() {
    void* p = nullptr;
    BITEP_CUDA_CHECK(cudaHostAlloc(&p, sizeof(int), cudaHostAllocMapped));
    timed_out_ = static_cast<volatile int*>(p);
    *timed_out_ = 0;
    BITEP_CUDA_CHECK(cudaHostGetDevicePointer(&p, p, 0));
    timed_out_dev_ = static_cast<volatile int*>(p);
    BITEP_CUDA_CHECK(cudaMalloc(&bases_dev_, sizeof(char*) * nranks_));
    return bitepSuccess;
  }

  bitepResult_t acquire(bitepStream_t stream) override { return order_.acquire(stream); }
  bitepResult_t release(bitepStream_t stream) override { return order_.release(stream); }

  size_t bytes() const override { return data_bytes_ + (mem_ != nullptr ? kHeaderBytes : 0); }

  bitepResult_t reserve(size_t bytes, double timeout_s) override {
    timeout_s_ = timeout_s;
    if (mem_ != nullptr && bytes <= data_bytes_) return bitepSuccess;
    if (fixed_bytes_ > 0 && (mem_ != nullptr || bytes > fixed_bytes_))
      BITEP_FAIL(bitepInternalError, "a fixed peer window of %zu bytes asked for %zu", fixed_bytes_, bytes);
    size_t want = bytes + bytes / 2;  // room to grow: a window is replaced, not resized
    if (want < kInitialBytes) want = kInitialBytes;
    if (fixed_bytes_ > 0) want = fixed_bytes_;
    want = (want + kHeaderBytes + kGranularity - 1) / kGranularity * kGranularity;
    BITEP_CUDA_CHECK(cudaDeviceSynchronize());  // the old window may still be read or written
    release();
    void* mem = nullptr;
    BITEP_NCCL_CHECK(ncclMemAlloc(&mem, want));
    if (cudaMemset(mem, 0, want) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
      (void)ncclMemFree(mem);
      BITEP_CUDA_CHECK(cudaGetLastError());
    }
    // A non-blocking communicator returns ncclSuccess at once and fills the handle from its own thread
    // (seen with NCCL 2.28.3): wait until the communicator is idle, then read it.
    volatile ncclWindow_t win = nullptr;
    bitepResult_t r = t_->nccl_call(
        settle(ncclCommWindowRegister(comm_, mem, want, const_cast<ncclWindow_t*>(&win), NCCL_WIN_COLL_SYMMETRIC)),
        "peer window", "ncclCommWindowRegister", timeout_s);
    if (r == bitepSuccess && win == nullptr)
      r = set_error(bitepNcclError, __FILE__, __LINE__,
                    "rank %d of %d: ncclCommWindowRegister gave no window (symmetric memory unavailable: "
                    "NCCL_CUMEM_ENABLE, NCCL_WIN_ENABLE?); BITEP_LSA=0 runs without it",
                    rank_, nranks_);
    if (r != bitepSuccess) {
      (void)ncclMemFree(mem);
      return r;
    }
    mem_ = mem;
    win_ = win;
    data_bytes_ = want - kHeaderBytes;
    peer_bases_kernel<<<(nranks_ + 127) / 128, 128>>>(win_, nranks_, static_cast<char**>(bases_dev_));
    BITEP_CUDA_CHECK(cudaGetLastError());
    BITEP_CUDA_CHECK(cudaMemcpy(bases_.data(), bases_dev_, sizeof(char*) * nranks_, cudaMemcpyDeviceToHost));
    // The flags start at 0 in every new window; the epochs go on counting.
    return bitepSuccess;
  }

  char* data(int r) const override { return bases_[r] + kHeaderBytes; }

  int max_chunks() const override {
    return static_cast<int>(std::min<size_t>(kMaxChunks, kChunkFlagBytes / sizeof(uint64_t) / nranks_));
  }
  uint64_t* chunk_flags(int r) const override { return reinterpret_cast<uint64_t*>(bases_[r] + kChunkFlagOffset); }
  volatile int* timeout_word() const override { return timed_out_dev_; }

  bitepResult_t barrier(bitepStream_t stream, double timeout_s) override {
    ++epoch_;
    barrier_kernel<<<1, threads(), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<char* const*>(bases_dev_), nranks_, rank_, epoch_, timeout_ns(timeout_s), timed_out_dev_);
    BITEP_CUDA_CHECK(cudaGetLastError());
    return bitepSuccess;
  }

  uint64_t exchanges() const override { return exchanges_; }

  bool can_exchange(int n) const override {
    return exchange_on_ && n > 0 && sizeof(int32_t) * static_cast<size_t>(nranks_) * n <= kExchangeBytes;
  }

  bitepResult_t exchange(const int32_t* send,
                         int32_t* recv,
                         int32_t* recv_mapped,
                         int n,
                         bitepStream_t stream,
                         double timeout_s) override {
    if (!can_exchange(n))
      BITEP_FAIL(bitepInternalError, "peer window: an exchange of %d x %d int32 (the exchange area holds %zu bytes)",
                 nranks_, n, kExchangeBytes);
    // In call order with every other use of the window (the flags' epochs must be reached in order),
    // whatever stream the previous one ran on.
    BITEP_CHECK(acquire(stream));
    ++epoch_;
    const size_t slot = (exchanges_++ % 2) * kExchangeBytes;
    // More threads than ranks: the rows are stored by all of them.
    exchange_kernel<<<1, std::max(256, threads()), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<char* const*>(bases_dev_), nranks_, rank_, send, recv, recv_mapped, n, slot, epoch_,
        timeout_ns(timeout_s), timed_out_dev_);
    BITEP_CUDA_CHECK(cudaGetLastError());
    return release(stream);
  }

  bitepResult_t check() override {
    if (*timed_out_ != 0)
      BITEP_FAIL(bitepTimeout,
                 "rank %d of %d: a peer did not reach a peer-window barrier of an earlier dispatch or combine within "
                 "the group's timeout (it failed or stalled); the data of that call is incomplete: destroy the group",
                 rank_, nranks_);
    return bitepSuccess;
  }

 private:
  int threads() const { return nranks_ < 1024 ? (nranks_ + 31) / 32 * 32 : 1024; }

  void release() {
    // Every rank deregisters at the same point (a replacement, or the group's destruction).
    if (win_ != nullptr && !t_->unusable())
      (void)t_->nccl_call(settle(ncclCommWindowDeregister(comm_, win_)), "peer window", "ncclCommWindowDeregister",
                          timeout_s_);
    if (mem_ != nullptr) (void)ncclMemFree(mem_);
    win_ = nullptr;
    mem_ = nullptr;
    data_bytes_ = 0;
  }

  NcclTransport* t_;
  ncclComm_t comm_;
  int rank_, nranks_;
  bool exchange_on_;        // the count exchange through the windows (exchange())
  size_t fixed_bytes_;      // > 0: the data area's size, never replaced
  uint64_t exchanges_ = 0;  // exchanges so far: the slot of the next is exchanges_ % 2
  void* mem_ = nullptr;
  ncclWindow_t win_ = nullptr;
  size_t data_bytes_ = 0;
  std::vector<char*> bases_;   // host copy of every rank's buffer as mapped here
  void* bases_dev_ = nullptr;  // the same on the device (the barrier's)
  uint64_t epoch_ = 0;
  double timeout_s_ = 300.0;
  StreamOrder order_;                  // acquire() / release()
  volatile int* timed_out_ = nullptr;  // mapped pinned host word
  volatile int* timed_out_dev_ = nullptr;
};

}  // namespace

bitepResult_t open_nccl_window(NcclTransport* t,
                               ncclComm_t comm,
                               bool owned,
                               double timeout_s,
                               std::unique_ptr<PeerWindow>* out,
                               size_t fixed_bytes) {
  out->reset();
  const int W = t->nranks(), self = t->rank();
  // Default: on over the communicators bitep creates (their destruction is collective already), off over a
  // borrowed one unless BITEP_LSA=1 (the window's deregistration then makes bitepGroupDestroy collective).
  const bool on = env_is("BITEP_LSA", "1"), off = env_is("BITEP_LSA", "0");
  const bool wanted = W > 1 && !off && (owned || on);
  // Every rank decides alike: its own verdict, then the agreement of all. Bit 0: a window; bit 1: the
  // count exchange through it (BITEP_LSA_EXCHANGE=0 turns that off).
  const int32_t exchange_bit = env_is("BITEP_LSA_EXCHANGE", "0") ? 0 : 2;
  int32_t ok = 0;
  // NCCL_P2P_DISABLE=1: NCCL refuses its device API and symmetric memory (a registration would fail and
  // leave the communicator in error), so no window is tried.
  const bool p2p = !env_is("NCCL_P2P_DISABLE", "1");
  if (wanted && p2p && static_cast<size_t>(W) * sizeof(uint64_t) <= kFlagBytes) {
    const auto team = ncclTeamLsa(comm);
    ok = team.nRanks == W ? 1 | exchange_bit : 0;
  }
  std::vector<int32_t> all(W, 0);
  BITEP_CHECK(t->allgather_host(&ok, all.data(), sizeof(int32_t)));
  const bool trace = trace_level() != 0;
  bool exchange = true;
  for (int q = 0; q < W; ++q) exchange = exchange && (all[q] & 2) != 0;
  for (int q = 0; q < W; ++q)
    if ((all[q] & 1) == 0) {
      if (trace && W > 1)
        std::fprintf(stderr, "bitep: rank %d: peer window off (%s)\n", self,
                     !wanted     ? (off ? "BITEP_LSA=0" : "a borrowed communicator: BITEP_LSA=1 turns it on")
                     : !p2p      ? "NCCL_P2P_DISABLE=1"
                     : q == self ? "this rank's load/store team is not every rank"
                                 : "another rank's load/store team is not every rank");
      return bitepSuccess;
    }
  std::unique_ptr<NcclWindow> w(new NcclWindow(t, comm, self, W, exchange, fixed_bytes));
  int32_t ready = w->init() == bitepSuccess ? 1 : 0;
  BITEP_CHECK(t->allgather_host(&ready, all.data(), sizeof(int32_t)));
  for (int32_t v : all)
    if (v == 0) return bitepSuccess;  // a rank could not make its host word or table: none uses a window
  BITEP_CHECK(w->reserve(fixed_bytes, timeout_s));
  if (trace)
    std::fprintf(stderr, "bitep: rank %d: %s window on (%d ranks, %zu bytes; count exchange %s)\n", self,
                 fixed_bytes > 0 ? "low-latency" : "peer", W, w->bytes(),
                 exchange ? "through it" : "by NCCL: BITEP_LSA_EXCHANGE=0");
  *out = std::move(w);
  return bitepSuccess;
}

}  // namespace bitep::ep
