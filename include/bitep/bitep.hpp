// SPDX-License-Identifier: Apache-2.0
// Header-only C++17 layer over the C API: RAII for groups and handles, exceptions carrying the
// result code and bitepGetLastError()'s detail. One implementation: everything calls bitep.h.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "bitep/bitep.h"

namespace bitep {

class Error : public std::runtime_error {
 public:
  Error(bitepResult_t result, const std::string& what) : std::runtime_error(what), result_(result) {}
  bitepResult_t result() const noexcept { return result_; }

 private:
  bitepResult_t result_;
};

// Throws bitep::Error unless r is bitepSuccess.
inline void check(bitepResult_t r) {
  if (r != bitepSuccess) throw Error(r, std::string(bitepGetErrorString(r)) + ": " + bitepGetLastError());
}

inline int version() {
  int v = 0;
  check(bitepGetVersion(&v));
  return v;
}

// Owns a dispatch handle; destroys it (returning its buffers to the pool) when it goes out of scope.
class Handle {
 public:
  Handle() = default;
  explicit Handle(bitepHandle_t h) noexcept : h_(h) {}
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }

  // bitepHandleDestroy, its result dropped (the destructor's). destroy() reports it.
  void reset() noexcept {
    if (h_) (void)bitepHandleDestroy(h_);
    h_ = nullptr;
  }
  // bitepHandleDestroy; throws bitep::Error when it reports a failure (a handle a CUDA graph used, whose wait for the
  // device failed: its buffers then stay out of the pool until the group goes). The handle is gone either way.
  void destroy() {
    if (h_) check(bitepHandleDestroy(std::exchange(h_, nullptr)));
  }
  bitepHandle_t get() const noexcept { return h_; }
  bitepDispatchLayout_t layout() const {
    bitepDispatchLayout_t l{};
    check(bitepHandleGetLayout(h_, &l));
    return l;
  }

 private:
  bitepHandle_t h_ = nullptr;
};

// Owns an EP group. Create it with bitep::group_from_mpi (bitep_mpi.hpp), Group::from_unique_id or Group::from_nccl.
class Group {
 public:
  Group() = default;
  explicit Group(bitepGroup_t g) noexcept : g_(g) {}
  Group(Group&& o) noexcept : g_(std::exchange(o.g_, nullptr)) {}
  Group& operator=(Group&& o) noexcept {
    if (this != &o) {
      destroy_quietly();
      g_ = std::exchange(o.g_, nullptr);
    }
    return *this;
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  // A destroy refused leaves the group alive and unowned (its pool and communicator stay until the process ends):
  // bitepGroupDestroy returns bitepInvalidUsage while another thread is inside a call on the group, and for a group
  // whose transport is MPI also on a thread MPI's thread level does not allow (bitep.h, Threads). Freeing it then
  // would be worse. reset() throws instead and keeps the group: destroy a group where reset() would succeed.
  ~Group() { destroy_quietly(); }

  static Group from_unique_id(const bitepUniqueId& id, int nranks, int rank, const bitepGroupConfig_t& cfg) {
    bitepGroup_t g = nullptr;
    check(bitepGroupCreateFromUniqueId(&id, nranks, rank, &cfg, &g));
    return Group(g);
  }
  static Group from_nccl(struct ncclComm* comm, const bitepGroupConfig_t& cfg) {
    bitepGroup_t g = nullptr;
    check(bitepGroupCreateFromNccl(comm, &cfg, &g));
    return Group(g);
  }

  // bitepGroupDestroy. Throws bitep::Error where it is refused (another thread inside a call on the group; a thread
  // MPI's thread level does not allow, for an MPI transport), and then still owns the group: reset() again once that
  // call has returned, or from an allowed thread.
  void reset() {
    if (g_) check(bitepGroupDestroy(g_));
    g_ = nullptr;
  }
  bitepGroup_t get() const noexcept { return g_; }
  // Gives up ownership: the caller destroys the group (bitepGroupDestroy).
  bitepGroup_t release() noexcept { return std::exchange(g_, nullptr); }
  int rank() const {
    int r = 0;
    check(bitepGroupGetRank(g_, &r, nullptr));
    return r;
  }
  int nranks() const {
    int n = 0;
    check(bitepGroupGetRank(g_, nullptr, &n));
    return n;
  }
  size_t memory_bytes() const {
    size_t b = 0;
    check(bitepGroupMemoryBytes(g_, &b));
    return b;
  }
  // Frees the idle pool blocks on this rank; returns the bytes freed (bitepGroupTrimMemory).
  size_t trim_memory() const {
    size_t b = 0;
    check(bitepGroupTrimMemory(g_, &b));
    return b;
  }

  Handle dispatch(const bitepDispatchArgs_t& args, bitepStream_t stream = nullptr) const {
    bitepHandle_t h = nullptr;
    check(bitepDispatch(g_, &args, stream, &h));
    return Handle(h);
  }
  // bitepGroupLowLatencyCapturable: whether a CUDA graph can capture dispatch_low_latency and its combines.
  bool low_latency_capturable() const {
    int c = 0;
    check(bitepGroupLowLatencyCapturable(g_, &c));
    return c != 0;
  }
  // bitepDispatchLowLatency (config.low_latency_max_tokens > 0): no host synchronisation where the group has a
  // low-latency window (low_latency_capturable()); elsewhere it runs bitepDispatch, with its count exchange.
  Handle dispatch_low_latency(const bitepDispatchArgs_t& args, bitepStream_t stream = nullptr) const {
    bitepHandle_t h = nullptr;
    check(bitepDispatchLowLatency(g_, &args, stream, &h));
    return Handle(h);
  }
  void combine(const Handle& h, const bitepCombineArgs_t& args, bitepStream_t stream = nullptr) const {
    check(bitepCombine(g_, h.get(), &args, stream));
  }
  void dispatch_backward(
      const Handle& h, const void* grad_y, bitepLayout_t layout, void* grad_x, bitepStream_t stream = nullptr) const {
    check(bitepDispatchBackward(g_, h.get(), grad_y, layout, grad_x, stream));
  }
  void combine_backward(const Handle& h, const bitepCombineBackwardArgs_t& args, bitepStream_t stream = nullptr) const {
    check(bitepCombineBackward(g_, h.get(), &args, stream));
  }
  // bitepHandleGetExpertSources: the received row of each expert-major row (-1 for pads), owned by the handle.
  const int32_t* expert_sources(const Handle& h, bitepStream_t stream = nullptr) const {
    const int32_t* sources = nullptr;
    check(bitepHandleGetExpertSources(g_, h.get(), stream, &sources));
    return sources;
  }

 private:
  void destroy_quietly() noexcept {
    if (g_) (void)bitepGroupDestroy(g_);
    g_ = nullptr;
  }
  bitepGroup_t g_ = nullptr;
};

// Router calls that throw on failure.
inline void router_forward(bitepBackend_t backend,
                           const bitepRouterConfig_t& cfg,
                           const bitepRouterForwardArgs_t& args,
                           bitepStream_t stream = nullptr) {
  check(bitepRouterForward(backend, &cfg, &args, stream));
}
inline void router_backward(bitepBackend_t backend,
                            const bitepRouterConfig_t& cfg,
                            const bitepRouterBackwardArgs_t& args,
                            bitepStream_t stream = nullptr) {
  check(bitepRouterBackward(backend, &cfg, &args, stream));
}
// The aux-loss scores (all E experts' scores and their top-k map) and their backward.
inline void aux_scores_forward(bitepBackend_t backend,
                               const bitepRouterConfig_t& cfg,
                               const bitepRouterForwardArgs_t& args,
                               bitepStream_t stream = nullptr) {
  check(bitepAuxScoresForward(backend, &cfg, &args, stream));
}
inline void aux_scores_backward(bitepBackend_t backend,
                                const bitepRouterConfig_t& cfg,
                                const bitepRouterBackwardArgs_t& args,
                                bitepStream_t stream = nullptr) {
  check(bitepAuxScoresBackward(backend, &cfg, &args, stream));
}
// The aux loss, forward (writes args.loss) and backward (writes args.grad_probs).
inline void aux_loss_forward(bitepBackend_t backend, const bitepAuxLossArgs_t& args, bitepStream_t stream = nullptr) {
  check(bitepAuxLossForward(backend, &args, stream));
}
inline void aux_loss_backward(bitepBackend_t backend, const bitepAuxLossArgs_t& args, bitepStream_t stream = nullptr) {
  check(bitepAuxLossBackward(backend, &args, stream));
}

}  // namespace bitep
