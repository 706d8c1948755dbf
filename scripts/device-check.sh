#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Everything the GPU machine must run, in one call: build with all cores, every test (gpu label and
# the mpirun NCCL tests included, over NVLink (through the peer window and without it) and over NCCL's
# network transport), the GPU tests under compute-sanitizer memcheck and racecheck, then the benchmarks.
# Logs and JSON go to $OUT, a summary is printed last. The device tool returns at most 8 files and this
# script writes 8 (machine, summary, build, tests, bench, router.json, ep.json, plots.tar): a caller that
# adds a file to $OUT loses one of them (seen: tests.log).
#   OUT=/tmp/out scripts/device-check.sh [--quick]
# PHASES (comma-separated; default bench,ctest,sanitize,net: ctest holds the GPU and multi-rank tests) picks
# what runs after the build: gpu, multirank (their GPU parts alone, for quick checks),
# bench, net (the NCCL network transport), ctest, sanitize, tune (TUNE_FLAGS builds, TUNE_ARGS rows), ab (AB_ENVS runs of
# ep_bench), abpatch (AB_PATCHES: source changes built apart, AB_CMD's benchmark interleaved over them), pdl (PDL_ARGS'
# router_bench rows without and with --pdl, interleaved), profile
# (Nsight Compute on the router (PROFILE_ROUTER_ARGS picks the rows) and EP kernels and a BITEP_TRACE=1 run of ep_bench:
# where the time goes), dram (Nsight Compute: the bytes a TE-compatible bitmap row's launches and its plain copies move).
# On one H200 at 187432f: build ~90 s, gpu ~75 s, multirank ~110 s (np 1 and the shared-GPU runs), sanitize ~400 s
# (memcheck 35, racecheck ~300, multi-rank memcheck ~35): PHASES=gpu,multirank,sanitize does not fit one call there.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
# The whole call must end inside the device tool's 600 s: each step gets what is left of BUDGET_S
# (default 560 s) and a step that cannot start with MIN_STEP_S left is skipped and reported as such.
BUDGET_S=${BUDGET_S:-560}
PHASES=${PHASES:-bench,ctest,sanitize,net}
on() { [[ ",$PHASES," == *",$1,"* ]]; }
MIN_STEP_S=20
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PATH=/usr/local/cuda/bin:$PATH
BUILD=$ROOT/build-device
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# The device tool sends the working tree without .git: the caller passes the commit.
COMMIT=${BITEP_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
export BITEP_COMMIT=$COMMIT

# ---- what the machine lacks comes from .deps/ (scripts/device-deps.sh packs it; carried) ----------
CMAKE_EXTRA=()
DEPS=$ROOT/.deps
DEPS_LOG=""
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  if [ -d "$DEPS/ompi" ]; then
    P=$DEPS/ompi/usr
    chmod +x "$P"/bin/* 2>/dev/null
    export OPAL_PREFIX=$P PATH=$P/bin:$PATH
    export LD_LIBRARY_PATH=$P/lib/x86_64-linux-gnu/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PMIX_MCA_mca_base_component_path=$P/lib/x86_64-linux-gnu/pmix2/lib/pmix
    export PMIX_INSTALL_PREFIX=$P/lib/x86_64-linux-gnu/pmix2
    export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp OMPI_MCA_osc=^ucx
    mkdir -p "$DEPS/syslib-use"
    for l in "$DEPS"/syslib/*; do
      ldconfig -p | grep -q "$(basename "$l") " || ln -sf "$l" "$DEPS/syslib-use/"
    done
    export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$DEPS/syslib-use
    DEPS_LOG+="mpi: carried Open MPI ($(ls "$DEPS/syslib-use" | tr '\n' ' ')from .deps/syslib); "
  else
    DEPS_LOG+="mpi: none (no mpirun, nothing carried); "
  fi
fi
if [ ! -f /usr/include/gtest/gtest.h ] && [ ! -f /usr/local/include/gtest/gtest.h ] && [ -d "$DEPS/gtest" ]; then
  CMAKE_EXTRA+=(-DGTEST_ROOT="$DEPS/gtest")
  DEPS_LOG+="gtest: carried; "
fi
NCCL_H=$(ls /usr/include/nccl.h /usr/local/cuda/include/nccl.h 2>/dev/null | head -1)
NCCL_SO=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so /usr/local/cuda/lib64/libnccl.so 2>/dev/null | head -1)
if [ -z "$NCCL_H" ] || [ -z "$NCCL_SO" ]; then
  # PyTorch's wheel (nvidia-nccl-cu13) holds a libnccl.so.2 and, usually, the header.
  [ -z "$NCCL_SO" ] && NCCL_SO=$(find /usr /opt -name 'libnccl.so*' -not -path '*/proc/*' 2>/dev/null | sort | head -1)
  [ -z "$NCCL_H" ] && NCCL_H=$(find /usr /opt -name nccl.h -not -path '*/proc/*' 2>/dev/null | head -1)
  [ -z "$NCCL_H" ] && [ -f "$DEPS/nccl/include/nccl.h" ] && NCCL_H=$DEPS/nccl/include/nccl.h
  if [ -n "$NCCL_SO" ] && [ -n "$NCCL_H" ]; then
    N=$DEPS/nccl-use
    rm -rf "$N" && mkdir -p "$N/include" "$N/lib"
    ln -s "$NCCL_H" "$N/include/nccl.h"
    ln -s "$NCCL_SO" "$N/lib/libnccl.so"
    export NCCL_HOME=$N LD_LIBRARY_PATH=$(dirname "$NCCL_SO")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
DEPS_LOG+="nccl: header $NCCL_H, library $NCCL_SO"

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
status=0
step() {  # step NAME LOGFILE CMD...: runs CMD under what is left of the budget, appends to LOGFILE,
  #         records PASS / FAIL / SKIP in the summary
  local name=$1 log=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ $left -lt $MIN_STEP_S ]; then
    printf '%-52s SKIP (budget spent)\n' "$name" | tee -a "$SUMMARY"
    status=1
    return 1
  fi
  # A call that built some targets alone (BUILD_TARGETS): a step whose program was not built ran nothing, and says so.
  local arg
  for arg in "$@"; do
    if [ -n "${BUILD_TARGETS:-}" ] && [[ $arg == "$BUILD"/* ]] && [ ! -e "$arg" ]; then
      printf '%-52s %s\n' "$name" "not run: ${arg#"$BUILD"/} is not among BUILD_TARGETS ($BUILD_TARGETS)" |
        tee -a "$SUMMARY"
      return 0
    fi
  done
  echo "== $name" | tee -a "$log"
  local t0=$SECONDS tmp
  tmp=$(mktemp)
  timeout -k 5 $left "$@" >"$tmp" 2>&1
  local rc=$?
  # A gtest run that selected no test proves nothing: count it as a failure.
  if [ $rc = 0 ] && grep -qE '\[  PASSED  \] 0 tests|No tests were found' "$tmp"; then
    echo "no test ran: check the filter" >>"$tmp"
    rc=3
  fi
  # STRICT_SKIPS=1 (gpu_step): the GPU steps on a machine with GPUs, where a skipped test (ctest's ***Skipped,
  # gtest's [  SKIPPED ], moe_layer's "SKIPPED --backend cuda") ran nothing: a failure, but for ALLOWED_SKIPS (a
  # test that needs more device memory).
  if [ $rc = 0 ] && [ "${STRICT_SKIPS:-0}" = 1 ]; then
    local skipped
    skipped=$(grep -E '\*\*\*Skipped|\[  SKIPPED \] [A-Za-z]|: SKIPPED' "$tmp" | grep -vE "${ALLOWED_SKIPS:-LargeTokenCount}" || true)
    if [ -n "$skipped" ]; then
      printf 'skipped on a machine with %s GPU(s):\n%s\n' "$NGPU" "$skipped" >>"$tmp"
      rc=4
    fi
  fi
  # 77: a multi-rank gtest run in which every test skipped on every rank (tests/multirank/main.cc): a skip where skips
  # are allowed, a failure in a gpu_step.
  if [ $rc = 77 ] && [ "${STRICT_SKIPS:-0}" != 1 ]; then
    cat "$tmp" >>"$log"
    rm -f "$tmp"
    printf '%-52s SKIP (every test skipped) (%ds)\n' "$name" $((SECONDS - t0)) | tee -a "$SUMMARY"
    return 0
  fi
  [ $rc = 124 ] && echo "timed out at the budget" >>"$tmp"
  cat "$tmp" >>"$log"
  rm -f "$tmp"
  printf '%-52s %s (%ds)\n' "$name" "$([ $rc = 0 ] && echo PASS || echo "FAIL rc=$rc")" $((SECONDS - t0)) | tee -a "$SUMMARY"
  [ $rc = 0 ] || status=1
  return $rc
}
gpu_step() { STRICT_SKIPS=1 step "$@"; }

{
  echo "commit $COMMIT  date $(date -u +%Y-%m-%dT%H:%M:%SZ)  gpus $NGPU  cores $(nproc)"
  echo "deps: $DEPS_LOG"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nvidia-smi topo -m
  nvcc --version | tail -2
  cmake --version | head -1
  g++ --version | head -1
  mpirun --version 2>&1 | head -1
  grep -m3 -E 'define NCCL_(MAJOR|MINOR|PATCH)' "${NCCL_H:-/dev/null}"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# abpatch: each patched tree is copied and built in the background beside the main build. Until the router forward's
# instances were split by bucket (kernels/router_topk_g*.cu) the main build's time was mostly that one translation unit
# (router_topk.cu): on one H200's 16 cores the tests built beside three router_bench builds in 183 s, against ~100-110 s
# alone and ~70-100 s for each router_bench build after it; on one H100 a router_bench build with two patched ones took
# 162-224 s. The abpatch phase waits for them and records each build as a step.
IFS=';' read -ra APS <<<"${AB_PATCHES:-}"
# AB_CMD may hold several argument lists of one benchmark, '|' between them ("router_bench --topk 32 | router_bench
# --topk 8"): each run of a build runs them all, in order, under one "# abpatch run" line.
IFS='|' read -ra ACMDS <<<"${AB_CMD:-router_bench --quick}"
read -ra ACMD <<<"${ACMDS[0]}"
for c in "${ACMDS[@]}"; do
  read -ra cw <<<"$c"
  [ "${cw[0]}" = "${ACMD[0]}" ] || { echo "AB_CMD: '${cw[0]}' is not '${ACMD[0]}': every '|'-separated command runs one benchmark" >&2; exit 2; }
done
AB_PIDS=()
AB_TREES=()
if on abpatch; then
  n=0
  for ap in "${APS[@]}"; do
    n=$((n + 1))
    PT=${TMPDIR:-/tmp}/bitep-abpatch-$n
    [[ $ap == /* ]] || ap=$ROOT/$ap
    rm -rf "$PT" && mkdir -p "$PT"
    tar -C "$ROOT" --exclude='./build-*' --exclude='./device-out' -cf - . | tar -C "$PT" -xf -
    timeout -k 5 $((BUDGET_S - SECONDS)) bash -c "cd '$PT' && patch -p1 < '$ap' &&
      cmake -S . -B build-abpatch -DCMAKE_BUILD_TYPE=Release -DBITEP_BUILD_TESTS=OFF ${CMAKE_EXTRA[*]} >/dev/null &&
      cmake --build build-abpatch -j $(nproc) --target ${ACMD[0]}" >"$PT.log" 2>&1 &
    AB_PIDS+=($!)
    AB_TREES+=("$PT")
  done
fi

# BUILD_TARGETS (space-separated cmake targets; default all) limits the build step, for a call that needs only some
# binaries (PHASES=abpatch AB_CMD="router_bench ..." with BUILD_TARGETS=router_bench: the base build without the tests).
step "build (-j$(nproc))" "$OUT/build.log" \
  bash -c "cmake -S '$ROOT' -B '$BUILD' -DCMAKE_BUILD_TYPE=Release ${CMAKE_EXTRA[*]} &&
    cmake --build '$BUILD' -j $(nproc) ${BUILD_TARGETS:+--target $BUILD_TARGETS}" || {
  tail -60 "$OUT/build.log"
  exit 1
}
grep -E 'bitep: (cuda|MPI)' "$OUT/build.log"
# On a GPU machine a build without the cuda backend and NCCL would pass every step by skipping: stop here.
if [ "$NGPU" -ge 1 ] && ! grep -qE 'bitep: cuda backend ON .*NCCL (ON|TRUE|1|YES)' "$OUT/build.log"; then
  printf '%-52s %s\n' "cuda backend with NCCL in the build" "FAIL (see build.log)" | tee -a "$SUMMARY"
  exit 1
fi

# Order: the benchmarks first (a quiet machine), then the GPU tests and the cuda backend over NCCL, then
# what CI also runs and the sanitizers (side by side on two GPUs), then the diagnostics.
LOG=$OUT/tests.log
BENCH=$OUT/bench.txt
MR=$BUILD/tests/multirank/bitep_multirank_tests
THR=$BUILD/tests/multirank/bitep_thread_tests
CUDA_FILTER=${MR_CUDA_FILTER:-EpCuda*:EpLowLatency/*Cuda*}
# Under the sanitizers: every GPU test but the multi-GiB 64-bit indexing one, one mid-size router grid.
# libnccl probes its kernels with cudaFuncGetAttributes and gets cudaErrorNoKernelImageForDevice for the
# architectures it was not built for (seen on H200, NCCL 2.28.3): API errors that are NCCL's, not
# memory errors. The multi-rank runs do not report API errors; memory errors still fail them.
MR_SAN_FLAGS="--tool memcheck --error-exitcode 1 --report-api-errors no"
# Under memcheck, the two fixed cuda-vs-host tests and the grid's edge scenarios (the whole grid is
# ~10x slower there than the budget of a device call allows).
G=EpCuda/EpCudaGrid.MatchesHostBackend
LL=EpLowLatency/EpLowLatency.MatchesDispatchCuda
MR_SAN_FILTER=${MR_SAN_FILTER:-EpCuda.*:$G/zero_tokens_odd_ranks:$G/all_to_last_rank:$G/L9_k4_align4:$G/k_eq_E_H5:$G/H7_fp32_align8:$G/no_weights:$LL/zero_tokens_odd_ranks:$LL/all_to_last_rank:$LL/L9_k4_align4:$LL/H7_fp32_align8}
# Under --leak-check full at W = 2: MR_SAN_FILTER's tests but CombineFailedOnOneRankLeavesTheGroupUnusable, whose rank 1
# times out in the combine's transfer (72 s under the tool), a transport failure after which its pool stays allocated
# by design: a peer may still write into it (src/ep/group.h pool_in_doubt; Pool::leak). The tests that end with a call
# every rank failed alone before queuing anything with its peers (EpCuda.BuffersOfAnotherMemorySpaceRefused, the
# low-latency tests' capture refusals) free their pools (pool_if_idle).
MR_LEAK_FILTER=${MR_LEAK_FILTER:-$MR_SAN_FILTER:-EpCuda.CombineFailedOnOneRankLeavesTheGroupUnusable}
GPU_SAN_FILTER=${SANITIZER_FILTER:-EpKernelsGpu.*:RouterGpu.*:Experts/RouterGrid.MatchesHostAndOracle/E130:-RouterGpu.LargeTokenCount*}

# BENCHES (default router,ep) picks the benchmarks of the bench phase; EP_BENCH_ARGS adds ep_bench arguments
# (--tokens 128,512: the decode sizes alone). ep_bench runs with --self-test-checks: its placement check must
# catch each corruption of a host copy of every row's layout.
BENCHES=${BENCHES:-router,ep}
if on bench; then
  [[ ",$BENCHES," == *",router,"* ]] &&
    step "router_bench" "$BENCH" "$BUILD/bench/router_bench" $QUICK --commit "$COMMIT" --json "$OUT/router.json"
  # shellcheck disable=SC2086
  [[ ",$BENCHES," == *",ep,"* ]] && step "ep_bench np$NGPU" "$BENCH" mpirun -np "$NGPU" -x BITEP_COMMIT \
    "$BUILD/bench/ep_bench" $QUICK --self-test-checks ${EP_BENCH_ARGS:-} --json "$OUT/ep.json"
  # At most 8 files come back from $OUT: the plots travel as one tar.
  if [ -f "$OUT/ep.json" ] && python3 -c 'import matplotlib' 2>/dev/null; then
    PLOTS=$(mktemp -d)
    step "ep plots" "$BENCH" bash -c "python3 '$ROOT/bench/plot_ep.py' '$OUT/ep.json' --out '$PLOTS' && tar -C '$PLOTS' -cf '$OUT/plots.tar' ."
  elif [ -f "$OUT/ep.json" ]; then
    printf '%-52s %s\n' "ep plots" "not drawn: no matplotlib here (bench/plot_ep.py ep.json draws them)" | tee -a "$SUMMARY"
  fi
fi

# The GPU tests one ctest entry each, side by side, each under GPU_TEST_TIMEOUT_S: a kernel that hangs costs
# one entry's timeout and names its test (run as one process, a hang once took the whole call's budget).
# GPU_FILTER (a gtest filter) runs the binary on those tests alone, under GPU_TIMEOUT_S in all.
if on gpu; then
  if [ -n "${GPU_FILTER:-}" ]; then
    gpu_step "gpu tests (bitep_gpu_tests $GPU_FILTER)" "$LOG" timeout "${GPU_TIMEOUT_S:-240}" \
      "$BUILD/tests/bitep_gpu_tests" --gtest_filter="$GPU_FILTER"
  else
    gpu_step "gpu tests (ctest -L gpu)" "$LOG" ctest --test-dir "$BUILD" -L gpu -j 4 --timeout "${GPU_TEST_TIMEOUT_S:-150}" \
      --output-on-failure
  fi
fi
# scripts/demo.sh's GPU path: the MoE layer on every GPU, cuda backend (fails on a wrong value, or when the
# build has no CUDA + cuBLAS path).
if { on gpu || on ctest; } && [ -n "${BUILD_TARGETS:-}" ] && [ ! -x "$BUILD/examples/moe_layer" ]; then
  # A call that built some targets alone (BUILD_TARGETS=bitep_gpu_tests): the demo was not built, so nothing ran.
  printf '%-52s %s\n' "demo: moe_layer" "not run: not among BUILD_TARGETS ($BUILD_TARGETS)" | tee -a "$SUMMARY"
elif on gpu || on ctest; then
  gpu_step "demo: moe_layer np$NGPU --backend cuda" "$LOG" mpirun -np "$NGPU" "$BUILD/examples/moe_layer" --backend cuda
  # The decode path: the low-latency calls one by one, then the whole step in one CUDA graph (launched per iteration,
  # every launch but the last on other inputs).
  gpu_step "demo: moe_layer np$NGPU --backend cuda --low-latency" "$LOG" mpirun -np "$NGPU" "$BUILD/examples/moe_layer" \
    --backend cuda --low-latency --tokens 128
  gpu_step "demo: moe_layer np$NGPU --backend cuda --graph" "$LOG" mpirun -np "$NGPU" "$BUILD/examples/moe_layer" \
    --backend cuda --graph --tokens 128 --iters 8
fi
# The two-GPU steps (NVLink, the network transport, np 2 under memcheck) say so when they cannot run.
if [ "$NGPU" -lt 2 ] && { on multirank || on net || on sanitize; }; then
  printf '%-52s %s\n' "multirank cuda np2 steps (NCCL)" "not run: $NGPU GPU(s) here, they need 2" | tee -a "$SUMMARY"
fi
if on multirank; then
  # BITEP_SPLIT_MIN_BYTES=0: every call takes the large-call path, the peer window (or, BITEP_LSA=0, the
  # split all-to-all); BITEP_TRACE=1 logs whether each group got a window.
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, peer window)" "$LOG" \
    mpirun -np 2 -x BITEP_TRACE=1 -x BITEP_SPLIT_MIN_BYTES=0 "$MR" --gtest_filter="$CUDA_FILTER"
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, defaults)" "$LOG" mpirun -np 2 "$MR" --gtest_filter="$CUDA_FILTER"
  # BITEP_WINDOW_CHUNKS=0: the window's large dispatches copy the peers' rows after a barrier, not on arrival.
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, peer window, no arrival chunks)" "$LOG" \
    mpirun -np 2 -x BITEP_WINDOW_CHUNKS=0 -x BITEP_SPLIT_MIN_BYTES=0 "$MR" --gtest_filter="$CUDA_FILTER"
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, split all-to-all: BITEP_LSA=0)" "$LOG" \
    mpirun -np 2 -x BITEP_LSA=0 -x BITEP_SPLIT_MIN_BYTES=0 "$MR" --gtest_filter="$CUDA_FILTER"
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, NCCL count exchange and small all-to-all)" "$LOG" \
    mpirun -np 2 -x BITEP_LSA_EXCHANGE=0 -x BITEP_LSA_SMALL=0 "$MR" --gtest_filter="$CUDA_FILTER"
  [ "$NGPU" -ge 2 ] && gpu_step "multirank cuda np2 (NVLink, split all-to-all rows beside the window)" "$LOG" \
    mpirun -np 2 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_LSA_DISPATCH=0 "$MR" --gtest_filter="$CUDA_FILTER"
  gpu_step "multirank cuda np1" "$LOG" mpirun -np 1 "$MR" --gtest_filter="$CUDA_FILTER"
  # A call refused while another thread is held inside a dispatch, and a group's calls from thread after thread.
  [ "$NGPU" -ge 2 ] && gpu_step "threads cuda np2 (NCCL)" "$LOG" \
    mpirun -np 2 -x BITEP_TEST_MPI_THREAD=multiple "$THR" --gtest_filter='ThreadsMultipleCuda.*'
  # Ranks sharing a GPU (BITEP_CUDA_TRANSPORT=ipc: MPI and CUDA IPC instead of NCCL, comm/mpi_ipc_transport.h):
  # the multi-rank kernels and the peer window's paths at W = 2 and 4 where fewer GPUs than ranks are lent
  # (SHARED_GPU=1: on more GPUs too). The all-to-alls without the window are staged through the host.
  if [ "$NGPU" -lt 2 ] || [ "${SHARED_GPU:-0}" = 1 ]; then
    T_IPC=${SHARED_GPU_TIMEOUT_S:-240}
    ipc_step() {  # ipc_step NAME NP [-x VAR=value ...]
      gpu_step "$1" "$LOG" timeout "$T_IPC" mpirun -np "$2" -x BITEP_CUDA_TRANSPORT=ipc "${@:3}" "$MR" \
        --gtest_filter="$CUDA_FILTER"
    }
    ipc_step "multirank cuda np2 shared GPU (IPC window)" 2 -x BITEP_TRACE=1
    ipc_step "multirank cuda np2 shared GPU (IPC window, split)" 2 -x BITEP_SPLIT_MIN_BYTES=0
    ipc_step "multirank cuda np3 shared GPU (IPC window, split)" 3 -x BITEP_SPLIT_MIN_BYTES=0
    ipc_step "multirank cuda np4 shared GPU (IPC window, split)" 4 -x BITEP_SPLIT_MIN_BYTES=0
    ipc_step "multirank cuda np8 shared GPU (IPC window)" 8
    ipc_step "multirank cuda np2 shared GPU (copy-engine rows)" 2 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_WINDOW_ROWS=ce
    ipc_step "multirank cuda np2 shared GPU (bulk rows)" 2 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_WINDOW_ROWS=bulk
    ipc_step "multirank cuda np2 shared GPU (no arrival chunks)" 2 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_WINDOW_CHUNKS=0
    ipc_step "multirank cuda np2 shared GPU (rows by all-to-all)" 2 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_LSA_DISPATCH=0
    ipc_step "multirank cuda np2 shared GPU (counts, small calls staged)" 2 -x BITEP_LSA_EXCHANGE=0 -x BITEP_LSA_SMALL=0
    ipc_step "multirank cuda np2 shared GPU (no window: staged all-to-all)" 2 -x BITEP_LSA=0 -x BITEP_SPLIT_MIN_BYTES=0
    ipc_step "multirank cuda np3 shared GPU (no window)" 3 -x BITEP_LSA=0
    gpu_step "threads cuda np2 shared GPU" "$LOG" timeout "$T_IPC" mpirun -np 2 -x BITEP_CUDA_TRANSPORT=ipc \
      -x BITEP_TEST_MPI_THREAD=multiple "$THR" --gtest_filter='ThreadsMultipleCuda.*'
    # ep_bench's checks at W = 2 on the shared GPU (--no-nccl is implied; its times mean nothing here): every
    # size of the grid through the window, with and without arrival chunks (the second found a stale window table).
    gpu_step "ep_bench np2 shared GPU (checks)" "$LOG" timeout "$T_IPC" mpirun -np 2 -x BITEP_CUDA_TRANSPORT=ipc \
      "$BUILD/bench/ep_bench" --self-test-checks --iters 2 --warmup 1
    gpu_step "ep_bench np2 shared GPU (checks, no arrival chunks)" "$LOG" timeout "$T_IPC" mpirun -np 2 \
      -x BITEP_CUDA_TRANSPORT=ipc -x BITEP_WINDOW_CHUNKS=0 "$BUILD/bench/ep_bench" --self-test-checks --iters 2 --warmup 1
    # The rank-major-only dispatch (no expert-major rows) against a dispatch with both views, every size.
    gpu_step "ep_bench np2 shared GPU (checks, rank-major only)" "$LOG" timeout "$T_IPC" mpirun -np 2 \
      -x BITEP_CUDA_TRANSPORT=ipc "$BUILD/bench/ep_bench" --self-test-checks --rank-major-only --iters 2 --warmup 1
  fi
fi

# The GPU tests of GPU_SAN_FILTER under one compute-sanitizer tool, one process per test, 8 at a time
# (a sanitized run is ~10x slower; one process for all of them does not fit a device call). Tools: memcheck,
# racecheck, initcheck (reads of device memory nothing wrote), synccheck (barriers and warp syncs misused), and
# leakcheck: memcheck with --leak-check full (device allocations alive at the process's end, each test its own process).
san_each() {
  local tool=$1 tests flags=(--tool "$1")
  [ "$tool" = leakcheck ] && flags=(--tool memcheck --leak-check full)
  tests=$("$BUILD/tests/bitep_gpu_tests" --gtest_list_tests --gtest_filter="$GPU_SAN_FILTER" |
    awk '/^[^ ]/ {suite = $1} /^  / {print suite $1}') || return 3
  [ -n "$tests" ] || { echo "no test matches $GPU_SAN_FILTER"; return 3; }
  echo "$(echo "$tests" | wc -l) tests under $tool"
  # BITEP_TEST_SANITIZER: the tests that need kernels to overlap (RouterPdl's dependent launches) learn that the tool
  # runs kernels one at a time.
  echo "$tests" | BITEP_TEST_SANITIZER=$tool xargs -P 8 -I{} compute-sanitizer "${flags[@]}" --error-exitcode 1 \
    "$BUILD/tests/bitep_gpu_tests" --gtest_filter={}
}
export BUILD GPU_SAN_FILTER
export -f san_each
# The multi-rank tests under memcheck: np 1 (MR_SAN_FILTER), then two ranks on this GPU through the IPC window
# (BITEP_CUDA_TRANSPORT=ipc), every call split. mr_san LOG NAME NP2_FILTER [more compute-sanitizer flags].
mr_san() {
  local log=$1 name=$2 np2_filter=$3
  shift 3
  gpu_step "multirank cuda np1 $name" "$log" mpirun -np 1 -x BITEP_TEST_TIMEOUT_S=180 \
    compute-sanitizer $MR_SAN_FLAGS "$@" "$MR" --gtest_filter="$MR_SAN_FILTER"
  [ "$NGPU" -lt 2 ] && gpu_step "multirank cuda np2 shared GPU $name (split)" "$log" \
    mpirun -np 2 -x BITEP_CUDA_TRANSPORT=ipc -x BITEP_TEST_TIMEOUT_S=180 -x BITEP_SPLIT_MIN_BYTES=0 \
    compute-sanitizer $MR_SAN_FLAGS "$@" "$MR" --gtest_filter="$np2_filter"
}
sanitize_one_gpu() {  # the single-GPU sanitizer passes
  # SAN_TOOLS (space-separated; default "memcheck racecheck"; san_each lists the others) picks the tools, for a call
  # short of device time; SAN_TOOLS=none runs the multi-rank memcheck steps alone.
  # Racecheck goes last: it is the longest step (~300 s) and, one process a test, leaves each finished test's result
  # when the call's budget cuts it, where a cut multi-rank step leaves none (one H100 at 8ba74a1: build 109 s,
  # memcheck 42, racecheck 309, np 1 memcheck 29, and the np 2 shared-GPU memcheck cut at 71 s inside
  # EpCuda.CombineFailedOnOneRankLeavesTheGroupUnusable, whose rank 1 waits out an 18 s group timeout).
  local tool tools=${SAN_TOOLS:-memcheck racecheck}
  [[ " $tools " == *" memcheck "* ]] && gpu_step "gpu tests under compute-sanitizer memcheck" "$1" bash -c "san_each memcheck"
  # SAN_MULTIRANK=0: the single-GPU tests alone (a router-only change). The multi-rank memcheck steps run where the
  # tools include memcheck, or are none; leakcheck's where they include it.
  if [ "${SAN_MULTIRANK:-1}" != 0 ]; then
    [[ " $tools " == *" memcheck "* || " $tools " == *" none "* ]] && mr_san "$1" memcheck "$MR_SAN_FILTER"
    # Device memory alive at each rank's end: every group and handle destroyed must have given all of it back.
    [[ " $tools " == *" leakcheck "* ]] && mr_san "$1" leakcheck "$MR_LEAK_FILTER" --leak-check full
  fi
  for tool in $tools; do
    [ "$tool" = memcheck ] || [ "$tool" = none ] ||
      gpu_step "gpu tests under compute-sanitizer $tool" "$1" bash -c "san_each $tool"
  done
}
if on ctest && on sanitize && [ "$NGPU" -ge 2 ]; then
  # Two GPUs: the single-GPU sanitizer passes run on GPU 1 while ctest runs.
  SANLOG=$(mktemp)
  (export CUDA_VISIBLE_DEVICES=1 && sanitize_one_gpu "$SANLOG") &
  step "ctest: every registered test" "$LOG" ctest --test-dir "$BUILD" -j "$(nproc)" --output-on-failure --timeout 300
  wait
  cat "$SANLOG" >>"$LOG"
else
  on ctest && step "ctest: every registered test" "$LOG" ctest --test-dir "$BUILD" -j "$(nproc)" --output-on-failure --timeout 300
  on sanitize && sanitize_one_gpu "$LOG"
fi
if [ "$NGPU" -ge 2 ]; then
  on net && gpu_step "multirank cuda np2 (NCCL net transport)" "$LOG" \
    mpirun -np 2 -x NCCL_P2P_DISABLE=1 -x NCCL_SHM_DISABLE=1 "$MR" --gtest_filter="$CUDA_FILTER"
  # BITEP_SPLIT_MIN_BYTES=0: every dispatch and combine splits (side stream beside the all-to-all).
  on net && gpu_step "multirank cuda np2 (NCCL net transport, split)" "$LOG" \
    mpirun -np 2 -x NCCL_P2P_DISABLE=1 -x NCCL_SHM_DISABLE=1 -x BITEP_SPLIT_MIN_BYTES=0 "$MR" --gtest_filter="$CUDA_FILTER"
  on sanitize && gpu_step "multirank cuda np2 memcheck (split, peer window)" "$LOG" \
    mpirun -np 2 -x BITEP_TEST_TIMEOUT_S=180 -x BITEP_SPLIT_MIN_BYTES=0 compute-sanitizer $MR_SAN_FLAGS "$MR" \
    --gtest_filter="$MR_SAN_FILTER"
  on sanitize && gpu_step "multirank cuda np2 memcheck (split all-to-all: BITEP_LSA=0)" "$LOG" \
    mpirun -np 2 -x BITEP_TEST_TIMEOUT_S=180 -x BITEP_SPLIT_MIN_BYTES=0 -x BITEP_LSA=0 compute-sanitizer $MR_SAN_FLAGS "$MR" \
    --gtest_filter="$MR_SAN_FILTER"
fi

if on tune; then
  # Tuning builds: each ';'-separated entry of TUNE_FLAGS (extra CUDA flags, e.g. -DBITEP_ROUTER_FWD_MIN_BLOCKS=6)
  # builds router_bench apart and runs its TUNE_ARGS rows (default: --quick) next to the default build's.
  read -ra TARGS <<<"${TUNE_ARGS:---quick}"
  step "router_bench ${TARGS[*]} (default build)" "$BENCH" "$BUILD/bench/router_bench" "${TARGS[@]}" --iters 200
  IFS=';' read -ra TUNES <<<"${TUNE_FLAGS:-}"
  n=0
  for f in "${TUNES[@]}"; do
    n=$((n + 1))
    TB=$ROOT/build-tune-$n
    step "tune $n build ($f)" "$OUT/build.log" bash -c "cmake -S '$ROOT' -B '$TB' -DCMAKE_BUILD_TYPE=Release \
      -DBITEP_BUILD_TESTS=OFF -DCMAKE_CUDA_FLAGS='$f' ${CMAKE_EXTRA[*]} >/dev/null && cmake --build '$TB' -j $(nproc) --target router_bench" &&
      step "tune $n router_bench ${TARGS[*]} ($f)" "$BENCH" "$TB/bench/router_bench" "${TARGS[@]}" --iters 200
  done
fi
if on ab; then
  # A/B of runtime settings in one session: ep_bench once per ';'-separated entry of AB_ENVS (space-separated
  # VAR=value pairs, passed to every rank), e.g. AB_ENVS="BITEP_SPLIT_MIN_BYTES=0;BITEP_SPLIT_MIN_BYTES=1000000000000".
  IFS=';' read -ra ABS <<<"${AB_ENVS:-}"
  for envs in "${ABS[@]}"; do
    xs=()
    for kv in $envs; do xs+=(-x "$kv"); done
    step "ep_bench A/B ($envs)" "$BENCH" env $envs mpirun -np "$NGPU" "${xs[@]}" "$BUILD/bench/ep_bench" \
      --tokens "${AB_TOKENS:-2048,4096,16384}" --routing "${AB_ROUTING:-uniform}" --no-baseline
  done
fi
if on abpatch; then
  # A/B of source changes in one call: each ';'-separated patch of AB_PATCHES (git diffs, paths from the root) is
  # applied to a copy of the tree, built apart ($TMPDIR/bitep-abpatch-N/build-abpatch; router_bench and ep_bench
  # link the library statically, so each binary runs its own tree's code). Then AB_CMD (a benchmark and its
  # arguments, e.g. "router_bench --bwd --configs softmax --experts 256" or "ep_bench --tokens 128,256 --no-baseline",
  # which runs under mpirun -np NGPU) runs AB_REPEATS times (default 2) over the default build and each patched one,
  # interleaved, in the reverse order on even repeats. Every run's output goes to bench.txt under a
  # "# abpatch run R: NAME" line; router_bench's header and JSON name the commit and the patch. For router_bench,
  # bench/ab_summary.py then compares the builds row by row, each row's time over its run's stream time: whole runs
  # shift by a few percent, the stream column with them (2026-12-03: one run of four 3% faster on every row).
  names=(base)
  dirs=("$BUILD")
  for n in "${!APS[@]}"; do
    ap=${APS[$n]} PT=${AB_TREES[$n]}
    wait "${AB_PIDS[$n]}"
    rc=$?
    step "abpatch $((n + 1)) build ($ap)" "$OUT/build.log" bash -c "tail -40 '$PT.log'; exit $rc" && {
      names+=("$(basename "$ap")")
      dirs+=("$PT/build-abpatch")
    }
  done
  for r in $(seq 1 "${AB_REPEATS:-2}"); do
    order=("${!names[@]}")
    [ $((r % 2)) = 0 ] && mapfile -t order < <(printf '%s\n' "${!names[@]}" | tac)
    for i in "${order[@]}"; do
      echo "# abpatch run $r: ${names[$i]}" >>"$BENCH"
      for c in "${ACMDS[@]}"; do
        read -ra cw <<<"$c"
        run=("${dirs[$i]}/bench/${cw[0]}" "${cw[@]:1}")
        [ "${cw[0]}" = router_bench ] && run+=(--commit "$COMMIT+${names[$i]}")
        [ "${cw[0]}" = ep_bench ] && run=(mpirun -np "$NGPU" -x BITEP_COMMIT="$COMMIT+${names[$i]}" "${run[@]}")
        step "abpatch run $r ${names[$i]}: ${cw[*]:1}" "$BENCH" "${run[@]}"
      done
    done
  done
  [ "${ACMD[0]}" = router_bench ] && [ "${#names[@]}" -gt 1 ] &&
    step "abpatch summary (bench/ab_summary.py)" "$BENCH" python3 "$ROOT/bench/ab_summary.py" "$BENCH"
fi
if on pdl; then
  # BITEP_LAUNCH_PDL against plain launches, on the default build: router_bench's PDL_ARGS rows without and with --pdl
  # (every timed kernel a dependent launch), interleaved AB_REPEATS times (default 2; the reverse order on even
  # repeats), under abpatch's run headers in their own file (pdl.txt: apart from an abpatch phase's runs), then
  # bench/ab_summary.py with the --pdl runs as the patched build. Used when bench is off (router.json's place).
  PDLB=$OUT/pdl.txt
  read -ra PARGS <<<"${PDL_ARGS:---quick}"
  for r in $(seq 1 "${AB_REPEATS:-2}"); do
    variants=(plain pdl)
    [ $((r % 2)) = 0 ] && variants=(pdl plain)
    for v in "${variants[@]}"; do
      echo "# abpatch run $r: $v" >>"$PDLB"
      extra=()
      [ "$v" = pdl ] && extra=(--pdl)
      step "pdl run $r $v: ${PARGS[*]}" "$PDLB" "$BUILD/bench/router_bench" "${PARGS[@]}" "${extra[@]}" \
        --commit "$COMMIT+$v"
    done
  done
  step "pdl summary (bench/ab_summary.py)" "$PDLB" python3 "$ROOT/bench/ab_summary.py" "$PDLB"
fi
if on profile; then
  # Where the router's time goes (Nsight Compute, clocks left alone), and the host phases of dispatch and
  # combine (BITEP_TRACE=1: one stderr line per call and rank). PROFILE_ROUTER_ARGS: router_bench's arguments for the
  # two router steps (default --quick: T = 16384, E = 256 softmax and DeepSeek-V3, bf16; launch 40 is a timed launch of
  # the first row, e.g. "--fwd --bf16 --configs deepseek-v2 --tokens 65536" for DeepSeek-V2's TE-compatible bytemap
  # row). PROFILE_SASS_MATCH: a fragment of the mangled name of the kernels whose SASS is dumped (default the one-octet
  # 32-lane bf16 instances). PROFILE_EP=0 leaves out the EP steps.
  read -ra PRA <<<"${PROFILE_ROUTER_ARGS:---quick --iters 100}"
  SASS_MATCH=${PROFILE_SASS_MATCH:-router_forward_bucketILi32ELi1ELb0E}
  step "ncu router_forward (${PRA[*]})" "$BENCH" ncu --clock-control none --kernel-name regex:router_forward \
    --launch-skip 40 --launch-count 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    "$BUILD/bench/router_bench" "${PRA[@]}"
  # Executed instructions per SASS line of one router_forward launch: where the instructions go. The CSV travels in
  # plots.tar (at most 8 files come back), the SASS dump of the matching kernels gzipped beside it (at stop 88 the dump
  # alone, 232579 lines, took plots.tar past the 16 MiB a file that comes back).
  PROF=$(mktemp -d)
  step "ncu router_forward SASS counts" "$BENCH" bash -c "ncu --clock-control none --kernel-name regex:router_forward \
    --launch-skip 40 --launch-count 1 --section SourceCounters --section InstructionStats --page source \
    --print-source sass --csv '$BUILD/bench/router_bench' ${PRA[*]} >'$PROF/router_forward_sass.csv' &&
    cuobjdump -sass '$BUILD/libbitep.so' | awk '/Function :/ {p = /$SASS_MATCH/} p' \
      >'$PROF/router_forward.sass' 2>&1 &&
    wc -l '$PROF'/* && gzip -9 '$PROF/router_forward.sass' && tar -C '$PROF' -rf '$OUT/plots.tar' ."
fi
if on dram; then
  # The bytes the launches of a TE-compatible bitmap row (T = 16384, E = 256, bf16) and of its plain copies move, at the
  # L2 from the SMs and at DRAM (bench/ncu_dram.py), clocks and caches left alone, so that each launch meets the dirty
  # lines of the one before as in the timed loops. DRAM_CONFIGS: router_bench's config names at E = 256. A config's
  # launches come in order: the bytemap row's 750 (its stream kernels' 535, four shapes timed and the best batched,
  # then its own 215: the check, the launch and the batch timings), then the bitmap row's 750, which are profiled.
  # The CSVs travel in plots.tar.
  PROF=$(mktemp -d)
  for c in ${DRAM_CONFIGS:-softmax softmax-pre deepseek-v3}; do
    step "ncu DRAM bytes ($c, T=16384 E=256 bf16 te bitmap)" "$BENCH" bash -c "ncu --clock-control none \
      --cache-control none --kernel-name regex:'router_forward_bucket|stream_kernel' --launch-skip 750 \
      --launch-count 750 --csv --print-units base --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_write.sum \
      '$BUILD/bench/router_bench' --fwd --bf16 --experts 256 --tokens 16384 --configs $c >'$PROF/dram-$c.csv' &&
      python3 '$ROOT/bench/ncu_dram.py' '$PROF/dram-$c.csv' 16384 256 bf16"
  done
  tar -C "$PROF" -rf "$OUT/plots.tar" .
fi
if on profile && [ "${PROFILE_EP:-1}" != 0 ]; then
  # Each EP kernel against its own HBM floor (one rank: the kernels are the same, NCCL stays out of ncu).
  step "ncu ep kernels (W=1, T=4096)" "$BENCH" mpirun -np 1 ncu --clock-control none \
    --kernel-name regex:'layout|permute|expert_|reduce|final_sum|weight_grad' --launch-skip 20 --launch-count 12 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis \
    "$BUILD/bench/ep_bench" --tokens 4096 --iters 3 --warmup 1 --routing uniform --no-baseline
  # The layout alone warm, after an L2 flush, and after a flush and the same launch on other buffers: whether a small
  # kernel's cold time is its code's fetch or its data's (bench/NOTES.md, "The small dispatch's kernels").
  step "layout_micro (warm / cold / code warm)" "$BENCH" bash -c \
    "'$BUILD/bench/layout_micro' 128 256 1 && '$BUILD/bench/layout_micro' 128 256 8 && '$BUILD/bench/layout_micro' 4096 128 1"
  step "ep_bench traced (BITEP_TRACE=1)" "$BENCH" mpirun -np "$NGPU" -x BITEP_TRACE=1 "$BUILD/bench/ep_bench" \
    --tokens 128,4096 --iters 3 --warmup 1 --routing uniform
fi
# Steps run in the background record only in the summary.
grep -qE 'FAIL|SKIP' "$SUMMARY" && status=1
echo
echo "== summary (commit $COMMIT, $SECONDS s)"
cat "$SUMMARY"
grep -E -A3 'FAILED|Failure|error' "$LOG" 2>/dev/null | head -60
tail -60 "$BENCH" 2>/dev/null
exit $status
