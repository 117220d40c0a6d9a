import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must be on before any
# @triton.jit runs (importing torch does not import triton). With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hyperfused  # noqa: E402

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine; CUDA tests need one")
requires_extension = pytest.mark.skipif(not hyperfused.HAS_EXTENSION,
                                        reason="hyperfused._C not built (run scripts/bootstrap.sh)")


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs per test (seed derived from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
