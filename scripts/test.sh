#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs every test that this machine can run: installs what is missing (root + apt), builds, checks
# the formatting, runs ctest (unit, multi-rank under mpirun, and the gpu tests, which say SKIPPED
# without a GPU), then the host backend's tests again in a host-only build under ASan + UBSan, and the thread tests
# under TSan.
set -euo pipefail
export NEED_FORMAT=1
source "$(dirname "$0")/common.sh"
cd "$ROOT"
# Every target this machine can build, whatever an earlier demo.sh left in the shared build directory's cache. MPI is
# required (BITEP_MPI=ON: configuring fails without it), not AUTO: without MPI tests/multirank adds no test, and every
# multi-rank test would drop out of ctest with the run still green.
CMAKE_ARGS="${CMAKE_ARGS:-} -DBITEP_BUILD_TESTS=ON -DBITEP_BUILD_EXAMPLES=ON -DBITEP_BUILD_BENCH=ON -DBITEP_MPI=ON"

echo "== format check (.clang-format)"
# Tracked files and new ones not yet added, less what CMake writes into a build directory inside the tree that
# .gitignore does not name (BUILD_DIR=out, ...): its CMakeFiles/ hold generated sources.
mapfile -t sources < <( (git ls-files -co --exclude-standard -- '*.h' '*.hpp' '*.cc' '*.cu' '*.cuh' '*.c' 2>/dev/null ||
  find include src kernels comm tests examples bench \( -name '*.h' -o -name '*.hpp' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' -o -name '*.c' \)) |
  grep -v -e '/CMakeFiles/' -e '^CMakeFiles/' || true)
clang-format --dry-run --Werror "${sources[@]}"
echo "   ${#sources[@]} files formatted"

echo "== build"
configure_and_build

echo "== tests"
cd "$BUILD_DIR"
ctest --output-on-failure --timeout 600 -j "$JOBS" ${CTEST_ARGS:-}

# The host backend once more, built alone (BITEP_CUDA=OFF: what a machine without the CUDA toolkit builds, warnings as
# errors) under AddressSanitizer and UndefinedBehaviorSanitizer (with float-cast-overflow, a float out of an integer's
# range converted, which GCC's "undefined" leaves out), every finding fatal: the unit, multi-rank and example tests.
# SANITIZE=0 leaves these stages out.
if [ "${SANITIZE:-1}" != 0 ]; then
  echo "== host-only build under ASan + UBSan (BITEP_CUDA=OFF, BITEP_SANITIZE=address,undefined,float-cast-overflow)"
  SAN_DIR=${SAN_BUILD_DIR:-$ROOT/build-sanitize}
  cmake -S "$ROOT" -B "$SAN_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBITEP_CUDA=OFF -DBITEP_MPI=ON \
    -DBITEP_SANITIZE=address,undefined,float-cast-overflow -DCMAKE_COMPILE_WARNING_AS_ERROR=ON \
    -DBITEP_BUILD_TESTS=ON -DBITEP_BUILD_EXAMPLES=ON -DBITEP_BUILD_BENCH=OFF
  cmake --build "$SAN_DIR" -j "$JOBS"
  cd "$SAN_DIR"
  # OpenMPI's own allocations (its plugins') outlive MPI_Finalize, so leaks are checked in the single-process tests.
  ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure --timeout 900 -j "$JOBS" -LE "multirank|example"
  ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure --timeout 900 -j "$JOBS" -L "multirank|example"

  # The tests of calls from several threads (tests/unit/threads_test.cc: router calls at once, the group's one-call
  # hold, the pool) under ThreadSanitizer, in a host-only build of the unit tests alone. The multi-rank thread tests
  # ran above under ASan: OpenMPI is not instrumented, and ThreadSanitizer cannot see how its progress engine hands
  # one thread's received data to another.
  echo "== the thread tests under ThreadSanitizer (BITEP_CUDA=OFF, BITEP_SANITIZE=thread)"
  TSAN_DIR=${TSAN_BUILD_DIR:-$ROOT/build-tsan}
  cmake -S "$ROOT" -B "$TSAN_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBITEP_CUDA=OFF -DBITEP_SANITIZE=thread \
    -DCMAKE_COMPILE_WARNING_AS_ERROR=ON -DBITEP_BUILD_TESTS=ON -DBITEP_BUILD_EXAMPLES=OFF -DBITEP_BUILD_BENCH=OFF
  cmake --build "$TSAN_DIR" -j "$JOBS" --target bitep_unit_tests
  TSAN_OPTIONS=halt_on_error=1 "$TSAN_DIR/tests/bitep_unit_tests" --gtest_filter='*Threads.*:GroupCall.*'
fi
