"""Gradients of gradients through the fused ops (backward with create_graph=True: gradient penalties,
Hessian-vector products, MAML). The fused backward has no autograd of its own, so there the op recomputes its
forward in PyTorch ops and differentiates that; a plain backward keeps the fused kernels."""
import pytest
import torch

import hyperfused
from conftest import backend_cases, backend_params, device_for, requires_extension
from helpers import make_pair, penalty_grads, random_state, randomize_

# (T, B, X, H, Hh, Nz): B = 1 and T = 1 beside odd sizes.
SIZES = [(1, 1, 3, 5, 4, 2), (4, 3, 5, 7, 6, 3)]
# float64: the fused op's double backward is the reference's own computation, so they agree to rounding. The
# Triton backend's forward runs in float32: its penalty gradients (up to ~1e3 here) agree to ~2e-5 relative.
# test_gradient_penalty_matches_reference checks that a forget bias of 0 instead of 1 misses even 100 times
# these tolerances (at these sizes it changes some gradient by 50% to 400%).
F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=1e-4, atol=1e-4)
CASES = backend_cases([(b, torch.float64, s) for b in ("cpu", "cuda") for s in SIZES] +
                      [("triton", torch.float32, s) for s in SIZES])


def _assert_close_grads(got, want, tol):
    (first_got, named_got), (first_want, named_want) = got, want
    for a, b in zip(first_got, first_want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, b.abs().max().item()))
    assert named_got.keys() == named_want.keys()
    for name, b in named_want.items():
        a = named_got[name]
        assert (a is None) == (b is None), f"{name}: a gradient on one side only"
        if b is not None:
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, b.abs().max().item()),
                                       msg=lambda msg, n=name: f"grad {n}: {msg}")


@pytest.mark.parametrize("backend, dtype, size", CASES)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_gradient_penalty_matches_reference(backend, dtype, size, layer_norm):
    T, B, X, H, Hh, Nz = size
    device = device_for(backend)
    ref, fast = make_pair(backend, X, H, num_layers=2, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm,
                          dtype=dtype)
    ref, fast = ref.to(device), fast.to(device)
    for m in (ref, fast):  # a frozen parameter: no gradient, and no error for the missing one
        m.hyper_weight_hh_l1.requires_grad_(False)
    x, state = torch.randn(T, B, X, dtype=dtype, device=device), random_state(ref, B, dtype)
    want = penalty_grads(ref, x, state)
    assert [name for name, g in want[1].items() if g is None] == ["hyper_weight_hh_l1"]
    tol = F64 if dtype == torch.float64 else F32
    _assert_close_grads(penalty_grads(fast, x, state), want, tol)
    # What the tolerance must catch: the same penalty with forget bias 0 differs by far more.
    wrong = hyperfused.HyperLSTM(X, H, num_layers=2, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm,
                                 forget_bias=0.0, backend="reference", dtype=dtype).to(device)
    wrong.load_state_dict(ref.state_dict())
    with pytest.raises(AssertionError):
        _assert_close_grads(penalty_grads(wrong, x, state), want, {k: 100 * v for k, v in tol.items()})


def _op_inputs(T, B, X, H, Hh, Nz, masks):
    m = randomize_(hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float64))
    params = [p.detach().clone().requires_grad_() for p in m.cells[0].flat_params()]
    x = torch.randn(T, B, X, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(B, n, dtype=torch.float64, requires_grad=True) for n in (H, H, Hh, Hh)]
    keep = lambda n: torch.bernoulli(torch.full((T, B, n), 0.7, dtype=torch.float64))  # noqa: E731
    # recurrent dropout's multipliers and zoneout's (1 = take the new state)
    extra = (keep(H) / 0.7, keep(Hh) / 0.7, keep(H), keep(Hh)) if masks else (None,) * 4
    return x, state, params, extra


@requires_extension
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
def test_gradgradcheck_cpu_op(layer_norm, masks):
    x, state, params, (mask, hyper_mask, zm, hzm) = _op_inputs(3, 2, 3, 5, 4, 2, masks)
    frozen = params[0].detach()  # an input without requires_grad among the parameters

    def f(x, h0, c0, hh0, hc0, *ps):
        return tuple(torch.ops.hyperfused.hyper_lstm_forward(x, h0, c0, hh0, hc0, [frozen, *ps], mask, hyper_mask,
                                                             layer_norm, 1.0, zm, hzm)[:4])

    assert torch.autograd.gradgradcheck(f, (x, *state, *params[1:]), fast_mode=True)  # a random projection: 19 inputs


def _op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@requires_extension
def test_plain_backward_stays_fused_and_create_graph_recomputes():
    """The recomputation is only for create_graph=True; a training step's backward is the fused kernel."""
    m = randomize_(hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend="cpu"))
    x = torch.randn(4, 2, 3, requires_grad=True)
    plain = _op_names(lambda: m(x)[0].sum().backward())
    assert "hyperfused::hyper_lstm_backward" in plain and "hyperfused::hyper_lstm_reference" not in plain
    twice = _op_names(lambda: torch.autograd.grad(m(x)[0].sum(), x, create_graph=True))
    assert "hyperfused::hyper_lstm_reference" in twice and "hyperfused::hyper_lstm_backward" not in twice


@requires_extension
def test_hessian_vector_product_matches_reference():
    ref, fast = make_pair("cpu", 3, 6, hyper_size=5, hyper_embed=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    v = [torch.randn_like(p) for p in ref.parameters()]

    def hvp(m):
        params = list(m.parameters())
        grads = torch.autograd.grad(m(x)[0].pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(grads, params, v)

    for a, b in zip(hvp(fast), hvp(ref), strict=True):
        torch.testing.assert_close(a, b, **F64)


def _generation_grads(net, conv):
    params = [*net.parameters(), *conv.parameters()]
    first = torch.autograd.grad(net.generate([conv])[0].pow(2).sum(), params, create_graph=True)
    return list(first) + list(torch.autograd.grad(sum(g.pow(2).sum() for g in first), params))


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_generation_gradient_penalty_matches_reference(backend):
    dtype = torch.float64 if backend == "cpu" else torch.float32
    net = randomize_(hyperfused.StaticHyperNetwork(z_dim=4, in_tile=4, out_tile=2, kernel_size=3, dtype=dtype,
                                                   backend="reference"))
    conv = randomize_(hyperfused.HyperConv2d(8, 4, 3, hypernet=net, dtype=dtype))
    want = _generation_grads(net, conv)
    net.backend = backend
    for a, b in zip(_generation_grads(net, conv), want, strict=True):
        torch.testing.assert_close(a, b, **(F64 if dtype == torch.float64 else F32))


@requires_extension
def test_gradgradcheck_cpu_generation_op():
    net = randomize_(hyperfused.StaticHyperNetwork(3, 2, 3, 3, dtype=torch.float64))
    meta, _, numel = hyperfused.ops.tile_layout([(3, 4), (6, 2)], 3, 2, 3)
    z = torch.randn(len(meta), 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in (net.w_in, net.b_in, net.w_out, net.b_out)]
    f = lambda z, *p: torch.ops.hyperfused.generate_kernels(z, *p, meta, numel, 3)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (z, *params))


def test_reference_has_double_backward():
    m = randomize_(hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend="reference", dtype=torch.float64))
    x = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,))


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda", "triton"))
def test_create_graph_gradients_of_inputs_computed_from_one_another(backend):
    """An op call whose inputs are computed from each other (c_0 = c and h_0 = tanh(c) themselves, as a projected
    layer passes its first step's c_1 and the u_1 made from it): the recomputed backward owes each input its
    partial derivative. Differentiated with respect to the inputs themselves, c's would take in the path through
    h_0, and autograd would add that again (measured on the CPU op: the sum of |∂out/∂c| went from 17.5 to 25.8).
    First-order gradients with create_graph=True, and the second-order ones, against the reference."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = device_for(backend)
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 12, hyper_size=6, hyper_embed=3, dtype=dtype, device=device))
    params = [p.detach().requires_grad_() for p in cell.flat_params()]
    x = torch.randn(3, 2, 5, dtype=dtype, device=device, requires_grad=True)
    c = torch.randn(2, 12, dtype=dtype, device=device, requires_grad=True)
    hyper = torch.zeros(2, 6, dtype=dtype, device=device)

    def grads(b):
        out = hyperfused.ops.hyper_lstm_layer(b, x, torch.tanh(c), c, hyper, hyper, params, True, 1.0)[0]
        first = torch.autograd.grad(out.square().sum(), (x, c), create_graph=True)
        return first + torch.autograd.grad(sum(g.square().sum() for g in first), (x, c, *params))

    tol = F64 if dtype == torch.float64 else F32
    for a, b in zip(grads(backend), grads("reference"), strict=True):
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
def test_gradient_penalty_with_a_projection_matches_reference(backend):
    """proj_size > 0: the fused steps run on weights that are products of the parameters (the first step on
    them padded with zeros); the penalty's gradients of every parameter, W_hr's included."""
    device = device_for(backend)
    ref, fast = make_pair(backend, 5, 12, num_layers=2, proj_size=4, hyper_size=6, hyper_embed=3)
    ref, fast = ref.to(device), fast.to(device)
    x, state = torch.randn(4, 3, 5, dtype=torch.float64, device=device), random_state(ref, 3)
    _assert_close_grads(penalty_grads(fast, x, state), penalty_grads(ref, x, state), F64)
