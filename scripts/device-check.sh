#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything the GPU machine must run, in one call: build with all cores, every test (gpu label and
# the mpirun NCCL tests included, over NVLink and over NCCL's network transport), the GPU tests under
# compute-sanitizer memcheck and racecheck, then the benchmarks. Logs and JSON go to $OUT (at most 8
# files come back from the device tool), a summary is printed last.
#   OUT=/tmp/out scripts/device-check.sh [--quick]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PATH=/usr/local/cuda/bin:$PATH
BUILD=$ROOT/build-device
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
status=0
step() {  # step NAME LOGFILE CMD...: runs CMD, appends to LOGFILE, records pass/fail in the summary
  local name=$1 log=$2
  shift 2
  echo "== $name" | tee -a "$log"
  local t0=$SECONDS tmp
  tmp=$(mktemp)
  "$@" >"$tmp" 2>&1
  local rc=$?
  # A gtest run that selected no test proves nothing: count it as a failure.
  if [ $rc = 0 ] && grep -q '\[  PASSED  \] 0 tests' "$tmp"; then
    echo "no test ran: check the filter" >>"$tmp"
    rc=3
  fi
  cat "$tmp" >>"$log"
  rm -f "$tmp"
  printf '%-52s %s (%ds)\n' "$name" "$([ $rc = 0 ] && echo PASS || echo "FAIL rc=$rc")" $((SECONDS - t0)) | tee -a "$SUMMARY"
  [ $rc = 0 ] || status=1
  return $rc
}

{
  echo "commit $COMMIT  date $(date -u +%Y-%m-%dT%H:%M:%SZ)  gpus $NGPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nvidia-smi topo -m
  nvcc --version | tail -2
} >"$OUT/machine.txt" 2>&1

step "build (-j$(nproc))" "$OUT/build.log" \
  bash -c "cmake -S '$ROOT' -B '$BUILD' -DCMAKE_BUILD_TYPE=Release && cmake --build '$BUILD' -j $(nproc)" || {
  tail -50 "$OUT/build.log"
  exit 1
}

LOG=$OUT/tests.log
step "ctest: unit + gpu + multirank (host and cuda)" "$LOG" ctest --test-dir "$BUILD" --output-on-failure --timeout 900
# Under the sanitizers: every GPU test but the multi-GiB 64-bit indexing one, and one mid-size router grid.
GPU_SAN_FILTER=${SANITIZER_FILTER:-EpKernelsGpu.*:RouterGpu.*:Experts/RouterGrid.MatchesHostAndOracle/E130:-RouterGpu.LargeTokenCount64BitIndexing}
if [ -x "$BUILD/tests/bitep_gpu_tests" ]; then
  step "gpu tests under compute-sanitizer memcheck" "$LOG" \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$BUILD/tests/bitep_gpu_tests" --gtest_filter="$GPU_SAN_FILTER"
  step "gpu tests under compute-sanitizer racecheck" "$LOG" \
    compute-sanitizer --tool racecheck --error-exitcode 1 "$BUILD/tests/bitep_gpu_tests" --gtest_filter="$GPU_SAN_FILTER"
fi
MR=$BUILD/tests/multirank/bitep_multirank_tests
# ctest above ran the whole multi-rank suite at np 1..8 (EpCuda, the cuda-vs-host test, runs where every
# rank has a GPU: np 1 and 2 here). Below: the cuda backend again over NCCL's network transport (as
# between nodes; small sizes, ~8 ms a grouped op there) and under compute-sanitizer.
if [ -x "$MR" ] && [ "$NGPU" -ge 1 ]; then
  CUDA_FILTER=${MR_CUDA_FILTER:-EpCuda*}
  if [ "$NGPU" -ge 2 ]; then
    step "multirank cuda np2 (NCCL net transport)" "$LOG" \
      mpirun -np 2 -x NCCL_P2P_DISABLE=1 -x NCCL_SHM_DISABLE=1 "$MR" --gtest_filter="$CUDA_FILTER"
    step "multirank cuda np2 memcheck" "$LOG" \
      mpirun -np 2 compute-sanitizer --tool memcheck --error-exitcode 1 "$MR" --gtest_filter="$CUDA_FILTER"
  fi
  step "multirank cuda np1 memcheck" "$LOG" \
    mpirun -np 1 compute-sanitizer --tool memcheck --error-exitcode 1 "$MR" --gtest_filter="$CUDA_FILTER"
fi

BENCH=$OUT/bench.txt
if [ -x "$BUILD/bench/router_bench" ]; then
  step "router_bench" "$BENCH" "$BUILD/bench/router_bench" $QUICK --commit "$COMMIT" --json "$OUT/router.json"
fi
if [ -x "$BUILD/bench/ep_bench" ] && [ "$NGPU" -ge 1 ]; then
  step "ep_bench np$NGPU" "$BENCH" mpirun -np "$NGPU" -x BITEP_COMMIT="$COMMIT" "$BUILD/bench/ep_bench" $QUICK \
    --json "$OUT/ep.json"
  if [ -f "$OUT/ep.json" ] && python3 -c 'import matplotlib' 2>/dev/null; then
    mkdir -p "$OUT/plots"
    step "ep plots" "$BENCH" python3 "$ROOT/bench/plot_ep.py" "$OUT/ep.json" --out "$OUT/plots"
  fi
fi

echo
echo "== summary (commit $COMMIT)"
cat "$SUMMARY"
tail -40 "$BENCH" 2>/dev/null
exit $status
