/* SPDX-License-Identifier: Apache-2.0 */
/* MPI bootstrap for bitep groups: the only bitep header that needs MPI. */
#ifndef BITEP_BITEP_MPI_H_
#define BITEP_BITEP_MPI_H_

/* bitep needs MPI's C API alone. From C++, Open MPI's and MPICH's <mpi.h> also declare their C++ bindings (removed
 * from the standard in MPI-3.0), which need a library that MPI's C link line (MPI::MPI_C, bitep's dependency) lacks:
 * they are left out here. A program that uses those bindings includes <mpi.h> before this header. */
#if defined(__cplusplus) && !defined(OMPI_SKIP_MPICXX)
#define OMPI_SKIP_MPICXX 1
#endif
#if defined(__cplusplus) && !defined(MPICH_SKIP_MPICXX)
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include "bitep/bitep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Creates a group over the ranks of comm. Collective over comm.
 * cuda backend: rank 0 makes an NCCL unique id and broadcasts it over comm; each rank takes one GPU,
 * config->device, or when it is -1 the rank's index among the ranks of its node (the ranks of comm with its
 * MPI_Get_processor_name).
 * Environment BITEP_CUDA_TRANSPORT=ipc (set alike on every rank; for testing): the cuda backend runs over MPI
 * and CUDA IPC instead of NCCL, and the ranks of a node share its GPUs (the rank's index modulo the GPUs), so
 * several ranks can run on one GPU; the peer window is every rank's cudaMalloc buffer opened by the others
 * through IPC handles, the all-to-alls without it are staged through host memory. Correct, not fast.
 * host backend: the transport is MPI itself (bitep duplicates comm; the caller keeps comm).
 * Every rank must pass the same E, k, H, dtype, backend; a mismatch fails on all ranks, naming the field.
 * [OUT] group. */
BITEP_API bitepResult_t bitepGroupCreateMpi(MPI_Comm comm, const bitepGroupConfig_t* config, bitepGroup_t* group);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* BITEP_BITEP_MPI_H_ */
