"""The CPU's few-rows kernel (csrc/cpu/few_rows_gemm.cpp), one of the decode step's measured GEMM candidates,
against torch on the same memory: out (m, n) = a (m, k) · wᵀ + beta · out with w read as its (n, k) rows.

The shapes walk every tail: m across the 4-row register tile (1, 3, 4, 5, 9), k across the vector width (16
float32 or 32 bfloat16 values: 1, 15, 16, 17, 33, 300; weights read as float32 with k <= 16 take the short-k
path, a 16 × 16 block of w transposed in registers, whose 16 columns n = 28 and 148 leave partly filled), rows
of a, w and out with strides beyond their length.
A product that dropped one term of k, one row or one column would be off by about one term's size (~1 here),
far beyond the tolerance. On a build without the vector extensions for a dtype (AVX-512; AVX512-BF16 for
bfloat16 weights, AVX-512 BW and VL for float16 ones and widened bfloat16 ones) the kernel says it cannot run
and leaves out as it was, which is checked instead."""
import os

import pytest
import torch

import hyperfused
from conftest import requires_extension

pytestmark = requires_extension


# The kernel's weights by the test hook's names: their torch dtype, and whether a is rounded to it
WEIGHTS = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, True),
           "bfloat16-widened": (torch.bfloat16, False), "float16": (torch.float16, False)}


@pytest.mark.parametrize("weights", list(WEIGHTS), ids=["f32", "bf16", "bf16-widened", "f16"])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 33, 300])
@pytest.mark.parametrize("n, beta", [(4, 0.0), (28, 1.0), (148, 0.0)])
def test_the_few_rows_kernel_computes_the_product(weights, m, k, n, beta):
    from hyperfused import _C
    dtype, rounds_a = WEIGHTS[weights]
    a_full = torch.randn(m, k + 3)  # rows longer than k: lda > k
    w_full = torch.randn(n, k + 5).to(dtype)
    out_full = torch.randn(m, n + 2)
    a, w = a_full[:, :k], w_full[:, :k]
    start, beyond = out_full[:, :n].clone(), out_full[:, n:].clone()
    ran = _C._few_rows_gemm(a_full.data_ptr(), a_full.stride(0), w_full.data_ptr(), w_full.stride(0),
                            weights, out_full.data_ptr(), out_full.stride(0), m, n, k, beta)
    assert ran == (weights in _C._few_rows_gemm_weights())
    if not ran:
        assert torch.equal(out_full[:, :n], start)
        return
    # the kernel rounds a to bfloat16 for bfloat16 weights, as MKL's and oneDNN's bfloat16 GEMMs do, and reads a
    # as it is beside float16 ones and widened bfloat16 ones (the decode step's small products)
    operand = a.to(dtype).double() if rounds_a else a.double()
    expected = operand @ w.double().t() + beta * start.double()
    torch.testing.assert_close(out_full[:, :n].double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out_full[:, n:], beyond)  # nothing written past each row's n columns


def test_the_few_rows_kernel_leaves_what_it_cannot_run_to_the_libraries():
    """n not a multiple of 4 (no decode product has one) and beta other than 0 or 1 are refused, out untouched."""
    from hyperfused import _C
    a, w, out = torch.randn(2, 8), torch.randn(6, 8), torch.zeros(2, 6)
    for n, beta in ((6, 0.0), (4, 0.5)):
        assert not _C._few_rows_gemm(a.data_ptr(), 8, w.data_ptr(), 8, "float32", out.data_ptr(), 6, 2, n, 8, beta)
    assert not out.any()


def test_the_build_has_the_kernel_where_its_cpu_has_the_vector_extensions():
    """Built with -march=native (HYPERFUSED_PORTABLE unset), the extension has the float32 kernel on an AVX-512
    machine, the bfloat16 one where the CPU also has AVX512-BF16 and AVX-512 BW, and the float16 one where it
    has AVX-512 BW and VL: the build machine is this one."""
    from hyperfused import _C
    weights = _C._few_rows_gemm_weights()
    if os.environ.get("HYPERFUSED_PORTABLE") == "1":
        assert weights == []
        return
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    assert ("float32" in weights) == ("avx512f" in flags)
    assert ("bfloat16" in weights) == ({"avx512f", "avx512bw", "avx512_bf16"} <= flags)
    assert ("bfloat16-widened" in weights) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
    assert ("float16" in weights) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
