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

// One buffer pair exchanged with one peer. Byte counts may be 0.
struct PeerBuffers {
  const void* send = nullptr;
  uint64_t send_bytes = 0;
  void* recv = nullptr;
  uint64_t recv_bytes = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int nranks() const = 0;

  // Blocking allgather of a small host blob (config agreement, error agreement): out = nranks * bytes.
  virtual bitepResult_t allgather_host(const void* in, void* out, size_t bytes) = 0;

  // All-to-all of n int32 per peer: send [nranks * n], recv [nranks * n] in backend memory (the self
  // slot is copied locally), then recv_host [nranks * n] filled on the host. Returns after the host has
  // the counts: the one host synchronisation of a dispatch. Fails with bitepTimeout after timeout_s.
  virtual bitepResult_t exchange_counts(
      const int32_t* send, int32_t* recv, int32_t* recv_host, int n, bitepStream_t stream, double timeout_s) = 0;

  // Grouped exchange: per_peer[p] lists the buffers sent to / received from peer p (the self entry
  // must be empty: the self chunk never goes through the transport). Enqueued on stream (NCCL) or
  // completed before return (MPI).
  virtual bitepResult_t alltoallv(const std::vector<std::vector<PeerBuffers>>& per_peer,
                                  bitepStream_t stream,
                                  double timeout_s) = 0;
};

// NCCL side, implemented in comm/nccl_transport.cc (built only with BITEP_HAVE_NCCL). The group code
// in src/ep/ calls these; without NCCL it returns bitepNotSupported itself.
// A transport over `comm` on the current device. owned: the transport destroys (or, on a timeout,
// aborts) comm; a borrowed comm is never destroyed or aborted by bitep.
bitepResult_t make_nccl_transport(struct ncclComm* comm, bool owned, std::unique_ptr<Transport>* out);
// ncclGetUniqueId into the opaque bitep id.
bitepResult_t nccl_get_unique_id(bitepUniqueId* id);
// A new communicator (non-blocking init polled against timeout_s) on the current device.
bitepResult_t nccl_comm_init(const bitepUniqueId* id, int nranks, int rank, double timeout_s, struct ncclComm** out);

}  // namespace bitep::ep
