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

}  // namespace bitep::ep
