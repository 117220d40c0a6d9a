"""Static hypernetwork for CNNs: conv kernels generated tile by tile from per-tile embeddings."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import reference
from ._args import flag, int_pair, positive_int
from ._module import Module
from ..ops import check_backend_name, generate_kernels, resolve_backend, tile_layout
from ..ops.backends import reference_only


class StaticHyperNetwork(Module):
    """The two-layer hypernetwork shared by every :class:`HyperConv2d` it serves (docs/design.md §2).

    Maps a tile embedding z (``z_dim``) to a kernel tile (out_tile, in_tile, k, k) through a hidden layer
    of size ``z_dim``: a_i = W_i z + B_i, K_i = W_out a_i + B_out.
    """

    def __init__(self, z_dim: int = 64, in_tile: int = 16, out_tile: int = 16, kernel_size: int = 3,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.z_dim, self.in_tile = positive_int("z_dim", z_dim), positive_int("in_tile", in_tile)
        self.out_tile, self.kernel_size = positive_int("out_tile", out_tile), positive_int("kernel_size", kernel_size)
        self.backend = check_backend_name(backend)
        self._layouts: dict = {}  # (layer shapes, device) -> tile placement, computed once
        hidden, k2 = z_dim, kernel_size * kernel_size
        factory = dict(device=device, dtype=dtype)
        self.w_in = nn.Parameter(torch.empty(in_tile, hidden, z_dim, **factory))
        self.b_in = nn.Parameter(torch.empty(in_tile, hidden, **factory))
        self.w_out = nn.Parameter(torch.empty(out_tile * k2, hidden, **factory))
        self.b_out = nn.Parameter(torch.empty(out_tile * k2, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # With z ~ N(0, 1), a_i ~ N(0, 1) and kernel entries get He variance 2 / (in_tile·k·k).
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.z_dim))
        nn.init.normal_(self.w_out, std=math.sqrt(2.0 / (self.in_tile * self.kernel_size ** 2 * self.w_out.shape[1])))
        self.b_in.zero_()
        self.b_out.zero_()

    def generate(self, layers: Sequence["HyperConv2d"]) -> list[torch.Tensor]:
        """Every given layer's kernel (N_out, N_in, k, k), in order, from one fused call for all of them."""
        if isinstance(layers, (HyperConv2d, torch.Tensor)) or not isinstance(layers, Sequence):
            raise TypeError(f"layers: expected a sequence of HyperConv2d, got {type(layers).__name__}")
        if len(layers) == 0:
            return []
        for i, layer in enumerate(layers):
            if not isinstance(layer, HyperConv2d):
                raise TypeError(f"layers[{i}]: expected a HyperConv2d, got {type(layer).__name__}")
            # Compared by a parameter, not by `is`: torch.export's tracer hands out a fresh proxy of a
            # submodule on every attribute access, and the parameter is the same tensor through any of them.
            if layer.hypernet.w_in is not self.w_in:
                raise ValueError(f"layers[{i}]: this HyperConv2d is served by another StaticHyperNetwork")
        if isinstance(self.w_in, torch.fx.Proxy):  # under torch.fx.symbolic_trace
            return self._fx_call(self.w_in.tracer, layers)
        backend = resolve_backend(self.backend, self.w_in.device)
        if backend == "reference" and reference_only():
            # Exporting to ONNX, a torch.func transform, forward-mode AD: the fused op's computation in plain PyTorch
            # (two batched products and one scatter), a few ONNX operators or transformed ops for every layer,
            # where the per-tile reference makes thousands (3,163 ONNX nodes at HyperWRN-10-1).
            backend = "torch"
        elif backend == "reference":
            return [reference.generate_kernel(layer.z, *layer.weight_shape[:2], self.w_in, self.b_in, self.w_out,
                                              self.b_out, self.kernel_size) for layer in layers]
        shapes = tuple(layer.weight_shape[:2] for layer in layers)
        key = (shapes, self.w_in.device)
        if key not in self._layouts:
            meta, spans, numel = tile_layout(shapes, self.out_tile, self.in_tile, self.kernel_size)
            self._layouts[key] = (meta.to(self.w_in.device), spans, numel)
        meta, spans, numel = self._layouts[key]
        z = torch.cat([layer.z for layer in layers]) if len(layers) > 1 else layers[0].z
        flat = generate_kernels(backend, z, self.w_in, self.b_in, self.w_out, self.b_out, meta, numel,
                                self.kernel_size)
        # One split (its backward is a single cat), not a slice per layer (a full-size zeros + add each).
        parts = flat.split([n for _, n in spans])
        return [part.view(layer.weight_shape) for part, layer in zip(parts, layers)]

    def _fx_call(self, tracer, layers: Sequence["HyperConv2d"]):
        """The proxy of this generation recorded as one call of this module (as FX records nn.Conv2d), with the
        layers as get_attr nodes: the traced model generates from their embeddings as they are when it runs.
        Index it (``kernels[i]``), as FX cannot iterate a proxy of unknown length."""
        layers = [tracer.create_proxy("get_attr", tracer.path_of_module(layer), (), {}) for layer in layers]
        return tracer.create_proxy("call_module", self._fx_path(tracer), (layers,), {})

    def forward(self, layers: Sequence["HyperConv2d"]) -> list[torch.Tensor]:
        """``net(layers)`` is ``net.generate(layers)``, called as a module: forward hooks and wrappers see it."""
        return self.generate(layers)

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, in_tile={self.in_tile}, out_tile={self.out_tile}, kernel_size={self.kernel_size}"


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class HyperConv2d(Module):
    """A Conv2d whose kernel is generated by a :class:`StaticHyperNetwork`; each kernel tile owns one z.

    Pass the same ``hypernet`` to many layers to share it (the paper's setting); without one the layer
    makes its own. The kernel is (out_channels, in_channels / groups, k, k), as nn.Conv2d's weight: both of its
    channel counts must be multiples of the hypernetwork's tile sizes. ``stride``, ``padding`` (an int, a pair,
    ``"valid"`` or ``"same"``), ``dilation``, ``groups`` and ``padding_mode`` act as nn.Conv2d's; ``bias`` is
    off by default (the paper's layers have none: a batch norm follows them), and a bias is initialised as
    nn.Conv2d's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1, padding=0,
                 hypernet: StaticHyperNetwork | None = None, device=None, dtype=None, *, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros"):
        super().__init__()
        kernel_size = positive_int("kernel_size", kernel_size)
        self.stride, self.dilation = int_pair("stride", stride, 1), int_pair("dilation", dilation, 1)
        self.padding = _padding(padding, self.stride)
        self.groups = positive_int("groups", groups)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if hypernet is None:
            hypernet = StaticHyperNetwork(kernel_size=kernel_size, device=device, dtype=dtype)
        if not isinstance(hypernet, StaticHyperNetwork):
            raise TypeError(f"hypernet: expected a StaticHyperNetwork, got {type(hypernet).__name__}")
        if kernel_size != hypernet.kernel_size:
            raise ValueError(f"kernel_size: expected {hypernet.kernel_size} (the hypernet's), got {kernel_size}")
        for name, value, tile in (("in_channels", in_channels, hypernet.in_tile),
                                  ("out_channels", out_channels, hypernet.out_tile)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % tile:
                raise ValueError(f"{name}: expected a positive multiple of the hypernet's tile size {tile}, "
                                 f"got {value!r}")
            if value % self.groups or (name == "in_channels" and value // self.groups % tile):
                raise ValueError(f"{name}: expected a multiple of groups={self.groups}"
                                 + (f" whose share per group is a multiple of the hypernet's tile size {tile}"
                                    if name == "in_channels" else "") + f", got {value!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.hypernet = hypernet
        n_tiles = (out_channels // hypernet.out_tile) * (in_channels // self.groups // hypernet.in_tile)
        ref = hypernet.w_in
        factory = dict(device=device or ref.device, dtype=dtype or ref.dtype)
        self.z = nn.Parameter(torch.randn(n_tiles, hypernet.z_dim, **factory))
        self.register_parameter("bias", None)  # as nn.Conv2d(bias=False)
        if flag("bias", bias):
            bound = 1.0 / math.sqrt(in_channels // self.groups * kernel_size ** 2)  # nn.Conv2d's initialisation
            self.bias = nn.Parameter(torch.empty(out_channels, **factory).uniform_(-bound, bound))

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """The generated kernel's shape (out_channels, in_channels / groups, k, k), nn.Conv2d's weight's."""
        return self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size

    def forward(self, input: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Convolves with `weight` (from a model-wide `hypernet.generate`) or a freshly generated kernel."""
        if not isinstance(input, torch.Tensor) and (node := self._fx_node(input, weight)) is not None:
            return node
        if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input: expected (B, {self.in_channels}, H, W) or ({self.in_channels}, H, W), got {shape}")
        if input.dtype != self.z.dtype:
            raise TypeError(f"input: expected dtype {self.z.dtype} (the layer's), got {input.dtype}")
        if input.device != self.z.device:
            raise ValueError(f"input: expected a tensor on {self.z.device} (the layer's device), got {input.device}")
        if weight is None:
            weight = self.hypernet([self])[0]
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: the input padded by the mode, then no zero padding
            input, padding = F.pad(input, self._pad_amounts(), mode=self.padding_mode), 0
        return F.conv2d(input, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def _pad_amounts(self) -> tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom) for the padding: "same" puts the odd one on the right/bottom."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            total = [d * (self.kernel_size - 1) for d in self.dilation]
            (top, left) = (t // 2 for t in total)
            return left, total[1] - left, top, total[0] - top
        return self.padding[1], self.padding[1], self.padding[0], self.padding[0]

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def _padding(padding, stride: tuple[int, int]):
    """nn.Conv2d's padding: "valid", "same" (stride 1 only, as nn.Conv2d) or an int / pair of them, as a pair."""
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding: expected 'valid', 'same', a non-negative int or a pair of them, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding: 'same' needs stride 1 (as nn.Conv2d), got stride={stride}")
        return padding
    return int_pair("padding", padding, 0)
