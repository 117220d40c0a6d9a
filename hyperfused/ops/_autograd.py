"""What the fused ops' autograd formulas share."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recomputed_grads(forward: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                     grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients for a backward run with create_graph=True (a gradient penalty, Hessian-vector products,
    MAML's inner steps). A fused backward has no autograd of its own, so this recomputes the forward in plain
    PyTorch ops (`forward(*inputs)`) and differentiates that: gradients that are themselves differentiable, at the
    reference's speed. One gradient per input; None where an input needs none. csrc/autograd.cpp does the same for
    the C++ ops.

    `forward` is given an alias (a view) of each saved input that needs a gradient, and the gradients are taken
    with respect to those: the partial derivatives the op owes its inputs. Taken with respect to the saved tensors
    themselves they would be total derivatives wherever one input was computed from another (h_0 = tanh(c_0), or a
    state that plain ops made from c_0): c_0's would take in the paths through h_0, which autograd then adds again.
    The aliases keep the gradients connected to the inputs' history for the next differentiation."""
    with torch.enable_grad():
        aliases = [t.view_as(t) if t.requires_grad else t for t in inputs]
        wanted = [t for t in aliases if t.requires_grad]
        outs = forward(*aliases)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
        if not wanted or not pairs:
            return [None] * len(inputs)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in aliases]
