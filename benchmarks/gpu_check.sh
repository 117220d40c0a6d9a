#!/usr/bin/env bash
# One run on a lent GPU machine (the device tool): builds hyperfused._C against that machine's torch, runs
# the GPU tests, then the full benchmark; writes the logs, the table and the JSON under $OUT.
# Sized for well under 8 minutes on an H200:
#   device run: bash benchmarks/gpu_check.sh      (timeout_s=480)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 HYPERFUSED_PORTABLE=1
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git rev-parse --short HEAD 2>/dev/null;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
echo "== build"; SECONDS=0
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then tail -40 "$OUT/build.log"; exit 1; fi
echo "built in ${SECONDS}s"
echo "== GPU tests"
timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_hyper_lstm_fused.py tests/test_hyper_lstm_triton.py \
  tests/test_static_hypernet.py tests/test_autocast.py -k "cuda or triton or gpu" 2>&1 | tee "$OUT/tests.log" | tail -15
echo "== benchmark"
timeout 240 $PY -m benchmarks --full --compile first --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>/dev/null \
  | tee "$OUT/bench.md"
