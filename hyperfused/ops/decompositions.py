"""The fused ops as plain PyTorch, for a program torch.export has already captured.

torch.export keeps the fused ops (they have fakes): right for AOTInductor and for anything that loads
hyperfused, wrong for a consumer that knows only ATen, such as torch.onnx.export given the ExportedProgram
(``No ONNX function found for hyperfused.hyper_lstm_forward``). ``ep.run_decompositions(decompositions())``
writes each fused op out as the computation it fuses:

    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(hyperfused.decompositions())
    torch.onnx.export(ep, (x,), "model.onnx")

The HyperLSTM ops become the reference's step, unrolled at the exported length; kernel generation becomes its
few-operator form (two batched products and one scatter). Exporting the module itself with torch.onnx.export
needs none of this: while that traces, the modules compute with these same functions.
"""
from __future__ import annotations

import torch

from .. import reference
from . import _checks
from .hyper_lstm import reference_sequence, saved_shapes
from .static_hypernet import check_generation_args, generate_kernels_torch


def _sequence(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask=None,
              hyper_zoneout_mask=None, save_for_backward=True, gemm_dtype=None):
    """hyperfused::hyper_lstm_forward (and its Triton twin). The products run in the inputs' precision: a
    gemm_dtype (autocast's low-precision GEMMs) is not reproduced. The saved rows (g, ws), which only the op's
    own backward reads, come out as zeros of their shapes."""
    T, B, _, H, Hh, Nz = _checks.lstm_sizes(x, h0, c0, hh0, hc0, params, mask, hyper_mask, zoneout_mask,
                                            hyper_zoneout_mask)
    outs = reference_sequence(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm, forget_bias, zoneout_mask,
                              hyper_zoneout_mask)
    g, ws = saved_shapes(T, B, H, Hh, Nz, save_for_backward)
    return (*outs, x.new_zeros(g), x.new_zeros(ws))


def _step(x, h, c, hh, hc, params, layer_norm, forget_bias):
    """hyperfused::hyper_lstm_step: a half-precision cell's product weights (DECODE_HALF_WEIGHTS) widened to the
    step's float32, as the kernel widens them."""
    _checks.step_sizes(x, h, c, hh, hc, params)
    p = reference.HyperLSTMParams(*(t.to(x.dtype) for t in params))
    return reference.hyper_lstm_step(x, (h, c, hh, hc), p, layer_norm, forget_bias)


def _generation(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size):
    """hyperfused::generate_kernels (and its Triton twin)."""
    check_generation_args(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size)
    return generate_kernels_torch(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size)


_WRITTEN_OUT = {"hyper_lstm_forward": _sequence, "hyper_lstm_triton_forward": _sequence,
                "hyper_lstm_step": _step, "generate_kernels": _generation, "generate_kernels_triton": _generation}


def decompositions(table: dict | None = None) -> dict:
    """A decomposition table for ``ExportedProgram.run_decompositions``: `table` (default:
    ``torch.export.default_decompositions()``, what run_decompositions applies when given none) with every
    registered forward op of hyperfused written out in ATen. The backward ops are left out: an exported
    program calls the forward ops only."""
    table = torch.export.default_decompositions() if table is None else table
    for name, fn in _WRITTEN_OUT.items():
        if hasattr(torch.ops.hyperfused, name):  # the C++ ops need the extension, the Triton ones Triton
            table[getattr(torch.ops.hyperfused, name).default] = fn
    return table
