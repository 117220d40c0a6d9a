"""Argument checks of the ops, in Python, with the messages of the C++ ones (csrc/hyper_lstm.cpp,
csrc/static_hypernet.cpp). The fake implementations run them, so torch.compile reports a wrong shape at
trace time with the real message, and the Triton ops run them before any launch (their kernels would
otherwise read out of bounds). torch._check works on symbolic shapes as well as on plain ints."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import PARAM_NAMES

_FLOATS = (torch.float32, torch.float64)
# The weights of the decode step's products (the input and recurrent products, the embeddings and the scaling
# vectors), which the decode op (hyperfused::hyper_lstm_step) also takes in bfloat16 or float16 beside float32
# states and other parameters (csrc/hyper_lstm.cpp: is_gemm_weight)
DECODE_HALF_WEIGHTS = ("weight_ih", "weight_hh", "hyper_weight_ih", "hyper_weight_hh", "z_weight", "bias_z_weight",
                       "scale_weight", "bias_scale_weight")
_HALVES = (torch.bfloat16, torch.float16)


def _check_arg(op: str, t, name: str, shape: Sequence, x: torch.Tensor, x_name: str = "x",
               half_ok: bool = False) -> None:
    """half_ok: t may also be bfloat16 or float16 where x is float32 (a decode step's GEMM weights)."""
    torch._check(isinstance(t, torch.Tensor), lambda: f"{op}: '{name}' must be a Tensor, got {type(t).__name__}")
    torch._check(t.device == x.device, lambda: f"{op}: '{name}' is on {t.device} but '{x_name}' is on {x.device}")
    half_ok = half_ok and x.dtype == torch.float32
    torch._check(t.dtype == x.dtype or (half_ok and t.dtype in _HALVES),
                 lambda: f"{op}: '{name}' has dtype {t.dtype}, expected {x.dtype} (the dtype of '{x_name}')"
                         + (", torch.bfloat16 or torch.float16" if half_ok else ""))
    torch._check(t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape)),
                 lambda: f"{op}: '{name}' has shape {list(t.shape)}, expected {list(shape)}")


def lstm_sizes(x, h0, c0, hh0, hc0, params, mask: Optional[torch.Tensor], hyper_mask: Optional[torch.Tensor],
               zoneout_mask: Optional[torch.Tensor] = None, hyper_zoneout_mask: Optional[torch.Tensor] = None,
               op: str = "hyperfused::hyper_lstm", half_gemm_weights: bool = False, projected_h: bool = False):
    """Checks the forward op's inputs as csrc/hyper_lstm.cpp does; returns (T, B, X, H, Ĥ, N_z).
    half_gemm_weights: the four weights of the input and recurrent products may be bfloat16 or float16 (decode
    step). projected_h (decode step): h0 may be P wide, the width W_h and Ŵ_x's h columns read; c0 gives H."""
    torch._check(x.dim() == 3, lambda: f"{op}: 'x' must have shape (T, B, input_size), got {list(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{op}: 'x' must be float32 or float64, got {x.dtype}")
    torch._check(len(params) == len(PARAM_NAMES),
                 lambda: f"{op}: 'params' must hold {len(PARAM_NAMES)} tensors, got {len(params)}")
    torch._check(h0.dim() == 2 and hh0.dim() == 2,
                 lambda: f"{op}: 'h0' and 'hh0' must be 2-D (B, ·), got {list(h0.shape)} and {list(hh0.shape)}")
    torch._check(params[8].dim() == 3, lambda: f"{op}: 'scale_weight' must be (2, 4H, N_z), got {list(params[8].shape)}")
    torch._check(not projected_h or c0.dim() == 2, lambda: f"{op}: 'c0' must be 2-D (B, H), got {list(c0.shape)}")
    T, B, X = x.shape
    P, Hh, Nz = h0.shape[1], hh0.shape[1], params[8].shape[2]
    H = c0.shape[1] if projected_h else P
    torch._check(T > 0 and B > 0 and X > 0, lambda: f"{op}: 'x' must be non-empty, got shape {list(x.shape)}")
    torch._check(H > 0 and Hh > 0 and Nz > 0 and P > 0, lambda: f"{op}: sizes must be positive")
    for name, t, n in (("h0", h0, P), ("c0", c0, H), ("hh0", hh0, Hh), ("hc0", hc0, Hh)):
        _check_arg(op, t, name, (B, n), x)
    shapes = [(4 * H, X), (4 * H, P), (4 * H,), (4 * Hh, X + P), (4 * Hh, Hh), (4 * Hh,), (8 * Nz, Hh), (8 * Nz,),
              (2, 4 * H, Nz), (4 * Nz, Hh), (4 * H, Nz), (4 * H,), (4 * H,), (H,), (H,), (4 * Hh,), (4 * Hh,), (Hh,),
              (Hh,)]
    for name, t, shape in zip(PARAM_NAMES, params, shapes):
        _check_arg(op, t, name, shape, x, half_ok=half_gemm_weights and name in DECODE_HALF_WEIGHTS)
    for name, m, n in (("mask", mask, H), ("hyper_mask", hyper_mask, Hh), ("zoneout_mask", zoneout_mask, H),
                       ("hyper_zoneout_mask", hyper_zoneout_mask, Hh)):
        if m is not None:
            _check_arg(op, m, name, (T, B, n), x)
    return T, B, X, H, Hh, Nz


def lstm_saved(x, sizes, hs, cs, hhs, hcs, g, ws, saved_shapes, op: str = "hyperfused::hyper_lstm") -> None:
    """The backward op's saved forward outputs; saved_shapes: those of g and ws (hyper_lstm.saved_shapes)."""
    T, B, X, H, Hh, Nz = sizes
    for name, t, shape in (("hs", hs, (T, B, H)), ("cs", cs, (T, B, H)), ("hhs", hhs, (T, B, Hh)),
                           ("hcs", hcs, (T, B, Hh)), ("g", g, saved_shapes[0]), ("ws", ws, saved_shapes[1])):
        _check_arg(op, t, name, shape, x)


def step_sizes(x, h, c, hh, hc, params):
    """Checks the single-step op's inputs as csrc/hyper_lstm.cpp does (its x as one step of the sequence op's;
    the weights of the products may be half precision; a projected cell's h is P wide); returns
    (B, X, H, Ĥ, N_z)."""
    torch._check(x.dim() == 2, lambda: f"hyperfused::hyper_lstm_step: 'x' must have shape (B, input_size), got "
                                       f"{list(x.shape)}")
    return lstm_sizes(x.unsqueeze(0), h, c, hh, hc, params, None, None, half_gemm_weights=True,
                      projected_h=True)[1:]


def lstm_grads(x, sizes, grads, op: str = "hyperfused::hyper_lstm") -> None:
    T, B, X, H, Hh, Nz = sizes
    for name, t, n in zip(("grad_hs", "grad_cs", "grad_hhs", "grad_hcs"), grads, (H, H, Hh, Hh)):
        if t is not None:
            _check_arg(op, t, name, (T, B, n), x)


MAX_KERNEL_SIZE = 1024  # csrc/static_hypernet.cpp's kMaxKernelSize


def generation_sizes(z, w_in, b_in, w_out, b_out, tile_meta, kernel_size: int,
                     op: str = "hyperfused::generate_kernels"):
    """Checks the generation op's inputs as csrc/static_hypernet.cpp does (the tile bounds aside, which need
    the tile_meta's values); returns (tiles, z_dim, hidden, in_tile, out_tile·k²)."""
    torch._check(z.dtype in _FLOATS, lambda: f"{op}: 'z' must be float32 or float64, got {z.dtype}")
    torch._check(z.dim() == 2 and z.shape[0] > 0, lambda: f"{op}: 'z' must be (tiles, z_dim), got {list(z.shape)}")
    torch._check(w_in.dim() == 3, lambda: f"{op}: 'w_in' must be (in_tile, hidden, z_dim), got {list(w_in.shape)}")
    torch._check(0 < kernel_size <= MAX_KERNEL_SIZE,
                 lambda: f"{op}: 'kernel_size' must be in [1, {MAX_KERNEL_SIZE}], got {kernel_size}")
    kk = kernel_size * kernel_size
    tiles, z_dim = z.shape
    in_tile, hidden = w_in.shape[0], w_in.shape[1]
    torch._check(w_in.shape[2] == z_dim, lambda: f"{op}: 'w_in' has shape {list(w_in.shape)}, expected "
                                                 f"(in_tile, hidden, {z_dim}) to match z_dim of 'z'")
    _check_arg(op, b_in, "b_in", (in_tile, hidden), z, "z")
    torch._check(w_out.dim() == 2 and w_out.shape[0] > 0 and w_out.shape[0] % kk == 0 and w_out.shape[1] == hidden,
                 lambda: f"{op}: 'w_out' has shape {list(w_out.shape)}, expected (out_tile*{kk}, {hidden})")
    for name, t in (("w_in", w_in), ("w_out", w_out)):
        _check_arg(op, t, name, tuple(t.shape), z, "z")
    if b_out is not None:
        _check_arg(op, b_out, "b_out", (w_out.shape[0],), z, "z")
    torch._check(tile_meta.dtype == torch.int64 and tuple(tile_meta.shape) == (tiles, 2),
                 lambda: f"{op}: 'tile_meta' must be a contiguous int64 tensor of shape [{tiles}, 2], got "
                         f"{tile_meta.dtype} {list(tile_meta.shape)}")
    torch._check(tile_meta.device == z.device,
                 lambda: f"{op}: 'tile_meta' is on {tile_meta.device} but 'z' is on {z.device}")
    return tiles, z_dim, hidden, in_tile, w_out.shape[0]


def gemm_dtype(x, dtype: Optional[torch.dtype], op: str = "hyperfused::hyper_lstm") -> None:
    """The forward/backward ops' gemm_dtype: bfloat16/float16 GEMM operands for float32 inputs, or None."""
    if dtype is None:
        return
    torch._check(dtype in (torch.bfloat16, torch.float16),
                 lambda: f"{op}: 'gemm_dtype' must be bfloat16, float16 or None, got {dtype}")
    torch._check(x.dtype == torch.float32, lambda: f"{op}: 'gemm_dtype' ({dtype}) needs float32 inputs, got {x.dtype}")
