"""Shared test helpers: random (non-paper) parameters, and comparing every output and gradient."""
import torch

import hyperfused


@torch.no_grad()
def randomize_(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Replaces every parameter by N(0, scale²) noise (LN gains around 1) so no gradient path is trivially
    zero, as it is under the paper's initialisation (z weights 0, W_bz 0)."""
    for name, p in module.named_parameters():
        p.normal_(0.0, scale)
        if "ln" in name and name.endswith("weight"):
            p.add_(1.0)
    return module


def make_pair(backend: str, *args, dtype=torch.float64, **kwargs):
    """A reference HyperLSTM and one on `backend` with identical random parameters."""
    ref = randomize_(hyperfused.HyperLSTM(*args, backend="reference", dtype=dtype, **kwargs))
    fast = hyperfused.HyperLSTM(*args, backend=backend, dtype=dtype, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def random_state(m: hyperfused.HyperLSTM, B: int, dtype=torch.float64, requires_grad=True):
    """A random (h, c, ĥ, ĉ) on the module's device."""
    n = m.num_layers * m.num_directions
    device = next(m.parameters()).device
    ts = [torch.randn(n, B, size, dtype=dtype, device=device, requires_grad=requires_grad)
          for size in m.cells[0]._state_sizes()]
    return hyperfused.HyperLSTMState(*ts)


def seeded_weights(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random weights of like's shape and dtype on like's device, drawn from a CPU generator so that every
    device and backend sees the same numbers."""
    return torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)


def forward_and_loss(m, x, state):
    """Output and final state (h, c, ĥ, ĉ), and a fixed random linear functional of all of them."""
    out, fin = m(x, state)
    gen = torch.Generator().manual_seed(1234)
    outs = [out, fin[0], fin[1], fin.hyper_h, fin.hyper_c]
    return outs, sum((o * seeded_weights(o, gen)).sum() for o in outs)


def run_and_grad(m, x, state):
    """Output, final state (h, c, ĥ, ĉ) and the gradients of x, the initial state and every parameter
    under a random linear functional of every output."""
    x = x.detach().clone().requires_grad_()
    state = hyperfused.HyperLSTMState(*(t.detach().clone().requires_grad_() for t in state.tensors()))
    outs, loss = forward_and_loss(m, x, state)
    m.zero_grad()
    loss.backward()
    grads = {"x": x.grad, "h0": state[0].grad, "c0": state[1].grad, "hh0": state.hyper_h.grad,
             "hc0": state.hyper_c.grad}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return outs, grads


def penalty_grads(m, x, state):
    """A gradient penalty, as WGAN-GP or a smoothness regulariser takes it: the squared norm of d(loss)/d(x, h0),
    differentiated with respect to x, the initial state and every parameter."""
    x = x.detach().clone().requires_grad_()
    state = hyperfused.HyperLSTMState(*(t.detach().clone().requires_grad_() for t in state.tensors()))
    out, fin = m(x, state)
    gen = torch.Generator().manual_seed(7)
    loss = (out * seeded_weights(out, gen)).sum() + (fin[1] * seeded_weights(fin[1], gen)).sum()
    first = torch.autograd.grad(loss, (x, state[0]), create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    m.zero_grad()
    penalty.backward()
    named = {"x": x.grad, "h0": state[0].grad, "c0": state[1].grad, "hyper_h0": state.hyper_h.grad,
             **{n: p.grad for n, p in m.named_parameters()}}
    return [g.detach() for g in first], named


def _scaled_atol(ref: torch.Tensor, atol: float) -> float:
    """atol relative to the tensor's largest entry (at least 1): a gradient entry is a sum of products whose
    rounding error scales with the largest terms, so a small entry of a large gradient carries the error
    of its neighbours' size, in any summation order."""
    return atol * max(1.0, ref.abs().max().item()) if ref.numel() else atol


class Seeded:
    """A module called after torch.manual_seed(seed): two modules that draw their masks (dropout, zoneout) from
    torch's RNG in the same order then draw the same ones."""

    def __init__(self, m, seed: int):
        self.m, self.seed = m, seed

    def __call__(self, *args):
        torch.manual_seed(self.seed)
        return self.m(*args)

    def __getattr__(self, name):
        return getattr(self.m, name)


def assert_same_run(ref, fast, x, state, rtol, atol, seed=None, scaled=True):
    """Every output and gradient of `fast` against `ref`'s; with `seed`, both run with the same masks (Seeded);
    atol scaled by each tensor's largest entry (_scaled_atol), or as given where not `scaled`."""
    if seed is not None:
        ref, fast = Seeded(ref, seed), Seeded(fast, seed)
    tol = (lambda t: _scaled_atol(t, atol)) if scaled else (lambda t: atol)  # noqa: E731
    outs_r, grads_r = run_and_grad(ref, x, state)
    outs_f, grads_f = run_and_grad(fast, x, state)
    for name, a, b in zip(("output", "h_n", "c_n", "hyper_h", "hyper_c"), outs_f, outs_r, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=tol(b), msg=lambda m, n=name: f"{n}: {m}")
    assert grads_r.keys() == grads_f.keys()
    for name in grads_r:
        assert grads_r[name] is not None, f"reference gradient of {name} is missing"
        assert grads_f[name] is not None, f"gradient of {name} is missing"
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=rtol, atol=tol(grads_r[name]),
                                   msg=lambda m, n=name: f"grad {n}: {m}")
