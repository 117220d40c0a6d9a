"""Static-hypernetwork section: generating every conv kernel of HyperWRN-40-2 (by default) (forward + backward), fused vs
the per-tile Python loop (the reference) vs plain PyTorch einsum, and its share of a training step."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

import hyperfused
from hyperfused.models import HyperWRN

from .timing import Samples, timed


def _generation(model: HyperWRN, backend: str):
    net = model.hypernet
    params = [*net.parameters(), *(c.z for c in model.hyper_convs)]

    def run():
        for p in params:
            p.grad = None
        net.backend = backend
        if backend == "torch":
            shapes = [(c.out_channels, c.in_channels) for c in model.hyper_convs]
            meta, _, numel = hyperfused.ops.tile_layout(shapes, net.out_tile, net.in_tile, net.kernel_size)
            z = torch.cat([c.z for c in model.hyper_convs])
            flat = hyperfused.ops.generate_kernels("torch", z, net.w_in, net.b_in, net.w_out, net.b_out, meta,
                                                   numel, net.kernel_size)
            flat.sum().backward()
        else:
            sum(k.sum() for k in net.generate(model.hyper_convs)).backward()

    return run


def run_static_section(device, quick, repeats, warmup, depth=40, widen=2):
    model = HyperWRN(depth, widen, device=device)
    tiles = sum(c.z.shape[0] for c in model.hyper_convs)
    rows = [("per-tile loop (reference)", "reference"), ("PyTorch einsum", "torch")]
    rows += [(f"hyperfused {b}", b) for b in hyperfused.ops.backends_for(device) if b != "reference"
             and not (b == "triton" and device.type != "cuda")]
    fns = {name: _generation(model, backend) for name, backend in rows}
    batch = 16 if quick and device.type == "cpu" else 128
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fast_backend = rows[-1][1]

    def train_step():
        model.zero_grad(set_to_none=True)
        model.hypernet.backend = fast_backend
        torch.nn.functional.cross_entropy(model(x), y).backward()

    samples = {name: Samples() for name, _ in rows}
    step = Samples()
    reps = min(repeats, 3) if quick else repeats
    bar = tqdm(total=(warmup + reps) * (len(rows) + 1), desc="static hypernet timings", unit="run", file=sys.stderr)
    for rep in range(warmup + reps):
        for name, _ in rows:
            t = timed(fns[name], device)
            if rep >= warmup:
                samples[name].values.append(t)
            bar.update()
        t = timed(train_step, device)
        if rep >= warmup:
            step.values.append(t)
        bar.update()
    bar.close()
    loop = samples[rows[0][0]].median
    results = [dict(model=f"HyperWRN-{depth}-{widen} ({len(model.hyper_convs)} layers, {tiles} tiles)", row=name,
                    ms=samples[name].median * 1e3, iqr_ms=samples[name].iqr * 1e3,
                    speedup=loop / samples[name].median) for name, _ in rows]
    fast = samples[rows[-1][0]].median
    results.append(dict(model=f"HyperWRN-{depth}-{widen} training step, batch {batch}", row=f"fwd+bwd with {rows[-1][0]}",
                        ms=step.median * 1e3, iqr_ms=step.iqr * 1e3, speedup=float("nan"),
                        generation_share=fast / step.median))
    return results
