// SPDX-License-Identifier: Apache-2.0
// The peer window (src/ep/transport.h) over NCCL's symmetric memory: one ncclMemAlloc buffer per rank,
// registered with ncclCommWindowRegister (NCCL_WIN_COLL_SYMMETRIC), every peer's buffer mapped here
// through ncclGetPeerPointer. Used when NCCL puts every rank of the communicator in one load/store
// accessible team (ncclTeamLsa: one NVLink domain): by default over the communicators bitep creates,
// over a borrowed one with BITEP_LSA=1; BITEP_LSA=0 turns it off. The flags, barriers and the count
// exchange are comm/flag_window.h's.
//
// A replaced window's new buffer is zeroed *before* it is registered (registration is collective, so no
// peer can store a flag into it before it is zero).
#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <memory>
#include <vector>

#include "comm/flag_window.h"
#include "comm/nccl_transport.h"
#include "src/check.h"
#include "src/env.h"

namespace bitep::ep {
namespace {

__global__ void peer_bases_kernel(ncclWindow_t win, int nranks, char** out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < nranks) out[p] = static_cast<char*>(ncclGetPeerPointer(win, 0, p));
}

// ncclSuccess of a call on a non-blocking communicator may still be in progress: ncclInProgress makes
// nccl_call poll the communicator until it is idle (a blocking one is idle at once).
ncclResult_t settle(ncclResult_t r) { return r == ncclSuccess ? ncclInProgress : r; }

class NcclWindow final : public FlagWindow {
 public:
  NcclWindow(NcclTransport* t, ncclComm_t comm, int rank, int nranks, size_t fixed_bytes)
      : FlagWindow(rank, nranks, fixed_bytes), t_(t), comm_(comm) {}
  ~NcclWindow() override { unmap_all(); }

 private:
  bitepResult_t map(size_t bytes, double timeout_s, char** bases_dev, std::vector<char*>* bases) override {
    void* mem = nullptr;
    BITEP_NCCL_CHECK(ncclMemAlloc(&mem, bytes));
    if (cudaMemset(mem, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
      (void)ncclMemFree(mem);
      BITEP_CUDA_CHECK(cudaGetLastError());
    }
    // A non-blocking communicator returns ncclSuccess at once and fills the handle from its own thread
    // (seen with NCCL 2.28.3): wait until the communicator is idle, then read it.
    volatile ncclWindow_t win = nullptr;
    bitepResult_t r = t_->nccl_call(
        settle(ncclCommWindowRegister(comm_, mem, bytes, const_cast<ncclWindow_t*>(&win), NCCL_WIN_COLL_SYMMETRIC)),
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
    peer_bases_kernel<<<(nranks_ + 127) / 128, 128>>>(win_, nranks_, bases_dev);
    BITEP_CUDA_CHECK(cudaGetLastError());
    BITEP_CUDA_CHECK(cudaMemcpy(bases->data(), bases_dev, sizeof(char*) * nranks_, cudaMemcpyDeviceToHost));
    return bitepSuccess;
  }

  void unmap() override {
    // Every rank deregisters at the same point (a replacement, or the group's destruction).
    if (win_ != nullptr && !t_->unusable())
      (void)t_->nccl_call(settle(ncclCommWindowDeregister(comm_, win_)), "peer window", "ncclCommWindowDeregister",
                          timeout_s());
    if (mem_ != nullptr) (void)ncclMemFree(mem_);
    (void)cudaGetLastError();
    win_ = nullptr;
    mem_ = nullptr;
  }

  NcclTransport* t_;
  ncclComm_t comm_;
  void* mem_ = nullptr;
  ncclWindow_t win_ = nullptr;
};

}  // namespace

bitepResult_t open_nccl_window(NcclTransport* t,
                               ncclComm_t comm,
                               bool owned,
                               double timeout_s,
                               std::unique_ptr<PeerWindow>* out,
                               size_t fixed_bytes) {
  const int W = t->nranks();
  // Default: on over the communicators bitep creates (their destruction is collective already), off over a
  // borrowed one unless BITEP_LSA=1 (the window's deregistration then makes bitepGroupDestroy collective).
  const bool on = env_is("BITEP_LSA", "1"), off = env_is("BITEP_LSA", "0");
  const bool wanted = W > 1 && !off && (owned || on);
  // NCCL_P2P_DISABLE=1: NCCL refuses its device API and symmetric memory (a registration would fail and
  // leave the communicator in error), so no window is tried.
  const bool p2p = !env_is("NCCL_P2P_DISABLE", "1");
  const bool lsa = wanted && p2p && ncclTeamLsa(comm).nRanks == W;
  const char* why = !wanted ? (off ? "BITEP_LSA=0" : "a borrowed communicator: BITEP_LSA=1 turns it on")
                    : !p2p  ? "NCCL_P2P_DISABLE=1"
                    : !lsa  ? "this rank's load/store team is not every rank"
                            : nullptr;
  return open_flag_window(t, lsa, why, std::make_unique<NcclWindow>(t, comm, t->rank(), W, fixed_bytes), fixed_bytes,
                          timeout_s, out);
}

}  // namespace bitep::ep
