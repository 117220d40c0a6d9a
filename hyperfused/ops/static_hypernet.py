"""The static-hypernetwork generation op: every tile of every layer to every layer's conv kernel, at once.

`tile_layout` places tiles; `generate_kernels` runs on the chosen backend. The C++/CUDA op gets its
autograd formula and fake implementation here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._extension import HAS_EXTENSION
from . import _checks
from ._autograd import recomputed_grads


def tile_layout(shapes: Sequence[tuple[int, int]], out_tile: int, in_tile: int, kernel_size: int):
    """For layers of (out_channels, in_channels): per-tile (offset, row stride) into one flat buffer holding
    every kernel in conv layout, each layer's (offset, numel), and the buffer's size."""
    kk = kernel_size * kernel_size
    meta, spans, base = [], [], 0
    for out_ch, in_ch in shapes:
        for r in range(out_ch // out_tile):
            for c in range(in_ch // in_tile):
                meta.append(((r * out_tile * in_ch + c * in_tile) * kk + base, in_ch * kk))
        spans.append((base, out_ch * in_ch * kk))
        base += out_ch * in_ch * kk
    return torch.tensor(meta, dtype=torch.long), spans, base


def generate_kernels_torch(z, w_in, b_in, w_out, b_out, meta, numel: int, kernel_size: int):
    """The same computation as the fused op in plain PyTorch (two batched GEMMs and an index_put)."""
    kk = kernel_size * kernel_size
    in_tile, out_tile = w_in.shape[0], w_out.shape[0] // kk
    hidden = torch.einsum("ihn,tn->tih", w_in, z) + b_in
    tiles = (hidden @ w_out.T + b_out).view(-1, in_tile, out_tile, kk)  # (t, ib, ob, kk)
    ob = torch.arange(out_tile, device=z.device).view(1, 1, out_tile, 1)
    ib = torch.arange(in_tile, device=z.device).view(1, in_tile, 1, 1)
    ab = torch.arange(kk, device=z.device).view(1, 1, 1, kk)
    meta = meta.to(z.device)
    index = meta[:, 0].view(-1, 1, 1, 1) + ob * meta[:, 1].view(-1, 1, 1, 1) + ib * kk + ab
    return z.new_zeros(numel).index_put((index.reshape(-1),), tiles.reshape(-1))


def generate_kernels(backend: str, z, w_in, b_in, w_out, b_out, meta, numel: int, kernel_size: int):
    if backend in ("cpu", "cuda") and z.dtype not in (torch.float32, torch.float64):
        return generate_kernels(backend, *(t.float() for t in (z, w_in, b_in, w_out, b_out)), meta, numel,
                                kernel_size).to(z.dtype)
    if backend in ("cpu", "cuda"):
        return torch.ops.hyperfused.generate_kernels(z.contiguous(), w_in.contiguous(), b_in.contiguous(),
                                                     w_out.contiguous(), b_out.contiguous(), meta, numel,
                                                     kernel_size)
    if backend == "triton":
        args = [t.contiguous() for t in (z, w_in, b_in, w_out, b_out)]
        return torch.ops.hyperfused.generate_kernels_triton(*args, meta, numel, kernel_size)
    if backend == "torch":
        return generate_kernels_torch(z, w_in, b_in, w_out, b_out, meta, numel, kernel_size)
    raise ValueError(f"backend: no fused kernel generation named {backend!r}")


def check_generation_args(z, w_in, b_in, w_out, b_out, tile_meta, numel: int, kernel_size: int) -> None:
    _checks.generation_sizes(z, w_in, b_in, w_out, b_out, tile_meta, kernel_size)
    torch._check(numel >= 0, lambda: f"hyperfused::generate_kernels: 'numel' must be non-negative, got {numel}")


def check_generation_backward_args(grad, z, w_in, b_in, w_out, tile_meta, kernel_size: int) -> None:
    _checks.generation_sizes(z, w_in, b_in, w_out, None, tile_meta, kernel_size)
    torch._check(grad.dim() == 1 and grad.dtype == z.dtype and grad.device == z.device,
                 lambda: f"hyperfused::generate_kernels_backward: 'grad' must be a flat {z.dtype} tensor on "
                         f"{z.device}")


def register_generation_meta(op_name: str, backward_op: str) -> None:
    """Fake implementations and autograd for a generation op and its backward op (the C++ and the Triton
    pairs share the schemas); the backward op returns (dZ, dW_in, dB_in, dW_out, dB_out)."""

    @torch.library.register_fake(op_name)
    def _(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size):
        check_generation_args(z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size)
        return z.new_empty(numel)

    @torch.library.register_fake(backward_op)
    def _(grad, z, w_in, b_in, w_out, tile_meta, kernel_size):
        check_generation_backward_args(grad, z, w_in, b_in, w_out, tile_meta, kernel_size)
        return [torch.empty_like(z), torch.empty_like(w_in), torch.empty_like(b_in), torch.empty_like(w_out),
                z.new_empty(w_out.shape[0])]

    backward_impl = getattr(torch.ops.hyperfused, backward_op.split("::")[1])

    def setup_context(ctx, inputs, output):
        z, w_in, b_in, w_out, b_out, tile_meta, numel, kernel_size = inputs
        ctx.numel, ctx.kernel_size = numel, kernel_size
        ctx.save_for_backward(z, w_in, b_in, w_out, b_out, tile_meta)

    def backward(ctx, grad):
        z, w_in, b_in, w_out, b_out, tile_meta = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, by recomputing in PyTorch ops
            grads = recomputed_grads(lambda *t: (generate_kernels_torch(*t, tile_meta, ctx.numel, ctx.kernel_size),),
                                     (z, w_in, b_in, w_out, b_out), (grad,))
        else:
            grads = backward_impl(grad, z, w_in, b_in, w_out, tile_meta, ctx.kernel_size)
        return (*grads, None, None, None)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if HAS_EXTENSION:
    register_generation_meta("hyperfused::generate_kernels", "hyperfused::generate_kernels_backward")
