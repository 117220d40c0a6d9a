"""Variants of the HyperLSTMCell decode step side by side, alternating round by round in one process beside
nn.LSTMCell: how to compare two settings of the step (a sampling loop's cost per character) on a machine whose
speed drifts by tens of percent between processes and minutes.

    python -m benchmarks.decode_ab --rounds 6 --variant "" --variant HYPERFUSED_STEP_GEMM=mm

A variant is VAR=value[,VAR=value...] (set around each timed run; the C++ op reads its settings on every
call); an empty one is the default. Each round times every variant and nn.LSTMCell once (the best of three
runs of --steps steps, after 20 to warm up), in an order reversed every other round. Prints the median µs
per step, each variant's change against the last one, and nn.LSTMCell's time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hyperfused
from benchmarks.alternate import parse_variant
from benchmarks.hyper_lstm import with_env


def per_step_us(step, state, steps: int) -> float:
    for _ in range(20):
        state = step(state)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            state = step(state)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e6


def compare(B: int, H: int, variants: list[str], rounds: int, steps: int,
            dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median µs per step of each variant (and 'nn.LSTMCell') at batch B and hidden size H, both in `dtype`."""
    torch.manual_seed(0)
    cell = hyperfused.HyperLSTMCell(128, H, hyper_size=128, hyper_embed=16, backend="cpu", dtype=dtype)
    lstm = torch.nn.LSTMCell(128, H, dtype=dtype)
    x = torch.randn(B, 128, dtype=dtype)
    timings: dict[str, list[float]] = {name: [] for name in [*variants, "nn.LSTMCell"]}
    with torch.no_grad():
        start = cell(x, cell(x))  # steps continue from a state, as when sampling
        runs = {"nn.LSTMCell": lambda: per_step_us(lambda s: lstm(x, s), lstm(x), steps)}
        for name in variants:
            run = lambda: per_step_us(lambda s: cell(x, s), start, steps)  # noqa: E731
            for var, value in parse_variant(name)[0].items():
                run = with_env(var, value, run)
            runs[name] = run
        order = list(runs)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                timings[name].append(runs[name]())
    return {name: statistics.median(t) for name, t in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=None, metavar="VAR=value[,...]")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed run")
    parser.add_argument("--sizes", default="1x256,8x256,1x1000,8x1000", help="BxH,... (batch x hidden size)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the cell's and nn.LSTMCell's dtype")
    args = parser.parse_args(argv)
    variants = args.variant or [""]
    for v in variants:
        parse_variant(v)  # a malformed variant fails before anything runs
    sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    label = lambda v: v or "default"  # noqa: E731
    dtype = getattr(torch, args.dtype)
    print(f"HyperLSTMCell(128, H, hyper_size=128, hyper_embed=16) decode step in {args.dtype}, µs per step, medians "
          f"of {args.rounds} alternating rounds; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| B, H | " + " | ".join(label(v) for v in variants) + " | nn.LSTMCell |")
    print("|---|" + "---:|" * (len(variants) + 1))
    for B, H in sizes:
        m = compare(B, H, variants, args.rounds, args.steps, dtype)
        cells = []
        for i, v in enumerate(variants):
            change = f" ({100 * (m[v] / m[variants[-1]] - 1):+.0f}%)" if i < len(variants) - 1 else ""
            cells.append(f"{m[v]:.0f}{change}")
        print(f"| {B}, {H} | " + " | ".join(cells) + f" | {m['nn.LSTMCell']:.0f} |")


if __name__ == "__main__":
    main()
