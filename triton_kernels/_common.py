import contextlib

import torch
import triton
import triton.language as tl

LN_EPS = 1e-3


@triton.jit
def tanh(x):
    # libdevice's tanh is unavailable under the interpreter; this form is exact up to rounding.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def layer_norm(v, mask, n, eps):
    """(normalised v, 1/sqrt(var + eps)) over the masked entries of a 1-D block; masked-out entries -> 0."""
    v = tl.where(mask, v, 0.0)
    mean = tl.sum(v, 0) / n
    diff = tl.where(mask, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 0) / n + eps)
    return diff * rstd, rstd


@triton.jit
def layer_norm_backward(dout, xhat, gain, rstd, mask, n):
    """Gradient w.r.t. the LN input, from dout = grad of (gain · xhat + bias)."""
    d = tl.where(mask, dout * gain, 0.0)
    mean_d = tl.sum(d, 0) / n
    mean_dx = tl.sum(d * xhat, 0) / n
    return tl.where(mask, rstd * (d - mean_d - xhat * mean_dx), 0.0)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(triton.next_power_of_2(int(n)), minimum)


def on_device_of(t: torch.Tensor):
    """Makes t's GPU the current device for the launches inside: Triton launches on the current device,
    not on the tensors' (a model on cuda:1 would otherwise fault). A no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
