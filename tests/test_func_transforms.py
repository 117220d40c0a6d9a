"""torch.func transforms (grad, vmap, per-sample gradients) and forward-mode AD over the modules with
backend="auto".

The fused ops' autograd is not functorch's and has no forward-mode rule, so under a transform or a
forward_ad.dual_level "auto" runs the reference (plain PyTorch, which has every transform's rules and forward
derivatives); these tests compare what they return with the fused ops' ordinary autograd, in float64, where
the two agree to ~1e-14 and a tolerance of 1e-10 is far below what any plausible fault would move them (a
dropped forget bias moves these gradients by >1e-2).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import hyperfused
from hyperfused import HyperConv2d, HyperLSTM, HyperLSTMCell

from helpers import randomize_

TOL = dict(rtol=0, atol=1e-10)


def _layer(**kwargs):
    torch.manual_seed(0)
    return randomize_(HyperLSTM(5, 37, hyper_size=6, hyper_embed=3, dtype=torch.float64, **kwargs), scale=0.3)


def _loss(m, params, x):
    out, state = torch.func.functional_call(m, params, (x,))
    return out.pow(2).sum() + state.hyper_c.sum()


def _autograd(m, x) -> dict:
    m.zero_grad()
    _loss(m, dict(m.named_parameters()), x).backward()
    return {k: p.grad.clone() for k, p in m.named_parameters()}


def test_func_grad_gives_the_fused_ops_gradients():
    m = _layer(num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}
    got = torch.func.grad(lambda p: _loss(m, p, x))(params)
    want = _autograd(m, x)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)
    wrong = _layer(num_layers=2, bidirectional=True, forget_bias=0.0)
    assert max((wrong_g - want[k]).abs().max() for k, wrong_g in _autograd(wrong, x).items()) > 1e-2


def test_vmap_of_grad_gives_per_sample_gradients():
    """Per-sample gradients (as DP-SGD takes them): vmap over the batch of grad of one sample's loss."""
    m = _layer()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xb: _loss(m, p, xb.unsqueeze(1))),
                                 in_dims=(None, 1))(params, x)
    for b in range(x.shape[1]):
        want = _autograd(m, x[:, b:b + 1])
        for k in want:
            torch.testing.assert_close(per_sample[k][b], want[k], **TOL, msg=f"{k}, sample {b}")


@torch.no_grad()
def test_vmap_over_a_cell_step_matches_the_batched_step():
    torch.manual_seed(1)
    cell = randomize_(HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3, dtype=torch.float64), scale=0.3).eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    start = cell(x)
    got = torch.func.vmap(lambda xb, *s: cell(xb, hyperfused.HyperLSTMState(*s)).tensors())(x, *start.tensors())
    for a, b in zip(got, cell(x, start).tensors(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_func_grad_through_generated_conv_kernels():
    torch.manual_seed(2)
    conv = HyperConv2d(16, 32, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in conv.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(conv, p, (x,)).pow(2).sum())(params)
    conv.zero_grad()
    conv(x).pow(2).sum().backward()
    for k, p in conv.named_parameters():
        torch.testing.assert_close(got[k], p.grad, **TOL, msg=k)


def test_a_transform_leaves_nothing_in_the_carried_hyper_state():
    """The hyper state a call remembers for a later plain (h, c) (carry_hyper_state) is not taken from inside
    a transform, whose tensors die with it: the next plain call continues from the last call outside it."""
    m = _layer()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    _, state = m(x)
    other = torch.randn(3, 2, 5, dtype=torch.float64)
    torch.func.grad(lambda p: _loss(m, p, other))({k: v.detach() for k, v in m.named_parameters()})
    out, _ = m(x, (state[0], state[1]))
    torch.testing.assert_close(out, m(x, state)[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in hyperfused.available_backends() if b in ("cpu", "triton")])
def test_a_fused_backend_named_under_a_transform_says_what_runs(backend):
    m = HyperLSTM(5, 7, hyper_size=6, hyper_embed=3, backend=backend)
    x = torch.randn(3, 2, 5)
    params = {k: v.detach() for k, v in m.named_parameters()}
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run under a torch\.func transform .*"
                                         r"backend='auto' runs the reference there"):
        torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sum())(params)


def test_forward_mode_ad_agrees_with_the_fused_backward():
    """A jvp by dual tensors (torch.autograd.forward_ad), J·t, checked against the fused ops' reverse mode:
    u·(J·t) = (Jᵀ·u)·t for a random u."""
    m = _layer(num_layers=2)
    x, t = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    with fwAD.dual_level():
        out, _ = m(fwAD.make_dual(x, t))
        jt = fwAD.unpack_dual(out).tangent
    u = torch.randn_like(jt)
    x_ = x.clone().requires_grad_()
    jtu, = torch.autograd.grad(m(x_)[0], x_, u)
    torch.testing.assert_close((u * jt).sum(), (jtu * t).sum(), **TOL)


def test_a_fused_backend_named_in_forward_mode_ad_says_what_runs():
    m = HyperLSTM(5, 7, hyper_size=6, hyper_embed=3, backend="cpu")
    x = torch.randn(3, 2, 5)
    with fwAD.dual_level(), pytest.raises(ValueError, match=r"backend='cpu' cannot run under forward-mode AD .*"
                                                            r"backend='auto' runs the reference there"):
        m(fwAD.make_dual(x, torch.randn_like(x)))
