"""Static hypernetwork for CNNs (Ha et al. 2016, Sec. 3.1), written out tile by tile.

One two-layer hypernetwork shared by every generated layer maps a tile embedding z ∈ R^{N_z} to a kernel
tile of shape (O_b, I_b, f, f):

    a_i = W_i z + B_i            i = 1..I_b      W_i: (d, N_z), B_i: (d,)
    K_i = W_out a_i + B_out      K_i: (O_b·f·f,) viewed as (O_b, f, f) — input slice i of the tile

A layer with N_out × N_in channels is the (N_out/O_b) × (N_in/I_b) grid of tiles, tile k = r·(N_in/I_b) + c
covering output channels [r·O_b, (r+1)·O_b) and input channels [c·I_b, (c+1)·I_b).
"""
from __future__ import annotations

import torch


def generate_tile(z, w_in, b_in, w_out, b_out, out_tile: int, kernel_size: int):
    """One tile (O_b, I_b, f, f) from one embedding z (N_z,). w_in: (I_b, d, N_z), b_in: (I_b, d)."""
    slices = []
    for i in range(w_in.shape[0]):
        a_i = w_in[i] @ z + b_in[i]
        k_i = w_out @ a_i + b_out
        slices.append(k_i.view(out_tile, kernel_size, kernel_size))
    return torch.stack(slices, dim=1)


def generate_kernel(z_layer, out_channels: int, in_channels: int, w_in, b_in, w_out, b_out, kernel_size: int):
    """A whole conv kernel (N_out, N_in, f, f) from the layer's tile embeddings z_layer (tiles, N_z)."""
    in_tile = w_in.shape[0]
    out_tile = w_out.shape[0] // (kernel_size * kernel_size)
    n_rows, n_cols = out_channels // out_tile, in_channels // in_tile
    if z_layer.shape[0] != n_rows * n_cols:
        raise ValueError(f"z_layer: expected {n_rows * n_cols} tile embeddings, got {z_layer.shape[0]}")
    rows = []
    for r in range(n_rows):
        row = [generate_tile(z_layer[r * n_cols + c], w_in, b_in, w_out, b_out, out_tile, kernel_size)
               for c in range(n_cols)]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)
