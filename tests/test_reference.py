"""The reference HyperLSTM: gradients, the LSTM identity, initialisation, state handling and layouts."""
import io

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_sequence

import hyperfused
from hyperfused import reference
from helpers import randomize_, random_state


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_reference_hyper_lstm(layer_norm, bias):
    m = randomize_(hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, layer_norm=layer_norm, bias=bias,
                                        backend="reference", dtype=torch.float64))
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    state = random_state(m, 2)

    def f(x, h0, c0, hh0, hc0, *params):
        out, fin = functional_call(m, dict(zip(names, params, strict=True)),
                                   (x, hyperfused.HyperLSTMState(h0, c0, hh0, hc0)))
        return out, fin[0], fin[1], fin.hyper_h, fin.hyper_c

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, state[0], state[1], state.hyper_h, state.hyper_c, *params))


def test_identity_with_unit_scaling_is_nn_lstm():
    """d ≡ 1, b = b_0 and no layer norm make the main cell exactly torch.nn.LSTM (docs/design.md §1)."""
    X, H, Nz = 4, 6, 3
    lstm = torch.nn.LSTM(X, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    m = hyperfused.HyperLSTM.from_lstm(lstm, layer_norm=False, hyper_size=5, hyper_embed=Nz, backend="reference")
    with torch.no_grad():
        for cell in m.cells:
            for name in ("hyper_weight_ih", "hyper_weight_hh", "hyper_bias", "bias_z_weight"):
                getattr(cell, name).normal_()  # the hyper cell may do anything: with W_z = 0 it cannot reach d
            cell.z_weight.zero_()
            cell.z_bias.fill_(1.0)
            cell.scale_weight.fill_(1.0 / Nz)
            cell.bias_scale_weight.zero_()
    x = torch.randn(7, 3, X, dtype=torch.float64)
    h0 = torch.randn(4, 3, H, dtype=torch.float64)
    c0 = torch.randn(4, 3, H, dtype=torch.float64)
    out_ref, (h_ref, c_ref) = lstm(x, (h0, c0))
    out, (h, c) = m(x, (h0, c0))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)


def test_initial_scaling_vectors_are_one_tenth():
    m = hyperfused.HyperLSTM(5, 9, hyper_size=7, hyper_embed=4)
    cell = m.cells[0]
    hh = torch.randn(3, 7)
    d = reference.scaling_vectors(hh, reference.HyperLSTMParams(*cell.flat_params()))
    for gate in reference.GATES:
        torch.testing.assert_close(d["h", gate], torch.full((3, 9), 0.1))
        torch.testing.assert_close(d["x", gate], torch.full((3, 9), 0.1))
        torch.testing.assert_close(d["b", gate], torch.zeros(3, 9))


def test_initialisation_follows_the_paper():
    cell = hyperfused.HyperLSTM(5, 8, hyper_size=6, hyper_embed=4).cells[0]
    for block in cell.weight_hh.detach().chunk(4, 0):  # each gate block of W_h is orthogonal
        torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.all(cell.z_weight == 0) and torch.all(cell.z_bias == 1)
    assert torch.all(cell.bias_scale_weight == 0) and torch.all(cell.bias_ih == 0) and torch.all(cell.bias_hh == 0)
    assert 0 < cell.bias_z_weight.std() < 0.05
    assert torch.all(cell.ln_weight == 1) and torch.all(cell.ln_bias == 0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_chunked_run_continues_exactly(backend):
    m = randomize_(hyperfused.HyperLSTM(4, 6, num_layers=2, hyper_size=5, hyper_embed=3, backend=backend,
                                        dtype=torch.float64))
    x = torch.randn(9, 2, 4, dtype=torch.float64)
    out, state = m(x)
    out1, s1 = m(x[:4])
    out2, s2 = m(x[4:], s1)
    torch.testing.assert_close(torch.cat([out1, out2]), out)
    for a, b in zip(s2.tensors(), state.tensors(), strict=True):
        torch.testing.assert_close(a, b)
    # A plain (h, c) tuple restarts the hyper state at zero, so the continuation differs.
    out3, _ = m(x[4:], (s1[0], s1[1]))
    assert not torch.allclose(out3, out2)


def _model(backend="reference", **kw):
    return randomize_(hyperfused.HyperLSTM(4, 6, hyper_size=5, hyper_embed=3, backend=backend,
                                           dtype=torch.float64, **kw))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batch_first_and_unbatched_layouts(bidirectional):
    m = _model(num_layers=2, bidirectional=bidirectional)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    out, (h, c) = m(x)
    m.batch_first = True
    out_bf, (h_bf, c_bf) = m(x.transpose(0, 1))
    torch.testing.assert_close(out_bf, out.transpose(0, 1))
    torch.testing.assert_close(h_bf, h)
    m.batch_first = False
    out_u, (h_u, c_u) = m(x[:, 1])
    torch.testing.assert_close(out_u, out[:, 1])
    torch.testing.assert_close(h_u, h[:, 1])
    torch.testing.assert_close(c_u, c[:, 1])


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_matches_each_sequence_alone(bidirectional, enforce_sorted):
    m = _model(num_layers=2, bidirectional=bidirectional)
    lengths = [6, 3, 1] if enforce_sorted else [3, 6, 1]
    seqs = [torch.randn(n, 4, dtype=torch.float64) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out, (h, c) = m(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out.batch_sizes, packed.batch_sizes)
    padded, out_lengths = torch.nn.utils.rnn.pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, seq in enumerate(seqs):
        o, (hb, cb) = m(seq)
        torch.testing.assert_close(padded[:len(seq), b], o)
        torch.testing.assert_close(h[:, b], hb)
        torch.testing.assert_close(c[:, b], cb)


def test_stack_and_bidirectional_equal_single_layers():
    m = _model(num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    out, (h, c) = m(x)

    def single(cell_index, input_size):
        s = hyperfused.HyperLSTM(input_size, 6, hyper_size=5, hyper_embed=3, backend="reference", dtype=torch.float64)
        s.cells[0].load_state_dict(m.cells[cell_index].state_dict())
        return s

    layer_in, hs = x, []
    for layer in range(2):
        fwd, (hf, _) = single(2 * layer, layer_in.shape[-1])(layer_in)
        bwd, (hb, _) = single(2 * layer + 1, layer_in.shape[-1])(layer_in.flip(0))
        layer_in = torch.cat([fwd, bwd.flip(0)], -1)
        hs += [hf[0], hb[0]]
    torch.testing.assert_close(out, layer_in)
    torch.testing.assert_close(h, torch.stack(hs))


def test_inter_layer_dropout_only_in_training():
    m = _model(num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


def test_recurrent_dropout_is_reproducible_under_a_seed():
    m = _model(recurrent_dropout=0.3)
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    b = m(x)[0]
    torch.testing.assert_close(a, b)
    m.eval()
    assert not torch.allclose(m(x)[0], a)


def test_state_dict_round_trip():
    m = _model(num_layers=2, bidirectional=True)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = hyperfused.HyperLSTM(4, 6, num_layers=2, bidirectional=True, hyper_size=5, hyper_embed=3,
                              backend="reference", dtype=torch.float64)
    m2.load_state_dict(torch.load(buf))
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(m2(x)[0], m(x)[0])


def test_cell_matches_one_step_of_the_layer():
    m = _model()
    cell = m.cells[0]
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    out, state = m(x)
    h, c = cell(x[0])
    torch.testing.assert_close(h, state[0][0])
    torch.testing.assert_close(c, state[1][0])
    hu, cu = cell(x[0, 1])  # unbatched
    torch.testing.assert_close(hu, h[1])


def test_cell_steps_continue_like_the_layer():
    m = _model()
    cell = m.cells[0]
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    h0, c0 = torch.randn(2, 2, 6, dtype=torch.float64).unbind(0)  # (B, H) each, as nn.LSTMCell takes them
    out, state = m(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    s = (h0, c0)
    for t in range(3):
        s = cell(x[t], s)
        torch.testing.assert_close(s[0], out[t])
    torch.testing.assert_close(s.hyper_c, state.hyper_c[0])
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\): expected shape \(2, 6\), got \(1, 2, 6\)"):
        cell(x[0], (h0.unsqueeze(0), c0.unsqueeze(0)))


def test_module_api_mirrors_nn_lstm():
    m = hyperfused.HyperLSTM(10, 20, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 5, 10)
    out, (h, c) = m(x)
    ref_out, (ref_h, ref_c) = torch.nn.LSTM(10, 20, num_layers=2, batch_first=True, bidirectional=True)(x)
    assert out.shape == ref_out.shape and h.shape == ref_h.shape and c.shape == ref_c.shape
    assert "10, 20, num_layers=2" in repr(m)
    m.flatten_parameters()  # code written for nn.LSTM calls this
    assert m.proj_size == 0 and m.num_layers == 2 and m.batch_first
