#!/usr/bin/env bash
# The tests that the GPU check runs, on the CPU, under the GPU machine's versions: Python 3.12 (where this
# machine has it), torch 2.11 and Triton 3.6 (interpreted), in .venv-gpu-versions beside .venv. torch
# changes what custom ops' autograd accepts and what Dynamo can trace from one release to the next: on
# torch 2.11 every Triton backward and every torch.compile(fullgraph=True) of the modules once failed here
# while torch 2.14 passed. The extension is built for this interpreter without CUDA (nvcc's build is
# checked by bootstrap.sh); a Python 3.12 build sits beside .venv's 3.11 one (the file names differ).
#
#   bash scripts/test_gpu_machine_versions.sh [pytest args]   (after scripts/bootstrap.sh; ~10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0  # torch 2.11 brings its Triton, 3.6
# Python 3.12 on the PATH, else one that pyenv installed, else the default python3
PYTHON=${PYTHON_GPU_VERSIONS:-python3.12}
if ! "$PYTHON" -c "" 2> /dev/null; then
  PYTHON=$(ls -d "$(pyenv root 2> /dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 2> /dev/null \
    | head -1)
  "${PYTHON:-none}" -c "" 2> /dev/null || PYTHON=python3
fi
VENV=.venv-gpu-versions
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
PY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2> /dev/null; then
  $PY -m pip install -q "torch==$TORCH_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
fi
$PY -m pip install -q numpy tqdm pytest setuptools wheel ninja 2>&1 | grep -v "^WARNING: Location" || true
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

mkdir -p build
if ! HYPERFUSED_NO_CUDA=1 $PY setup.py build_ext --inplace > build/build-gpu-versions.log 2>&1; then
  tail -40 build/build-gpu-versions.log
  echo "test_gpu_machine_versions: building hyperfused._C failed (log: build/build-gpu-versions.log)" >&2
  exit 1
fi
$PY -c "import hyperfused; assert hyperfused.HAS_EXTENSION, hyperfused._extension.EXTENSION_ERROR"

# benchmarks/gpu_check.sh's GPU tests (their GPU-only cases skip here), and the modules' nn.LSTM API.
TESTS="$(grep -v '^#' benchmarks/gpu_tests.txt | tr '\n' ' ') tests/test_lstm_compat.py"
exec $PY -m pytest -q -p no:cacheprovider $TESTS "$@"
