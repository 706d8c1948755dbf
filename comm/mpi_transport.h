// SPDX-License-Identifier: Apache-2.0
// The host backend's transport: MPI on host memory, every operation polled against a timeout.
#pragma once

#include <mpi.h>

#include <memory>

#include "src/ep/transport.h"

namespace bitep::ep {

// Takes over `comm` (a duplicate that bitep made: the transport frees it). timeout_s bounds
// allgather_host, which has no timeout argument.
std::unique_ptr<Transport> make_mpi_transport(MPI_Comm comm, double timeout_s);

// *local_rank: the rank's index among the ranks of t on its node (the same MPI_Get_processor_name), through t's
// allgather: polled against t's timeout, where MPI_Comm_split_type blocks for good behind a rank that left (one whose
// operation before timed out while the others' completed).
bitepResult_t node_local_rank(Transport* t, int* local_rank);

// One bitep call's MPI calls on the calling thread, held to MPI's thread level (MPI_Query_thread). enter() refuses
// with bitepInvalidUsage, before any MPI call: MPI finalized or not initialised (except for a teardown, which then
// makes no MPI call); below MPI_THREAD_SERIALIZED, a thread other than the one that initialised MPI; below
// MPI_THREAD_MULTIPLE, another thread inside a bitep call over MPI in this process (on another group: one group's
// calls never overlap). The caller's own MPI calls are its to order.
class MpiThreadHold {
 public:
  MpiThreadHold() = default;
  ~MpiThreadHold() { leave(); }
  MpiThreadHold(const MpiThreadHold&) = delete;
  MpiThreadHold& operator=(const MpiThreadHold&) = delete;
  // call: the API function's name; teardown: a group's transport is destroyed next.
  bitepResult_t enter(const char* call, bool teardown = false);
  void leave();

 private:
  bool counted_ = false;  // in the process's count of calls over MPI (levels below MPI_THREAD_MULTIPLE)
};

}  // namespace bitep::ep
