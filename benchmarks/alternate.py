"""Variants of the fused HyperLSTM layer side by side, forward+backward, alternating round by round in one
process beside nn.LSTM and the GEMMs-alone row: how to compare two settings on a machine whose speed drifts
by tens of percent between processes and minutes (the 2-core VMs the CPU results come from).

    python -m benchmarks.alternate --config 100,32,128,256 --rounds 20 \\
        --variant HYPERFUSED_CPU_BUFFER_CACHE_MB=0 --variant HYPERFUSED_CPU_BUFFER_CACHE_MB=1024
    python -m benchmarks.alternate --variant HYPERFUSED_STEP_GEMM=onednn@bf16 --variant @bf16

A variant is VAR=value[,VAR=value...] (set around the whole forward+backward; the C++ driver reads its
settings on every call), optionally followed by @bf16 (under bfloat16 autocast); an empty variant is the
default. Prints median and minimum ms per forward+backward, the median's ratio to the GEMMs-alone row, and
the page faults per iteration.
"""
from __future__ import annotations

import argparse
import resource
import statistics

import torch

import hyperfused
from benchmarks.hyper_lstm import Config, GemmFloorRow, Row, _under_autocast, with_env
from benchmarks.timing import timed


def parse_variant(text: str) -> tuple[dict[str, str], bool]:
    settings, _, mode = text.partition("@")
    if mode not in ("", "bf16"):
        raise SystemExit(f"--variant: expected VAR=value[,...][@bf16], got {text!r}")
    env = {}
    for item in filter(None, settings.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise SystemExit(f"--variant: expected VAR=value, got {item!r} in {text!r}")
        env[var] = value
    return env, mode == "bf16"


class Variant:
    """A row whose forward+backward runs with its environment settings in place."""

    def __init__(self, name: str, row, env: dict[str, str]):
        self.name, self.row, self.env = name, row, env
        self.ms: list[float] = []
        self.faults = 0

    def run(self) -> float:
        run = self._measured
        for var, value in self.env.items():
            run = with_env(var, value, run)
        return run() * 1e3

    def _measured(self) -> float:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = timed(self.row.fwd_bwd, torch.device("cpu"))
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        # The variants share one module: each frees its gradients in its own settings (a buffer cache turned
        # off would otherwise drop what the next variant kept).
        for p in getattr(self.row, "_params", []):
            p.grad = None
        return seconds


def make_variants(cfg: Config, specs: list[str], backend: str) -> list[Variant]:
    torch.manual_seed(0)
    x = torch.randn(cfg.T, cfg.B, cfg.X)
    lstm = torch.nn.LSTM(cfg.X, cfg.H)
    rows = [Variant("nn.LSTM", Row("nn.LSTM", lambda x: lstm(x)[0], lstm.parameters(), x), {}),
            Variant(GemmFloorRow.name, GemmFloorRow(cfg, torch.device("cpu")), {})]
    m = hyperfused.HyperLSTM(cfg.X, cfg.H, hyper_size=cfg.Hh, hyper_embed=cfg.Nz, backend=backend)
    for spec in specs or [""]:
        env, bf16 = parse_variant(spec)
        forward = (lambda x: m(x)[0]) if not bf16 else _under_autocast(lambda x: m(x)[0])
        rows.append(Variant(f"hyperfused {backend} {spec or '(default)'}", Row(spec, forward, m.parameters(), x), env))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.alternate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="100,32,128,256", metavar="T,B,X,H[,Hh[,Nz]]")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (each runs every row once)")
    ap.add_argument("--variant", action="append", default=[], metavar="VAR=value[,...][@bf16]")
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected a positive number, got {args.rounds}")
    cfg = Config.parse(args.config)
    rows = make_variants(cfg, args.variant, args.backend)
    for r in rows:  # warm-up: the GEMM library choice, packing, the buffer cache
        r.run(), r.run()
        r.faults = 0
    for _ in range(args.rounds):
        for r in rows:
            r.ms.append(r.run())
    floor = statistics.median(rows[1].ms)
    print(f"{cfg.label()}, forward+backward, {args.rounds} alternating rounds, {torch.get_num_threads()} threads\n")
    print("| row | median ms | min ms | × GEMMs alone | page faults / iter |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        med = statistics.median(r.ms)
        print(f"| {r.name} | {med:.1f} | {min(r.ms):.1f} | {med / floor:.2f} | {r.faults / args.rounds:.0f} |")
    return rows


if __name__ == "__main__":
    main()
