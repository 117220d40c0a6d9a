"""The HyperLSTM layer op: one layer, one direction, a whole sequence, on the chosen backend.

For the C++ backends this module gives torch.ops.hyperfused.hyper_lstm_forward its autograd formula
(the hyper_lstm_backward op) and fake implementations, so it traces under torch.compile without graph
breaks.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from .. import reference
from . import _checks
from .._extension import HAS_EXTENSION
from .._triton_kernels import layouts
from ._autograd import recomputed_grads
from .backends import jit_tracing

_FLOAT_DTYPES = (torch.float32, torch.float64)


def workspace_width(H: int, Hh: int, Nz: int) -> int:
    """Per-row width of the saved forward workspace (triton_kernels/workspace_layouts.def, which the C++
    kernels include)."""
    return layouts().ws_layout(H, Hh, Nz)["width"]


def saved_shapes(T: int, B: int, H: int, Hh: int, Nz: int, save_for_backward: bool = True):
    """The shapes of the rows the forward op keeps for its backward: g (T, B, 4H + 4Ĥ), the gates of the main and
    the hyper LSTM, and ws (T, B, workspace_width). Without save_for_backward it keeps none (T = 0 rows)."""
    kept = T if save_for_backward else 0
    return (kept, B, 4 * H + 4 * Hh), (kept, B, workspace_width(H, Hh, Nz))


def backward_workspace_width(H: int, Hh: int, Nz: int) -> int:
    """Per-row width of the backward workspace with every slot kept (workspace_layouts.def)."""
    return layouts().dws_layout(H, Hh, Nz)["width"]


# Whether oneDNN has bfloat16 GEMM kernels on this CPU (AVX512-BF16 or AMX): read once, at import, so that
# torch.compile traces gemm_dtype_for as a constant.
_CPU_BF16_GEMMS = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Which device types have autocast, asked once (torch 2.11's Dynamo cannot trace the question); a device without
# it, such as meta for shape inference, has no autocast state to read.
_AUTOCAST_TYPES = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def _has_autocast(device_type: str) -> bool:
    known = _AUTOCAST_TYPES.get(device_type)
    return torch.amp.is_autocast_available(device_type) if known is None else known


def gemm_dtype_for(dtype: torch.dtype, device: torch.device) -> Optional[torch.dtype]:
    """The precision of the fused ops' large GEMMs for inputs of `dtype` on `device`: bfloat16/float16 for
    half-precision modules, autocast's dtype for float32 ones under autocast, else None (the inputs' dtype).
    Products accumulate in float32; states, layer norms and pointwise math stay float32. On the CPU only
    bfloat16, and only where oneDNN has bfloat16 kernels (AVX512-BF16 or AMX): elsewhere float32."""
    if dtype in (torch.float16, torch.bfloat16):
        low = dtype
    elif dtype == torch.float32 and _has_autocast(device.type) and \
            torch.is_autocast_enabled(device.type):
        low = torch.get_autocast_dtype(device.type)
    else:
        return None
    if device.type == "cpu":
        return low if low == torch.bfloat16 and _CPU_BF16_GEMMS else None
    return low


def hyper_lstm_layer(backend: str, x, h0, c0, hh0, hc0, params: Sequence[torch.Tensor], layer_norm: bool,
                     forget_bias: float, mask: Optional[torch.Tensor] = None,
                     hyper_mask: Optional[torch.Tensor] = None, zoneout_mask: Optional[torch.Tensor] = None,
                     hyper_zoneout_mask: Optional[torch.Tensor] = None, weight_hr: Optional[torch.Tensor] = None):
    """Runs x (T, B, X) from (h0, c0, ĥ0, ĉ0); returns the per-step (h, c, ĥ, ĉ), each (T, B, ·). The masks
    (T, B, ·) are recurrent dropout's multipliers on φ(g) and zoneout's (1 = take the new h). ``weight_hr``
    (P, H): nn.LSTM's projection of h (h0 and the h returned are then P wide)."""
    masks = (mask, hyper_mask, zoneout_mask, hyper_zoneout_mask)
    if backend == "reference" or (weight_hr is not None and zoneout_mask is not None):
        return reference.hyper_lstm_sequence(x, h0, c0, hh0, hc0, reference.HyperLSTMParams(*params), layer_norm,
                                             forget_bias, *masks, weight_hr=weight_hr)
    if weight_hr is not None:
        return _projected_layer(backend, x, (h0, c0, hh0, hc0), params, layer_norm, forget_bias, masks, weight_hr)
    if backend in ("cpu", "cuda", "triton"):
        dtype = x.dtype
        gemm_dtype = gemm_dtype_for(dtype, x.device)
        if dtype not in _FLOAT_DTYPES:
            # half/bfloat16 modules: the GEMMs in that precision (gemm_dtype), states and pointwise math in float32
            cast = lambda t: None if t is None else t.float()  # noqa: E731
            x, h0, c0, hh0, hc0 = map(cast, (x, h0, c0, hh0, hc0))
            params, masks = [p.float() for p in params], tuple(map(cast, masks))
            mask, hyper_mask, zoneout_mask, hyper_zoneout_mask = masks
        op = torch.ops.hyperfused.hyper_lstm_triton_forward if backend == "triton" else \
            torch.ops.hyperfused.hyper_lstm_forward
        # When no gradient can be asked for, nothing is saved for a backward (g and ws become one step's scratch).
        # torch.jit.trace records the flag as a constant, and a trace may be run with gradients: it saves.
        training = jit_tracing() or (torch.is_grad_enabled()
                                     and any(t.requires_grad for t in (x, h0, c0, hh0, hc0, *params)))
        outs = op(
            x.contiguous(), h0.contiguous(), c0.contiguous(), hh0.contiguous(), hc0.contiguous(),
            [p.contiguous() for p in params], mask, hyper_mask, layer_norm, float(forget_bias), zoneout_mask,
            hyper_zoneout_mask, save_for_backward=training, gemm_dtype=gemm_dtype)
        return tuple(o.to(dtype) for o in outs[:4])
    raise ValueError(f"backend: no HyperLSTM implementation named {backend!r}")


def _projected_layer(backend: str, x, state: tuple, params, layer_norm: bool, forget_bias: float, masks: tuple,
                     weight_hr):
    """A layer with nn.LSTM's projection h_t = W_hr u_t, u_t = σ(a^o) ⊙ φ(LN(c_t)), on a fused backend, whose
    kernels have no projection. They run the steps on u instead, with the weights that read it: W_h h_{t-1} =
    (W_h W_hr) u_{t-1}, and Ŵ_x's columns on h_{t-1} times W_hr likewise — the same function, two products per
    call. The first step reads the given h_0 (P wide: in general no u gives it), so it is a call of its own, on h_0
    padded with zeros to H and read by W_h and Ŵ_x's h columns padded with zero columns (P < H): the same
    products. Every h_t comes from one product over all T·B rows after the loop; autograd carries the gradients
    through the pads and products. Zoneout on h mixes h_{t-1} into h_t in P space, where no u gives the result:
    the caller runs that on the reference."""
    h0, c0, hh0, hc0 = state
    (P, H), X, p = weight_hr.shape, x.shape[-1], reference.HyperLSTMParams(*params)
    pad = lambda t: torch.nn.functional.pad(t, (0, H - P))  # noqa: E731 (the last P columns to H)
    read_h0 = p._replace(weight_hh=pad(p.weight_hh), hyper_weight_ih=pad(p.hyper_weight_ih))
    at = lambda steps: [None if m is None else m[steps] for m in masks]  # noqa: E731 (the masks of those steps)
    seqs = hyper_lstm_layer(backend, x[:1], pad(h0), c0, hh0, hc0, list(read_h0), layer_norm, forget_bias,
                            *at(slice(0, 1)))
    if x.shape[0] > 1:  # (a single step, a cell trained step by step, needs no W_h W_hr: 4H·P·H multiply-adds)
        with _autocast_off(x.device):  # in the parameters' precision; the fused op rounds it as it rounds W_h
            read_u = p._replace(weight_hh=p.weight_hh @ weight_hr, hyper_weight_ih=torch.cat(
                [p.hyper_weight_ih[:, :X], p.hyper_weight_ih[:, X:] @ weight_hr], 1))
        rest = hyper_lstm_layer(backend, x[1:], *(t[0] for t in seqs), list(read_u), layer_norm, forget_bias,
                                *at(slice(1, None)))
        seqs = tuple(torch.cat([a, b]) for a, b in zip(seqs, rest))
    us, cs, hhs, hcs = seqs
    return reference.project(us, weight_hr), cs, hhs, hcs


def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False) if _has_autocast(device.type) else contextlib.nullcontext()


# The forward written out in differentiable PyTorch ops (the reference's steps). A fused op's backward run with
# create_graph=True recomputes through it, so that gradients of gradients exist (csrc/autograd.cpp for the C++
# ops, register_lstm_meta for the Triton ones): the fused backward itself has no autograd.
torch.library.define(
    "hyperfused::hyper_lstm_reference",
    "(Tensor x, Tensor h0, Tensor c0, Tensor hh0, Tensor hc0, Tensor[] params, Tensor? mask, Tensor? hyper_mask, "
    "bool layer_norm, float forget_bias, Tensor? zoneout_mask=None, Tensor? hyper_zoneout_mask=None) -> "
    "(Tensor, Tensor, Tensor, Tensor)")


def reference_sequence(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask=None,
                       hyper_zoneout_mask=None):
    """hyper_lstm_forward's (hs, cs, ĥs, ĉs), checked as the op checks its arguments."""
    _checks.lstm_sizes(x, h0, c0, hh0, hc0, params, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask)
    return reference.hyper_lstm_sequence(x, h0, c0, hh0, hc0, reference.HyperLSTMParams(*params), layer_norm,
                                         forget_bias, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask)


torch.library.impl("hyperfused::hyper_lstm_reference", "CompositeImplicitAutograd", reference_sequence)


def check_backward_args(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs,
                        cs, hhs, hcs, g, ws, zoneout_mask=None, hyper_zoneout_mask=None) -> None:
    """What the backward op checks (the forward's inputs, its saved outputs and the incoming gradients)."""
    sizes = _checks.lstm_sizes(x, h0, c0, hh0, hc0, params, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask)
    _checks.lstm_saved(x, sizes, hs, cs, hhs, hcs, g, ws, saved_shapes(*sizes[:2], *sizes[3:]))
    _checks.lstm_grads(x, sizes, (grad_hs, grad_cs, grad_hhs, grad_hcs))


def register_lstm_meta(forward_op: str, backward_op: str, autograd: bool = True) -> None:
    """Fake implementations and (with `autograd`) the autograd formula for a forward/backward op pair with the
    schemas of hyperfused::hyper_lstm_forward/_backward (the C++ ops and the Triton ones share them). The C++
    ops register their autograd in C++ (csrc/autograd.cpp: the same formula without Python on every call)."""

    @torch.library.register_fake(forward_op)
    def _(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask=None,
          hyper_zoneout_mask=None, save_for_backward=True, gemm_dtype=None):
        T, B, _, H, Hh, Nz = _checks.lstm_sizes(x, h0, c0, hh0, hc0, params, mask, hyper_mask, zoneout_mask,
                                                hyper_zoneout_mask)
        _checks.gemm_dtype(x, gemm_dtype)
        g, ws = saved_shapes(T, B, H, Hh, Nz, save_for_backward)
        return (x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T, B, Hh), x.new_empty(T, B, Hh),
                x.new_empty(g), x.new_empty(ws))

    @torch.library.register_fake(backward_op)
    def _(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs, cs, hhs, hcs, g,
          ws, layer_norm, forget_bias, zoneout_mask=None, hyper_zoneout_mask=None, gemm_dtype=None):
        check_backward_args(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask,
                            hs, cs, hhs, hcs, g, ws, zoneout_mask, hyper_zoneout_mask)
        _checks.gemm_dtype(x, gemm_dtype)
        return [torch.empty_like(t) for t in (x, h0, c0, hh0, hc0, *params)]

    if not autograd:
        return
    backward_impl = getattr(torch.ops.hyperfused, backward_op.split("::")[1])

    def setup_context(ctx, inputs, output):
        x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, *rest = inputs
        zone = (rest + [None, None])[:2]  # the zoneout masks, save_for_backward and gemm_dtype have defaults
        ctx.saved = rest[2] if len(rest) > 2 else True
        ctx.gemm_dtype = rest[3] if len(rest) > 3 else None
        ctx.set_materialize_grads(False)  # unused outputs (g, ws, often cs) need no zero-filled gradients
        ctx.layer_norm, ctx.forget_bias = layer_norm, forget_bias
        ctx.save_for_backward(x, h0, c0, hh0, hc0, mask, hyper_mask, *zone, *output, *params)

    def backward(ctx, grad_hs, grad_cs, grad_hhs, grad_hcs, _grad_g, _grad_ws):
        x, h0, c0, hh0, hc0, mask, hyper_mask, zm, hzm, hs, cs, hhs, hcs, g, ws, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = recomputed_grads(
                lambda *t: torch.ops.hyperfused.hyper_lstm_reference(*t[:5], list(t[5:]), mask, hyper_mask,
                                                                     ctx.layer_norm, ctx.forget_bias, zm, hzm),
                (x, h0, c0, hh0, hc0, *params), (grad_hs, grad_cs, grad_hhs, grad_hcs))
        elif not ctx.saved:
            raise RuntimeError(f"{forward_op}: the forward ran with save_for_backward=False and kept nothing for a "
                               "backward; call it with save_for_backward=True to differentiate it")
        else:
            grads = backward_impl(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask,
                                  hs, cs, hhs, hcs, g, ws, ctx.layer_norm, ctx.forget_bias, zm, hzm,
                                  ctx.gemm_dtype)
        # One gradient per input the op was called with: torch 2.11's dispatcher drops trailing arguments equal
        # to their defaults, and its autograd wants exactly that many (2.14 takes that count or the schema's).
        return (*grads[:5], list(grads[5:])) + (None,) * (len(ctx.needs_input_grad) - 6)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def register_step_meta(op: str) -> None:
    """The fake of the single-step op (decoding), and an autograd formula that says it has none."""

    @torch.library.register_fake(op)
    def _(x, h, c, hh, hc, params, layer_norm, forget_bias):
        B, _, H, Hh, _ = _checks.step_sizes(x, h, c, hh, hc, params)
        return x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, Hh), x.new_empty(B, Hh)

    def backward(ctx, *grads):
        raise RuntimeError(f"{op} is the inference step (decoding) and has no backward; to train, run the sequence "
                           "op (HyperLSTM / HyperLSTMCell with gradients enabled do)")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


if HAS_EXTENSION:
    register_lstm_meta("hyperfused::hyper_lstm_forward", "hyperfused::hyper_lstm_backward", autograd=False)
    register_step_meta("hyperfused::hyper_lstm_step")
