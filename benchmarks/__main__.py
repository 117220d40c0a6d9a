"""python -m benchmarks: HyperLSTM backends against nn.LSTM (cuDNN on GPU) and the reference, side by side.

    python -m benchmarks --quick                 # the README's main job; ~3 minutes on 2 CPU cores
    python -m benchmarks --config 100,64,512,512 --json out.json --plot out.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys

import torch
from tqdm import tqdm

from . import report
from .hyper_lstm import FULL_CONFIGS, QUICK_CONFIGS, Config, make_rows
from .timing import Samples, peak_memory_mb, timed


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_lstm_section(configs, device, repeats, warmup, compile_on, backends):
    results = []
    todo = []
    for i, cfg in enumerate(configs):
        todo.append((cfg, make_rows(cfg, device, with_compile=compile_on(i), backends=backends)))
    total = sum(len(rows) for _, rows in todo) * (warmup + repeats)
    bar = tqdm(total=total, desc="HyperLSTM timings", unit="run", file=sys.stderr)
    for cfg, rows in todo:
        fwd = {r.name: Samples() for r in rows}
        both = {r.name: Samples() for r in rows}
        inner = {}
        for rep in range(warmup + repeats):
            for r in rows:  # interleaved, so that drift in the machine's speed hits every row alike
                bar.set_postfix_str(f"{cfg.name}: {r.name}")
                # One untimed call first: the row before left caches and the allocator's free memory shaped
                # for itself, which would otherwise count against the slow rows that get one timed call.
                r.fwd_bwd()
                for _ in range(inner.get(r.name, 1)):
                    tf = timed(r.fwd, device)
                    tb = timed(r.fwd_bwd, device)
                    if rep >= warmup:
                        fwd[r.name].values.append(tf)
                        both[r.name].values.append(tb)
                # Fast rows repeat within a round (about 0.3 s of work), for a steadier median.
                inner[r.name] = max(1, min(10, int(0.3 / max(tb, 1e-6))))
                bar.update()
        base = both[rows[0].name].median
        ref = both["reference"].median
        for r in rows:
            results.append(dict(
                config=cfg.name, T=cfg.T, B=cfg.B, X=cfg.X, H=cfg.H, Hh=cfg.Hh, Nz=cfg.Nz, row=r.name,
                fwd_ms=fwd[r.name].median * 1e3, fwd_iqr_ms=fwd[r.name].iqr * 1e3,
                fwd_bwd_ms=both[r.name].median * 1e3, fwd_bwd_iqr_ms=both[r.name].iqr * 1e3,
                tokens_per_s=cfg.T * cfg.B / both[r.name].median,
                peak_mem_mb=peak_memory_mb(r.fwd_bwd, device),
                vs_lstm=both[r.name].median / base, speedup_vs_reference=ref / both[r.name].median,
                gemm_flop_ratio=cfg.gemm_flops(hyper=True) / cfg.gemm_flops(hyper=False)))
    bar.close()
    return results


def _quiet_without_gpu() -> None:
    """torch.compile (the compiled-reference row) imports torch.utils.cpp_extension, which warns on a machine
    without a GPU that no CUDA runtime is found: true, and not this benchmark's concern."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv=None):
    _quiet_without_gpu()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small configs sized for a CPU (default without a GPU)")
    ap.add_argument("--full", action="store_true", help="the full configs even on a CPU")
    ap.add_argument("--config", action="append", default=[], metavar="T,B,X,H[,Hh[,Nz]]",
                    help="benchmark this config (repeatable) instead of the built-in ones")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per row (after warm-up)")
    ap.add_argument("--compile", choices=("first", "all", "none"), default="first",
                    help="configs that get the torch.compile'd reference row (compiling costs ~1 min each)")
    ap.add_argument("--backends", default=None, help="comma-separated fused backends to include (default: all)")
    ap.add_argument("--sections", default="lstm,static,decode", help="comma-separated: lstm, static, decode")
    ap.add_argument("--wrn", default="40,2", metavar="DEPTH,WIDEN", help="HyperWRN for the static section")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--plot", default=None, metavar="PATH", help="write a PNG bar chart (matplotlib)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    # Results are grouped by config name (tables, JSON, plot): several --config options get a name each.
    names = [f"custom {k + 1}" for k in range(len(args.config))] if len(args.config) > 1 else ["custom"]
    configs = [Config.parse(c, n) for c, n in zip(args.config, names)] or (QUICK_CONFIGS if quick else FULL_CONFIGS)
    repeats = args.repeats or (5 if quick else 10)
    warmup = 1 if quick else 3
    compile_on = {"first": lambda i: i == 0, "all": lambda i: True, "none": lambda i: False}[args.compile]
    sections = set(args.sections.split(","))
    meta = dict(date=datetime.date.today().isoformat(), machine=machine(), device=str(device),
                torch=torch.__version__, commit=commit(), quick=quick)
    out = dict(meta=meta, lstm=[], static=[], decode=[])
    print(f"hyperfused benchmarks — {meta['date']}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}")
    if "lstm" in sections:
        out["lstm"] = run_lstm_section(configs, device, repeats, warmup, compile_on,
                                       args.backends.split(",") if args.backends else None)
        print(report.lstm_markdown(out["lstm"], configs))
    if "static" in sections:
        from .static_hypernet import run_static_section

        depth, widen = (int(v) for v in args.wrn.split(","))
        out["static"] = run_static_section(device, quick, repeats, warmup, depth, widen)
        if out["static"]:
            print(report.static_markdown(out["static"]))
    if "decode" in sections:
        from .decode import decode_markdown, run_decode_section

        out["decode"] = run_decode_section(device, repeats)
        print(decode_markdown(out["decode"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(out, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
