"""python -m benchmarks.step_gemm: the CPU libraries for the time loop's recurrent GEMMs, side by side.

Each step multiplies the same weight by a (B × K) batch. at::mm (MKL's sgemm) packs the weight on every call;
mkl::_mkl_linear takes it packed once; oneDNN's matmul caches its primitive. hyperfused's StepGemm measures
these once per shape and process and runs the fastest (csrc/cpu/step_gemm.cpp); this prints what each takes.

    python -m benchmarks.step_gemm                       # the --quick suite's shapes and the paper's H = 1000
    python -m benchmarks.step_gemm --shape 8,1000,4512   # M,K,N: (M × K) · (K × N)
"""
from __future__ import annotations

import argparse
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


def libraries(a: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> a callable computing a · wᵀ (w is (N, K)), for the libraries this torch has."""
    wt, out = w.t().contiguous(), a.new_empty(a.shape[0], w.shape[0])
    fns = {"at::mm": lambda: torch.mm(a, wt, out=out)}
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, a.shape[0])
        fns["packed MKL"] = lambda: torch.ops.mkl._mkl_linear(a, packed, w, None, a.shape[0])
    if torch.backends.mkldnn.is_available():
        fns["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], None)
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
        for name, fn in fns.items():  # every library computes the same product
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-3)
        times = {name: best_us(fn, args.calls) for name, fn in fns.items()}
        print(f"{m:>4} x {k:>5} x {n:>5}: " + "   ".join(f"{name} {t:8.1f}" for name, t in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
