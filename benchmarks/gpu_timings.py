"""GPU timings for the prepared GPU check: the fused CUDA and Triton HyperLSTM against cuDNN's nn.LSTM and
the GEMMs-alone floor, at the paper's size with a large and a small batch, under both float32 matmul
settings (TF32 on and off) and under bfloat16 autocast (the fused ops' GEMMs in bfloat16 with float32
states; nn.LSTM's cuDNN in bfloat16), with the launches and the host time per step. In float32 each of
nn.LSTM and the fused backends is timed a second time with its whole forward and backward captured once as
a CUDA graph and replayed (torch.cuda.make_graphed_callables): graphs on against graphs off, and the fused
backends with their ops' own graphs (HYPERFUSED_CUDA_GRAPHS=1); with TF32 off
the CUDA backend also runs in the launch shapes its batch does not get (HYPERFUSED_CUDA_THREAD_GROUPS,
HYPERFUSED_CUDA_CLUSTER) and, at a small batch, with the one-kernel step (HYPERFUSED_STEP_DESIGN=fused).

    python -m benchmarks.gpu_timings --json out.json [--configs 100,128,128,1000 100,8,128,1000 ...]

The JSON file is rewritten after every config, so a run cut short by its time limit still returns what it
measured. Each record names the precision settings it ran under (torch.backends.cuda.matmul.allow_tf32 and
torch.backends.cudnn.allow_tf32): cuDNN's LSTM uses TF32 by default, PyTorch's matmuls do not.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import hyperfused

from .hyper_lstm import Config, Row, make_rows, with_env
from .timing import Samples, peak_memory_mb, timed

DEFAULT_CONFIGS = ["100,128,128,1000", "100,8,128,1000", "100,128,128,1000,128,64"]


def launches_and_host_time(row, device, T: int) -> dict:
    """CUDA kernels launched per step and host (CPU) milliseconds per step of one forward+backward: the
    per-step overhead that caps a small batch, whatever the kernels' speed."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        row.fwd_bwd()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # Host time without the profiler: the calls return once their work is queued.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    row.fwd_bwd()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dict(kernels_per_step=len(kernels) / T, host_ms_per_step=host * 1e3 / T)


class _Autocast:
    """A row run under torch.autocast(dtype)."""

    def __init__(self, row, dtype):
        self.row, self.dtype, self.name = row, dtype, row.name

    def fwd_bwd(self):
        with torch.autocast("cuda", dtype=self.dtype):
            self.row.fwd_bwd()


class WithEnv:
    """A row run with one environment variable set for its calls (and restored after each): the CUDA backend
    with a fixed launch shape (HYPERFUSED_CUDA_THREAD_GROUPS, HYPERFUSED_CUDA_CLUSTER), beside the shape its
    batch rule picks."""

    def __init__(self, row, name: str, var: str, value: str):
        self.name, self.fwd_bwd = name, with_env(var, value, row.fwd_bwd)


class Recorded(WithEnv):
    """A fused row with the ops' own recordings (HYPERFUSED_CUDA_GRAPHS=1: each op's whole body replayed as a
    CUDA graph from a key's second call); warmed up twice, so that the timed calls replay."""
    warmups = 2

    def __init__(self, row):
        super().__init__(row, f"{row.name}, own CUDA graphs", "HYPERFUSED_CUDA_GRAPHS", "1")


def other_launch_shapes(rows, cfg: Config, multiprocessors: int) -> list:
    """The fused CUDA row again in the launch shapes its batch does not get: one thread group of 256 per row
    where the rule gives four (B < 2 x multiprocessors), four where it gives one; and at such a batch, one
    block per row and a cluster of eight beside the cluster the rule picks (sm_90+; HYPERFUSED_CUDA_CLUSTER),
    and the one-kernel step design (HYPERFUSED_STEP_DESIGN=fused) beside the GEMM-shaped default."""
    small = cfg.B < 2 * multiprocessors
    groups = "1" if small else "4"
    shapes = [(f"{groups} thread group{'s' if groups == '4' else ''} per row", "HYPERFUSED_CUDA_THREAD_GROUPS", groups)]
    if small:  # and the one-kernel step: 3 launches per step instead of 6-7, each weight read once per row
        shapes += [("1 block per row", "HYPERFUSED_CUDA_CLUSTER", "1"),
                   ("8-block cluster per row", "HYPERFUSED_CUDA_CLUSTER", "8"),
                   ("one-kernel step", "HYPERFUSED_STEP_DESIGN", "fused")]
    return [WithEnv(r, f"{r.name}, {label}", var, value)
            for r in rows if r.name == "hyperfused cuda" for label, var, value in shapes]


class OutputOnly(torch.nn.Module):
    """The output sequence of an LSTM-like module, alone: make_graphed_callables captures modules whose
    outputs are tensors."""

    def __init__(self, lstm: torch.nn.Module):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


def graphed_rows(cfg: Config, device) -> tuple[list[Row], list[dict]]:
    """nn.LSTM and each fused GPU backend with its forward and backward captured once as a CUDA graph
    (torch.cuda.make_graphed_callables, which warms up on a side stream first) and replayed on every call:
    no per-step host work or launch gaps left, whatever the driver does. Returns the rows, and an error
    record for each module whose capture failed."""
    torch.manual_seed(0)
    x = torch.randn(cfg.T, cfg.B, cfg.X, device=device)
    modules = [("nn.LSTM (cuDNN), CUDA graph", torch.nn.LSTM(cfg.X, cfg.H, device=device))]
    for backend in ("cuda", "triton"):
        if backend in hyperfused.ops.backends_for(device):
            modules.append((f"hyperfused {backend}, CUDA graph",
                            hyperfused.HyperLSTM(cfg.X, cfg.H, hyper_size=cfg.Hh, hyper_embed=cfg.Nz, backend=backend,
                                                 device=device)))
    rows, errors = [], []
    for name, m in modules:
        try:
            graphed = torch.cuda.make_graphed_callables(OutputOnly(m), (x,))
            rows.append(Row(name, graphed, m.parameters(), x))
        except Exception as e:  # a capture that fails must not lose the other rows
            errors.append(dict(config=cfg.label(), row=name, error=f"{type(e).__name__}: {e}"))
    return rows, errors


def warmed_up(rows, cfg: Config) -> tuple[list, list[dict]]:
    """Each row run once (Triton compiles, cuBLAS heuristics, the allocator): the rows that ran, and an error
    record for each that raised, so that one failing launch shape does not lose the others' timings."""
    ok, errors = [], []
    for r in rows:
        try:
            for _ in range(getattr(r, "warmups", 1)):
                r.fwd_bwd()
            ok.append(r)
        except Exception as e:
            errors.append(dict(config=cfg.label(), row=r.name, error=f"{type(e).__name__}: {e}"))
    return ok, errors


def time_config(cfg: Config, device, repeats: int, tf32: bool, autocast=None) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    rows = [r for r in make_rows(cfg, device, with_compile=False) if r.name != "reference"]
    errors = []
    if autocast is not None:  # the GEMMs-alone row writes float32 outputs in place, which autocast refuses
        rows = [_Autocast(r, autocast) for r in rows if not r.name.startswith("HyperLSTM GEMMs alone")]
    else:
        graphed, errors = graphed_rows(cfg, device)
        graphed += [Recorded(r) for r in rows if r.name in ("hyperfused cuda", "hyperfused triton")]
        if not tf32:
            rows += other_launch_shapes(rows, cfg, torch.cuda.get_device_properties(device).multi_processor_count)
        rows += graphed
    rows, failed = warmed_up(rows, cfg)
    errors += failed
    samples = {r.name: Samples() for r in rows}
    for _ in range(repeats):
        for r in rows:  # interleaved
            samples[r.name].values.append(timed(r.fwd_bwd, device))
    lstm = samples[rows[0].name].median if rows and rows[0].name.startswith("nn.LSTM") else float("nan")
    out = []
    for r in rows:
        rec = dict(config=cfg.label(), T=cfg.T, B=cfg.B, X=cfg.X, H=cfg.H, Hh=cfg.Hh, Nz=cfg.Nz, row=r.name,
                   matmul_allow_tf32=tf32, cudnn_allow_tf32=tf32, autocast=str(autocast), fwd_bwd_ms=samples[r.name].median * 1e3,
                   fwd_bwd_iqr_ms=samples[r.name].iqr * 1e3, vs_cudnn=samples[r.name].median / lstm,
                   peak_mem_mb=peak_memory_mb(r.fwd_bwd, device))
        if r.name.startswith("hyperfused"):
            rec.update(launches_and_host_time(r, device, cfg.T))
        out.append(rec)
    return out + errors


def _cuda_step_clusters():
    """Whether the CUDA step launches use clusters on this GPU (the small-batch main cell's rule needs them),
    as the extension decides it; None without a GPU or the CUDA backend."""
    if not torch.cuda.is_available() or "cuda" not in hyperfused.available_backends():
        return None
    from hyperfused import _C
    return _C._cuda_step_device()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, metavar="FILE")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="T,B,X,H[,Hh[,Nz]]")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true", help="parse, write an empty result and stop (no GPU needed)")
    args = ap.parse_args(argv)
    configs = [Config.parse(c) for c in args.configs]
    meta = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__,
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                multiprocessors=torch.cuda.get_device_properties(0).multi_processor_count
                if torch.cuda.is_available() else None,
                # 9.0+: the CUDA main cell's thread-block clusters at a small batch (hyper_lstm_simt.h)
                compute_capability=".".join(map(str, torch.cuda.get_device_capability(0)))
                if torch.cuda.is_available() else None,
                cuda_step_clusters=_cuda_step_clusters())
    result = dict(meta=meta, records=[])

    def save():
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

    save()
    if args.dry_run:
        print(f"dry run: {len(configs)} configs parsed, wrote {args.json}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_timings: no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    for cfg in configs:
        for tf32, autocast in ((False, None), (True, None), (False, torch.bfloat16)):
            try:
                recs = time_config(cfg, device, args.repeats, tf32, autocast)
            except Exception as e:  # one failing row must not lose the rest of the run
                recs = [dict(config=cfg.label(), matmul_allow_tf32=tf32, autocast=str(autocast),
                             error=f"{type(e).__name__}: {e}")]
            result["records"].extend(recs)
            save()
            for r in recs:
                print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
