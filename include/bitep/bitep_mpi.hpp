// SPDX-License-Identifier: Apache-2.0
// C++ layer of bitep_mpi.h (the MPI bootstrap): needs MPI's C headers, as bitep_mpi.h does.
#pragma once

#include "bitep/bitep.hpp"
#include "bitep/bitep_mpi.h"

namespace bitep {

// bitepGroupCreateMpi: a group over the ranks of comm (collective over comm); throws bitep::Error on failure.
inline Group group_from_mpi(MPI_Comm comm, const bitepGroupConfig_t& cfg) {
  bitepGroup_t g = nullptr;
  check(bitepGroupCreateMpi(comm, &cfg, &g));
  return Group(g);
}

}  // namespace bitep
