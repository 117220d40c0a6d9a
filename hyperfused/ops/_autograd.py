"""What the fused ops' autograd formulas share."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recomputed_grads(forward: Callable[[], Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                     grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients for a backward run with create_graph=True (a gradient penalty, Hessian-vector products,
    MAML's inner steps). A fused backward has no autograd of its own, so this recomputes the forward in plain
    PyTorch ops (`forward`, from the saved `inputs`) and differentiates that: gradients that are themselves
    differentiable, at the reference's speed. One gradient per input; None where an input needs none.
    csrc/autograd.cpp does the same for the C++ ops."""
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        outs = forward()
        pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
        if not wanted or not pairs:
            return [None] * len(inputs)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in inputs]
