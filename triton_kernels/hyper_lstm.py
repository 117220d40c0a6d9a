"""Fused HyperLSTM step kernels in Triton and the sequence driver around them.

One program per batch row and time step does, in registers: the hyper LN-LSTM cell on [x_t ; h_{t-1}],
the 12 embeddings z (Ĥ→N_z), the 12 scaling vectors d (N_z→H), the row scaling d ⊙ (W v), the per-gate
layer norm and the main cell update (forward), or all of it in reverse (backward). The recurrent GEMMs
and the post-loop weight-gradient GEMMs run in torch, as in the C++ driver (csrc/hyper_lstm.cpp), whose
workspace layout these kernels share, so the two backends are interchangeable step for step.

By default (the GEMM-shaped step, `gemm_shaped`) each step runs the kernels in two phases, the hyper cell
and then the main cell, with the embeddings and the scaling vectors (forward), or d_h, dz and dĥ's share
(backward), computed between them as torch GEMMs over all rows; PHASE 0 does the whole step in one program.

Inputs follow hyperfused.reference.PARAM_NAMES order; bf16/fp16 values are cast to float32 right after
each load (the accumulation is float32 throughout).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import layouts
from ._common import LN_EPS, layer_norm, layer_norm_backward, next_pow2, on_device_of, tanh


@functools.lru_cache(maxsize=None)
def ws_layout(H, Hh, Nz):
    """Offsets inside one row of the forward workspace (workspace_layouts.def), as the kernels' constexprs.
    The kernels index n, the first slot, from the row's start."""
    L = layouts.ws_layout(H, Hh, Nz)
    assert L["n"] == 0, "workspace_layouts.def: the kernels expect n first in the forward workspace"
    return dict(GW=4 * H + 4 * Hh, **{f"OFF_{k.upper()}": v for k, v in L.items() if k not in ("n", "width")})


@functools.lru_cache(maxsize=None)
def dws_layout(H, Hh, Nz):
    """Offsets inside one row of the backward workspace (workspace_layouts.def, every slot kept), as the
    kernels' constexprs. The kernels index da, the first slot, from the row's start."""
    L = layouts.dws_layout(H, Hh, Nz)
    assert L["da"] == 0, "workspace_layouts.def: the kernels expect da first in the backward workspace"
    return {f"OFF_{k.upper()}": v for k, v in L.items() if k not in ("da", "width")}


@functools.lru_cache(maxsize=None)
def ws_width(H, Hh, Nz):
    return layouts.ws_layout(H, Hh, Nz)["width"]


@functools.lru_cache(maxsize=None)
def dws_width(H, Hh, Nz):
    return layouts.dws_layout(H, Hh, Nz)["width"]


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _affine(n, w_ptr, b_ptr, offs, mask, LN: tl.constexpr):
    if LN:
        return n * _load(w_ptr, offs, mask) + _load(b_ptr, offs, mask)
    return n


@triton.jit
def _cell_fwd(yi, yf, yg, yo, c_prev, m, fb, cw_ptr, cb_ptr, offs, msk, n, cn_ptr, crstd_ptr, LN: tl.constexpr):
    c = tl.where(msk, tl.sigmoid(yf + fb) * c_prev + tl.sigmoid(yi) * tanh(yg) * m, 0.0)
    co = c
    if LN:
        cn, cr = layer_norm(c, msk, n, 1e-3)
        tl.store(cn_ptr + offs, cn, mask=msk)
        tl.store(crstd_ptr, cr)
        co = cn * _load(cw_ptr, offs, msk) + _load(cb_ptr, offs, msk)
    h = tl.where(msk, tl.sigmoid(yo) * tanh(co), 0.0)
    return c, h


@triton.jit
def _cell_bwd(yi, yf, yg, yo, m, c, c_prev, cn, crstd, cw_ptr, cb_ptr, dh, dc_carry, dc_out, fb, offs, msk, n,
              LN: tl.constexpr):
    co = c
    if LN:
        cw = _load(cw_ptr, offs, msk)
        co = cn * cw + _load(cb_ptr, offs, msk)
    tc = tanh(co)
    so = tl.sigmoid(yo)
    dyo = dh * tc * so * (1.0 - so)
    dco = tl.where(msk, dh * so * (1.0 - tc * tc), 0.0)
    dcl = dco
    if LN:
        dcl = layer_norm_backward(dco, cn, cw, crstd, msk, n)
    dc = dc_carry + dcl + dc_out
    si = tl.sigmoid(yi)
    sf = tl.sigmoid(yf + fb)
    tg = tanh(yg)
    dyi = dc * tg * m * si * (1.0 - si)
    dyf = dc * c_prev * sf * (1.0 - sf)
    dyg = dc * si * m * (1.0 - tg * tg)
    return dyi, dyf, dyg, dyo, dco, tl.where(msk, dc * sf, 0.0)


@triton.jit
def _cell_bwd_row(yi, yf, yg, yo, dh, row, o, msk, n: tl.constexpr, c_ptr, c_prev_ptr, ws, OFF_CN: tl.constexpr,
                  OFF_CRSTD: tl.constexpr, cw_ptr, cb_ptr, mask_ptr, dc_out_ptr, dc_next_ptr, dc_prev_ptr, dcout_ptr,
                  fb, BLOCK: tl.constexpr, LN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DC_OUT: tl.constexpr):
    """_cell_bwd for one row of a cell of width n, reading its inputs and storing dcout and the new carry.
    The carry comes in through dc_next_ptr (grad of c_t via step t+1) and leaves through dc_prev_ptr (grad
    of c_{t-1}): two buffers, since the load and the store map lanes differently and nothing orders them."""
    dc_out = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_DC_OUT:
        dc_out += _load(dc_out_ptr, row * n + o, msk)
    m = 1.0
    if HAS_MASK:
        m = _load(mask_ptr, row * n + o, msk)
    crstd = 1.0
    if LN:
        crstd = tl.load(ws + OFF_CRSTD)
    dyi, dyf, dyg, dyo, dco, dc_prev = _cell_bwd(
        yi, yf, yg, yo, m, _load(c_ptr, row * n + o, msk), _load(c_prev_ptr, row * n + o, msk),
        _load(ws, OFF_CN + o, msk), crstd, cw_ptr, cb_ptr, dh, _load(dc_next_ptr, row * n + o, msk), dc_out, fb,
        o, msk, n, LN)
    tl.store(dc_prev_ptr + row * n + o, dc_prev, mask=msk)
    tl.store(dcout_ptr + o, dco, mask=msk)
    return dyi, dyf, dyg, dyo


@triton.jit
def _hyper_gate_fwd(k: tl.constexpr, row, g_ptr, ghh_ptr, ghx_ptr, ws, lnw_ptr, lnb_ptr, oh, mh,
                    H: tl.constexpr, HH: tl.constexpr, GW: tl.constexpr, OFF_HN: tl.constexpr,
                    OFF_HRSTD: tl.constexpr, LN: tl.constexpr):
    a = (_load(ghx_ptr, row * 4 * HH + k * HH + oh, mh) + _load(g_ptr, row * GW + 4 * H + k * HH + oh, mh)
         + _load(ghh_ptr, row * 4 * HH + k * HH + oh, mh))
    if LN:
        n, r = layer_norm(a, mh, HH, 1e-3)
        tl.store(ws + OFF_HRSTD + k, r)
    else:
        n = a
    tl.store(ws + OFF_HN + k * HH + oh, n, mask=mh)
    return _affine(n, lnw_ptr + k * HH, lnb_ptr + k * HH, oh, mh, LN)


@triton.jit
def _embed(w_ptr, first_row, hh, oz, mz, oh, mh, HH: tl.constexpr):
    """z[n] = Σ_j W[first_row + n, j] ĥ[j] for one (kind, gate) block of N_z rows."""
    w = tl.load(w_ptr + (first_row + oz)[:, None] * HH + oh[None, :], mask=mz[:, None] & mh[None, :],
                other=0.0).to(tl.float32)
    return tl.sum(w * hh[None, :], axis=1)


@triton.jit
def _scale(w_ptr, first_row, z, oH, mH, oz, mz, NZ: tl.constexpr):
    """d[r] = Σ_n W[first_row + r, n] z[n] over one gate's H rows."""
    w = tl.load(w_ptr + (first_row + oH)[:, None] * NZ + oz[None, :], mask=mH[:, None] & mz[None, :],
                other=0.0).to(tl.float32)
    return tl.sum(w * z[None, :], axis=1)


@triton.jit
def _main_gate_fwd(y: tl.constexpr, row, hh, g_ptr, gx_ptr, ws, bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr,
                   bsw_ptr, lnw_ptr, lnb_ptr, oH, mH, oh, mh, oz, mz, H: tl.constexpr, HH: tl.constexpr,
                   NZ: tl.constexpr, GW: tl.constexpr, OFF_Z: tl.constexpr, OFF_RSTD: tl.constexpr,
                   LN: tl.constexpr):
    zh = _embed(zw_ptr, y * NZ, hh, oz, mz, oh, mh, HH) + _load(zb_ptr, y * NZ + oz, mz)
    zx = _embed(zw_ptr, (4 + y) * NZ, hh, oz, mz, oh, mh, HH) + _load(zb_ptr, (4 + y) * NZ + oz, mz)
    zb = _embed(bzw_ptr, y * NZ, hh, oz, mz, oh, mh, HH)
    tl.store(ws + OFF_Z + y * NZ + oz, zh, mask=mz)
    tl.store(ws + OFF_Z + (4 + y) * NZ + oz, zx, mask=mz)
    tl.store(ws + OFF_Z + (8 + y) * NZ + oz, zb, mask=mz)
    dh = _scale(sw_ptr, y * H, zh, oH, mH, oz, mz, NZ)
    dx = _scale(sw_ptr, 4 * H + y * H, zx, oH, mH, oz, mz, NZ)
    db = _scale(bsw_ptr, y * H, zb, oH, mH, oz, mz, NZ)
    return _main_gate_scaled(y, row, dh, dx, db, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                             OFF_RSTD, LN)


@triton.jit
def _main_gate_given(y: tl.constexpr, row, d_ptr, n_rows, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH,
                     H: tl.constexpr, GW: tl.constexpr, OFF_RSTD: tl.constexpr, LN: tl.constexpr):
    """_main_gate_fwd with the scaling vectors given, d (12, B, H) kind-major (the GEMM-shaped step)."""
    dh = _load(d_ptr, (y * n_rows + row) * H + oH, mH)
    dx = _load(d_ptr, ((4 + y) * n_rows + row) * H + oH, mH)
    db = _load(d_ptr, ((8 + y) * n_rows + row) * H + oH, mH)
    return _main_gate_scaled(y, row, dh, dx, db, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                             OFF_RSTD, LN)


@triton.jit
def _main_gate_scaled(y: tl.constexpr, row, dh, dx, db, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH,
                      H: tl.constexpr, GW: tl.constexpr, OFF_RSTD: tl.constexpr, LN: tl.constexpr):
    """Gate y's row-scaled pre-activation d_h ⊙ (W_h h) + d_x ⊙ (W_x x) + b_0 + d_b, its LN, stored n; returns
    the gate value after LN's gain and bias."""
    a = (dh * _load(g_ptr, row * GW + y * H + oH, mH) + dx * _load(gx_ptr, row * 4 * H + y * H + oH, mH)
         + _load(bias_ptr, y * H + oH, mH) + db)
    if LN:
        n, r = layer_norm(a, mH, H, 1e-3)
        tl.store(ws + OFF_RSTD + y, r)
    else:
        n = a
    tl.store(ws + y * H + oH, n, mask=mH)
    return _affine(n, lnw_ptr + y * H, lnb_ptr + y * H, oH, mH, LN)


@triton.jit
def _feature_ranges(H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_HH: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Offsets and masks over the main (H), hyper (Ĥ) and embedding (N_z) feature axes."""
    oH = tl.arange(0, BLOCK_H)
    oh = tl.arange(0, BLOCK_HH)
    oz = tl.arange(0, BLOCK_Z)
    return oH, oH < H, oh, oh < HH, oz, oz < NZ


@triton.jit
def hyper_lstm_fwd_step(g_ptr, ghh_ptr, gx_ptr, ghx_ptr, c_prev_ptr, hc_prev_ptr, mask_ptr, hmask_ptr,
                        h_prev_ptr, hh_prev_ptr, zmask_ptr, hzmask_ptr,
                        h_ptr, c_ptr, hh_ptr, hc_ptr, ws_ptr,
                        bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr,
                        hlnw_ptr, hlnb_ptr, hlncw_ptr, hlncb_ptr, forget_bias, d_ptr, n_rows,
                        H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr, WS: tl.constexpr,
                        GW: tl.constexpr, OFF_CN: tl.constexpr, OFF_Z: tl.constexpr, OFF_HN: tl.constexpr,
                        OFF_HCN: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_CRSTD: tl.constexpr, OFF_HRSTD: tl.constexpr,
                        OFF_HCRSTD: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_HH: tl.constexpr, BLOCK_Z: tl.constexpr,
                        LN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_HMASK: tl.constexpr,
                        HAS_ZONE: tl.constexpr, HAS_HZONE: tl.constexpr, PHASE: tl.constexpr):
    """PHASE 0: the whole step. The GEMM-shaped step (csrc/hyper_lstm_kernels.h, StepPhase): 1, the hyper cell
    only; 2, the main cell with the scaling vectors given in d_ptr, (12, n_rows, H)."""
    row = tl.program_id(0)
    ws = ws_ptr + row * WS
    oH, mH, oh, mh, oz, mz = _feature_ranges(H, HH, NZ, BLOCK_H, BLOCK_HH, BLOCK_Z)
    hh = tl.zeros([BLOCK_HH], dtype=tl.float32)  # ĥ_t, kept in registers for PHASE 0's embeddings
    if PHASE != 2:
        hh = _hyper_cell_fwd(row, g_ptr, ghh_ptr, ghx_ptr, hc_prev_ptr, hmask_ptr, hh_prev_ptr, hzmask_ptr, hh_ptr,
                             hc_ptr, ws, hlnw_ptr, hlnb_ptr, hlncw_ptr, hlncb_ptr, forget_bias, oh, mh, H, HH, GW,
                             OFF_HN, OFF_HCN, OFF_HRSTD, OFF_HCRSTD, LN, HAS_HMASK, HAS_HZONE)
    if PHASE != 1:
        _main_cell_fwd(row, g_ptr, gx_ptr, c_prev_ptr, mask_ptr, h_prev_ptr, zmask_ptr, h_ptr, c_ptr, hh, ws,
                       bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr,
                       forget_bias, d_ptr, n_rows, oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_CN, OFF_Z, OFF_HCN,
                       OFF_RSTD, OFF_CRSTD, BLOCK_H, BLOCK_HH, LN, HAS_MASK, HAS_ZONE, PHASE)


@triton.jit
def _hyper_cell_fwd(row, g_ptr, ghh_ptr, ghx_ptr, hc_prev_ptr, hmask_ptr, hh_prev_ptr, hzmask_ptr, hh_ptr, hc_ptr, ws,
                    hlnw_ptr, hlnb_ptr, hlncw_ptr, hlncb_ptr, forget_bias, oh, mh, H: tl.constexpr,
                    HH: tl.constexpr, GW: tl.constexpr, OFF_HN: tl.constexpr, OFF_HCN: tl.constexpr,
                    OFF_HRSTD: tl.constexpr, OFF_HCRSTD: tl.constexpr, LN: tl.constexpr, HAS_HMASK: tl.constexpr,
                    HAS_HZONE: tl.constexpr):
    """Hyper LN-LSTM on [x_t ; h_{t-1}]: stores ĥ_t (zoned), ĉ_t and the hyper workspace slots; returns ĥ_t."""
    yi = _hyper_gate_fwd(0, row, g_ptr, ghh_ptr, ghx_ptr, ws, hlnw_ptr, hlnb_ptr, oh, mh, H, HH, GW, OFF_HN, OFF_HRSTD, LN)
    yf = _hyper_gate_fwd(1, row, g_ptr, ghh_ptr, ghx_ptr, ws, hlnw_ptr, hlnb_ptr, oh, mh, H, HH, GW, OFF_HN, OFF_HRSTD, LN)
    yg = _hyper_gate_fwd(2, row, g_ptr, ghh_ptr, ghx_ptr, ws, hlnw_ptr, hlnb_ptr, oh, mh, H, HH, GW, OFF_HN, OFF_HRSTD, LN)
    yo = _hyper_gate_fwd(3, row, g_ptr, ghh_ptr, ghx_ptr, ws, hlnw_ptr, hlnb_ptr, oh, mh, H, HH, GW, OFF_HN, OFF_HRSTD, LN)
    hm = 1.0
    if HAS_HMASK:
        hm = _load(hmask_ptr, row * HH + oh, mh)
    hc, hh = _cell_fwd(yi, yf, yg, yo, _load(hc_prev_ptr, row * HH + oh, mh), hm, forget_bias, hlncw_ptr, hlncb_ptr,
                       oh, mh, HH, ws + OFF_HCN, ws + OFF_HCRSTD, LN)
    if HAS_HZONE:  # zoneout: the embeddings below read the zoned ĥ_t
        hh_prev = _load(hh_prev_ptr, row * HH + oh, mh)
        hh = hh_prev + _load(hzmask_ptr, row * HH + oh, mh) * (hh - hh_prev)
    tl.store(hc_ptr + row * HH + oh, hc, mask=mh)
    tl.store(hh_ptr + row * HH + oh, hh, mask=mh)
    return hh


@triton.jit
def _main_cell_fwd(row, g_ptr, gx_ptr, c_prev_ptr, mask_ptr, h_prev_ptr, zmask_ptr, h_ptr, c_ptr, hh, ws,
                   bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr,
                   forget_bias, d_ptr, n_rows, oH, mH, oh, mh, oz, mz, H: tl.constexpr, HH: tl.constexpr,
                   NZ: tl.constexpr, GW: tl.constexpr, OFF_CN: tl.constexpr, OFF_Z: tl.constexpr,
                   OFF_HCN: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_CRSTD: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HH: tl.constexpr, LN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZONE: tl.constexpr,
                   PHASE: tl.constexpr):
    """Per gate the row-scaled pre-activation and its LN, then the main cell; the scaling vectors from the
    embeddings of ĥ_t (hh) in PHASE 0, given in PHASE 2."""
    if PHASE == 0:
        yi = _main_gate_fwd(0, row, hh, g_ptr, gx_ptr, ws, bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr,
                            lnw_ptr, lnb_ptr, oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, LN)
        yf = _main_gate_fwd(1, row, hh, g_ptr, gx_ptr, ws, bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr,
                            lnw_ptr, lnb_ptr, oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, LN)
        yg = _main_gate_fwd(2, row, hh, g_ptr, gx_ptr, ws, bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr,
                            lnw_ptr, lnb_ptr, oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, LN)
        yo = _main_gate_fwd(3, row, hh, g_ptr, gx_ptr, ws, bias_ptr, zw_ptr, zb_ptr, bzw_ptr, sw_ptr, bsw_ptr,
                            lnw_ptr, lnb_ptr, oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, LN)
    else:
        yi = _main_gate_given(0, row, d_ptr, n_rows, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                              OFF_RSTD, LN)
        yf = _main_gate_given(1, row, d_ptr, n_rows, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                              OFF_RSTD, LN)
        yg = _main_gate_given(2, row, d_ptr, n_rows, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                              OFF_RSTD, LN)
        yo = _main_gate_given(3, row, d_ptr, n_rows, g_ptr, gx_ptr, ws, bias_ptr, lnw_ptr, lnb_ptr, oH, mH, H, GW,
                              OFF_RSTD, LN)
    m = 1.0
    if HAS_MASK:
        m = _load(mask_ptr, row * H + oH, mH)
    c, h = _cell_fwd(yi, yf, yg, yo, _load(c_prev_ptr, row * H + oH, mH), m, forget_bias, lncw_ptr, lncb_ptr, oH, mH,
                     H, ws + OFF_CN, ws + OFF_CRSTD, LN)
    if HAS_ZONE:
        h_prev = _load(h_prev_ptr, row * H + oH, mH)
        h = h_prev + _load(zmask_ptr, row * H + oH, mH) * (h - h_prev)
    tl.store(c_ptr + row * H + oH, c, mask=mH)
    tl.store(h_ptr + row * H + oH, h, mask=mH)
    if not LN:  # the LN-only slots (WsLayout::ln_only_slot): zero, so the saved workspace is fully written
        tl.store(ws + OFF_CN + oH, tl.zeros([BLOCK_H], dtype=tl.float32), mask=mH)
        tl.store(ws + OFF_HCN + oh, tl.zeros([BLOCK_HH], dtype=tl.float32), mask=mh)
        o16 = tl.arange(0, 16)
        tl.store(ws + OFF_RSTD + o16, tl.zeros([16], dtype=tl.float32), mask=o16 < 10)


@triton.jit
def _main_gate_bwd(y: tl.constexpr, row, dy, ws, dws, dg_ptr, g_ptr, gx_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr,
                   lnw_ptr, oH, mH, oh, mh, oz, mz, H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr,
                   GW: tl.constexpr, OFF_Z: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_DY: tl.constexpr,
                   OFF_DZ: tl.constexpr, LN: tl.constexpr):
    """Stores da, dy, dg (= da ⊙ d_h) and dz of gate y; returns this gate's part of the grad of ĥ_t."""
    da = _main_gate_da(y, dy, ws, dws, lnw_ptr, oH, mH, H, OFF_RSTD, OFF_DY, LN)
    zh = _load(ws, OFF_Z + y * NZ + oz, mz)
    tl.store(dg_ptr + row * GW + y * H + oH, da * _scale(sw_ptr, y * H, zh, oH, mH, oz, mz, NZ), mask=mH)
    smask = mH[:, None] & mz[None, :]
    wh = tl.load(sw_ptr + (y * H + oH)[:, None] * NZ + oz[None, :], mask=smask, other=0.0).to(tl.float32)
    wx = tl.load(sw_ptr + (4 * H + y * H + oH)[:, None] * NZ + oz[None, :], mask=smask, other=0.0).to(tl.float32)
    wb = tl.load(bsw_ptr + (y * H + oH)[:, None] * NZ + oz[None, :], mask=smask, other=0.0).to(tl.float32)
    ddh = da * _load(g_ptr, row * GW + y * H + oH, mH)
    ddx = da * _load(gx_ptr, row * 4 * H + y * H + oH, mH)
    dzh = tl.sum(wh * ddh[:, None], axis=0)
    dzx = tl.sum(wx * ddx[:, None], axis=0)
    dzb = tl.sum(wb * da[:, None], axis=0)
    tl.store(dws + OFF_DZ + y * NZ + oz, dzh, mask=mz)
    tl.store(dws + OFF_DZ + (4 + y) * NZ + oz, dzx, mask=mz)
    tl.store(dws + OFF_DZ + (8 + y) * NZ + oz, dzb, mask=mz)
    zmask = mz[:, None] & mh[None, :]
    wzh = tl.load(zw_ptr + (y * NZ + oz)[:, None] * HH + oh[None, :], mask=zmask, other=0.0).to(tl.float32)
    wzx = tl.load(zw_ptr + ((4 + y) * NZ + oz)[:, None] * HH + oh[None, :], mask=zmask, other=0.0).to(tl.float32)
    wzb = tl.load(bzw_ptr + (y * NZ + oz)[:, None] * HH + oh[None, :], mask=zmask, other=0.0).to(tl.float32)
    return tl.sum(wzh * dzh[:, None] + wzx * dzx[:, None] + wzb * dzb[:, None], axis=0)


@triton.jit
def _main_gate_da(y: tl.constexpr, dy, ws, dws, lnw_ptr, oH, mH, H: tl.constexpr, OFF_RSTD: tl.constexpr,
                  OFF_DY: tl.constexpr, LN: tl.constexpr):
    """da, the grad of gate y's pre-activation, through its LN; stores da and dy in the backward workspace."""
    if LN:
        da = layer_norm_backward(dy, _load(ws, y * H + oH, mH), _load(lnw_ptr, y * H + oH, mH),
                                 tl.load(ws + OFF_RSTD + y), mH, H)
    else:
        da = tl.where(mH, dy, 0.0)
    tl.store(dws + y * H + oH, da, mask=mH)
    tl.store(dws + OFF_DY + y * H + oH, dy, mask=mH)
    return da


@triton.jit
def _main_gate_bwd_given(y: tl.constexpr, row, dy, ws, dws, dg_ptr, g_ptr, gx_ptr, d_ptr, dd_ptr, n_rows, lnw_ptr,
                         oH, mH, H: tl.constexpr, GW: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_DY: tl.constexpr,
                         LN: tl.constexpr):
    """The GEMM-shaped step's gate y: da and dy stored, dg = da ⊙ d_h with d_h given (4, n_rows, H), and
    dd = [da ⊙ W_h h | da ⊙ W_x x | da] stored (12, n_rows, H) for the driver's dz GEMM."""
    da = _main_gate_da(y, dy, ws, dws, lnw_ptr, oH, mH, H, OFF_RSTD, OFF_DY, LN)
    dh = _load(d_ptr, (y * n_rows + row) * H + oH, mH)
    tl.store(dg_ptr + row * GW + y * H + oH, da * dh, mask=mH)
    tl.store(dd_ptr + (y * n_rows + row) * H + oH, da * _load(g_ptr, row * GW + y * H + oH, mH), mask=mH)
    tl.store(dd_ptr + ((4 + y) * n_rows + row) * H + oH, da * _load(gx_ptr, row * 4 * H + y * H + oH, mH), mask=mH)
    tl.store(dd_ptr + ((8 + y) * n_rows + row) * H + oH, da, mask=mH)


@triton.jit
def _gates(ws, base, w_ptr, b_ptr, o, m, n: tl.constexpr, LN: tl.constexpr):
    yi = _affine(_load(ws, base + o, m), w_ptr, b_ptr, o, m, LN)
    yf = _affine(_load(ws, base + n + o, m), w_ptr + n, b_ptr + n, o, m, LN)
    yg = _affine(_load(ws, base + 2 * n + o, m), w_ptr + 2 * n, b_ptr + 2 * n, o, m, LN)
    yo = _affine(_load(ws, base + 3 * n + o, m), w_ptr + 3 * n, b_ptr + 3 * n, o, m, LN)
    return yi, yf, yg, yo


@triton.jit
def _hyper_gate_bwd(k: tl.constexpr, row, dy, ws, dws, dg_ptr, hlnw_ptr, oh, mh, H: tl.constexpr,
                    HH: tl.constexpr, NZ: tl.constexpr, GW: tl.constexpr, OFF_HN: tl.constexpr,
                    OFF_HRSTD: tl.constexpr, OFF_DYH: tl.constexpr, LN: tl.constexpr):
    if LN:
        da = layer_norm_backward(dy, _load(ws, OFF_HN + k * HH + oh, mh), _load(hlnw_ptr, k * HH + oh, mh),
                                 tl.load(ws + OFF_HRSTD + k), mh, HH)
    else:
        da = tl.where(mh, dy, 0.0)
    tl.store(dws + OFF_DYH + k * HH + oh, dy, mask=mh)
    tl.store(dg_ptr + row * GW + 4 * H + k * HH + oh, da, mask=mh)


@triton.jit
def hyper_lstm_bwd_step(g_ptr, gx_ptr, c_ptr, c_prev_ptr, hc_ptr, hc_prev_ptr, ws_ptr, mask_ptr, hmask_ptr,
                        dh_out_ptr, dh_rec_ptr, dc_out_ptr, dhh_out_ptr, dhh_rec_ptr, dhc_out_ptr,
                        dc_next_ptr, dhc_next_ptr, dc_prev_ptr, dhc_prev_ptr, dg_ptr, dws_ptr,
                        zmask_ptr, hzmask_ptr, dh_zone_ptr, dhh_zone_ptr,
                        zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr,
                        hlnw_ptr, hlnb_ptr, hlncw_ptr, hlncb_ptr, forget_bias, d_ptr, dd_ptr, dhh_extra_ptr, n_rows,
                        H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr, WS: tl.constexpr, DWS: tl.constexpr,
                        GW: tl.constexpr, OFF_CN: tl.constexpr, OFF_Z: tl.constexpr, OFF_HN: tl.constexpr,
                        OFF_HCN: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_CRSTD: tl.constexpr, OFF_HRSTD: tl.constexpr,
                        OFF_HCRSTD: tl.constexpr, OFF_DY: tl.constexpr, OFF_DCOUT: tl.constexpr,
                        OFF_DZ: tl.constexpr, OFF_DYH: tl.constexpr, OFF_DHCOUT: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_HH: tl.constexpr, BLOCK_Z: tl.constexpr, LN: tl.constexpr,
                        HAS_MASK: tl.constexpr, HAS_HMASK: tl.constexpr, HAS_DH_OUT: tl.constexpr,
                        HAS_REC: tl.constexpr, HAS_DC_OUT: tl.constexpr, HAS_DHH_OUT: tl.constexpr,
                        HAS_DHC_OUT: tl.constexpr, HAS_ZONE: tl.constexpr, HAS_HZONE: tl.constexpr,
                        PHASE: tl.constexpr):
    """PHASE 0: the whole step. The GEMM-shaped step (csrc/hyper_lstm_kernels.h, StepPhase): 2, the main cell
    with d_h given in d_ptr and dd stored to dd_ptr; 1, the hyper cell with dz·Z given in dhh_extra_ptr."""
    row = tl.program_id(0)
    ws = ws_ptr + row * WS
    dws = dws_ptr + row * DWS
    oH, mH, oh, mh, oz, mz = _feature_ranges(H, HH, NZ, BLOCK_H, BLOCK_HH, BLOCK_Z)
    dhh = tl.zeros([BLOCK_HH], dtype=tl.float32)
    if PHASE != 1:
        dhh = _main_cell_bwd(row, g_ptr, gx_ptr, c_ptr, c_prev_ptr, ws, dws, mask_ptr, dh_out_ptr, dh_rec_ptr,
                             dc_out_ptr, dc_next_ptr, dc_prev_ptr, dg_ptr, zmask_ptr, dh_zone_ptr, zw_ptr, bzw_ptr,
                             sw_ptr, bsw_ptr, lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr, forget_bias, d_ptr, dd_ptr, n_rows,
                             oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_CN, OFF_Z, OFF_RSTD, OFF_CRSTD, OFF_DY,
                             OFF_DCOUT, OFF_DZ, BLOCK_H, BLOCK_HH, LN, HAS_MASK, HAS_DH_OUT, HAS_REC, HAS_DC_OUT,
                             HAS_ZONE, PHASE)
    if PHASE != 2:
        _hyper_cell_bwd(row, dhh, hc_ptr, hc_prev_ptr, ws, dws, hmask_ptr, dhh_out_ptr, dhh_rec_ptr, dhc_out_ptr,
                        dhc_next_ptr, dhc_prev_ptr, dg_ptr, hzmask_ptr, dhh_zone_ptr, dhh_extra_ptr, hlnw_ptr,
                        hlnb_ptr, hlncw_ptr, hlncb_ptr, forget_bias, oh, mh, H, HH, NZ, GW, OFF_HN, OFF_HCN,
                        OFF_HRSTD, OFF_HCRSTD, OFF_DYH, OFF_DHCOUT, BLOCK_HH, LN, HAS_HMASK, HAS_DHH_OUT, HAS_REC,
                        HAS_DHC_OUT, HAS_HZONE, PHASE)


@triton.jit
def _main_cell_bwd(row, g_ptr, gx_ptr, c_ptr, c_prev_ptr, ws, dws, mask_ptr, dh_out_ptr, dh_rec_ptr, dc_out_ptr,
                   dc_next_ptr, dc_prev_ptr, dg_ptr, zmask_ptr, dh_zone_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr,
                   lnb_ptr, lncw_ptr, lncb_ptr, forget_bias, d_ptr, dd_ptr, n_rows, oH, mH, oh, mh, oz, mz,
                   H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr, GW: tl.constexpr, OFF_CN: tl.constexpr,
                   OFF_Z: tl.constexpr, OFF_RSTD: tl.constexpr, OFF_CRSTD: tl.constexpr, OFF_DY: tl.constexpr,
                   OFF_DCOUT: tl.constexpr, OFF_DZ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HH: tl.constexpr,
                   LN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DH_OUT: tl.constexpr, HAS_REC: tl.constexpr,
                   HAS_DC_OUT: tl.constexpr, HAS_ZONE: tl.constexpr, PHASE: tl.constexpr):
    """The main cell's backward; returns the embeddings' share of the grad of ĥ_t (PHASE 0; zero in PHASE 2,
    where the driver's GEMMs compute it)."""
    yi, yf, yg, yo = _gates(ws, 0, lnw_ptr, lnb_ptr, oH, mH, H, LN)
    dh = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_DH_OUT:
        dh += _load(dh_out_ptr, row * H + oH, mH)
    if HAS_REC:
        dh += _load(dh_rec_ptr, row * H + oH, mH)
    if HAS_ZONE:  # the share of dh_t that skips the cell goes straight to h_{t-1}
        zm = _load(zmask_ptr, row * H + oH, mH)
        tl.store(dh_zone_ptr + row * H + oH, (1.0 - zm) * dh, mask=mH)
        dh = zm * dh
    dyi, dyf, dyg, dyo = _cell_bwd_row(yi, yf, yg, yo, dh, row, oH, mH, H, c_ptr, c_prev_ptr, ws, OFF_CN, OFF_CRSTD,
                                       lncw_ptr, lncb_ptr, mask_ptr, dc_out_ptr, dc_next_ptr, dc_prev_ptr,
                                       dws + OFF_DCOUT,
                                       forget_bias, BLOCK_H, LN, HAS_MASK, HAS_DC_OUT)
    dhh = tl.zeros([BLOCK_HH], dtype=tl.float32)
    if PHASE == 2:
        _main_gate_bwd_given(0, row, dyi, ws, dws, dg_ptr, g_ptr, gx_ptr, d_ptr, dd_ptr, n_rows, lnw_ptr, oH, mH,
                             H, GW, OFF_RSTD, OFF_DY, LN)
        _main_gate_bwd_given(1, row, dyf, ws, dws, dg_ptr, g_ptr, gx_ptr, d_ptr, dd_ptr, n_rows, lnw_ptr, oH, mH,
                             H, GW, OFF_RSTD, OFF_DY, LN)
        _main_gate_bwd_given(2, row, dyg, ws, dws, dg_ptr, g_ptr, gx_ptr, d_ptr, dd_ptr, n_rows, lnw_ptr, oH, mH,
                             H, GW, OFF_RSTD, OFF_DY, LN)
        _main_gate_bwd_given(3, row, dyo, ws, dws, dg_ptr, g_ptr, gx_ptr, d_ptr, dd_ptr, n_rows, lnw_ptr, oH, mH,
                             H, GW, OFF_RSTD, OFF_DY, LN)
    else:
        dhh += _main_gate_bwd(0, row, dyi, ws, dws, dg_ptr, g_ptr, gx_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr,
                              oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, OFF_DY, OFF_DZ, LN)
        dhh += _main_gate_bwd(1, row, dyf, ws, dws, dg_ptr, g_ptr, gx_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr,
                              oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, OFF_DY, OFF_DZ, LN)
        dhh += _main_gate_bwd(2, row, dyg, ws, dws, dg_ptr, g_ptr, gx_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr,
                              oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, OFF_DY, OFF_DZ, LN)
        dhh += _main_gate_bwd(3, row, dyo, ws, dws, dg_ptr, g_ptr, gx_ptr, zw_ptr, bzw_ptr, sw_ptr, bsw_ptr, lnw_ptr,
                              oH, mH, oh, mh, oz, mz, H, HH, NZ, GW, OFF_Z, OFF_RSTD, OFF_DY, OFF_DZ, LN)
    return dhh


@triton.jit
def _hyper_cell_bwd(row, dhh, hc_ptr, hc_prev_ptr, ws, dws, hmask_ptr, dhh_out_ptr, dhh_rec_ptr, dhc_out_ptr,
                    dhc_next_ptr, dhc_prev_ptr, dg_ptr, hzmask_ptr, dhh_zone_ptr, dhh_extra_ptr, hlnw_ptr, hlnb_ptr,
                    hlncw_ptr, hlncb_ptr, forget_bias, oh, mh, H: tl.constexpr, HH: tl.constexpr, NZ: tl.constexpr,
                    GW: tl.constexpr, OFF_HN: tl.constexpr, OFF_HCN: tl.constexpr, OFF_HRSTD: tl.constexpr,
                    OFF_HCRSTD: tl.constexpr, OFF_DYH: tl.constexpr, OFF_DHCOUT: tl.constexpr, BLOCK_HH: tl.constexpr,
                    LN: tl.constexpr, HAS_HMASK: tl.constexpr, HAS_DHH_OUT: tl.constexpr, HAS_REC: tl.constexpr,
                    HAS_DHC_OUT: tl.constexpr, HAS_HZONE: tl.constexpr, PHASE: tl.constexpr):
    """The hyper cell's backward from dhh, the embeddings' share of the grad of ĥ_t (in registers in PHASE 0,
    given in dhh_extra_ptr in PHASE 1), plus what flows in from outside and from step t+1."""
    if HAS_DHH_OUT:
        dhh += _load(dhh_out_ptr, row * HH + oh, mh)
    if HAS_REC:
        dhh += _load(dhh_rec_ptr, row * HH + oh, mh)
    if PHASE == 1:
        dhh += _load(dhh_extra_ptr, row * HH + oh, mh)
    if HAS_HZONE:
        hzm = _load(hzmask_ptr, row * HH + oh, mh)
        tl.store(dhh_zone_ptr + row * HH + oh, (1.0 - hzm) * dhh, mask=mh)
        dhh = hzm * dhh
    hi, hf, hg, ho = _gates(ws, OFF_HN, hlnw_ptr, hlnb_ptr, oh, mh, HH, LN)
    dhi, dhf, dhg, dho = _cell_bwd_row(hi, hf, hg, ho, dhh, row, oh, mh, HH, hc_ptr, hc_prev_ptr, ws, OFF_HCN,
                                       OFF_HCRSTD, hlncw_ptr, hlncb_ptr, hmask_ptr, dhc_out_ptr, dhc_next_ptr,
                                       dhc_prev_ptr, dws + OFF_DHCOUT, forget_bias, BLOCK_HH, LN, HAS_HMASK, HAS_DHC_OUT)
    _hyper_gate_bwd(0, row, dhi, ws, dws, dg_ptr, hlnw_ptr, oh, mh, H, HH, NZ, GW, OFF_HN, OFF_HRSTD, OFF_DYH, LN)
    _hyper_gate_bwd(1, row, dhf, ws, dws, dg_ptr, hlnw_ptr, oh, mh, H, HH, NZ, GW, OFF_HN, OFF_HRSTD, OFF_DYH, LN)
    _hyper_gate_bwd(2, row, dhg, ws, dws, dg_ptr, hlnw_ptr, oh, mh, H, HH, NZ, GW, OFF_HN, OFF_HRSTD, OFF_DYH, LN)
    _hyper_gate_bwd(3, row, dho, ws, dws, dg_ptr, hlnw_ptr, oh, mh, H, HH, NZ, GW, OFF_HN, OFF_HRSTD, OFF_DYH, LN)


def _launch_config(H, Hh, Nz, phase=0, rows=None, multiprocessors=None):
    """Block sizes and num_warps. The GEMM-shaped step's main cell (phase 2) gets up to one warp per 32 features
    (32 warps at H = 1000) while the batch leaves most multiprocessors idle (rows < 2 × multiprocessors, the
    CUDA kernels' rule: csrc/hyper_lstm_simt.h, step_groups): one program per row then runs on as many threads
    as the row has features. The other phases, and full batches, keep 4 or 8 warps."""
    blocks = dict(BLOCK_H=next_pow2(H, 4), BLOCK_HH=next_pow2(Hh, 4), BLOCK_Z=next_pow2(Nz, 4))
    warps = 8 if blocks["BLOCK_H"] >= 512 else 4
    if phase == 2 and rows is not None and multiprocessors and rows < 2 * multiprocessors:
        warps = max(warps, min(32, blocks["BLOCK_H"] // 32))
    return blocks, warps


def multiprocessors(t: torch.Tensor):
    """The multiprocessor count of t's GPU, or None on the CPU (the interpreter ignores num_warps)."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else None


def gemm_shaped() -> bool:
    """The step design (csrc/hyper_lstm_kernels.h, StepPhase): GEMM-shaped (phases 1 and 2 around torch GEMMs)
    unless HYPERFUSED_STEP_DESIGN=fused asks for the whole step in one program per row (phase 0)."""
    design = os.environ.get("HYPERFUSED_STEP_DESIGN") or "gemm"
    if design not in ("gemm", "fused"):
        raise ValueError(f"HYPERFUSED_STEP_DESIGN must be 'gemm', 'fused' or unset, got {design!r}")
    return design == "gemm"


def forward_config(H, Hh, Nz, layer_norm, has_mask=False, has_hmask=False, has_zone=False, has_hzone=False,
                   phase=0, rows=None, multiprocessors=None):
    """(constexprs, num_warps) that `forward` launches hyper_lstm_fwd_step with: the one definition, which the
    compile-for-target check (benchmarks/gpu_resources.py) reads too. rows and multiprocessors: the batch
    and the GPU's multiprocessor count (see _launch_config)."""
    blocks, warps = _launch_config(H, Hh, Nz, phase, rows, multiprocessors)
    return dict(H=H, HH=Hh, NZ=Nz, WS=ws_width(H, Hh, Nz), LN=bool(layer_norm), HAS_MASK=bool(has_mask),
                HAS_HMASK=bool(has_hmask), HAS_ZONE=bool(has_zone), HAS_HZONE=bool(has_hzone), PHASE=phase,
                **blocks, **ws_layout(H, Hh, Nz)), warps


def backward_config(H, Hh, Nz, layer_norm, has_mask=False, has_hmask=False, has_dh_out=True, has_rec=True,
                    has_dc_out=False, has_dhh_out=False, has_dhc_out=False, has_zone=False, has_hzone=False, phase=0,
                    rows=None, multiprocessors=None):
    """(constexprs, num_warps) that `backward` launches hyper_lstm_bwd_step with."""
    blocks, warps = _launch_config(H, Hh, Nz, phase, rows, multiprocessors)
    return dict(H=H, HH=Hh, NZ=Nz, WS=ws_width(H, Hh, Nz), DWS=dws_width(H, Hh, Nz), LN=bool(layer_norm),
                HAS_MASK=bool(has_mask), HAS_HMASK=bool(has_hmask), HAS_DH_OUT=bool(has_dh_out),
                HAS_REC=bool(has_rec), HAS_DC_OUT=bool(has_dc_out), HAS_DHH_OUT=bool(has_dhh_out),
                HAS_DHC_OUT=bool(has_dhc_out), HAS_ZONE=bool(has_zone), HAS_HZONE=bool(has_hzone), PHASE=phase,
                **blocks, **ws_layout(H, Hh, Nz), **dws_layout(H, Hh, Nz)), warps


def _per_step(t, steps=None, absent=None):
    """The (B, ·) views of a (T, B, ·) tensor, made once; for an absent (None) tensor, `steps` copies of
    `absent` (a placeholder pointer the kernel does not read)."""
    return list(t.unbind(0)) if t is not None else [absent] * steps


class Gemms:
    """The drivers' large GEMMs (input projections, recurrent products, weight gradients) with operands as they
    are (low None) or rounded to bfloat16/float16, accumulated and returned in float32, as the C++ ops'
    GemmPrecision does; the projections to z and d stay in float32."""

    def __init__(self, low=None):
        self.low = low

    def operand(self, t):
        return t if self.low is None else t.to(self.low)

    def mm(self, a, b, out=None):
        """a · b (b already an operand), into out if given."""
        if self.low is None:
            return torch.mm(a, b, out=out)
        a = self.operand(a)
        r = torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.mm(a, b).float()
        return r if out is None else out.copy_(r)


def forward(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm: bool, forget_bias: float, zoneout_mask=None,
            hyper_zoneout_mask=None, save_for_backward: bool = True, gemm_dtype=None):
    """Whole-sequence forward of one layer/direction; returns (hs, cs, hhs, hcs, g, ws) like the C++ op (g and
    ws empty, (0, B, ·), without save_for_backward: one step's scratch is reused then). gemm_dtype: the large
    GEMMs' operand precision (Gemms)."""
    with on_device_of(x):
        return _forward(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask,
                        hyper_zoneout_mask, save_for_backward, Gemms(gemm_dtype))


def _forward(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zm, hzm, save, G):
    (wih, whh, bias, hwih, hwhh, hbias, zw, zb, sw, bzw, bsw, lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw,
     hlncb) = params
    T, B, X = x.shape
    H, Hh, Nz = h0.shape[1], hh0.shape[1], sw.shape[2]
    x2 = x.reshape(T * B, X)
    gx = G.mm(x2, G.operand(wih.T)).view(T, B, 4 * H)
    ghx = G.mm(x2, G.operand(hwih[:, :X].T)).add_(hbias).view(T, B, 4 * Hh)
    w_rec, w_hyper = G.operand(torch.cat([whh, hwih[:, X:]], 0).T), G.operand(hwhh.T)
    new = lambda *shape: x.new_empty(shape)  # noqa: E731
    hs, cs, hhs, hcs = new(T, B, H), new(T, B, H), new(T, B, Hh), new(T, B, Hh)
    kept = T if save else 1  # steps of g and ws held at once
    g, ws, ghh = new(kept, B, 4 * H + 4 * Hh), new(kept, B, ws_width(H, Hh, Nz)), new(B, 4 * Hh)
    flags = (layer_norm, mask is not None, hyper_mask is not None, zm is not None, hzm is not None)
    split = gemm_shaped()
    phases = [forward_config(H, Hh, Nz, *flags, phase=p, rows=B, multiprocessors=multiprocessors(x))
              for p in ((1, 2) if split else (0,))]
    if split:  # z and the 12 scaling vectors as GEMMs between the hyper and the main cell: weights read once
        zwt, zbias = torch.cat([zw, bzw]).T, torch.cat([zb, zb.new_zeros(4 * Nz)])
        swt = torch.cat([sw, bsw[None]]).view(12, H, Nz).transpose(1, 2)  # cuBLAS reads the transpose in place
        d = new(12, B, H)
        off_z = layouts.ws_layout(H, Hh, Nz)["z"]
        z_slot = _per_step(ws[:, :, off_z:off_z + 12 * Nz])
    # Every per-step argument made once, before the loop: the loop body is GEMMs and launches.
    HS, CS, HHS, HCS, GX, GHX, G_, WS = map(_per_step, (hs, cs, hhs, hcs, gx, ghx, g, ws))
    MASK, HMASK, ZM, HZM = (_per_step(m, T, ws) for m in (mask, hyper_mask, zm, hzm))
    H_PREV, C_PREV, HH_PREV, HC_PREV = ([first] + steps[:-1] for first, steps in
                                         ((h0, HS), (c0, CS), (hh0, HHS), (hc0, HCS)))
    weights = (bias, zw, zb, bzw, sw, bsw, lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw, hlncb, float(forget_bias))
    for t in range(T):
        g_t, ws_t = G_[t % kept], WS[t % kept]
        G.mm(H_PREV[t], w_rec, out=g_t)
        G.mm(HH_PREV[t], w_hyper, out=ghh)
        args = (g_t, ghh, GX[t], GHX[t], C_PREV[t], HC_PREV[t], MASK[t], HMASK[t], H_PREV[t], HH_PREV[t], ZM[t],
                HZM[t], HS[t], CS[t], HHS[t], HCS[t], ws_t, *weights)
        if split:
            consts, warps = phases[0]
            hyper_lstm_fwd_step[(B,)](*args, d, B, num_warps=warps, **consts)
            z = torch.addmm(zbias, HHS[t], zwt)
            z_slot[t % kept].copy_(z)
            torch.bmm(z.view(B, 12, Nz).transpose(0, 1), swt, out=d)
        consts, warps = phases[-1]
        hyper_lstm_fwd_step[(B,)](*args, d if split else ws, B, num_warps=warps, **consts)
    if not save:
        return hs, cs, hhs, hcs, new(0, B, g.shape[2]), new(0, B, ws.shape[2])
    return hs, cs, hhs, hcs, g, ws


def backward(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs, cs, hhs,
             hcs, g, ws, layer_norm: bool, forget_bias: float, zoneout_mask=None, hyper_zoneout_mask=None,
             gemm_dtype=None):
    """Gradients [x, h0, c0, ĥ0, ĉ0, *params] of the whole sequence, like the C++ backward op."""
    with on_device_of(x):
        return _backward(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs,
                         cs, hhs, hcs, g, ws, layer_norm, forget_bias, zoneout_mask, hyper_zoneout_mask,
                         Gemms(gemm_dtype))


def _backward(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs, cs, hhs,
              hcs, g, ws, layer_norm, forget_bias, zm, hzm, G):
    (wih, whh, bias, hwih, hwhh, hbias, zw, zb, sw, bzw, bsw, lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw,
     hlncb) = params
    T, B, X = x.shape
    H, Hh, Nz = h0.shape[1], hh0.shape[1], sw.shape[2]
    M, GW = T * B, 4 * H + 4 * Hh
    grads_in = [None if t is None else t.contiguous() for t in (grad_hs, grad_cs, grad_hhs, grad_hcs)]
    grad_hs, grad_cs, grad_hhs, grad_hcs = grads_in
    x2 = x.reshape(M, X)
    gx = G.mm(x2, G.operand(wih.T)).view(T, B, 4 * H)
    w_rec, w_hyper = G.operand(torch.cat([whh, hwih[:, X:]], 0)), G.operand(hwhh)
    new = lambda *shape: x.new_empty(shape)  # noqa: E731
    dg, dws = new(T, B, GW), new(T, B, dws_width(H, Hh, Nz))
    dcs, dhcs = [x.new_zeros(B, H), new(B, H)], [x.new_zeros(B, Hh), new(B, Hh)]  # carries, in and out in turn
    dh_rec, dhh_rec = new(B, H), new(B, Hh)
    # With zoneout the kernel leaves the share of dh_t that skips the cell here; it joins dh_{t-1} after the GEMM.
    dh_zone = new(B, H) if zm is not None else ws
    dhh_zone = new(B, Hh) if hzm is not None else ws
    split = gemm_shaped()
    if split:  # d_h, dz and dĥ's share dz·Z as GEMMs between the main and the hyper cell: weights read once
        scale = torch.cat([sw, bsw[None]])  # (3, 4H, N_z)
        swt_h = scale[0].view(4, H, Nz).transpose(1, 2)
        scale_rows, zcat = scale.view(12, H, Nz), torch.cat([zw, bzw])
        dh_all, dd_all, dhh_extra = new(4, B, H), new(12, B, H), new(B, Hh)
        off_z, off_dz = layouts.ws_layout(H, Hh, Nz)["z"], layouts.dws_layout(H, Hh, Nz)["dz"]
        zh_slot = _per_step(ws[:, :, off_z:off_z + 4 * Nz])
        dz_slot = _per_step(dws[:, :, off_dz:off_dz + 12 * Nz])
    # Every per-step argument and launch configuration made once, before the loop.
    G_, GX, CS, HCS, WS, DG, DWS = map(_per_step, (g, gx, cs, hcs, ws, dg, dws))
    DG_HYPER = _per_step(dg[:, :, 4 * H:])
    C_PREV, HC_PREV = [c0] + CS[:-1], [hc0] + HCS[:-1]
    MASK, HMASK, ZM, HZM = (_per_step(m, T, ws) for m in (mask, hyper_mask, zm, hzm))
    GRAD_HS, GRAD_CS, GRAD_HHS, GRAD_HCS = (_per_step(m, T, ws) for m in (grad_hs, grad_cs, grad_hhs, grad_hcs))
    weights = (zw, bzw, sw, bsw, lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw, hlncb, float(forget_bias))
    configs, sms = {}, multiprocessors(x)  # (has_rec, phase) -> (constexprs, warps)
    for has_rec in (False, True):
        flags = (H, Hh, Nz, layer_norm, mask is not None, hyper_mask is not None, grad_hs is not None, has_rec,
                 grad_cs is not None, grad_hhs is not None, grad_hcs is not None, zm is not None, hzm is not None)
        for phase in ((2, 1) if split else (0,)):
            configs[has_rec, phase] = backward_config(*flags, phase=phase, rows=B, multiprocessors=sms)
    for i, t in enumerate(reversed(range(T))):
        has_rec = t < T - 1
        args = (G_[t], GX[t], CS[t], C_PREV[t], HCS[t], HC_PREV[t], WS[t], MASK[t], HMASK[t], GRAD_HS[t], dh_rec,
                GRAD_CS[t], GRAD_HHS[t], dhh_rec, GRAD_HCS[t], dcs[i % 2], dhcs[i % 2], dcs[1 - i % 2],
                dhcs[1 - i % 2], DG[t], DWS[t], ZM[t], HZM[t], dh_zone, dhh_zone, *weights)
        if split:
            torch.bmm(zh_slot[t].reshape(B, 4, Nz).transpose(0, 1), swt_h, out=dh_all)
            consts, warps = configs[has_rec, 2]
            hyper_lstm_bwd_step[(B,)](*args, dh_all, dd_all, dhh_extra, B, num_warps=warps, **consts)
            dz = torch.bmm(dd_all, scale_rows).transpose(0, 1).reshape(B, 12 * Nz)
            dz_slot[t].copy_(dz)
            torch.mm(dz, zcat, out=dhh_extra)
            consts, warps = configs[has_rec, 1]
            hyper_lstm_bwd_step[(B,)](*args, dh_all, dd_all, dhh_extra, B, num_warps=warps, **consts)
        else:
            consts, warps = configs[has_rec, 0]
            hyper_lstm_bwd_step[(B,)](*args, ws, ws, ws, B, num_warps=warps, **consts)
        G.mm(DG[t], w_rec, out=dh_rec)
        G.mm(DG_HYPER[t], w_hyper, out=dhh_rec)
        if zm is not None:
            dh_rec += dh_zone
        if hzm is not None:
            dhh_rec += dhh_zone
    dc, dhc = dcs[T % 2], dhcs[T % 2]
    return weight_gradients(x2, h0, hh0, hs, hhs, params, g, gx, ws, dg, dws, dh_rec, dc, dhh_rec, dhc,
                            layer_norm, (T, B, X, H, Hh, Nz), G)


def weight_gradients(x2, h0, hh0, hs, hhs, params, g, gx, ws, dg, dws, dh0, dc0, dhh0, dhc0, layer_norm, sizes,
                     G=Gemms()):
    """Every weight gradient as a GEMM or reduction over all T·B rows (the post-loop part of backward)."""
    (wih, whh, bias, hwih, hwhh, hbias, zw, zb, sw, bzw, bsw, lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw,
     hlncb) = params
    T, B, X, H, Hh, Nz = sizes
    M, GW = T * B, 4 * H + 4 * Hh
    dgm, dwsm, wsm = dg.view(M, GW), dws.view(M, -1), ws.view(M, -1)
    dgh, dah = dgm[:, :4 * H], dgm[:, 4 * H:]
    L, D = layouts.ws_layout(H, Hh, Nz), layouts.dws_layout(H, Hh, Nz)
    slot = lambda rows, o, n: rows[:, o:o + n]  # noqa: E731
    da = slot(dwsm, D["da"], 4 * H)
    z3 = slot(wsm, L["z"], 12 * Nz).reshape(M, 3, 4, Nz)
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).view(M, H)
    hh_prev = torch.cat([hh0.unsqueeze(0), hhs[:-1]]).view(M, Hh)
    hh_all = hhs.reshape(M, Hh)
    w_scale = sw.view(2, 4, H, Nz)
    d_x = torch.einsum("myn,yhn->myh", z3[:, 1], w_scale[1]).reshape(M, 4 * H)
    dgx = da * d_x
    X_ = x2.shape[1]
    dx = G.mm(dgx, G.operand(wih)).add_(G.mm(dah, G.operand(hwih[:, :X_]))).view(T, B, X_)
    x2_op, h_prev_op = G.operand(x2), G.operand(h_prev)
    dd_h = (da * g.view(M, GW)[:, :4 * H]).view(M, 4, H)
    dd_x = (da * gx.reshape(M, 4 * H)).view(M, 4, H)
    dz = slot(dwsm, D["dz"], 12 * Nz)
    grads = [
        G.mm(dgx.T, x2_op), G.mm(dgh.T, h_prev_op), da.sum(0),
        torch.cat([G.mm(dah.T, x2_op), G.mm(dah.T, h_prev_op)], 1), G.mm(dah.T, G.operand(hh_prev)), dah.sum(0),
        dz[:, :8 * Nz].T @ hh_all, dz[:, :8 * Nz].sum(0),
        torch.stack([torch.einsum("myh,myn->yhn", dd_h, z3[:, 0]),
                     torch.einsum("myh,myn->yhn", dd_x, z3[:, 1])]).reshape(2, 4 * H, Nz),
        dz[:, 8 * Nz:].T @ hh_all,
        torch.einsum("myh,myn->yhn", da.reshape(M, 4, H), z3[:, 2]).reshape(4 * H, Nz),
    ]
    if layer_norm:
        dy, dcout = slot(dwsm, D["dy"], 4 * H), slot(dwsm, D["dcout"], H)
        dyh, dhcout = slot(dwsm, D["dyh"], 4 * Hh), slot(dwsm, D["dhcout"], Hh)
        grads += [(dy * slot(wsm, L["n"], 4 * H)).sum(0), dy.sum(0), (dcout * slot(wsm, L["cn"], H)).sum(0),
                  dcout.sum(0), (dyh * slot(wsm, L["hn"], 4 * Hh)).sum(0), dyh.sum(0),
                  (dhcout * slot(wsm, L["hcn"], Hh)).sum(0), dhcout.sum(0)]
    else:
        grads += [torch.zeros_like(p) for p in (lnw, lnb, lncw, lncb, hlnw, hlnb, hlncw, hlncb)]
    return [dx, dh0, dc0, dhh0, dhc0, *grads]
