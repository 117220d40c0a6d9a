"""Static-hypernetwork kernel generation in Triton: one program per tile computes the hidden layer
a_i = W_i z + B_i and K_i = W_out a_i + B_out for every input slice i of the tile and stores the weights
straight into their place in the conv kernels (the flat buffer of every layer), so both GEMMs and the
layout change are one launch for the whole model. Backward gathers the tiles back and leaves the weight
gradients to GEMMs in torch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_device_of


@triton.jit
def _tile_in_bounds(off, stride, numel, OUT_TILE: tl.constexpr, ROW: tl.constexpr):
    """csrc/static_hypernet_kernels.h's tile_in_bounds: the tile's rows lie inside the buffer and do not
    overlap, checked without overflow. A tile that fails is not touched (the host does not read a GPU
    tile_meta back: that would be a sync per call)."""
    ok = (off >= 0) & (stride >= ROW) & (numel >= ROW) & (off <= numel - ROW)
    if OUT_TILE > 1:
        ok = ok & (stride <= (numel - ROW - off) // (OUT_TILE - 1))
    return ok


@triton.jit
def generate_tiles_kernel(z_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr, meta_ptr, out_ptr, numel,
                          ZD: tl.constexpr, HID: tl.constexpr, IN_TILE: tl.constexpr, OUT_KK: tl.constexpr,
                          KK: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr):
    t = tl.program_id(0)
    oz = tl.arange(0, BLOCK_Z)
    od = tl.arange(0, BLOCK_D)
    oo = tl.arange(0, BLOCK_O)
    mz, md, mo = oz < ZD, od < HID, oo < OUT_KK
    z = tl.load(z_ptr + t * ZD + oz, mask=mz, other=0.0).to(tl.float32)
    w_out = tl.load(w_out_ptr + oo[:, None] * HID + od[None, :], mask=mo[:, None] & md[None, :], other=0.0)
    w_out = w_out.to(tl.float32)
    b_out = tl.load(b_out_ptr + oo, mask=mo, other=0.0).to(tl.float32)
    off = tl.load(meta_ptr + 2 * t)
    stride = tl.load(meta_ptr + 2 * t + 1)
    mo = mo & _tile_in_bounds(off, stride, numel, OUT_KK // KK, IN_TILE * KK)
    # weight o = ob·k² + ab of input slice i goes to row ob, column i·k² + ab of the tile.
    dest = (oo // KK) * stride + oo % KK
    for i in range(IN_TILE):
        w_in = tl.load(w_in_ptr + i * HID * ZD + od[:, None] * ZD + oz[None, :], mask=md[:, None] & mz[None, :],
                       other=0.0).to(tl.float32)
        a = tl.sum(w_in * z[None, :], axis=1) + tl.load(b_in_ptr + i * HID + od, mask=md, other=0.0).to(tl.float32)
        k = tl.sum(w_out * a[None, :], axis=1) + b_out
        tl.store(out_ptr + off + dest + i * KK, k, mask=mo)


@triton.jit
def gather_tiles_kernel(flat_ptr, meta_ptr, tiled_ptr, numel, IN_TILE: tl.constexpr, OUT_KK: tl.constexpr,
                        KK: tl.constexpr, BLOCK_O: tl.constexpr):
    t = tl.program_id(0)
    oo = tl.arange(0, BLOCK_O)
    mo = oo < OUT_KK
    off = tl.load(meta_ptr + 2 * t)
    stride = tl.load(meta_ptr + 2 * t + 1)
    src = (oo // KK) * stride + oo % KK
    inside = mo & _tile_in_bounds(off, stride, numel, OUT_KK // KK, IN_TILE * KK)
    for i in range(IN_TILE):
        v = tl.load(flat_ptr + off + src + i * KK, mask=inside, other=0.0)
        tl.store(tiled_ptr + (t * IN_TILE + i) * OUT_KK + oo, v, mask=mo)


def generate_blocks(z_dim: int, hidden: int, out_kk: int) -> dict:
    """The block sizes `generate` launches generate_tiles_kernel with."""
    return dict(BLOCK_Z=next_pow2(z_dim, 4), BLOCK_D=next_pow2(hidden, 4), BLOCK_O=next_pow2(out_kk, 4))


def generate(z, w_in, b_in, w_out, b_out, meta, numel: int, kernel_size: int):
    """Every layer's kernel in one flat buffer (see hyperfused.ops.tile_layout for `meta`)."""
    in_tile, hidden, z_dim = w_in.shape
    kk = kernel_size * kernel_size
    out = z.new_zeros(numel)
    with on_device_of(z):
        generate_tiles_kernel[(z.shape[0],)](
            z, w_in, b_in, w_out, b_out, meta, out, numel, ZD=z_dim, HID=hidden, IN_TILE=in_tile,
            OUT_KK=w_out.shape[0], KK=kk, **generate_blocks(z_dim, hidden, w_out.shape[0]))
    return out


def backward(grad, z, w_in, b_in, w_out, meta, kernel_size: int):
    """(dZ, dW_in, dB_in, dW_out, dB_out) from the gradient of the flat kernel buffer."""
    in_tile, hidden, _ = w_in.shape
    kk = kernel_size * kernel_size
    tiles, out_kk = z.shape[0], w_out.shape[0]
    dk = z.new_empty(tiles, in_tile, out_kk)
    grad = grad.contiguous()
    with on_device_of(z):
        gather_tiles_kernel[(tiles,)](grad, meta, dk, grad.numel(), IN_TILE=in_tile, OUT_KK=out_kk, KK=kk,
                                      BLOCK_O=next_pow2(out_kk, 4))
    a = torch.einsum("ihn,tn->tih", w_in, z) + b_in
    d_a = dk @ w_out
    return (torch.einsum("tih,ihn->tn", d_a, w_in), torch.einsum("tih,tn->ihn", d_a, z), d_a.sum(0),
            dk.reshape(-1, out_kk).T @ a.reshape(-1, hidden), dk.sum((0, 1)))
