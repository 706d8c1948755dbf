// SPDX-License-Identifier: Apache-2.0
// The cuda backend over MPI and CUDA IPC instead of NCCL (BITEP_CUDA_TRANSPORT=ipc, bitepGroupCreateMpi only):
// a transport for testing several ranks on one GPU, or on the GPUs of one node, where NCCL would refuse two
// ranks on one device. The peer window is every rank's cudaMalloc buffer shared by CUDA IPC handles (the
// same flags, barriers and count exchange as NCCL's window: comm/flag_window.h); the count exchange and the
// all-to-all without the window are staged through host memory and MPI, after a synchronisation of the
// stream. Correct, not fast: processes that share a GPU take turns on it (time slices), so each barrier
// may wait for the peers' slices.
#pragma once

#include <memory>

#include "src/ep/transport.h"

namespace bitep::ep {

// BITEP_CUDA_TRANSPORT=ipc is set.
bool mpi_ipc_requested();

// *out = the transport over `mpi` (make_mpi_transport's; taken over) on `device`, the current device.
// bitepNotSupported in a build without CUDA.
bitepResult_t make_mpi_ipc_transport(std::unique_ptr<Transport> mpi, int device, std::unique_ptr<Transport>* out);

}  // namespace bitep::ep
