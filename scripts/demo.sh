#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main job: an MoE layer routed by bitep's bitmap router, dispatched and combined over the EP
# group with mpirun. On the GPUs present (cuda backend, NCCL), else on the host reference backend
# with 4 ranks. Installs what is missing (root + apt) and builds first.
#   scripts/demo.sh [moe_layer options: --tokens T --hidden H --experts E --topk k]
set -euo pipefail
source "$(dirname "$0")/common.sh"
CMAKE_ARGS="${CMAKE_ARGS:-} -DBITEP_BUILD_BENCH=OFF"
configure_and_build

ngpu=0
# Lines that name a GPU ("GPU 0: ..."): a failing driver's message is not one. nvidia-smi lists every GPU of the host;
# CUDA_VISIBLE_DEVICES, when set, is what the ranks see (empty or starting with -1: none).
if command -v nvidia-smi >/dev/null; then ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true); fi
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  visible=0
  IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
  for id in "${ids[@]}"; do  # CUDA stops at the first entry that names no device
    [[ "$id" =~ ^-?[0-9]+$ && "$id" -lt 0 ]] && break
    [ -n "$id" ] || break
    visible=$((visible + 1))
  done
  [ "$visible" -lt "$ngpu" ] && ngpu=$visible
fi
# The cuda backend needs a build with CUDA and NCCL (libbitep then links libnccl). moe_layer exits 77 when it skipped
# the cuda path (a build without cuBLAS, a rank without a GPU of its own): then the host backend runs.
if [ "$ngpu" -ge 1 ] && [ "$(ldd "$BUILD_DIR"/libbitep.so 2>/dev/null | grep -c libnccl || true)" -ge 1 ]; then
  echo "== moe_layer on $ngpu GPU(s), cuda backend"
  rc=0
  mpirun -np "$ngpu" "$BUILD_DIR/examples/moe_layer" --backend cuda "$@" || rc=$?
  [ "$rc" -ne 77 ] && exit "$rc"
  echo "== the cuda path was skipped (above): moe_layer on the host reference backend, 4 ranks"
else
  echo "== no GPU here: moe_layer on the host reference backend, 4 ranks"
fi
exec mpirun -np 4 "$BUILD_DIR/examples/moe_layer" --backend host "$@"
