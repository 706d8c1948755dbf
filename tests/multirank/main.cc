// SPDX-License-Identifier: Apache-2.0
// main() of the multi-rank tests: MPI_Init/Finalize; rank 0 prints gtest's output, the other ranks print
// only their failures (prefixed with the rank); after each test rank 0 names the ranks where it failed;
// the process fails on every rank if any rank failed anything, and returns kSkipped (ctest's SKIP_RETURN_CODE) on every
// rank if no rank failed anything and every rank skipped every test it ran (so mpirun, which returns a non-zero rank's
// code, says 77 only then, and a failure beside a skip stays a failure). Environment BITEP_TEST_MPI_THREAD=single,
// funneled, serialized or multiple: MPI_Init_thread at that level (the thread tests); unset, MPI_Init.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tests/multirank/mpi_main.h"

namespace {

int g_rank = 0, g_size = 1, g_thread_level = MPI_THREAD_SINGLE;

// The exit status of a run in which every test that ran was skipped (tests/multirank/CMakeLists.txt: SKIP_RETURN_CODE).
constexpr int kSkipped = 77;

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

// MPI_Init, or MPI_Init_thread at the level BITEP_TEST_MPI_THREAD names; false for a name it does not know.
bool init_mpi(int* argc, char*** argv) {
  const char* want = std::getenv("BITEP_TEST_MPI_THREAD");
  if (want == nullptr || *want == '\0') {
    MPI_Init(argc, argv);
    MPI_Query_thread(&g_thread_level);
    return true;
  }
  static const struct {
    const char* name;
    int level;
  } kLevels[] = {{"single", MPI_THREAD_SINGLE},
                 {"funneled", MPI_THREAD_FUNNELED},
                 {"serialized", MPI_THREAD_SERIALIZED},
                 {"multiple", MPI_THREAD_MULTIPLE}};
  for (const auto& l : kLevels)
    if (std::strcmp(want, l.name) == 0) {
      MPI_Init_thread(argc, argv, l.level, &g_thread_level);
      return true;
    }
  std::fprintf(stderr, "BITEP_TEST_MPI_THREAD=%s: not single, funneled, serialized or multiple\n", want);
  return false;
}

}  // namespace

int multirank_mpi_thread_level() { return g_thread_level; }

int main(int argc, char** argv) {
  if (!init_mpi(&argc, &argv)) return 2;
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
  const int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  // {failed, ran a test that was not skipped}, the most over the ranks: one verdict on every rank.
  const testing::UnitTest& u = *testing::UnitTest::GetInstance();
  const int ran = u.test_to_run_count(), skipped = u.skipped_test_count();
  int local[2] = {failed, ran == 0 || skipped < ran ? 1 : 0}, any[2] = {0, 0};
  MPI_Allreduce(local, any, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (g_rank == 0 && any[0] && !failed) std::printf("FAILED on another rank (see [rank N] lines above)\n");
  if (g_rank == 0 && !any[0] && !any[1]) std::printf("SKIPPED: every test that ran skipped, on every rank\n");
  MPI_Finalize();
  return any[0] ? 1 : any[1] ? 0 : kSkipped;
}
