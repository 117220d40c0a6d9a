"""The Triton backend as torch.library custom ops: hyperfused::hyper_lstm_triton_forward/_backward and
hyperfused::generate_kernels_triton (static hypernetwork).

Registered only where Triton imports. The dispatcher uses it for CUDA tensors; on CPU tensors it runs only
under the Triton interpreter (TRITON_INTERPRET=1), which is how the tests exercise it without a GPU.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import recorded
from ._checks import gemm_dtype as gemm_dtype_check, lstm_sizes
from .hyper_lstm import check_backward_args, register_lstm_meta
from .static_hypernet import check_generation_args, check_generation_backward_args, register_generation_meta

try:
    import triton  # noqa: F401

    from .._triton_kernels import load as _load_kernels

    _load_kernels()
    from hyperfused.triton_kernels import hyper_lstm as _kernels
    from hyperfused.triton_kernels import static_hypernet as _static

    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the install
    _kernels = None
    IMPORT_ERROR = f"triton could not be imported ({e})"


def float32_only(t: torch.Tensor, name: str, op: str) -> None:
    """The Triton kernels compute in float32: a float64 model would be silently rounded, so it is refused."""
    torch._check(t.dtype != torch.float64,
                 lambda: f"{op}: backend='triton' computes in float32 and takes no float64 tensors (got '{name}' of "
                         "dtype torch.float64); use backend='cpu', 'cuda' or 'reference' for float64")


def _without_autocast(fn):
    """Runs fn with autocast off: the Triton drivers size their buffers by the inputs' dtype and call torch
    GEMMs whose outputs the kernels read; under autocast those would come back in bfloat16/float16. As for
    the C++ ops (csrc/no_autocast.h), autocast stops at the op's boundary."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return run


def _settings(*flags) -> tuple:
    """What besides the tensors fixes what a recorded Triton op does (recorded.py): its flags, the step design
    and torch's GEMM precision switches, as the body reads them when it runs."""
    m = torch.backends.cuda.matmul
    return (*map(str, flags), _kernels.gemm_shaped(), m.allow_tf32, m.allow_fp16_reduced_precision_reduction,
            m.allow_bf16_reduced_precision_reduction)


if _kernels is not None:

    @torch.library.custom_op("hyperfused::hyper_lstm_triton_forward", mutates_args=())
    def triton_forward(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, hh0: torch.Tensor, hc0: torch.Tensor,
                       params: list[torch.Tensor], mask: Optional[torch.Tensor], hyper_mask: Optional[torch.Tensor],
                       layer_norm: bool, forget_bias: float, zoneout_mask: Optional[torch.Tensor] = None,
                       hyper_zoneout_mask: Optional[torch.Tensor] = None, save_for_backward: bool = True,
                       gemm_dtype: Optional[torch.dtype] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        float32_only(x, "x", "hyperfused::hyper_lstm_triton")
        lstm_sizes(x, h0, c0, hh0, hc0, params, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask,
                   op="hyperfused::hyper_lstm_triton")
        gemm_dtype_check(x, gemm_dtype, op="hyperfused::hyper_lstm_triton")
        if recorded.requested():
            return tuple(recorded.run_recorded(
                "forward", [x, h0, c0, hh0, hc0, mask, hyper_mask, zoneout_mask, hyper_zoneout_mask], params,
                _settings(layer_norm, forget_bias, save_for_backward, gemm_dtype),
                lambda t, p: _without_autocast(_kernels.forward)(*t[:5], p, *t[5:7], layer_norm, forget_bias, *t[7:],
                                                                 save_for_backward, gemm_dtype)))
        return _without_autocast(_kernels.forward)(x, h0, c0, hh0, hc0, params, mask, hyper_mask, layer_norm,
                                                   forget_bias, zoneout_mask, hyper_zoneout_mask, save_for_backward,
                                                   gemm_dtype)

    @torch.library.custom_op("hyperfused::hyper_lstm_triton_backward", mutates_args=())
    def triton_backward(grad_hs: Optional[torch.Tensor], grad_cs: Optional[torch.Tensor],
                        grad_hhs: Optional[torch.Tensor], grad_hcs: Optional[torch.Tensor], x: torch.Tensor,
                        h0: torch.Tensor, c0: torch.Tensor, hh0: torch.Tensor, hc0: torch.Tensor,
                        params: list[torch.Tensor], mask: Optional[torch.Tensor], hyper_mask: Optional[torch.Tensor],
                        hs: torch.Tensor, cs: torch.Tensor, hhs: torch.Tensor, hcs: torch.Tensor, g: torch.Tensor,
                        ws: torch.Tensor, layer_norm: bool, forget_bias: float,
                        zoneout_mask: Optional[torch.Tensor] = None,
                        hyper_zoneout_mask: Optional[torch.Tensor] = None,
                        gemm_dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        check_backward_args(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, params, mask, hyper_mask, hs,
                            cs, hhs, hcs, g, ws, zoneout_mask, hyper_zoneout_mask)
        gemm_dtype_check(x, gemm_dtype, op="hyperfused::hyper_lstm_triton")
        if recorded.requested():
            return recorded.run_recorded(
                "backward", [grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0, mask, hyper_mask, hs, cs, hhs,
                             hcs, g, ws, zoneout_mask, hyper_zoneout_mask], params,
                _settings(layer_norm, forget_bias, gemm_dtype),
                lambda t, p: _without_autocast(_kernels.backward)(*t[:9], p, *t[9:17], layer_norm, forget_bias,
                                                                  *t[17:], gemm_dtype))
        return _without_autocast(_kernels.backward)(grad_hs, grad_cs, grad_hhs, grad_hcs, x, h0, c0, hh0, hc0,
                                                    params, mask, hyper_mask, hs, cs, hhs, hcs, g, ws, layer_norm,
                                                    forget_bias, zoneout_mask, hyper_zoneout_mask, gemm_dtype)

    register_lstm_meta("hyperfused::hyper_lstm_triton_forward", "hyperfused::hyper_lstm_triton_backward")

    @torch.library.custom_op("hyperfused::generate_kernels_triton", mutates_args=())
    def generate_kernels_triton(z: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                                b_out: torch.Tensor, tile_meta: torch.Tensor, numel: int,
                                kernel_size: int) -> torch.Tensor:
        float32_only(z, "z", "hyperfused::generate_kernels_triton")
        check_generation_args(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size)
        return _without_autocast(_static.generate)(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size)

    # The backward is an op of its own (with a fake), so that torch.compile traces the autograd formula
    # instead of running Triton launches on fake tensors.
    @torch.library.custom_op("hyperfused::generate_kernels_triton_backward", mutates_args=())
    def generate_kernels_triton_backward(grad: torch.Tensor, z: torch.Tensor, w_in: torch.Tensor,
                                         b_in: torch.Tensor, w_out: torch.Tensor, tile_meta: torch.Tensor,
                                         kernel_size: int) -> list[torch.Tensor]:
        check_generation_backward_args(grad, z, w_in, b_in, w_out, tile_meta, kernel_size)
        return list(_without_autocast(_static.backward)(grad, z, w_in, b_in, w_out, tile_meta, kernel_size))

    register_generation_meta("hyperfused::generate_kernels_triton", "hyperfused::generate_kernels_triton_backward")
