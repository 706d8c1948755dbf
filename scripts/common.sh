#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Shared by scripts/test.sh and scripts/demo.sh: install what is missing (as root, through apt),
# then configure and build into ${BUILD_DIR:-build}.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$ROOT/build}
JOBS=${JOBS:-$(nproc)}

need_pkgs=()
command -v cmake >/dev/null || need_pkgs+=(cmake)
command -v make >/dev/null || need_pkgs+=(make)  # cmake only recommends it: not installed by --no-install-recommends
command -v g++ >/dev/null || need_pkgs+=(g++)
command -v mpirun >/dev/null || need_pkgs+=(openmpi-bin)
[ -f /usr/include/x86_64-linux-gnu/mpi.h ] || [ -f /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] ||
  command -v mpicxx >/dev/null || need_pkgs+=(libopenmpi-dev)
[ -d /usr/include/gtest ] || need_pkgs+=(libgtest-dev)
# The format check and the install test's pkg-config consumer are test.sh's alone (it sets NEED_FORMAT=1 before
# sourcing this file).
[ "${NEED_FORMAT:-0}" = 0 ] || command -v clang-format >/dev/null || need_pkgs+=(clang-format)
[ "${NEED_FORMAT:-0}" = 0 ] || command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "missing packages: ${need_pkgs[*]} (install them, or run as root to let this script use apt)" >&2
    exit 1
  fi
fi

# CMake 3.24 or later (apt gives 3.22 on Ubuntu 22.04): from PyPI where apt's is older.
cmake_ok() { printf '3.24\n%s\n' "$(cmake --version 2>/dev/null | head -1 | awk '{print $3}')" | sort -V -C; }
if ! cmake_ok; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== cmake $(cmake --version | head -1 | awk '{print $3}') is older than 3.24: installing cmake from PyPI"
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    python3 -m pip install -q 'cmake>=3.24' 2>/dev/null || python3 -m pip install -q --break-system-packages 'cmake>=3.24'
    hash -r
  fi
  cmake_ok || { echo "cmake 3.24 or later is needed (found: $(cmake --version | head -1))" >&2; exit 1; }
fi

# mpirun as root (containers, CI) and more ranks than cores (multi-rank tests on a 2-core machine); no CMA single copy
# between ranks, which containers without ptrace rights refuse.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
# Never let NCCL, PyTorch or NVSHMEM use NVLink multicast (shared GPU hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# nvcc from the usual place when it is not on PATH.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

configure_and_build() {
  cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} ${CMAKE_ARGS:-}
  cmake --build "$BUILD_DIR" -j "$JOBS"
}
