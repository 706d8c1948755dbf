// SPDX-License-Identifier: Apache-2.0
// What the shared EP orchestration needs from a transport: NCCL (comm/nccl_transport.cc, device
// memory, enqueued on the stream) or MPI (comm/mpi_transport.cc, host memory, blocking).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "bitep/bitep.h"

namespace bitep::ep {

// The timeout of collective work before a group config has been read and checked: the default of
// BITEP_GROUP_CONFIG_INIT, taken from the macro so that the two never differ.
inline constexpr double kDefaultTimeoutS = bitepGroupConfig_t BITEP_GROUP_CONFIG_INIT.timeout_s;

// config is non-null and carries bitepGroupConfig_t's magic and size, so its fields may be read (their
// values are checked elsewhere).
inline bool config_readable(const bitepGroupConfig_t* c) {
  return c != nullptr && c->magic == BITEP_GROUP_CONFIG_MAGIC && c->size == sizeof(bitepGroupConfig_t);
}

// The timeout of a group's creation: the config's where it can be read and is > 0, else kDefaultTimeoutS (the
// config's checks come later, in the agreement).
inline double creation_timeout_s(const bitepGroupConfig_t* c) {
  return config_readable(c) && c->timeout_s > 0 ? c->timeout_s : kDefaultTimeoutS;
}

// A wait on the device bounded by timeout_s (a group's timeout), in the nanoseconds of the global timer: no
// bound for 0, a negative or a huge value.
inline uint64_t timeout_ns(double timeout_s) {
  return timeout_s > 0 && timeout_s < 1e9 ? static_cast<uint64_t>(timeout_s * 1e9) : ~uint64_t{0};
}

// One buffer pair exchanged with one peer. Byte counts may be 0.
struct PeerBuffers {
  const void* send = nullptr;
  uint64_t send_bytes = 0;
  void* recv = nullptr;
  uint64_t recv_bytes = 0;
};

// Load/store access to every peer's memory: a symmetric window of the same size on every rank, mapped
// into each rank's address space (NCCL's symmetric memory over NVLink; comm/nccl_window.cu). The cuda
// transport offers one when every rank of the group is load/store accessible (one NVLink domain) and
// BITEP_LSA is not 0; dispatch and combine then store rows straight into the peers' windows instead of
// calling the all-to-all. Every call is collective and issued in the same order on every rank.
class PeerWindow {
 public:
  virtual ~PeerWindow() = default;
  // The calls' bookkeeping of the data area, the same on every rank (every rank makes the same calls):
  // the bytes the most recent dispatch stored into (0: its rows went another way), and exchanges() at
  // the most recent combine through the window. A combine after a window exchange (which no rank passes
  // before every rank's earlier window work is done) stores past that dispatch's bytes without a barrier.
  size_t dispatch_extent = 0;
  uint64_t combine_mark = 0;
  // Exchanges (exchange()) so far.
  virtual uint64_t exchanges() const = 0;
  // Where a combine puts its `bytes` of partial rows in the data area, and whether it needs a barrier
  // before storing them: after a window exchange since the last combine, past dispatch_extent (256-byte
  // aligned) and no barrier, when that ends within `limit`; else at 0 behind a barrier. Marks the combine.
  size_t place_combine(size_t bytes, size_t limit, bool* barrier) {
    const size_t past = (dispatch_extent + 255) / 256 * 256;
    const bool fresh = exchanges() != combine_mark;
    combine_mark = exchanges();
    *barrier = !(fresh && past + bytes <= limit);
    return *barrier ? 0 : past;
  }
  // The data area holds at least `bytes` (every rank passes the same value): a larger request replaces the
  // window on every rank at once (waits for the device first). Host-side; the timeout bounds NCCL's
  // registration.
  virtual bitepResult_t reserve(size_t bytes, double timeout_s) = 0;
  // Device memory this rank holds for the window.
  virtual size_t bytes() const = 0;
  // Rank r's data area, as this rank addresses it (r == rank: its own).
  virtual char* data(int r) const = 0;
  // Enqueued on stream: no rank leaves it before every rank has entered it (in the same call order), and
  // the stores every rank queued before it (on its stream) are visible to all after it. A peer that never
  // arrives ends the wait after timeout_s; the failure is reported by check().
  virtual bitepResult_t barrier(bitepStream_t stream, double timeout_s) = 0;
  // bitepTimeout when an earlier barrier ended without every peer (their stores may be missing).
  virtual bitepResult_t check() = 0;
  // The count exchange through the windows, beside the data area (a combine on another stream may still
  // use that): whether it can carry nranks * n int32. Off with BITEP_LSA_EXCHANGE=0 on any rank; the same
  // answer on every rank for the same n.
  virtual bool can_exchange(int n) const = 0;
  // Enqueued on stream, one kernel: row p of send [nranks, n] int32 is stored into rank p's exchange area,
  // then a barrier, then recv [nranks, n] holds row q = what rank q sent to this rank. A peer missing for
  // timeout_s ends the wait as barrier() does (check() reports it). Needs can_exchange(n). Ordered after
  // the previous call's release() and marks its own (it acquires and releases the window itself).
  // recv_mapped, when not null: pinned host memory as the device addresses it, where the kernel stores recv
  // too (the host reads it once the kernel is done, with no copy queued after it).
  virtual bitepResult_t exchange(
      const int32_t* send, int32_t* recv, int32_t* recv_mapped, int n, bitepStream_t stream, double timeout_s) = 0;
  // Orders the calls that use the window, whatever streams they run on: acquire() makes `stream` wait for
  // the previous call's release(), which marks where that call's last access to the window was queued.
  virtual bitepResult_t acquire(bitepStream_t stream) = 0;
  virtual bitepResult_t release(bitepStream_t stream) = 0;
  // Arrival flags per chunk of a dispatch's rows (kernels/ep_params.h, PermuteParams::chunk_*): rank r's
  // [nranks][max_chunks()] uint64, as this rank addresses it; sender s's flags are row s. A flag holds the
  // epoch of the last call that raised it; a new window starts them at 0. max_chunks() 0: none.
  virtual int max_chunks() const { return 0; }
  virtual uint64_t* chunk_flags(int r) const {
    (void)r;
    return nullptr;
  }
  // The epoch of one call's chunk flags, above every earlier call's: counted alike on every rank (every
  // rank makes the same calls).
  uint64_t next_chunk_epoch() { return ++chunk_epoch_; }
  // The device word that a wait which gave up raises (check() reports it), as a kernel addresses it.
  virtual volatile int* timeout_word() const { return nullptr; }
  // The device word counting this window's barriers (null: a window without barriers, the one-rank one),
  // from which the low-latency kernels take their slots' parity (kernels::SlotParity).
  virtual const uint64_t* epoch_word() const { return nullptr; }

 private:
  uint64_t chunk_epoch_ = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int nranks() const = 0;

  // Blocking allgather of a small host blob (config agreement, error agreement): out = nranks * bytes.
  virtual bitepResult_t allgather_host(const void* in, void* out, size_t bytes) = 0;

  // All-to-all of n int32 per peer: send [nranks * n] in backend memory, recv_host [nranks * n] filled on the
  // host (row q: what rank q sent to this rank). recv [nranks * n], backend memory, is the transport's to use
  // on the way (its contents after the call are unspecified; one rank's transport may leave it). Returns after
  // the host has the counts: the one host synchronisation of a dispatch. Fails with bitepTimeout after timeout_s.
  virtual bitepResult_t exchange_counts(
      const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t stream, double timeout_s) = 0;

  // Grouped exchange: per_peer[p] lists the buffers sent to / received from peer p (the self entry
  // must be empty: the self chunk never goes through the transport). Enqueued on stream (NCCL) or
  // completed before return (MPI).
  virtual bitepResult_t alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                                  bitepStream_t stream,
                                  double timeout_s) = 0;

  // Collective, once, after the group's config is agreed: sets up the peer window where the transport and
  // the ranks allow it (every rank ends with one, or none).
  virtual bitepResult_t open_window(double timeout_s) {
    (void)timeout_s;
    return bitepSuccess;
  }
  // The peer window, or null (host transport, ranks beyond one NVLink domain, BITEP_LSA=0, W = 1).
  virtual PeerWindow* window() { return nullptr; }
  // Collective, once, after open_window() gave a window: a second one of a fixed `bytes` of data for the
  // low-latency dispatches and combines (src/ep/low_latency.cc), never replaced; every rank ends with one, or
  // none.
  virtual bitepResult_t open_low_latency_window(size_t bytes, double timeout_s) {
    (void)bytes;
    (void)timeout_s;
    return bitepSuccess;
  }
  virtual PeerWindow* low_latency_window() { return nullptr; }

  // A call that may communicate enters and leaves the group (GroupCall): a transport that runs a library with thread
  // rules on the caller's thread (MPI below MPI_THREAD_MULTIPLE) refuses, before anything is sent, a call that would
  // break them. call: the API function's name; teardown: bitepGroupDestroy (the transport's destructor follows).
  virtual bitepResult_t enter_call(const char* call, bool teardown) {
    (void)call;
    (void)teardown;
    return bitepSuccess;
  }
  virtual void leave_call() {}
};

// NCCL side, implemented in comm/nccl_transport.cc (built only with BITEP_HAVE_NCCL). The group code
// in src/ep/ calls these; without NCCL it returns bitepNotSupported itself.
// A transport over `comm` on the current device. owned: the transport destroys (or, on a timeout,
// aborts) comm; a borrowed comm is never destroyed or aborted by bitep. timeout_s > 0: the waits' timeout until
// the group sets its own (the config agreement at creation); else the one nccl_comm_init was given (or 300 s).
bitepResult_t make_nccl_transport(struct ncclComm* comm,
                                  bool owned,
                                  std::unique_ptr<Transport>* out,
                                  double timeout_s = 0.0);
// ncclGetUniqueId into the opaque bitep id.
bitepResult_t nccl_get_unique_id(bitepUniqueId* id);
// A new communicator (non-blocking init polled against timeout_s) on the current device.
bitepResult_t nccl_comm_init(const bitepUniqueId* id, int nranks, int rank, double timeout_s, struct ncclComm** out);

}  // namespace bitep::ep
