"""python -m benchmarks.step_gemm: the CPU libraries for the time loop's recurrent GEMMs, side by side.

Each step multiplies the same weight by a (B × K) batch. at::mm (MKL's sgemm) packs the weight on every call;
mkl::_mkl_linear takes it packed once but returns a new tensor; MKL's cblas_sgemm_compute, which hyperfused
calls, takes the packed weight and writes into the caller's buffer; oneDNN's matmul caches its primitive, and
runs against the weight as it is or reordered once into its blocked layout for the batch size.
With bfloat16 operands (autocast): at::mm and oneDNN return bfloat16, converted here to float32 as the op
does; MKL's cblas_gemm_bf16bf16f32 returns float32. hyperfused's StepGemm measures these once per shape and
process and runs the fastest (csrc/cpu/step_gemm.cpp); this prints what each takes, the operand conversion
included.

    python -m benchmarks.step_gemm                       # the --quick suite's shapes and the paper's H = 1000
    python -m benchmarks.step_gemm --shape 8,1000,4512   # M,K,N: (M × K) · (K × N)
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch

# (B, K, N) of the forward's [W_h; Ŵ_x,h] h product and the backward's transposed one, at H = 256 and 1000
# with Ĥ = 128 (N = 4H + 4Ĥ).
SHAPES = [(8, 256, 1536), (8, 1536, 256), (32, 256, 1536), (32, 1536, 256), (8, 1000, 4512), (32, 1000, 4512)]


def best_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def mkl_cblas():
    """libtorch_cpu's MKL CBLAS (torch links it in and exports it), or None: the functions hyperfused's StepGemm
    looks up there."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
        lib.cblas_gemm_bf16bf16f32  # noqa: B018  (present, or AttributeError)
        return lib
    except (OSError, AttributeError):
        return None


ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162


def libraries(a: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> a callable computing a · wᵀ in float32 (w is (N, K)), for the libraries this torch has."""
    (m, k), n = a.shape, w.shape[0]
    wt, out = w.t().contiguous(), a.new_empty(m, n)
    fns = {"at::mm": lambda: torch.mm(a, wt, out=out)}
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        fns["mkl::_mkl_linear"] = lambda: torch.ops.mkl._mkl_linear(a, packed, w, None, m)
    lib, ptr, one, zero = mkl_cblas(), ctypes.c_void_p, ctypes.c_float(1.0), ctypes.c_float(0.0)
    if lib is not None:
        buf = torch.empty((lib.cblas_sgemm_pack_get_size(B_MATRIX, m, n, k) + 3) // 4)
        lib.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, m, n, k, one, ptr(w.data_ptr()), k, ptr(buf.data_ptr()))

        def packed_into_out():
            lib.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, ptr(a.data_ptr()), k, ptr(buf.data_ptr()),
                                    n, zero, ptr(out.data_ptr()), n)
            return out
        fns["MKL packed, into out"] = packed_into_out
    onednn = torch.backends.mkldnn.is_available()
    reorder = onednn and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    linear = lambda x, weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], None)  # noqa: E731
    if onednn:
        fns["oneDNN"] = lambda: linear(a, w)
    if reorder:  # the weight in oneDNN's blocked layout for m rows, made once
        w_blocked = torch.ops.mkldnn._reorder_linear_weight(w, m)
        fns["oneDNN reordered"] = lambda: linear(a, w_blocked)
    wb, wtb = w.bfloat16(), wt.bfloat16()
    fns["at::mm bf16"] = lambda: torch.mm(a.bfloat16(), wtb).float()
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX2-only CPUs: no bf16 kernels
    if onednn_bf16:
        fns["oneDNN bf16"] = lambda: linear(a.bfloat16(), wb).float()
    if reorder and onednn_bf16:
        wb_blocked = torch.ops.mkldnn._reorder_linear_weight(wb, m)
        fns["oneDNN reordered bf16"] = lambda: linear(a.bfloat16(), wb_blocked).float()
    if lib is not None:
        def mkl_bf16():
            ab = a.bfloat16()
            lib.cblas_gemm_bf16bf16f32(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, one, ptr(ab.data_ptr()), k,
                                       ptr(wb.data_ptr()), k, zero, ptr(out.data_ptr()), n)
            return out
        fns["MKL bf16"] = mkl_bf16
    return fns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_gemm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", metavar="M,K,N", help="a GEMM shape (repeatable)")
    ap.add_argument("--calls", type=int, default=300, help="calls per timing (best of 5)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of 5 x {args.calls} calls, µs per call")
    for m, k, n in shapes:
        a, w = torch.randn(m, k), torch.randn(n, k)
        fns = libraries(a, w)
        expected = fns["at::mm"]().clone()
        for name, fn in fns.items():  # every library computes the same product (bfloat16: to its rounding)
            tol = dict(rtol=2e-2, atol=0.1 * k ** 0.5) if "bf16" in name else dict(rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(fn(), expected, **tol)
        times = {name: best_us(fn, args.calls) for name, fn in fns.items()}
        print(f"{m:>4} x {k:>5} x {n:>5}: " + "   ".join(f"{name} {t:8.1f}" for name, t in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
