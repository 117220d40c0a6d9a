"""The HyperLSTM of Ha, Dai & Le (2016), written out equation by equation.

This is the oracle every fused kernel is tested against, so it is slow on purpose: every gate and every
one of the twelve embedding/scaling projection pairs is computed on its own, exactly as
``docs/design.md`` §1 writes it. It imports torch only.

Conventions shared with every backend (they define the parameter layout the kernels read):

* Gate order inside every 4·n block is PyTorch's ``(i, f, g, o)``, so ``nn.LSTM`` weights copy over
  unchanged.
* The three kinds of hyper projection are ordered ``(h, x, b)``. ``z_weight`` / ``z_bias`` hold the
  ``h`` and ``x`` kinds (``[kind, gate, n]`` flattened to ``8·N_z`` rows); the bias kind lives in
  ``bias_z_weight`` / ``bias_scale_weight`` because it has no bias of its own and disappears with
  ``bias=False``.
* ``scale_weight[k, y·H + r, n]`` is row ``r`` of ``W_kz^y``: ``d_k^y[r] = Σ_n scale_weight[k, yH+r, n] z_k^y[n]``.
* With a projection (nn.LSTM's ``proj_size = P > 0``) the carried and emitted ``h`` is
  ``W_hr · (o ⊙ tanh(LN(c)))`` of size P, as nn.LSTM's: ``weight_hh`` is then (4H, P) and the hyper cell
  reads ``[x_t ; h_{t-1}]`` of size X + P. ``W_hr`` (P, H) is an argument of its own, not one of the
  ``HyperLSTMParams`` (the fused kernels, which read that list, have no projection).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

LN_EPS = 1e-3  # the reference TensorFlow cell's epsilon
GATES = ("i", "f", "g", "o")
KINDS = ("h", "x")  # kinds with a bias on z; "b" is handled by the bias_* tensors


class HyperLSTMParams(NamedTuple):
    """One layer, one direction. Shapes with X inputs, H hidden, Hh = hyper_size, Nz = hyper_embed."""

    weight_ih: torch.Tensor  # (4H, X)      W_x
    weight_hh: torch.Tensor  # (4H, H)      W_h  ((4H, P) with a projection)
    bias: torch.Tensor  # (4H,)         b_0
    hyper_weight_ih: torch.Tensor  # (4Hh, X+H)   Ŵ_x, reads [x_t ; h_{t-1}]  ((4Hh, X+P) with a projection)
    hyper_weight_hh: torch.Tensor  # (4Hh, Hh)    Ŵ_h
    hyper_bias: torch.Tensor  # (4Hh,)        b̂
    z_weight: torch.Tensor  # (8Nz, Hh)    W_hh^y, W_hx^y  (kinds h, x)
    z_bias: torch.Tensor  # (8Nz,)        b_hh^y, b_hx^y
    scale_weight: torch.Tensor  # (2, 4H, Nz)  W_hz^y, W_xz^y
    bias_z_weight: torch.Tensor  # (4Nz, Hh)    W_hb^y
    bias_scale_weight: torch.Tensor  # (4H, Nz)     W_bz^y
    ln_weight: torch.Tensor  # (4H,)  per-gate LN gain of the main cell
    ln_bias: torch.Tensor  # (4H,)
    ln_cell_weight: torch.Tensor  # (H,)   LN_c gain
    ln_cell_bias: torch.Tensor  # (H,)
    hyper_ln_weight: torch.Tensor  # (4Hh,)
    hyper_ln_bias: torch.Tensor  # (4Hh,)
    hyper_ln_cell_weight: torch.Tensor  # (Hh,)
    hyper_ln_cell_bias: torch.Tensor  # (Hh,)


PARAM_NAMES = HyperLSTMParams._fields


def layer_norm(v: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LN over the last axis with the biased variance and ε = 1e-3, as in the reference cell."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + LN_EPS) * gain + bias


def _gate(t: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Block k (of 4) of size n along the last axis."""
    return t[..., k * n:(k + 1) * n]


def _lstm_update(pre: dict, c_prev, gains, forget_bias, layer_norm_on, mask):
    """Shared tail of both cells: c_t and h_t from normalised gate pre-activations."""
    i, f, g, o = (pre[y] for y in GATES)
    g_act = torch.tanh(g)
    if mask is not None:
        g_act = g_act * mask  # recurrent dropout on φ(g) (Semeniuta et al.)
    c = torch.sigmoid(f + forget_bias) * c_prev + torch.sigmoid(i) * g_act
    c_out = layer_norm(c, *gains) if layer_norm_on else c
    h = torch.sigmoid(o) * torch.tanh(c_out)
    return h, c  # c (not LN(c)) is the carried state


def hyper_cell_step(x, h_prev, hh_prev, hc_prev, p: HyperLSTMParams, layer_norm_on, forget_bias, hyper_mask=None):
    """The hyper LN-LSTM reading x̂_t = [x_t ; h_{t-1}]; returns (ĥ_t, ĉ_t).

    Like the main cell it adds forget_bias to f̂ and drops out φ(ĝ): the reference TensorFlow HyperLSTMCell
    builds its hyper cell as an LSTMCell with the default forget_bias = 1 and the same recurrent dropout.
    """
    Hh = hh_prev.shape[-1]
    x_hat = torch.cat([x, h_prev], dim=-1)
    pre = {}
    for k, y in enumerate(GATES):
        a = x_hat @ _gate(p.hyper_weight_ih.T, k, Hh) + hh_prev @ _gate(p.hyper_weight_hh.T, k, Hh) + _gate(p.hyper_bias, k, Hh)
        pre[y] = layer_norm(a, _gate(p.hyper_ln_weight, k, Hh), _gate(p.hyper_ln_bias, k, Hh)) if layer_norm_on else a
    gains = (p.hyper_ln_cell_weight, p.hyper_ln_cell_bias)
    return _lstm_update(pre, hc_prev, gains, forget_bias, layer_norm_on, hyper_mask)


def embeddings(hh, p: HyperLSTMParams):
    """z_h^y, z_x^y, z_b^y from the *updated* hyper state ĥ_t; a dict keyed by (kind, gate)."""
    Nz = p.scale_weight.shape[-1]
    z = {}
    for kind_idx, kind in enumerate(KINDS):
        for k, y in enumerate(GATES):
            rows = slice((kind_idx * 4 + k) * Nz, (kind_idx * 4 + k + 1) * Nz)
            z[kind, y] = hh @ p.z_weight[rows].T + p.z_bias[rows]
    for k, y in enumerate(GATES):
        z["b", y] = hh @ p.bias_z_weight[k * Nz:(k + 1) * Nz].T  # no bias on z_b
    return z


def scaling_vectors(hh, p: HyperLSTMParams):
    """d_h^y, d_x^y and the dynamic bias b^y (each of size H) for a hyper state ĥ_t."""
    H = p.weight_hh.shape[0] // 4
    z = embeddings(hh, p)
    d = {}
    for k, y in enumerate(GATES):
        d["h", y] = z["h", y] @ _gate(p.scale_weight[0].T, k, H)
        d["x", y] = z["x", y] @ _gate(p.scale_weight[1].T, k, H)
        d["b", y] = z["b", y] @ _gate(p.bias_scale_weight.T, k, H) + _gate(p.bias, k, H)
    return d


def zoneout(new, prev, keep_new):
    """Zoneout (Krueger et al. 2016) as haste applies it to h: ``keep_new`` is 1 where a unit takes its new
    value and 0 where it keeps the previous one (training: Bernoulli(1 - p) draws), or 1 - p everywhere
    (evaluation: the expectation)."""
    return new if keep_new is None else prev + keep_new * (new - prev)


def project(u: torch.Tensor, weight_hr: torch.Tensor) -> torch.Tensor:
    """nn.LSTM's projection h = W_hr u, in u's dtype (autocast would leave the product in its low precision,
    which the next step's state check refuses)."""
    return (u @ weight_hr.T).to(u.dtype)


def hyper_lstm_step(x, state, p: HyperLSTMParams, layer_norm_on=True, forget_bias=1.0, mask=None, hyper_mask=None,
                    zoneout_mask=None, hyper_zoneout_mask=None, weight_hr=None):
    """One time step. ``state = (h, c, ĥ, ĉ)``; returns the new state in the same order. The zoneout masks
    act on h and ĥ (the embeddings read the zoned ĥ_t); with ``weight_hr`` (P, H), on the projected h."""
    h_prev, c_prev, hh_prev, hc_prev = state
    H = c_prev.shape[-1]
    hh, hc = hyper_cell_step(x, h_prev, hh_prev, hc_prev, p, layer_norm_on, forget_bias, hyper_mask)
    hh = zoneout(hh, hh_prev, hyper_zoneout_mask)
    d = scaling_vectors(hh, p)
    pre = {}
    for k, y in enumerate(GATES):
        # d ⊙ (W v): the row-scaled weight diag(d)·W is never formed.
        a = d["h", y] * (h_prev @ _gate(p.weight_hh.T, k, H)) + d["x", y] * (x @ _gate(p.weight_ih.T, k, H)) + d["b", y]
        pre[y] = layer_norm(a, _gate(p.ln_weight, k, H), _gate(p.ln_bias, k, H)) if layer_norm_on else a
    h, c = _lstm_update(pre, c_prev, (p.ln_cell_weight, p.ln_cell_bias), forget_bias, layer_norm_on, mask)
    if weight_hr is not None:
        h = project(h, weight_hr)
    return zoneout(h, h_prev, zoneout_mask), c, hh, hc


def hyper_lstm_sequence(x, h0, c0, hh0, hc0, p: HyperLSTMParams, layer_norm_on=True, forget_bias=1.0,
                        mask: Optional[torch.Tensor] = None, hyper_mask: Optional[torch.Tensor] = None,
                        zoneout_mask: Optional[torch.Tensor] = None, hyper_zoneout_mask: Optional[torch.Tensor] = None,
                        weight_hr: Optional[torch.Tensor] = None):
    """Runs x of shape (T, B, X) from the given state; returns the stacked (h, c, ĥ, ĉ) of every step.

    ``mask``/``hyper_mask`` (T, B, H)/(T, B, Hh) are recurrent-dropout multipliers (already scaled by 1/keep);
    ``zoneout_mask``/``hyper_zoneout_mask`` of h's and ĥ's shapes are zoneout's (see `zoneout`). ``weight_hr``
    (P, H): nn.LSTM's projection of h (then h0 and the h returned are (·, B, P)).
    """
    state = (h0, c0, hh0, hc0)
    outs = []
    at = lambda m, t: None if m is None else m[t]  # noqa: E731
    for t in range(x.shape[0]):
        state = hyper_lstm_step(x[t], state, p, layer_norm_on, forget_bias, at(mask, t), at(hyper_mask, t),
                                at(zoneout_mask, t), at(hyper_zoneout_mask, t), weight_hr)
        outs.append(state)
    return tuple(torch.stack(s) for s in zip(*outs))
