"""The paper's MNIST network (Sec. 4.1): a 7×7×16×16 second conv kernel generated from one N_z = 4
embedding by a 4,240-parameter hypernetwork (12,544 weights otherwise)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import HyperConv2d, StaticHyperNetwork


class HyperMNISTNet(nn.Module):
    """conv 7×7 (1→16) → pool → conv 7×7 (16→16, generated when ``hyper``) → pool → linear (784→10)."""

    def __init__(self, hyper: bool = True, z_dim: int = 4, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.hyper = hyper
        self.conv1 = nn.Conv2d(1, 16, 7, padding=3, **factory)
        if hyper:
            self.hypernet = StaticHyperNetwork(z_dim, 16, 16, 7, backend=backend, **factory)
            self.conv2 = HyperConv2d(16, 16, 7, padding=3, hypernet=self.hypernet, **factory)
        else:
            self.conv2 = nn.Conv2d(16, 16, 7, padding=3, bias=False, **factory)
        self.fc = nn.Linear(16 * 7 * 7, 10, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x.view(-1, 1, 28, 28))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))
