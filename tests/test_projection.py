"""nn.LSTM's proj_size (LSTMP): h = W_hr · (o ⊙ tanh(LN(c))) of size P is what the layer emits, carries and
feeds back to W_h and to the hyper cell. These tests run the module's default backend; the fused backends
against the reference are in test_hyper_lstm_fused.py."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from hyperfused import HyperLSTM, HyperLSTMCell, HyperLSTMState
from helpers import randomize_, random_state

X, H, P = 5, 7, 3


def _as_plain_lstm(lstm: torch.nn.LSTM, **kw) -> HyperLSTM:
    """The HyperLSTM that is exactly `lstm`: d ≡ 1 and b = b_0 (scale_init=1 with the paper's zero z weights,
    whatever the hyper state), no layer norm, no forget-gate offset (from_lstm's default)."""
    return HyperLSTM.from_lstm(lstm, hyper_size=4, hyper_embed=2, scale_init=1.0, layer_norm=False, **kw)


def _run(m, x, hx):
    out, state = m(x, hx)
    loss = out.square().sum() + state[0].square().sum() + (state[1] * 0.5).sum()
    inputs = [x, *hx] + [p for p in m.parameters() if p.requires_grad]
    return out, state, torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("num_layers,bidirectional,bias", [(1, False, True), (2, True, True), (2, False, False)])
def test_a_projected_hyper_lstm_with_unit_scaling_is_nn_lstm_with_proj_size(num_layers, bidirectional, bias):
    """Outputs, final (h, c) and the gradients of the input, the initial state and every main weight (W_hr
    included) against nn.LSTM(proj_size=3), float64, at 1e-10. A plausible bug moves them by far more: the
    same model with forget_bias=1 (an offset from_lstm must not add) is measured below to differ by > 1e-3."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(X, H, num_layers, bias=bias, bidirectional=bidirectional, proj_size=P, dtype=torch.float64)
    m = _as_plain_lstm(lstm)
    n = num_layers * (2 if bidirectional else 1)
    x = torch.randn(4, 2, X, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(n, 2, P, dtype=torch.float64, requires_grad=True),
          torch.randn(n, 2, H, dtype=torch.float64, requires_grad=True))
    out, state, grads = _run(m, x, hx)
    theirs_out, theirs_state = lstm(x, hx)
    assert out.shape == theirs_out.shape == (4, 2, P * (2 if bidirectional else 1))
    torch.testing.assert_close(out, theirs_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(state[0], theirs_state[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(state[1], theirs_state[1], rtol=0, atol=1e-10)
    loss = theirs_out.square().sum() + theirs_state[0].square().sum() + (theirs_state[1] * 0.5).sum()
    theirs = torch.autograd.grad(loss, [x, *hx, *[w for ws in lstm.all_weights for w in ws]])
    ours = grads[:3] + tuple(dict(zip([x, *hx, *m.parameters()], grads))[w] for ws in m.all_weights for w in ws)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    offset = _as_plain_lstm(lstm, forget_bias=1.0)
    assert (offset(x, hx)[0] - theirs_out).abs().max() > 1e-3


def test_every_gradient_of_a_projected_hyper_lstm_passes_gradcheck():
    """float64 gradcheck with random hyper parameters (the hyper cell reads [x ; h_{t-1}] of size X + P, the
    layer norms on), through two layers: input, initial state and every parameter."""
    torch.manual_seed(1)
    m = randomize_(HyperLSTM(3, 4, 2, proj_size=2, hyper_size=3, hyper_embed=2, dtype=torch.float64), scale=0.4)
    names = [name for name, _ in m.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    state = random_state(m, 2)

    def f(x, h, c, hh, hc, *params):
        out, s = torch.func.functional_call(m, dict(zip(names, params)), (x, HyperLSTMState(h, c, hh, hc)))
        return out, *s.tensors()

    params = [p.detach().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *state.tensors(), *params), fast_mode=True)


def test_shapes_and_state_passing_follow_nn_lstm():
    torch.manual_seed(2)
    m = HyperLSTM(X, H, 2, batch_first=True, bidirectional=True, proj_size=P, hyper_size=4, hyper_embed=2)
    lstm = torch.nn.LSTM(X, H, 2, batch_first=True, bidirectional=True, proj_size=P)
    assert [p.shape for _, p in lstm.named_parameters()] == [
        dict(m.named_parameters())[n].shape for n, _ in lstm.named_parameters()]
    x = torch.randn(3, 6, X)
    out, state = m(x)
    ref_out, (h, c) = lstm(x)
    assert out.shape == ref_out.shape and state[0].shape == h.shape and state[1].shape == c.shape
    assert state.hyper_h.shape == (4, 3, 4)
    assert m(x[0])[0].shape == (6, 2 * P)  # unbatched
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
    assert m(packed)[0].data.shape == lstm(packed)[0].data.shape
    assert "proj_size=3" in repr(m)


def test_the_state_passed_back_continues_the_sequence():
    """As a HyperLSTMState, or as nn.LSTM's plain (h, c) tuple whose hyper state the module remembers. Starting
    afresh instead (the hyper state lost) is measured to move the output by > 1e-4, 100× the tolerance."""
    torch.manual_seed(5)
    m = randomize_(HyperLSTM(X, H, 2, proj_size=P, hyper_size=4, hyper_embed=2), scale=0.3)
    x = torch.randn(6, 3, X)
    whole, _ = m(torch.cat([x, x]))
    _, state = m(x)
    torch.testing.assert_close(m(x, state)[0], whole[6:], rtol=1e-6, atol=1e-6)
    m(x)
    torch.testing.assert_close(m(x, (state[0].clone(), state[1].clone()))[0], whole[6:], rtol=1e-6, atol=1e-6)
    fresh = HyperLSTMState(state[0], state[1], torch.zeros_like(state.hyper_h), torch.zeros_like(state.hyper_c))
    assert (m(x, fresh)[0] - whole[6:]).abs().max() > 1e-4


def test_from_lstm_and_to_lstm_keep_the_projection():
    lstm = torch.nn.LSTM(X, H, 2, bidirectional=True, proj_size=P)
    back = HyperLSTM.from_lstm(lstm, hyper_size=4, hyper_embed=2).to_lstm()
    assert back.proj_size == P
    for (name, a), (_, b) in zip(lstm.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_cell_projects_and_steps_alike_with_and_without_gradients():
    """HyperLSTMCell(proj_size=P): h is (B, P); a step without gradients (the decode op where the extension is
    built: it reads the P-wide h, and the cell projects what it returns) gives what a step with gradients gives,
    to float32 rounding (measured: 1.2e-7; 1e-6 allowed). Leaving out the output gate from what is projected
    moves h by 0.28 here (more than 0.05 asserted)."""
    torch.manual_seed(3)
    cell = randomize_(HyperLSTMCell(X, H, hyper_size=4, hyper_embed=2, proj_size=P), scale=0.3)
    assert cell.weight_hr.shape == (P, H) and cell.weight_hh.shape == (4 * H, P)
    x = torch.randn(2, X)
    state = cell(x)
    assert state[0].shape == (2, P) and state[1].shape == (2, H)
    with_grad = cell(x, state)
    with torch.no_grad():
        without = cell(x, state)
        ungated = (torch.tanh(torch.nn.functional.layer_norm(without[1], (H,), cell.ln_cell_weight,
                                                             cell.ln_cell_bias)) @ cell.weight_hr.T)
    for a, b in zip(with_grad.tensors(), without.tensors(), strict=True):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-6)
    assert (ungated - without[0]).abs().max() > 0.05
    assert cell(x[0])[0].shape == (P,)


def test_zoneout_and_recurrent_dropout_act_on_the_projected_state():
    torch.manual_seed(4)
    m = HyperLSTM(X, H, proj_size=P, hyper_size=4, hyper_embed=2, zoneout=0.3, recurrent_dropout=0.2)
    out, state = m(torch.randn(4, 2, X))
    assert out.shape == (4, 2, P) and state[0].shape == (1, 2, P)
    m.eval()
    assert m(torch.randn(4, 2, X))[0].shape == (4, 2, P)


@pytest.mark.parametrize("kwargs,message", [
    (dict(proj_size=7), r"proj_size: expected 0 or less than hidden_size=7 \(as nn.LSTM\), got 7"),
    (dict(proj_size=-1), r"proj_size: expected a non-negative int, got -1"),
    (dict(proj_size=True), r"proj_size: expected a non-negative int, got True"),
])
def test_a_wrong_projection_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyperLSTM(X, H, **kwargs)
    with pytest.raises(ValueError, match=message):
        HyperLSTMCell(X, H, **kwargs)


def test_a_state_of_the_wrong_size_is_refused_by_name():
    m = HyperLSTM(X, H, proj_size=P, hyper_size=4, hyper_embed=2)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\): expected shape \(1, 1, 3\), got \(1, 1, 7\)"):
        m(torch.randn(2, 1, X), (torch.zeros(1, 1, H), torch.zeros(1, 1, H)))


def test_a_projected_model_compiles_whole_and_exports():
    """torch.compile(fullgraph=True) and torch.export capture a projected layer (the fused op where one is
    built, twice: the first step on the padded weights, then the rest; the products and pads around them in
    plain ops)."""
    torch.manual_seed(6)
    m = randomize_(HyperLSTM(X, H, 2, proj_size=P, hyper_size=4, hyper_embed=2), scale=0.3)
    x = torch.randn(3, 2, X)
    out, state = m(x)
    torch._dynamo.reset()  # HyperLSTM.forward's compiled entries from other tests would count towards its limit
    try:
        compiled_out, compiled_state = torch.compile(m, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()  # and this test's towards theirs
    torch.testing.assert_close(compiled_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_state.hyper_h, state.hyper_h, rtol=1e-5, atol=1e-6)
    exported_out, exported_state = torch.export.export(m, (x,)).module()(x)
    torch.testing.assert_close(exported_out, out, rtol=1e-5, atol=1e-6)
    assert exported_state[0].shape == (2, 2, P)
