// SPDX-License-Identifier: Apache-2.0
// What the multi-rank tests' main() (main.cc) tells the tests.
#pragma once

// The thread level MPI gave (MPI_Query_thread after MPI_Init or MPI_Init_thread; BITEP_TEST_MPI_THREAD asks).
int multirank_mpi_thread_level();
