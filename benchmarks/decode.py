"""Decode section: one step without gradients, as sampling a character at a time from a char-LM runs it (batch 1
and a small beam): HyperLSTMCell on each backend beside nn.LSTMCell, and HyperLSTM called with T = 1 (a
sampling loop written for nn.LSTM) beside nn.LSTM called so."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

import hyperfused

from .timing import Samples, timed

# (batch, input size, hidden size): a char-LM's sampling step, a beam of 8, and a step at the paper's H = 1000
# (where which library runs the large products matters most).
DECODE_CONFIGS = [(1, 128, 256), (8, 128, 256), (1, 128, 1000)]


HYPER_SIZE, HYPER_EMBED = 128, 16


def _step_gemms(B, X, H, device):
    """Only the products a HyperLSTMCell step computes, as torch.mm with the op's shapes and nothing between
    them: W_x x, Ŵ_x[:, :X] x + b̂, [W_h ; Ŵ_x[:, X:]] h, Ŵ_h ĥ, then the embeddings z = [Z ; Z_b] ĥ and the
    12 scaling vectors (a batched B × N_z × H product). The floor a step's arithmetic sets on this machine,
    pointwise work aside (the fused op computes z and d inside its kernel on the CPU)."""
    Hh, Nz = HYPER_SIZE, HYPER_EMBED
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    x, h, hh = r(B, X), r(B, H), r(B, Hh)
    w_x, w_hx, b_h, w_rec, w_hh = r(X, 4 * H), r(X, 4 * Hh), r(4 * Hh), r(H, 4 * H + 4 * Hh), r(Hh, 4 * Hh)
    w_z, w_d = r(Hh, 12 * Nz), r(12, Nz, H)
    return lambda: (x @ w_x, torch.addmm(b_h, x, w_hx), h @ w_rec, hh @ w_hh,
                    torch.bmm((hh @ w_z).view(B, 12, Nz).transpose(0, 1), w_d))


def _rows(B, X, H, device):
    """The cells' steps, then the layers called with T = 1 (a sampling loop written for nn.LSTM)."""
    torch.manual_seed(0)
    x = torch.randn(B, X, device=device)
    x1 = x[None]
    lstm, seq = torch.nn.LSTMCell(X, H, device=device), torch.nn.LSTM(X, H, device=device)
    seq_state = seq(x1)[1]
    rows = [("nn.LSTMCell", lambda: lstm(x)),
            ("HyperLSTMCell step's GEMMs alone (torch.mm)", _step_gemms(B, X, H, device))]
    layers = [("nn.LSTM called with T = 1", lambda: seq(x1, seq_state))]
    for backend in hyperfused.ops.backends_for(device):
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timings
        kw = dict(device=device, hyper_size=HYPER_SIZE, hyper_embed=HYPER_EMBED, backend=backend)
        cell, layer = hyperfused.HyperLSTMCell(X, H, **kw), hyperfused.HyperLSTM(X, H, **kw)
        state, layer_state = cell(x), layer(x1)[1]  # steps continue from a state, as when sampling
        rows.append((f"HyperLSTMCell {backend}", lambda cell=cell, state=state: cell(x, state)))
        layers.append((f"HyperLSTM {backend} called with T = 1",
                       lambda layer=layer, s=layer_state: layer(x1, s)))
    return rows + layers


@torch.no_grad()
def run_decode_section(device: torch.device, repeats: int) -> list[dict]:
    results = []
    todo = [(cfg, _rows(*cfg, device)) for cfg in DECODE_CONFIGS]
    bar = tqdm(total=sum(len(r) for _, r in todo) * repeats, desc="decode steps", unit="run", file=sys.stderr)
    for (B, X, H), rows in todo:
        samples = {name: Samples() for name, _ in rows}
        for name, fn in rows:
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in rows:  # interleaved; 20 steps per timed call, for a readable clock
                samples[name].values.append(timed(lambda fn=fn: [fn() for _ in range(20)], device) / 20)
                bar.update()
        base = samples["nn.LSTMCell"].median
        for name, _ in rows:
            results.append(dict(B=B, X=X, H=H, row=name, us_per_step=samples[name].median * 1e6,
                                iqr_us=samples[name].iqr * 1e6, vs_lstm_cell=samples[name].median / base))
    bar.close()
    return results


def decode_markdown(results) -> str:
    lines = ["", "### Decode: one step without gradients, of a cell or of a layer called with T = 1 (Ĥ = 128, "
             "N_z = 16)", "",
             "| B, X, H | implementation | µs per step | time vs nn.LSTMCell |", "|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r['B']}, {r['X']}, {r['H']} | {r['row']} | {r['us_per_step']:.0f} ± {r['iqr_us']:.0f} | "
                     f"{r['vs_lstm_cell']:.2f}× |")
    return "\n".join(lines)
