#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs every test that this machine can run: installs what is missing (root + apt), builds, checks
# the formatting, runs ctest (unit, multi-rank under mpirun, and the gpu tests, which say SKIPPED
# without a GPU).
set -euo pipefail
export NEED_FORMAT=1
source "$(dirname "$0")/common.sh"
cd "$ROOT"
# Every target this machine can build, whatever an earlier demo.sh left in the shared build directory's cache.
CMAKE_ARGS="${CMAKE_ARGS:-} -DBITEP_BUILD_TESTS=ON -DBITEP_BUILD_EXAMPLES=ON -DBITEP_BUILD_BENCH=ON"

echo "== format check (.clang-format)"
mapfile -t sources < <(git ls-files -co --exclude-standard -- '*.h' '*.hpp' '*.cc' '*.cu' '*.cuh' '*.c' 2>/dev/null ||
  find include src kernels comm tests examples bench \( -name '*.h' -o -name '*.hpp' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' -o -name '*.c' \))
clang-format --dry-run --Werror "${sources[@]}"
echo "   ${#sources[@]} files formatted"

echo "== build"
configure_and_build

echo "== tests"
cd "$BUILD_DIR"
ctest --output-on-failure --timeout 600 -j "$JOBS" ${CTEST_ARGS:-}
