// SPDX-License-Identifier: Apache-2.0
// The peer window (src/ep/transport.h) over NCCL's symmetric memory: one ncclMemAlloc buffer per rank,
// registered with ncclCommWindowRegister (NCCL_WIN_COLL_SYMMETRIC), every peer's buffer mapped here
// through ncclGetPeerPointer. Used when NCCL puts every rank of the communicator in one load/store
// accessible team (ncclTeamLsa: one NVLink domain): by default over the communicators bitep creates,
// over a borrowed one with BITEP_LSA=1; BITEP_LSA=0 turns it off.
//
// Layout of a rank's buffer: [kFlagBytes: one uint64 flag per rank (W <= kFlagBytes / 8)][data area].
// barrier(): epoch e = the number of barriers so far on this group, the same on every rank. Thread p
// stores e to flag[self] of rank p's window (release, system scope), then waits until flag[p] of its own
// window reaches e (acquire). Flags only grow, so a peer already one barrier ahead satisfies the wait.
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

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "comm/nccl_transport.h"
#include "src/check.h"

namespace bitep::ep {
namespace {

constexpr size_t kFlagBytes = 4096;  // up to 512 ranks
constexpr size_t kGranularity = size_t{2} << 20;
constexpr size_t kInitialBytes = size_t{4} << 20;

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void peer_bases_kernel(ncclWindow_t win, int nranks, char** out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < nranks) out[p] = static_cast<char*>(ncclGetPeerPointer(win, 0, p));
}

// bases[p]: rank p's buffer (flags first). One thread per rank.
__global__ void barrier_kernel(
    char* const* bases, int nranks, int self, uint64_t epoch, uint64_t timeout_ns, volatile int* timed_out) {
  // Everything this rank stored before (earlier kernels on the stream) is ordered before the flags.
  __threadfence_system();
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

// ncclSuccess of a call on a non-blocking communicator may still be in progress: ncclInProgress makes
// nccl_call poll the communicator until it is idle (a blocking one is idle at once).
ncclResult_t settle(ncclResult_t r) { return r == ncclSuccess ? ncclInProgress : r; }

class NcclWindow final : public PeerWindow {
 public:
  NcclWindow(NcclTransport* t, ncclComm_t comm, int rank, int nranks)
      : t_(t), comm_(comm), rank_(rank), nranks_(nranks), bases_(nranks, nullptr) {}
  ~NcclWindow() override {
    release();
    if (bases_dev_ != nullptr) (void)cudaFree(bases_dev_);
    if (last_use_ != nullptr) (void)cudaEventDestroy(last_use_);
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
    BITEP_CUDA_CHECK(cudaEventCreateWithFlags(&last_use_, cudaEventDisableTiming));
    return bitepSuccess;
  }

  bitepResult_t acquire(bitepStream_t stream) override {
    BITEP_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), last_use_, 0));
    return bitepSuccess;
  }
  bitepResult_t release(bitepStream_t stream) override {
    BITEP_CUDA_CHECK(cudaEventRecord(last_use_, reinterpret_cast<cudaStream_t>(stream)));
    return bitepSuccess;
  }

  size_t bytes() const override { return data_bytes_ + (mem_ != nullptr ? kFlagBytes : 0); }

  bitepResult_t reserve(size_t bytes, double timeout_s) override {
    timeout_s_ = timeout_s;
    if (mem_ != nullptr && bytes <= data_bytes_) return bitepSuccess;
    size_t want = bytes + bytes / 2;  // room to grow: a window is replaced, not resized
    if (want < kInitialBytes) want = kInitialBytes;
    want = (want + kFlagBytes + kGranularity - 1) / kGranularity * kGranularity;
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
    data_bytes_ = want - kFlagBytes;
    peer_bases_kernel<<<(nranks_ + 127) / 128, 128>>>(win_, nranks_, static_cast<char**>(bases_dev_));
    BITEP_CUDA_CHECK(cudaGetLastError());
    BITEP_CUDA_CHECK(cudaMemcpy(bases_.data(), bases_dev_, sizeof(char*) * nranks_, cudaMemcpyDeviceToHost));
    // The flags start at 0 in every new window; the epochs go on counting.
    return bitepSuccess;
  }

  char* data(int r) const override { return bases_[r] + kFlagBytes; }

  bitepResult_t barrier(bitepStream_t stream, double timeout_s) override {
    ++epoch_;
    const uint64_t ns = timeout_s > 0 && timeout_s < 1e9 ? static_cast<uint64_t>(timeout_s * 1e9) : ~uint64_t{0};
    const int threads = nranks_ < 1024 ? (nranks_ + 31) / 32 * 32 : 1024;
    barrier_kernel<<<1, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<char* const*>(bases_dev_), nranks_, rank_, epoch_, ns, timed_out_dev_);
    BITEP_CUDA_CHECK(cudaGetLastError());
    return bitepSuccess;
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
  void* mem_ = nullptr;
  ncclWindow_t win_ = nullptr;
  size_t data_bytes_ = 0;
  std::vector<char*> bases_;   // host copy of every rank's buffer as mapped here
  void* bases_dev_ = nullptr;  // the same on the device (the barrier's)
  uint64_t epoch_ = 0;
  double timeout_s_ = 300.0;
  cudaEvent_t last_use_ = nullptr;     // release()'s mark (a never-recorded event is complete)
  volatile int* timed_out_ = nullptr;  // mapped pinned host word
  volatile int* timed_out_dev_ = nullptr;
};

}  // namespace

bitepResult_t open_nccl_window(
    NcclTransport* t, ncclComm_t comm, bool owned, double timeout_s, std::unique_ptr<PeerWindow>* out) {
  out->reset();
  const int W = t->nranks(), self = t->rank();
  // Default: on over the communicators bitep creates (their destruction is collective already), off over a
  // borrowed one unless BITEP_LSA=1 (the window's deregistration then makes bitepGroupDestroy collective).
  const char* env = std::getenv("BITEP_LSA");
  const bool on = env != nullptr && std::strcmp(env, "1") == 0, off = env != nullptr && std::strcmp(env, "0") == 0;
  const bool wanted = W > 1 && !off && (owned || on);
  // Every rank decides alike: its own verdict, then the agreement of all.
  int32_t ok = 0;
  // NCCL_P2P_DISABLE=1: NCCL refuses its device API and symmetric memory (a registration would fail and
  // leave the communicator in error), so no window is tried.
  const char* p2p_off = std::getenv("NCCL_P2P_DISABLE");
  const bool p2p = !(p2p_off != nullptr && std::strcmp(p2p_off, "1") == 0);
  if (wanted && p2p && static_cast<size_t>(W) * sizeof(uint64_t) <= kFlagBytes) {
    const auto team = ncclTeamLsa(comm);
    ok = team.nRanks == W ? 1 : 0;
  }
  std::vector<int32_t> all(W, 0);
  BITEP_CHECK(t->allgather_host(&ok, all.data(), sizeof(int32_t)));
  const bool trace = std::getenv("BITEP_TRACE") != nullptr && std::getenv("BITEP_TRACE")[0] != '\0';
  for (int q = 0; q < W; ++q)
    if (all[q] == 0) {
      if (trace && W > 1)
        std::fprintf(stderr, "bitep: rank %d: peer window off (%s)\n", self,
                     !wanted     ? (off ? "BITEP_LSA=0" : "a borrowed communicator: BITEP_LSA=1 turns it on")
                     : !p2p      ? "NCCL_P2P_DISABLE=1"
                     : q == self ? "this rank's load/store team is not every rank"
                                 : "another rank's load/store team is not every rank");
      return bitepSuccess;
    }
  std::unique_ptr<NcclWindow> w(new NcclWindow(t, comm, self, W));
  int32_t ready = w->init() == bitepSuccess ? 1 : 0;
  BITEP_CHECK(t->allgather_host(&ready, all.data(), sizeof(int32_t)));
  for (int32_t v : all)
    if (v == 0) return bitepSuccess;  // a rank could not make its host word or table: none uses a window
  BITEP_CHECK(w->reserve(0, timeout_s));
  if (trace) std::fprintf(stderr, "bitep: rank %d: peer window on (%d ranks, %zu bytes)\n", self, W, w->bytes());
  *out = std::move(w);
  return bitepSuccess;
}

}  // namespace bitep::ep
