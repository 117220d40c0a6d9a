#!/usr/bin/env bash
# The GPU check: one run on a fresh GPU machine gives one verdict. It builds hyperfused._C against that
# machine's torch for the GPU that is there (without the CUDA backend it fails the run but goes on with the
# Triton backend, which needs no build), runs every GPU test (no -x; each test with a timeout; Triton
# compiles in parallel), runs small cases of the CUDA and Triton paths under compute-sanitizer, then times
# the fused backends against cuDNN and the GEMM floor with TF32 on and off, under bfloat16 autocast, and
# replayed as CUDA graphs, profiles where the time goes (both backends, at B = 128 and B = 8), and times a
# sampling step (decode) with the ops' own graphs off and on. Every step has its own time limit and its own
# line in summary.txt; the exit status is non-zero if any step failed. Nothing goes to /dev/null.
#
#   device run: bash benchmarks/gpu_check.sh            (timeout_s=540; about 8 minutes on an H200)
#   here:       bash benchmarks/gpu_check.sh --rehearse (no GPU: every step that can run without one)
#
# A machine without a CUDA compiler fails the build, and then times only Triton against cuDNN. A build made
# here for the GPU machine's Python 3.12 and torch 2.11 can travel with the run instead (a failed build
# leaves it in place; 29 MB, within the device tool's carry; it loads where torch 2.11 is the CUDA 13.0
# build): make the venv with `bash scripts/test_gpu_machine_versions.sh -k none`, then rehearse with
# `CUDA_HOME=<.venv's site-packages/nvidia/cu13> PYTHON=.venv-gpu-versions/bin/python
# bash benchmarks/gpu_check.sh --rehearse` (its build step compiles for sm_80 and sm_90), and carry
# hyperfused/_C.cpython-312-x86_64-linux-gnu.so.
#
# Writes at most 8 files to $OUT (the device tool brings back no more): env.txt, build.log, tests.log,
# sanitizer.log, timings.json, timings.log, breakdown.txt, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # built on the machine it runs on: -march=native is right there
unset TRITON_INTERPRET
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under a time limit, records PASS/FAIL/TIMEOUT with its duration.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local verdict=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAIL (exit $rc)"; fi
  [ "$verdict" = PASS ] || FAILED=1
  echo "$name: $verdict in $((SECONDS - t0))s" | tee -a "$SUMMARY"
  return $rc
}

{ date -u +%FT%TZ; git rev-parse --short HEAD 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  echo "nvcc: $(command -v nvcc || echo none)"; nvcc --version 2>&1 | tail -2
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo none)"; nproc; } > "$OUT/env.txt"
cat "$OUT/env.txt"

# -- build: the CUDA compiler of the machine, else the nvidia-cuda-nvcc wheel (which needs libcudart.so) ----
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc > /dev/null; then
  PIP_CUDA=$($PY -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', 'cu13'))")
  if [ -x "$PIP_CUDA/bin/nvcc" ]; then
    export CUDA_HOME=$PIP_CUDA
    [ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
  fi
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the GPU that is here, else Ampere and Hopper
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "8.0;9.0")
fi
export TORCH_CUDA_ARCH_LIST
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >> "$OUT/env.txt"
step build 240 bash -c "MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace > '$OUT/build.log' 2>&1" \
  || { tail -40 "$OUT/build.log"; }
# Without the CUDA backend (no compiler there, or a carried build that does not load) the run is failed but
# goes on with what needs no build: the Triton backend's tests, timings and breakdown beside cuDNN.
FUSED="cuda triton"
if ! $PY -c "import hyperfused, sys; b = hyperfused.available_backends(); print('backends:', b); sys.exit('cuda' not in b)"; then
  echo "cuda backend: FAIL (not in hyperfused.available_backends() after the build; going on with Triton)" \
    | tee -a "$SUMMARY"
  FAILED=1
  FUSED="triton"
fi

# -- tests: every GPU test, each with a time limit, in parallel where pytest-xdist is installed ------------
GPU_TESTS=$(grep -v '^#' benchmarks/gpu_tests.txt | tr '\n' ' ')
PARALLEL=""
$PY -c "import xdist" 2>/dev/null && PARALLEL="-n 8"
TIMEOUT_OPT=""
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=150"
if [ $REHEARSE = 1 ]; then
  step tests-collect 120 bash -c "$PY -m pytest -q --collect-only -p no:cacheprovider $GPU_TESTS > '$OUT/tests.log' 2>&1"
else
  # Sanitizer runs go alongside the tests (one GPU, small cases); their logs are joined into one file below.
  SAN_DIR=$(mktemp -d)
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck initcheck racecheck synccheck; do
      for backend in $FUSED; do
        ( timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 $PY -m benchmarks.gpu_smoke --backend "$backend" \
            > "$SAN_DIR/$tool-$backend.log" 2>&1; echo "exit $?" >> "$SAN_DIR/$tool-$backend.log" ) &
      done
    done
  fi
  step tests 300 bash -c "$PY -m pytest -q -rs $PARALLEL $TIMEOUT_OPT -p no:cacheprovider $GPU_TESTS > '$OUT/tests.log' 2>&1"
  tail -25 "$OUT/tests.log"
  wait
  : > "$OUT/sanitizer.log"
  if command -v compute-sanitizer > /dev/null; then
    for f in "$SAN_DIR"/*.log; do
      name=$(basename "$f" .log); rc=$(tail -1 "$f")
      { echo "===== $name: $rc"; tail -60 "$f"; } >> "$OUT/sanitizer.log"
      case "$rc" in
        "exit 0") echo "sanitizer $name: PASS" >> "$SUMMARY" ;;
        "exit 99") echo "sanitizer $name: FAIL (errors found)" >> "$SUMMARY"; FAILED=1 ;;
        *) echo "sanitizer $name: DID NOT RUN ($rc; see sanitizer.log: it refuses the device on some machines)" >> "$SUMMARY" ;;
      esac
    done
  else
    echo "compute-sanitizer not found" | tee -a "$OUT/sanitizer.log" "$SUMMARY"
  fi
fi

# -- timings (JSON rewritten after each config) and the per-part breakdown ----------------------------------
if [ $REHEARSE = 1 ]; then
  step timings-dry-run 60 bash -c "$PY -m benchmarks.gpu_timings --dry-run --json '$OUT/timings.json' > '$OUT/timings.log' 2>&1"
  step breakdown-help 60 bash -c "$PY -m benchmarks.breakdown --help > '$OUT/breakdown.txt' 2>&1"
else
  step timings 200 bash -c "$PY -m benchmarks.gpu_timings --repeats 5 --json '$OUT/timings.json' > '$OUT/timings.log' 2>&1"
  tail -30 "$OUT/timings.log"
  # The paper's batch and a small one (B = 8, where one block per row leaves most SMs idle), both backends;
  # CUDA also with the other launch shapes (cuda-g1: one thread group of 256 per row instead of the gate layer
  # norms side by side in four, which both batches get on an H200; cuda-c1 at B = 8: one block per row
  # instead of the main cell's cluster of four).
  ROWS_128="cuda cuda-g1 triton"; ROWS_8="cuda cuda-g1 cuda-c1 triton"
  [ "$FUSED" = triton ] && ROWS_128=triton && ROWS_8=triton
  step breakdown 150 bash -c "for b in 128 8; do rows=\$([ \$b = 8 ] && echo '$ROWS_8' || echo '$ROWS_128'); for be in \$rows; do \
    echo \"=== B=\$b \$be\"; HYPERFUSED_CUDA_THREAD_GROUPS=\$([ \$be = cuda-g1 ] && echo 1) \
    HYPERFUSED_CUDA_CLUSTER=\$([ \$be = cuda-c1 ] && echo 1) $PY -m benchmarks.breakdown \
    --config 100,\$b,128,1000 --backend \${be%-*} --device cuda --iters 3 --top 8; done; done > '$OUT/breakdown.txt' 2>&1"
  cat "$OUT/breakdown.txt"
fi

# -- sampling latency: one decode step of a cell, and a layer called with T = 1, beside nn.LSTMCell and nn.LSTM,
# with the ops' own CUDA graphs off and on. Last, so that running out of time loses only this; appended to
# timings.log (the device tool brings back eight files).
DECODE_DEVICE=cuda
[ $REHEARSE = 1 ] && DECODE_DEVICE=cpu
step decode 150 bash -c "set -o pipefail; for g in 0 1; do echo \"=== decode, HYPERFUSED_CUDA_GRAPHS=\$g\"; \
  HYPERFUSED_CUDA_GRAPHS=\$g $PY -m benchmarks --device $DECODE_DEVICE --sections decode --repeats 5 --compile none \
  2>&1 | grep -v 'it/s\|run/s\|s/run' || exit 1; done >> '$OUT/timings.log' 2>&1"
tail -40 "$OUT/timings.log"

echo "== summary"
cat "$SUMMARY"
[ $FAILED = 0 ] && echo "VERDICT: PASS" | tee -a "$SUMMARY" || echo "VERDICT: FAIL" | tee -a "$SUMMARY"
exit $FAILED
