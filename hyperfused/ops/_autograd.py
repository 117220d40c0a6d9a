"""What the fused ops' autograd formulas share."""
from __future__ import annotations

import torch


def refuse_double_backward(op: str) -> None:
    """The fused ops' backward is itself a fused op with no autograd of its own. Run with create_graph=True
    (a gradient penalty, Hessian-vector products) it would fail deep inside or, worse, drop the
    second-order terms; say so at the boundary instead, as cuDNN's RNNs do."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"hyperfused: {op} has no double backward (backward with create_graph=True); "
                           "use backend='reference' for higher-order gradients")
