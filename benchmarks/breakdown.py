"""Where a fused HyperLSTM forward+backward spends its time, by part of the performance model (docs/design.md §5):

    python -m benchmarks.breakdown                          # T=100, B=32, X=128, H=256, Ĥ=128, N_z=16
    python -m benchmarks.breakdown --config 100,32,128,1000 --backend cpu --iters 5
    python -m benchmarks.breakdown --traffic --config 100,128,128,1000    # bytes and FLOPs per step (model)

torch.profiler's self times (op time on the calling thread on the CPU, kernel time on CUDA) per iteration,
sorted into: the per-step recurrent GEMMs, the GEMMs over all T·B rows (input projections, weight
gradients), the fused step kernels with the time loop around them (the ops' own time), the post-loop
elementwise reductions, and the rest. A guide for optimising, not a benchmark: the profiler adds overhead
to every op call. --traffic prints instead the per-step bytes, FLOPs and launches of each step kernel and
GEMM, computed from the launch shapes (benchmarks/traffic.py), without running anything.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import hyperfused

from .hyper_lstm import Config
from .traffic import traffic_markdown

_GEMMS = ("aten::mm", "aten::addmm", "aten::matmul", "mkldnn::_linear_pointwise")
# the CPU op's direct MKL calls, which only its per-step GEMMs make (csrc/cpu/step_gemm.cpp), with no shapes
_STEP_GEMMS = ("hyperfused::mkl_gemm", "hyperfused::mkl_pack")
_POST_LOOP = ("aten::mul", "aten::sum", "aten::bmm", "aten::einsum", "aten::copy_", "aten::cat", "aten::stack")
PARTS = ("recurrent GEMMs (per step)", "GEMMs over all T·B rows", "fused step kernels + time loop",
         "post-loop elementwise", "other")


def part_of(name: str, shapes, batch: int) -> str:
    if name in _STEP_GEMMS:
        return PARTS[0]
    if name in _GEMMS:
        rows = shapes[0][0] if shapes and shapes[0] else None
        return PARTS[0] if rows == batch else PARTS[1]
    # the forward op's own time is booked to its autograd node, named GeneratedBackwardFor_<op>
    if name.startswith(("hyperfused::hyper_lstm", "GeneratedBackwardFor_hyperfused_hyper_lstm")):
        return PARTS[2]
    if name in _POST_LOOP:  # bmm: the einsums of the scale-weight gradients
        return PARTS[3]
    return PARTS[4]


def breakdown(cfg: Config, backend: str, device: torch.device, iters: int):
    torch.manual_seed(0)
    m = hyperfused.HyperLSTM(cfg.X, cfg.H, hyper_size=cfg.Hh, hyper_embed=cfg.Nz, backend=backend, device=device)
    x = torch.randn(cfg.T, cfg.B, cfg.X, device=device)

    def step():
        m.zero_grad(set_to_none=True)
        m(x)[0].sum().backward()

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if not torch.cuda.is_available():
        # A CUDA build of torch on a machine without a GPU: the profiler library logs a failed GPU probe and its
        # start/stop markers at every use. Only devices that exist are profiled; say nothing about the others.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    on_device = device.type == "cuda"
    parts, ops = defaultdict(float), defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        t = (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3 / iters  # ms per iteration
        if t <= 0:
            continue
        parts[part_of(e.key, e.input_shapes, cfg.B)] += t
        ops[e.key] += t
    return parts, ops


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="100,32,128,256,128,16", metavar="T,B,X,H[,Hh[,Nz]]")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="also list this many ops by self time")
    ap.add_argument("--traffic", action="store_true", help="print the per-step traffic model instead of profiling")
    args = ap.parse_args(argv)
    cfg, device = Config.parse(args.config), torch.device(args.device)
    if args.traffic:
        print(traffic_markdown(cfg.T, cfg.B, cfg.X, cfg.H, cfg.Hh, cfg.Nz))
        return
    backend = hyperfused.ops.resolve_backend(args.backend, device)
    parts, ops = breakdown(cfg, backend, device, args.iters)
    total = sum(parts.values())
    clock = "kernel time" if device.type == "cuda" else "op time"
    print(f"{cfg.label()}, backend {backend}: {total:.1f} ms {clock} per forward+backward (under the profiler)\n")
    print("| part | ms / iteration | share |\n|---|---:|---:|")
    for p in PARTS:
        print(f"| {p} | {parts[p]:.1f} | {100 * parts[p] / total:.0f}% |")
    print(f"\n| op (self time) | ms / iteration |\n|---|---:|")
    for name, t in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {t:.1f} |")


if __name__ == "__main__":
    main()
