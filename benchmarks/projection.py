"""nn.LSTM's projection (proj_size): forward+backward of nn.LSTM(proj_size=P), the HyperLSTM with the same
projection on the reference and on each fused backend, and the fused HyperLSTM without a projection, timed side
by side in one run (repeats interleaved across rows); then one step without gradients (decoding) of the same
layers called with T = 1, and of the projected HyperLSTMCell.

    python -m benchmarks.projection [--config T,B,X,H,P] [--repeats N] [--device cpu|cuda]

The fused backends run a projected layer's steps on the unprojected state with the weights W_h·W_hr (docs/design.md
§1): their recurrent product is (B × H)·(H × 4H), not nn.LSTM's (B × P)·(P × 4H), so the projection saves nn.LSTM
time that it does not save here; the last row shows what the same layer costs without one. A decode step reads
the P-wide h as it is, so there the projection does save time.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import hyperfused
from .hyper_lstm import Row
from .timing import Samples, timed


def _parse_config(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
        if len(vals) != 5 or min(vals) <= 0 or vals[4] >= vals[3]:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,X,H,P as positive integers with P < H, got {text!r}")
    return vals


def make_rows(T: int, B: int, X: int, H: int, P: int, device: torch.device, backends: list[str]) -> list[Row]:
    torch.manual_seed(0)
    x = torch.randn(T, B, X, device=device)
    lstm = torch.nn.LSTM(X, H, proj_size=P, device=device)
    rows = [Row(f"nn.LSTM, proj_size={P}", lambda v: lstm(v)[0], lstm.parameters(), x)]
    for backend in ["reference", *backends]:
        m = hyperfused.HyperLSTM(X, H, proj_size=P, backend=backend, device=device)
        rows.append(Row(f"HyperLSTM {backend}, proj_size={P}", lambda v, m=m: m(v)[0], m.parameters(), x))
    if backends:
        m = hyperfused.HyperLSTM(X, H, backend=backends[0], device=device)
        rows.append(Row(f"HyperLSTM {backends[0]}, no projection", lambda v: m(v)[0], m.parameters(), x))
    return rows


@torch.no_grad()
def decode_rows(B: int, X: int, H: int, P: int, device: torch.device, backends: list[str]) -> list[tuple]:
    """(name, one decode step): each layer called with T = 1 from the state it returned, as a sampling loop
    written for nn.LSTM calls it, then the projected cell stepped from its own state."""
    torch.manual_seed(0)
    x = torch.randn(1, B, X, device=device)
    lstm = torch.nn.LSTM(X, H, proj_size=P, device=device)
    rows = [(f"nn.LSTM, proj_size={P}", lambda s=lstm(x)[1]: lstm(x, s))]
    for backend in ["reference", *backends]:
        m = hyperfused.HyperLSTM(X, H, proj_size=P, backend=backend, device=device)
        rows.append((f"HyperLSTM {backend}, proj_size={P}", lambda m=m, s=m(x)[1]: m(x, s)))
    if backends:
        m = hyperfused.HyperLSTM(X, H, backend=backends[0], device=device)
        rows.append((f"HyperLSTM {backends[0]}, no projection", lambda m=m, s=m(x)[1]: m(x, s)))
    for backend in backends:
        cell = hyperfused.HyperLSTMCell(X, H, proj_size=P, backend=backend, device=device)
        rows.append((f"HyperLSTMCell {backend}, proj_size={P}", lambda c=cell, s=cell(x[0]): c(x[0], s)))
    return rows


@torch.no_grad()
def time_decode(rows: list[tuple], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds per step of each row, repeats interleaved across rows, 20 steps per timed call."""
    samples = {name: Samples() for name, _ in rows}
    for rep in tqdm(range(warmup + repeats), desc="projection decode timings", unit="round"):
        for name, fn in rows:
            t = timed(lambda fn=fn: [fn() for _ in range(20)], device) / 20
            if rep >= warmup:
                samples[name].values.append(t)
    return {name: s.median for name, s in samples.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=_parse_config, default=(100, 32, 128, 256, 64), metavar="T,B,X,H,P")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fused = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",))
             if b in hyperfused.available_backends()]
    rows = make_rows(*args.config, device, fused)
    samples = {r.name: Samples() for r in rows}
    for rep in tqdm(range(args.warmup + args.repeats), desc="projection timings", unit="round"):
        for r in rows:
            t = timed(r.fwd_bwd, device)
            if rep >= args.warmup:
                samples[r.name].values.append(t)
    T, B, X, H, P = args.config
    base = samples[rows[0].name].median
    print(f"\nforward+backward, T={T}, B={B}, X={X}, H={H}, P={P}, Ĥ=128, N_z=16, {device.type}, "
          f"median of {args.repeats}\n")
    print("| row | ms | vs nn.LSTM |\n|---|---:|---:|")
    for r in rows:
        ms = samples[r.name].median * 1e3
        print(f"| {r.name} | {ms:.1f} | {samples[r.name].median / base:.2f}× |")
    steps = time_decode(decode_rows(B, X, H, P, device, fused), device, args.warmup, args.repeats)
    base = steps[f"nn.LSTM, proj_size={P}"]
    print(f"\none step without gradients (decode; the layers called with T = 1), B={B}, X={X}, H={H}, P={P}, "
          f"median of {args.repeats} × 20 steps\n")
    print("| row | µs per step | vs nn.LSTM |\n|---|---:|---:|")
    for name, t in steps.items():
        print(f"| {name} | {t * 1e6:.0f} | {t / base:.2f}× |")


if __name__ == "__main__":
    main()
