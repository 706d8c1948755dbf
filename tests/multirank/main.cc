// SPDX-License-Identifier: Apache-2.0
// main() of the multi-rank tests: MPI_Init/Finalize; rank 0 prints gtest's output, the other ranks print
// only their failures (prefixed with the rank); after each test rank 0 names the ranks where it failed;
// the process fails on every rank if any rank failed anything.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int g_rank = 0, g_size = 1;

// Other ranks: print failed assertions only.
class FailurePrinter : public testing::EmptyTestEventListener {
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", g_rank, r.file_name() ? r.file_name() : "?", r.line_number(),
                 r.summary());
    std::fflush(stderr);
  }
};

// Every rank: after each test, rank 0 learns where it failed.
class RankAgreement : public testing::EmptyTestEventListener {
  void OnTestEnd(const testing::TestInfo& info) override {
    int failed = info.result()->Failed() ? 1 : 0;
    std::vector<int> all(g_size, 0);
    MPI_Gather(&failed, 1, MPI_INT, all.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (g_rank != 0) return;
    std::string ranks;
    for (int r = 0; r < g_size; ++r)
      if (all[r]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    if (!ranks.empty())
      std::printf("[ RANKS    ] %s.%s failed on rank(s) %s of %d\n", info.test_suite_name(), info.name(), ranks.c_str(),
                  g_size);
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  testing::InitGoogleTest(&argc, argv);
  testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
  if (g_rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter);
  } else {
    std::printf("bitep multirank tests on %d rank(s)\n", g_size);
  }
  listeners.Append(new RankAgreement);
  int local = RUN_ALL_TESTS() != 0 ? 1 : 0, any = 0;
  MPI_Allreduce(&local, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (g_rank == 0 && any && !local) std::printf("FAILED on another rank (see [rank N] lines above)\n");
  MPI_Finalize();
  return any;
}
