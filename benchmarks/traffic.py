"""Per-step memory traffic and arithmetic of the fused HyperLSTM step designs, computed from their launch shapes.

    python -m benchmarks.breakdown --traffic --config 100,128,128,1000     # T, B, X, H (Ĥ=128, N_z=16)

A model, not a measurement: each kernel's bytes are what its code reads and writes from global memory (every
read counted, as if nothing stayed in cache, which is what an L2 sees when B blocks run at once), its FLOPs
the multiply-adds in its loops. The step kernels are those of csrc/cuda/hyper_lstm_cuda.cu (the Triton
kernels have the same structure): one thread block per batch row, so the weights a row needs are read B
times per step, and some loops run serially over a whole dimension in one thread. The "weights once" line
is what the same step reads if every weight is read once per step, the target of a batch-parallel design.
The GEMM-shaped step (StepPhase in csrc/hyper_lstm_kernels.h; CUDA's default) computes z and the 12 scaling
vectors (forward), d_h, dz and dĥ's share (backward) as GEMMs between a main-cell and a hyper-cell kernel, so
the projections are read once per step and no thread loops over H alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from hyperfused.ops.hyper_lstm import backward_workspace_width, workspace_width

F32 = 4  # bytes per element


@dataclass
class KernelCost:
    name: str
    launches: int       # per step
    read: float         # bytes from global memory per step
    written: float
    flops: float
    weights: float      # of `read`: bytes of parameters
    serial: str = ""    # the longest loop one thread runs alone, and how many threads run it


def _gemm(name, m, k, n) -> KernelCost:
    w = k * n * F32
    return KernelCost(name, 1, (m * k) * F32 + w, m * n * F32, 2.0 * m * k * n, w)


def forward_step(B, X, H, Hh, Nz, layer_norm=True) -> list[KernelCost]:
    """One forward step: the two recurrent GEMMs and the fused step kernel (grid = B blocks)."""
    ln = (2 * 4 * H + 2 * H + 2 * 4 * Hh + 2 * Hh) if layer_norm else 0  # LN gains and biases
    # Per row: z weights (12 N_z × Ĥ) and z_bias, the 12 scaling weights (12 N_z × H), b_0, the LN parameters.
    weights_row = (12 * Nz * Hh + 8 * Nz + 12 * Nz * H + 4 * H + ln) * F32
    data_row = (4 * H + 4 * Hh) + 4 * Hh + 4 * Hh + 4 * H + H + Hh  # g, ĝ_h, ĝ_x, g_x, c_{t-1}, ĉ_{t-1}
    ws = workspace_width(H, Hh, Nz)
    out_row = 2 * H + 2 * Hh + ws
    flops_row = 2 * 12 * Nz * Hh + 2 * 12 * Nz * H + 40 * (H + Hh)  # z, the 12 d vectors, gates + LN (≈)
    step = KernelCost("fused forward step (1 block per row)", 1, B * (weights_row + data_row * F32),
                      B * out_row * F32, B * flops_row, B * weights_row,
                      f"z: Ĥ={Hh} per thread, {12 * Nz} threads of 256 busy")
    return [_gemm("GEMM h·[W_h; Ŵ_h]", B, H, 4 * H + 4 * Hh), _gemm("GEMM ĥ·Ŵ_ĥ", B, Hh, 4 * Hh), step]


def forward_step_gemm(B, X, H, Hh, Nz, layer_norm=True) -> list[KernelCost]:
    """The GEMM-shaped forward step: the recurrent GEMMs, the hyper-cell kernel, z and d as GEMMs, the
    main-cell kernel (grid = B blocks each)."""
    hln = (2 * 4 * Hh + 2 * Hh) if layer_norm else 0
    mln = (2 * 4 * H + 2 * H) if layer_norm else 0
    hyper = KernelCost("hyper cell (1 block per row)", 1, B * (hln + 4 * Hh * 3 + Hh) * F32,
                       B * (2 * Hh + 5 * Hh + 5) * F32, B * 40.0 * Hh, B * hln * F32)
    z = _gemm("GEMM z = ĥ·Zᵀ (+ z bias)", B, Hh, 12 * Nz)
    d = KernelCost("batched GEMM d = z·W_z (12 gates × kinds)", 1, (12 * B * Nz + 12 * Nz * H) * F32,
                   12 * B * H * F32, 2.0 * 12 * B * Nz * H, 12 * Nz * H * F32)
    main = KernelCost("main cell (1 block per row)", 1, B * ((4 * H + mln) + (4 * H + 4 * H + 12 * H + H)) * F32,
                      B * (2 * H + 5 * H + 5) * F32, B * 40.0 * H, B * (4 * H + mln) * F32)
    return forward_step(B, X, H, Hh, Nz, layer_norm)[:2] + [hyper, z, d, main]


def backward_step(B, X, H, Hh, Nz, layer_norm=True) -> list[KernelCost]:
    """One backward step: the fused step kernel and the two GEMMs for dh_{t-1}, dĥ_{t-1}."""
    ln = (2 * 4 * H + 2 * H + 2 * 4 * Hh + 2 * Hh) if layer_norm else 0
    # Per row: d_h for dg (4 N_z H), all 12 scaling weights for dz (12 N_z H), the z weights for dĥ (12 N_z Ĥ).
    weights_row = (4 * Nz * H + 12 * Nz * H + 12 * Nz * Hh + ln) * F32
    ws = workspace_width(H, Hh, Nz)
    data_row = ws + (4 * H + 4 * Hh) + 4 * H + 2 * H + 2 * Hh + 2 * H + 2 * Hh  # ws, g, g_x, c's, incoming grads
    # dz's loop reads g and g_x once per (kind, gate, m): 12 N_z passes over H values each.
    data_row += 3 * Nz * 4 * H
    dws = backward_workspace_width(H, Hh, Nz)  # da, dy, dcout, dz, dyh, dhcout
    out_row = (4 * H + 4 * Hh) + dws + H + Hh
    flops_row = 2 * 4 * Nz * H + 2 * 12 * Nz * H + 2 * 12 * Nz * Hh + 50 * (H + Hh)
    step = KernelCost("fused backward step (1 block per row)", 1, B * (weights_row + data_row * F32),
                      B * out_row * F32, B * flops_row, B * weights_row,
                      f"dz: H={H} per thread, {12 * Nz} threads of 256 busy")
    return [step, _gemm("GEMM dg·[W_h; Ŵ_h]ᵀ", B, 4 * H + 4 * Hh, H), _gemm("GEMM dâ·Ŵ_ĥᵀ", B, 4 * Hh, Hh)]


def backward_step_gemm(B, X, H, Hh, Nz, layer_norm=True) -> list[KernelCost]:
    """The GEMM-shaped backward step: d_h as a batched GEMM, the main-cell kernel (dg, dd out), dz = dd·W_z
    (batched), dĥ's share dz·Z, the hyper-cell kernel, and the two GEMMs for dh_{t-1}, dĥ_{t-1}."""
    hln = (2 * 4 * Hh + 2 * Hh) if layer_norm else 0
    mln = (2 * 4 * H + 2 * H) if layer_norm else 0
    ws = workspace_width(H, Hh, Nz)
    dh = KernelCost("batched GEMM d_h = z_h·W_hz", 1, (4 * B * Nz + 4 * Nz * H) * F32, 4 * B * H * F32,
                    2.0 * 4 * B * Nz * H, 4 * Nz * H * F32)
    main = KernelCost("main cell backward (1 block per row)", 1,
                      B * (mln + ws + (4 * H) * 3 + 4 * H + 6 * H) * F32,   # LN params, ws, g, g_x, d_h, states/grads
                      B * (4 * H + 12 * H + 9 * H + H) * F32, B * 50.0 * H, B * mln * F32)
    dz = KernelCost("batched GEMM dz = dd·W_z", 1, (12 * B * H + 12 * H * Nz) * F32, 12 * B * Nz * F32 * 2,
                    2.0 * 12 * B * H * Nz, 12 * H * Nz * F32)
    dhh = _gemm("GEMM dĥ += dz·Z", B, 12 * Nz, Hh)
    hyper = KernelCost("hyper cell backward (1 block per row)", 1, B * (hln + ws // 4 + 12 * Hh) * F32,
                       B * (8 * Hh) * F32, B * 50.0 * Hh, B * hln * F32)
    return [dh, main, dz, dhh, hyper] + backward_step(B, X, H, Hh, Nz, layer_norm)[1:]


def weights_once(costs: list[KernelCost], B: int) -> float:
    """Bytes of the step if each step kernel read its weights once, not once per row."""
    return sum(c.read - (c.weights * (B - 1) / B if "1 block per row" in c.name else 0.0) for c in costs)


def recorded_copies(T, B, X, H, Hh, Nz) -> dict[str, tuple[float, float]]:
    """Bytes a call copies (in, out) when the ops replay their own CUDA graphs (HYPERFUSED_CUDA_GRAPHS=1, no
    masks): the activation inputs and b_0 into the graph's own, and clones of its outputs. Forward: x, the four
    initial states and b_0 in; h, c, ĥ, ĉ, g and ws out. Backward: the four output gradients, x, the states,
    the six forward outputs and b_0 in; the gradients of x, the states and every parameter out."""
    M, GW, WS = T * B, 4 * H + 4 * Hh, workspace_width(H, Hh, Nz)
    states = B * (2 * H + 2 * Hh)
    outputs = M * (2 * H + 2 * Hh + GW + WS)
    params = (4 * H * (X + H + 1) + 4 * Hh * (X + H + Hh + 1) + 12 * Nz * Hh + 8 * Nz + 12 * H * Nz
              + 4 * H * 2 + 2 * H + 4 * Hh * 2 + 2 * Hh)  # the layer norms' gains and biases last
    return {"forward": ((M * X + states + 4 * H) * F32, outputs * F32),
            "backward": ((M * (2 * H + 2 * Hh) + M * X + states + outputs + 4 * H) * F32,
                         (M * X + states + params) * F32)}


def traffic_markdown(T, B, X, H, Hh, Nz, layer_norm=True) -> str:
    lines = [f"### Per-step traffic of the step designs (model, T={T}, B={B}, X={X}, H={H}, Ĥ={Hh}, N_z={Nz}, "
             "float32)", "",
             "| pass | kernel | launches | MB read | of which weights | MB written | GFLOP | longest serial loop |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, costs in (("forward, one kernel", forward_step(B, X, H, Hh, Nz, layer_norm)),
                        ("forward, GEMM-shaped", forward_step_gemm(B, X, H, Hh, Nz, layer_norm)),
                        ("backward, one kernel", backward_step(B, X, H, Hh, Nz, layer_norm)),
                        ("backward, GEMM-shaped", backward_step_gemm(B, X, H, Hh, Nz, layer_norm))):
        for c in costs:
            lines.append(f"| {name} | {c.name} | {c.launches} | {c.read / 1e6:.1f} | {c.weights / 1e6:.1f} | "
                         f"{c.written / 1e6:.1f} | {c.flops / 1e9:.3f} | {c.serial} |")
        total = sum(c.read for c in costs)
        lines.append(f"| {name} | **per step** | {sum(c.launches for c in costs)} | {total / 1e6:.1f} | "
                     f"{sum(c.weights for c in costs) / 1e6:.1f} | {sum(c.written for c in costs) / 1e6:.1f} | "
                     f"{sum(c.flops for c in costs) / 1e9:.3f} | weights read once: {weights_once(costs, B) / 1e6:.1f}"
                     " MB read |")
    lines += ["", f"With the ops' own CUDA graphs (HYPERFUSED_CUDA_GRAPHS=1) a call is one graph launch plus "
              "copies of its inputs into the graph's own and clones of its outputs, once per call, not per step:", "",
              "| pass | MB copied in | MB cloned out | of the GEMM-shaped steps' reads over T steps |",
              "|---|---:|---:|---:|"]
    steps = {"forward": forward_step_gemm(B, X, H, Hh, Nz, layer_norm),
             "backward": backward_step_gemm(B, X, H, Hh, Nz, layer_norm)}
    for name, (cin, cout) in recorded_copies(T, B, X, H, Hh, Nz).items():
        reads = T * sum(c.read for c in steps[name])
        lines.append(f"| {name} | {cin / 1e6:.1f} | {cout / 1e6:.1f} | {100 * (cin + cout) / reads:.1f}% |")
    lines += ["", "Bytes are global-memory reads and writes as the kernels' loops issue them. The one-kernel step reads "
              "the 12 scaling projections once per batch row; the GEMM-shaped step reads them once per step, "
              "with three (forward) or four (backward) more launches. Host work per step (C++ driver): the GEMM calls, the kernel launches and "
              "about a dozen tensor views; the Triton driver makes every per-step argument before its loop and "
              "launches from Python with ~60 arguments."]
    return "\n".join(lines)
