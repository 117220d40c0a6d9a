"""Code written for torch.nn.LSTM / nn.LSTMCell works with HyperLSTM / HyperLSTMCell: training loops that
rebuild the state as a plain tuple keep the hyper state, the constructor's positional arguments mean what
they mean for nn.LSTM."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.utils.parametrize
import torch.nn.utils.prune

import hyperfused
from hyperfused import HyperLSTMState
from conftest import HAS_MKL_BATCH, own_kernel_for
from helpers import randomize_


def repackage_hidden(h):
    """As PyTorch's word-language-model example writes it: the returned state rebuilt as plain tuples."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def _model(**kw):
    torch.manual_seed(0)
    return randomize_(hyperfused.HyperLSTM(5, 12, num_layers=2, hyper_size=6, hyper_embed=3, **kw), scale=0.3)


def _losses(model, batches, loop):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, hidden = [], None
    for x, y in batches:
        if loop == "repackage":  # nn.LSTM's idiom: zeros first, then the detached plain tuple
            hidden = (torch.zeros(2, 3, 12), torch.zeros(2, 3, 12)) if hidden is None else repackage_hidden(hidden)
        out, hidden = model(x, hidden)
        if loop == "state":  # the HyperLSTMState, detached
            hidden = hidden.detach()
        loss = (out - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if hyperfused.HAS_EXTENSION else []))
def test_repackage_hidden_loop_gives_the_same_losses_as_the_state_loop(backend):
    batches = [(torch.randn(4, 3, 5), torch.randn(4, 3, 12)) for _ in range(5)]
    with_state = _losses(_model(backend=backend), batches, "state")
    with_tuple = _losses(_model(backend=backend), batches, "repackage")
    assert with_tuple == with_state
    without_carry = _losses(_model(backend=backend, carry_hyper_state=False), batches, "repackage")
    assert without_carry[0] == with_state[0] and without_carry[1:] != with_state[1:]  # the hyper state restarted


def _graphs_counted():
    """A torch.compile backend that runs Dynamo's graphs as they are (no codegen: fast) and counts them."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if hyperfused.HAS_EXTENSION else []))
def test_a_compiled_module_carries_the_hyper_state_as_the_eager_one_does(backend):
    """nn.LSTM's repackage_hidden loop through torch.compile(fullgraph=True): the same losses as in eager mode
    (where, without the carry, the batches after the first differ), with two graphs for five batches — the
    first call's, from no state, and the one every later call replays (the remembered state is its input)."""
    batches = [(torch.randn(4, 3, 5), torch.randn(4, 3, 12)) for _ in range(5)]
    eager = _losses(_model(backend=backend), batches, "repackage")
    counted, graphs = _graphs_counted()
    compiled = _losses(torch.compile(_model(backend=backend), fullgraph=True, backend=counted), batches, "repackage")
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    assert len(graphs) == 2
    without_carry = _losses(_model(backend=backend, carry_hyper_state=False), batches, "repackage")
    # (the carry's effect on these losses: 1e-5 to 1e-3 relative)
    assert max(abs(a - b) / abs(b) for a, b in zip(without_carry, eager, strict=True)) > 100 * 1e-6
    inductor = torch.compile(_model(backend=backend), fullgraph=True)  # the default backend too
    torch.testing.assert_close(_losses(inductor, batches[:3], "repackage"), eager[:3], rtol=1e-5, atol=0)


def test_a_compiled_cell_loop_carries_the_hyper_state():
    """h, c = cell(x, (h, c)), as with nn.LSTMCell, compiled with fullgraph=True."""
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2), scale=0.3)
    xs = torch.randn(4, 3, 5)

    def loop(step):
        h = c = None
        for x in xs:
            h, c = step(x, None if h is None else (h, c))
        return h
    torch.testing.assert_close(loop(torch.compile(cell, fullgraph=True, backend=_graphs_counted()[0])), loop(cell),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_neither_reads_nor_changes_the_remembered_state(strict):
    """An exported program takes its state as inputs: exported with a plain (h_0, c_0) equal to the last state's,
    it starts a fresh hyper state (the remembered one, a constant in the program, would be wrong for any other
    input), and the export leaves the module's memory as it was."""
    m = _model()
    x = torch.randn(3, 4, 5)
    _, state = m(x)
    h, c = state
    program = torch.export.export(m, (x, (h, c)), strict=strict)
    fresh = hyperfused.HyperLSTMState(h, c, torch.zeros_like(state.hyper_h), torch.zeros_like(state.hyper_c))
    torch.testing.assert_close(program.module()(x, (h, c))[0], m(x, fresh)[0], rtol=0, atol=0)
    _, state = m(x)
    torch.testing.assert_close(m(x, (state[0], state[1]))[0], m(x, state)[0], rtol=0, atol=0)


def _chunks(m, xs, hx):
    """The chunks xs run in turn from the plain tuple hx, each from the (h, c) the last returned."""
    outs = []
    for x in xs:
        out, (h, c) = m(x, hx)
        outs.append(out)
        hx = (h, c)
    return torch.cat(outs), h, c


def _checkpointed_grads(m, batches, checkpoint):
    """Gradients of two batches in a truncated-BPTT loop over plain (h, c) tuples, each batch's chunks run
    under `checkpoint` (or as they are, None)."""
    grads, hidden = [], None
    for xs in batches:
        hidden = (torch.zeros(2, 3, 12), torch.zeros(2, 3, 12)) if hidden is None else repackage_hidden(hidden)
        m.zero_grad()
        out, h, c = _chunks(m, xs, hidden) if checkpoint is None else checkpoint(_chunks, m, xs, hidden)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        hidden = (h, c)
    return grads


@pytest.mark.parametrize("calls", [1, 3], ids=["one call", "three calls"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_from_the_carried_hyper_state(reentrant, calls):
    """torch.utils.checkpoint reruns the calls in the backward, after they have remembered their own final
    states, and the non-reentrant kind stops rerunning where it has what the backward needs: each call must
    start again from the hyper state it started from, and the next batch from the last forward state. (Rerun
    from a zero or a rerun's hyper state, the gradients were off by 1e-4 to 5e-4, 100 times their size in
    places, where they agree exactly.)"""
    import functools
    from torch.utils.checkpoint import checkpoint
    m = _model()
    batches = [torch.randn(calls, 2, 3, 5, requires_grad=True) for _ in range(2)]  # (reentrant: an input must)
    plain = _checkpointed_grads(m, batches, None)
    again = _checkpointed_grads(m, batches, functools.partial(checkpoint, use_reentrant=reentrant))
    for grads, want in zip(again, plain, strict=True):
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def _continue(m, x2, hx):
    return m(x2, hx)[0]


@pytest.mark.parametrize("make_hx", [
    lambda s: (s[0], s[1]),
    lambda s: (s[0].detach(), s[1].detach()),
    lambda s: (s[0].clone(), s[1].clone()),
    lambda s: tuple(repackage_hidden(v) for v in s),
], ids=["tuple", "detach", "clone", "repackage_hidden"])
def test_a_plain_tuple_of_the_returned_state_continues_the_sequence(make_hx):
    m = _model()
    x1, x2 = torch.randn(3, 4, 5), torch.randn(2, 4, 5)
    _, state = m(x1)
    expected = m(x2, state)[0]  # the HyperLSTMState
    _, state = m(x1)
    torch.testing.assert_close(_continue(m, x2, make_hx(state)), expected, rtol=0, atol=0)


def test_beam_search_reordering_with_index_select_takes_the_matching_rows():
    m = _model()
    x1, x2 = torch.randn(3, 4, 5), torch.randn(2, 3, 5)
    _, state = m(x1)
    beams = torch.tensor([2, 0, 2])
    expected = m(x2, state.index_select(1, beams))[0]
    _, state = m(x1)
    h, c = state
    torch.testing.assert_close(m(x2, (h.index_select(1, beams), c.index_select(1, beams)))[0], expected, rtol=0, atol=0)


def test_a_fresh_zero_state_is_a_fresh_hyper_state():
    m = _model()
    x = torch.randn(3, 4, 5)
    first = m(x)[0]
    m(torch.randn(2, 4, 5))
    zeros = (torch.zeros(2, 4, 12), torch.zeros(2, 4, 12))
    torch.testing.assert_close(m(x, zeros)[0], first, rtol=0, atol=0)
    other = (torch.randn(2, 4, 12), torch.randn(2, 4, 12))  # no row of the last state: fresh hyper state
    explicit = hyperfused.HyperLSTMState(*other, torch.zeros(2, 4, 6), torch.zeros(2, 4, 6))
    torch.testing.assert_close(m(x, other)[0], m(x, explicit)[0], rtol=0, atol=0)


def test_lstm_cell_loop_keeps_the_hyper_state():
    """h, c = cell(x, (h, c)), as with nn.LSTMCell, gives what passing the HyperLSTMState gives."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2), scale=0.3)
    xs = torch.randn(4, 3, 5)
    state = None
    for x in xs:
        state = cell(x, state)
    h = c = None
    for x in xs:
        h, c = cell(x, None if h is None else (h, c))
    torch.testing.assert_close(h, state[0], rtol=0, atol=0)


def test_nn_lstm_positional_arguments_mean_the_same():
    """nn.LSTM's 8th positional argument is proj_size; the hyper options are keyword-only."""
    m = hyperfused.HyperLSTM(4, 6, 2, True, True, 0.0, True, 0)
    assert (m.num_layers, m.bias, m.batch_first, m.bidirectional) == (2, True, True, True)
    assert hyperfused.HyperLSTM(4, 6, 1, True, False, 0.0, False, 3).proj_size == 3
    with pytest.raises(ValueError, match=r"proj_size: expected 0 or less than hidden_size=6"):
        hyperfused.HyperLSTM(4, 6, 1, True, False, 0.0, False, 128)
    with pytest.raises(TypeError):
        hyperfused.HyperLSTM(4, 6, 1, True, False, 0.0, False, 0, None, None, 128)  # hyper_size is keyword-only
    cell = hyperfused.HyperLSTMCell(4, 6, False)  # nn.LSTMCell(input_size, hidden_size, bias)
    assert not cell.use_bias


def test_main_parameters_have_nn_lstms_names_and_nothing_is_saved_twice():
    m = hyperfused.HyperLSTM(4, 6, 2, bidirectional=True, hyper_size=5, hyper_embed=2)
    lstm = torch.nn.LSTM(4, 6, 2, bidirectional=True)
    ours = dict(m.named_parameters())
    for name, p in lstm.named_parameters():
        assert ours[name].shape == p.shape, name
    sd = m.state_dict()
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)  # every entry its own tensor
    assert set(dict(m.named_parameters())) <= set(sd)
    assert [[t.shape for t in layer] for layer in m.all_weights] == [[t.shape for t in layer] for layer in lstm.all_weights]


def test_initialising_by_name_as_for_nn_lstm_reaches_the_layers():
    m = hyperfused.HyperLSTM(4, 6, 2, hyper_size=5, hyper_embed=2)
    for name, p in m.named_parameters():
        if name.startswith("weight_hh"):
            torch.nn.init.constant_(p, 0.25)
        elif name.startswith("bias_"):
            torch.nn.init.constant_(p, 0.5)
    for cell in m.cells:  # what the layers compute with
        assert torch.all(cell.weight_hh == 0.25) and torch.all(cell.flat_params()[2] == 1.0)  # b_0 = b_ih + b_hh


@pytest.mark.parametrize("bias", [True, False])
def test_the_layers_follow_every_change_of_the_modules_tensors(bias):
    """The layers (HyperLSTM.cells) hold the module's own tensors, looked up again on every call: after a copy
    of the module (the copy's cells hold the copy's tensors), load_state_dict(assign=True), a parameter replaced
    by a new one, and eval()."""
    m = hyperfused.HyperLSTM(4, 6, 2, bias=bias, bidirectional=True, hyper_size=5, hyper_embed=2)

    def held_by_the_layers(module):
        return all(getattr(cell, name) is getattr(module, name + module._suffix(k))
                   for k, cell in enumerate(module.cells) for name, t in cell.named_parameters(recurse=False))

    assert held_by_the_layers(m)
    c = copy.deepcopy(m)
    assert held_by_the_layers(c) and held_by_the_layers(m)
    assert all(a is not b for a, b in zip(c.cells[3].parameters(), m.cells[3].parameters(), strict=True))
    c.load_state_dict({k: torch.zeros_like(v) for k, v in m.state_dict().items()}, assign=True)
    assert held_by_the_layers(c) and not any(p.abs().sum() for p in c.cells[1].parameters())
    c.weight_hh_l1_reverse = torch.nn.Parameter(torch.ones(24, 6))
    assert c.cells[3].weight_hh is c.weight_hh_l1_reverse
    c.eval()
    assert not any(cell.training for cell in c.cells) and all(cell.training for cell in m.cells)


def test_a_module_called_through_functional_call_copies_and_saves_as_itself():
    """torch.func.functional_call runs the module with other tensors (here non-leaf ones, as a meta-learning
    loop makes); afterwards the module deep-copies and pickles with its own parameters, and computes with them."""
    m = _model(bidirectional=True)
    x = torch.randn(4, 3, 5)
    out = m(x)[0]
    fast = {name: p - 0.1 * torch.ones_like(p) for name, p in m.named_parameters()}
    f_out = torch.func.functional_call(m, fast, (x,))[0]
    moved = copy.deepcopy(m)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.copy_(fast[name])
    torch.testing.assert_close(f_out, moved(x)[0], rtol=0, atol=0)
    assert (f_out - out).abs().max() > 0.05  # the fast weights change the output: the check above can fail
    for copied in (copy.deepcopy(m), _pickled(m)):
        assert all(not p.requires_grad or p.is_leaf for cell in copied.cells for p in cell.parameters())
        torch.testing.assert_close(copied(x)[0], out, rtol=0, atol=0)
    torch.testing.assert_close(m(x)[0], out, rtol=0, atol=0)


def test_modules_built_on_the_meta_device_infer_shapes_and_materialise():
    """As nn.LSTM: built under torch.device("meta") (no memory), a module runs on meta inputs to give its
    outputs' shapes, with and without gradients; to_empty() and reset_parameters() make it a real one."""
    with torch.device("meta"):
        m = hyperfused.HyperLSTM(5, 12, num_layers=2, bidirectional=True, hyper_size=6, hyper_embed=3)
        cell = hyperfused.HyperLSTMCell(5, 12, hyper_size=6, hyper_embed=3)
        x = torch.randn(4, 3, 5)
    out, state = m(x)
    assert out.device.type == "meta" and out.shape == (4, 3, 24)
    assert state[0].shape == (4, 3, 12) and state.hyper_h.shape == (4, 3, 6)
    with torch.no_grad():
        assert cell(x[0], cell(x[0]))[1].shape == (3, 12)
    m.to_empty(device="cpu")
    m.reset_parameters()
    plain = hyperfused.HyperLSTM(5, 12, num_layers=2, bidirectional=True, hyper_size=6, hyper_embed=3)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(m(x)[0], plain(x)[0], rtol=0, atol=0)
    assert m.weight_hh_l1_reverse.abs().sum() > 0


def test_torch_export_captures_the_layer_and_its_state():
    """torch.export.export of a HyperLSTM given a HyperLSTMState and of a HyperLSTMCell: the program, saved and
    loaded (its example inputs hold the state), returns the HyperLSTMState the module returns, hyper part
    included."""
    m = _model(bidirectional=True)
    x = torch.randn(4, 3, 5)
    _, state = m(x)
    with warnings.catch_warnings(record=True) as caught:  # the cells' tables, refilled by every call, are no
        warnings.simplefilter("always")                   # tensor attributes assigned during export
        program = torch.export.export(m, (x, state))
    assert not [w for w in caught if "assigned during export" in str(w.message)]
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    out, got = torch.export.load(buffer).module()(x, state)
    want_out, want = m(x, state)
    assert isinstance(got, HyperLSTMState)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 12, hyper_size=6, hyper_embed=3), scale=0.3)
    start = cell(x[0])
    got = torch.export.export(cell, (x[1], start)).module()(x[1], start)
    assert isinstance(got, HyperLSTMState)
    for a, b in zip(got.tensors(), cell(x[1], start).tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: hyperfused.HyperLSTM(5, 12, hyper_size=6, hyper_embed=3),
    lambda: hyperfused.HyperLSTMCell(5, 12, hyper_size=6, hyper_embed=3),
    lambda: hyperfused.StaticHyperNetwork(z_dim=4),
    lambda: torch.nn.Sequential(hyperfused.HyperConv2d(16, 16, 3), torch.nn.ReLU()),  # found inside a model
], ids=["HyperLSTM", "HyperLSTMCell", "StaticHyperNetwork", "HyperConv2d in a model"])
def test_torchscript_is_refused_with_the_way_that_works(make):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script: \w+ cannot be compiled by TorchScript; "
                                           r"capture it with torch\.export\.export"):
        torch.jit.script(make())


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("bias", [True, False])
def test_from_lstm_and_to_lstm_are_inverse(bias):
    lstm = torch.nn.LSTM(4, 6, 2, bias=bias, bidirectional=True)
    m = hyperfused.HyperLSTM.from_lstm(lstm, hyper_size=5, hyper_embed=2)
    back = m.to_lstm()
    for (name, a), (_, b) in zip(lstm.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert (back.num_layers, back.bias, back.bidirectional) == (2, bias, True)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dicts_of_the_earlier_layout_still_load(bias):
    """Before: layers were submodules 'cells.{k}.{name}' with one 'bias' (b_0)."""
    m = _model(bias=bias, bidirectional=True)
    old = {}
    for k, cell in enumerate(m.cells):
        for name, t in cell.state_dict().items():
            if name == "bias_hh":
                continue
            old[f"cells.{k}.{'bias' if name == 'bias_ih' else name}"] = t + (cell.bias_hh if name == "bias_ih" else 0)
        if not bias:
            old[f"cells.{k}.bias"] = torch.zeros(48)
    fresh = hyperfused.HyperLSTM(5, 12, num_layers=2, bidirectional=True, hyper_size=6, hyper_embed=3, bias=bias)
    fresh.load_state_dict(old)
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(fresh(x)[0], m(x)[0])


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
def test_decoding_without_gradients_sees_every_change_of_the_weights():
    """Each decode step must see the weights as they are: changed in place as an optimiser does, in place
    through .data (manual SGD, EMA and clipping code; no version counter records it), in new storage, or by
    load_state_dict. A step from the previous weights differs from the reference by far more than the
    tolerance (the weights change by 10-100% here)."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu"), scale=0.3)
    ref = hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="reference")
    ref.load_state_dict(cell.state_dict())
    xs = torch.randn(7, 3, 5)
    state = ref_state = None
    with torch.no_grad():
        for t, x in enumerate(xs):
            if t == 3:
                for m in (cell, ref):  # in place, as an optimiser does: every weight the step prepares or derives
                    m.weight_hh.add_(0.5)
                    m.weight_ih.add_(0.25)
                    m.hyper_weight_ih.mul_(-1.0)
                    m.hyper_weight_hh.mul_(0.5)
                    m.hyper_bias.add_(0.5)
                    m.bias_ih.add_(0.5)  # b_0 = bias_ih + bias_hh
                    m.scale_weight.add_(0.01)
            if t == 4:
                for m in (cell, ref):  # new storage under the same parameter, as module.to() does
                    m.weight_ih.data = m.weight_ih.data * -2.0
                    m.bias_hh.data = m.bias_hh.data + 1.0
            if t == 5:
                for m in (cell, ref):  # in place through .data: the same storage, no version change
                    m.weight_hh.data.mul_(0.5)
                    m.bias_hh.data.add_(0.5)  # b_0 = bias_ih + bias_hh
                    m.z_weight.data.mul_(-1.0)
                    m.scale_weight.data.mul_(2.0)
                    m.hyper_weight_ih.data.mul_(0.5)
            state, ref_state = cell(x, state), ref(x, ref_state)
            torch.testing.assert_close(state.hyper_h, ref_state.hyper_h, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state[0], ref_state[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        cell.load_state_dict(randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2)).state_dict())
        ref.load_state_dict(cell.state_dict())
        torch.testing.assert_close(cell(xs[0], state)[0], ref(xs[0], ref_state)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("design", [None, "fused", "gemm"], ids=["default", "fused", "gemm"])
def test_decode_path_gives_what_the_general_path_gives(monkeypatch, design):
    """Stepping with the returned state under no_grad takes the decode path; it computes the same numbers, to
    float32 rounding: by default a decode step is GEMM-shaped on every device, while the CPU's sequence op runs
    the one-kernel step, which sums the projections in another order (2.4e-7 apart here). A dropped forget bias
    moves the states by 0.69, far beyond the tolerance."""
    if design:
        monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", design)
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu"), scale=0.3)
    xs = torch.randn(4, 3, 5)
    general = [cell(xs[0])]
    for x in xs[1:]:  # gradients on: the general path
        general.append(cell(x, general[-1]))
    calls = []
    real = hyperfused.HyperLSTMCell._decode_step
    monkeypatch.setattr(hyperfused.HyperLSTMCell, "_decode_step", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        decoded = [cell(xs[0])]
        for x in xs[1:]:
            decoded.append(cell(x, decoded[-1]))
        for d, g in zip(decoded, general, strict=True):
            for a, b in zip(d.tensors(), g.tensors(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert len(calls) == len(xs) - 1
        with pytest.raises(ValueError, match=r"hx.hyper_c: expected shape \(3, 6\), got \(3, 5\)"):
            cell(xs[0], hyperfused.HyperLSTMState(*decoded[-1].tensors()[:3], torch.zeros(3, 5)))


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "hyperfused::mkl_gemm", "hyperfused::mkl_batch",
            "hyperfused::onednn_gemm", "hyperfused::few_rows_gemm", "hyperfused::few_rows_gemm_batch")
COPIES = ("aten::cat", "aten::clone", "aten::contiguous", "aten::copy_", "aten::_to_copy")
MKL_BATCH, ONEDNN, OWN = "hyperfused::mkl_batch", "hyperfused::onednn_gemm", "hyperfused::few_rows_gemm"
OWN_BATCH = "hyperfused::few_rows_gemm_batch"


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("H", [37, 36])
@pytest.mark.parametrize("library", ["", "mkl", "onednn", "own", "mm"],
                         ids=["measured", "mkl", "onednn", "own", "aten"])
def test_a_decode_step_copies_no_weight(library, H, monkeypatch):
    """A decode step runs every product on the parameters themselves, with no concatenated or transposed copy of
    a weight. On a torch with MKL's batch GEMM a float32 step makes the products as seven direct calls: the four
    input and recurrent products and the two embeddings one by one (W_x x, Ŵ_x [x, h], W_h h, Ŵ_h ĥ, then z and
    the bias embedding, in MKL, oneDNN or the few-rows kernel as measured or forced), then the 12 scaling
    vectors in one MKL call or, where H is a multiple of 4, in one call of the few-rows kernel's batch, as
    measured or forced (own; mkl and onednn force MKL). The only copy allowed there is of
    a oneDNN product into its slice of the step's scratch. As ATen ops
    (HYPERFUSED_STEP_GEMM=mm, or a torch without MKL's batch GEMM) the 12 scaling vectors are two batched GEMMs
    (kinds h and x from scale_weight, kind b from bias_scale_weight), and the one copy allowed is addmm's of a
    bias into its (B, ·) output."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    torch.manual_seed(0)
    cell = hyperfused.HyperLSTMCell(5, H, hyper_size=6, hyper_embed=3, backend="cpu")
    x = torch.randn(2, 5)
    with torch.no_grad():
        state = cell(x)
        with torch.profiler.profile() as prof:
            cell(x, state)
    names = [e.name for e in prof.events()]
    assert names.count("hyperfused::hyper_lstm_step") == 1
    copies = [e for e in prof.events() if e.name in COPIES]
    products = [n for n in names if n in PRODUCTS]
    if HAS_MKL_BATCH and library != "mm":
        own_scales = H % 4 == 0 and own_kernel_for(torch.float32)
        assert len(products) == 7 and products[6] in ({MKL_BATCH, OWN_BATCH} if own_scales else {MKL_BATCH})
        if library in ("own", "mkl", "onednn"):
            assert products[6] == (OWN_BATCH if own_scales and library == "own" else MKL_BATCH)
        inputs = products[:6]
        assert set(inputs) <= {MKL_BATCH, ONEDNN, OWN}
        if library == "mkl" or (library == "onednn" and not torch.backends.mkldnn.is_available()):
            assert inputs == [MKL_BATCH] * 6
        elif library == "onednn":
            assert inputs == [ONEDNN] * 6
        elif library == "own":
            assert inputs == [OWN if own_kernel_for(torch.float32) else MKL_BATCH] * 6
        assert all(e.cpu_parent.name == ONEDNN for e in copies), [e.cpu_parent.name for e in copies]
        return
    assert names.count("aten::bmm") == 2 and MKL_BATCH not in names
    if library != "onednn":  # a forced oneDNN takes its (N, K) copies of the weights there
        assert all(e.name == "aten::copy_" and e.cpu_parent.name == "aten::addmm" for e in copies), \
            [(e.name, e.cpu_parent and e.cpu_parent.name) for e in copies]


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("library", ["", "mkl", "onednn", "own", "mm"],
                         ids=["measured", "mkl", "onednn", "own", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H", [37, 36])
def test_a_half_precision_cell_decodes_from_its_own_weights(dtype, H, library, monkeypatch):
    """A bfloat16 or float16 HyperLSTMCell steps in float32 with its four large weights read as they are (the
    products accumulated in float32; a bfloat16 one's operands rounded to bfloat16): on a torch with MKL's batch
    GEMM no float32 copy of W_h is made where the products can read the weights (bfloat16: MKL, oneDNN or the
    few-rows kernel; float16: the few-rows kernel only, whatever library is forced). As ATen ops
    (HYPERFUSED_STEP_GEMM=mm) the op makes the copy. Each step matches the reference run in float32 from the
    same weights and the same state to 2e-2: the step rounds its outputs, and a bfloat16 step the states the
    products read, to the cell's dtype (the largest difference seen was 4.7e-3). Dropping the forget bias
    moves the states by more than 0.1 (checked below). The weights of the small products (the embeddings and the
    scaling vectors) are read as they are too, widened by the few-rows kernel, where it is built and H is a
    multiple of 4 (36 here); else the op makes their float32 copies."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    X, Hh, Nz, B = 5, 7, 3, 3
    kw = dict(hyper_size=Hh, hyper_embed=Nz)
    cell = randomize_(hyperfused.HyperLSTMCell(X, H, backend="cpu", **kw), scale=0.3).to(dtype)
    weights = {k: v.float() for k, v in cell.state_dict().items()}
    ref = hyperfused.HyperLSTMCell(X, H, backend="reference", **kw)
    wrong = hyperfused.HyperLSTMCell(X, H, backend="reference", forget_bias=0.0, **kw)
    ref.load_state_dict(weights), wrong.load_state_dict(weights)
    xs = torch.randn(4, B, X).to(dtype)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        state = cell(xs[0])
        for x in xs[1:]:
            start = HyperLSTMState(*(t.float() for t in state.tensors()))
            expected, bad = ref(x.float(), start), wrong(x.float(), start)
            state = cell(x, state)
            for got, want in zip(state.tensors(), expected.tensors(), strict=True):
                assert got.dtype == dtype
                torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
            assert (bad.tensors()[1] - expected.tensors()[1]).abs().max() > 0.1
    converted = [e for e in prof.events() if e.name == "aten::_to_copy" and [4 * H, H] in e.input_shapes]
    readable = dtype == torch.bfloat16 or own_kernel_for(dtype)
    assert bool(converted) == (library == "mm" or not HAS_MKL_BATCH or not readable)
    small = ([2, 4 * H, Nz], [4 * H, Nz], [8 * Nz, Hh], [4 * Nz, Hh])
    small_converted = [e for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")
                       and e.input_shapes[:1] in ([shape] for shape in small)]  # by the op, or the module
    widened = library != "mm" and HAS_MKL_BATCH and readable and H % 4 == 0 and own_kernel_for(torch.float16)
    assert bool(small_converted) != widened  # (the widened bfloat16 path needs what the float16 one needs)
    if library == "own" and HAS_MKL_BATCH:
        assert (OWN in {e.name for e in prof.events()}) == own_kernel_for(dtype)


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
def test_decode_leaves_onednn_when_it_is_disabled(monkeypatch):
    """torch.backends.mkldnn.enabled = False rules oneDNN out of the decode step, even where it is forced."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "onednn")
    cell = hyperfused.HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3, backend="cpu")
    x = torch.randn(2, 5)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), torch.profiler.profile() as prof:
        cell(x, cell(x))
    assert ONEDNN not in {e.name for e in prof.events()}


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("B", [1, 3, 9])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("H", [37, 36])  # 36: the scaling vectors can run in the few-rows kernel
def test_decode_products_direct_or_through_aten(B, layer_norm, H, monkeypatch):
    """The float32 decode step's products made each way (as measured, the default; forced into MKL, oneDNN or
    the few-rows kernel; as ATen ops, HYPERFUSED_STEP_GEMM=mm) agree with the reference over several steps, and
    MKL's direct calls with the ATen ops (MKL's too) and with the few-rows kernel to float32 rounding: bit for
    bit or nearly here, 1e-6 allowed. Dropping the forget
    bias moves the states by more than 0.1 (checked below), so a product read with a wrong offset or
    transposition cannot hide inside either tolerance."""
    X, Hh, Nz = 5, 7, 3
    ref = randomize_(hyperfused.HyperLSTMCell(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm,
                                              backend="reference"), scale=0.3)
    cell = hyperfused.HyperLSTMCell(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, backend="cpu")
    cell.load_state_dict(ref.state_dict())
    no_forget_bias = hyperfused.HyperLSTMCell(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm,
                                              forget_bias=0.0, backend="cpu")
    no_forget_bias.load_state_dict(ref.state_dict())
    xs = torch.randn(4, B, X)
    # (run once, onednn-packed runs unpacked). The few-rows kernel first: the step's scratch then holds the
    # previous step's values, not another library's of this step, which a product it skipped would leave unseen.
    libraries = ("own", "", "mkl", "onednn", "onednn-packed", "mm")
    with torch.no_grad():
        s_ref = s_wrong = ref(xs[0])
        states = dict.fromkeys(libraries, s_ref)
        for x in xs[1:]:
            s_ref, s_wrong = ref(x, s_ref), no_forget_bias(x, s_wrong)
            for library in libraries:
                monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
                states[library] = cell(x, states[library])
    for library, state in states.items():
        for got, expected in zip(state.tensors(), s_ref.tensors(), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{library!r}: {m}")
    for direct, aten, own in zip(states["mkl"].tensors(), states["mm"].tensors(), states["own"].tensors(), strict=True):
        torch.testing.assert_close(direct, aten, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(own, direct, rtol=1e-6, atol=1e-6)  # sums in another order
    assert (s_wrong.tensors()[1] - s_ref.tensors()[1]).abs().max() > 0.1


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("layers, bidirectional, batch_first, batched", [
    (1, False, False, True), (2, True, True, True), (2, False, False, False)],
    ids=["1-layer", "2-layer-bidirectional-batch-first", "2-layer-unbatched"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("proj_size", [0, 11], ids=["plain", "projected"])
def test_a_hyper_lstm_called_one_step_at_a_time_decodes(layers, bidirectional, batch_first, batched, layer_norm,
                                                        proj_size):
    """A HyperLSTM called with T = 1 under no_grad (a sampling loop written for nn.LSTM) runs every layer and
    direction through the decode op instead of the sequence op, and gives what the general path gives with
    gradients on, to float32 rounding (the decode op's GEMM-shaped step sums in another order; 1e-5 allowed).
    A projected layer's too (the op on its P-wide h, the projection after it; the general path steps on the
    unprojected state). Dropping the forget bias moves the states by more than 0.1."""
    X, H, B = 5, 37, 3

    def model(forget_bias):
        torch.manual_seed(1)
        return randomize_(hyperfused.HyperLSTM(X, H, num_layers=layers, bidirectional=bidirectional,
                                               batch_first=batch_first, hyper_size=7, hyper_embed=3,
                                               layer_norm=layer_norm, forget_bias=forget_bias, backend="cpu",
                                               proj_size=proj_size),
                          scale=0.3)

    m, no_forget_bias = model(1.0), model(0.0)
    xs = torch.randn(4, B, X) if batched else torch.randn(4, X)
    step = (lambda x: x[:, None] if batch_first else x[None]) if batched else (lambda x: x[None])
    general = decoded = wrong = None
    for x in xs:
        out_g, general = m(step(x), general)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out_d, decoded = m(step(x), decoded)
            _, wrong = no_forget_bias(step(x), wrong)
        names = [e.name for e in prof.events()]
        assert names.count("hyperfused::hyper_lstm_step") == 2 * layers * (2 if bidirectional else 1)
        assert "hyperfused::hyper_lstm_forward" not in names
        assert out_d.shape == out_g.shape
        torch.testing.assert_close(out_d, out_g.detach(), rtol=1e-5, atol=1e-5)
        for a, b in zip(decoded.tensors(), general.tensors(), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
    assert (wrong.tensors()[1] - decoded.tensors()[1]).abs().max() > 0.1


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("proj_size", [0, 3], ids=["plain", "projected"])
def test_a_half_precision_cell_steps_without_gradients(dtype, proj_size, monkeypatch):
    """Sampling from a bfloat16 or float16 cell: the decode path steps in float32 (from float32 copies of the
    weights refreshed on every call, a bfloat16 cell's four large weights read as they are) and gives what a
    float32 copy of the cell gives, rounded to the cell's dtype (a projected cell's projection in its dtype, as
    its sequence path projects). In-place changes through .data, which no version counter records, reach the
    next step: to a large weight, a small one, b_0's two halves and the projection."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu",
                                               proj_size=proj_size), scale=0.3)
    low = copy.deepcopy(cell).to(dtype)
    cell.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the same bfloat16-exact weights
    calls = []
    real = hyperfused.HyperLSTMCell._decode_step
    monkeypatch.setattr(hyperfused.HyperLSTMCell, "_decode_step", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(3, 5).to(dtype)
    with torch.no_grad():
        s_low = low(x)
        s_low = low(x, s_low)
        first = [t.clone() for t in s_low.tensors()]
        s = cell(x.float(), HyperLSTMState(*(t.float() for t in cell(x.float()).tensors())))
        assert len(calls) == 2  # both cells' second steps took the decode path
        assert s_low[0].dtype == dtype and s_low.hyper_h.dtype == dtype
        for a, b in zip(s_low.tensors(), s.tensors(), strict=True):
            torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
        # each change moves h by 0.21 or more (measured), ten times the tolerance: a stale step would fail
        changes = [("weight_hh", -1.0), ("scale_weight", 3.0), ("bias_hh", -2.0), ("bias_ih", -0.25)]
        for name, change in changes + ([("weight_hr", -1.0)] if proj_size else []):
            for m in (low, cell):  # in place, past the version counter: the float32 copies must follow
                getattr(m, name).data.mul_(change)
            again = low(x, low(x))
            ref = cell(x.float(), HyperLSTMState(*(t.float() for t in cell(x.float()).tensors())))
            assert not torch.equal(again[0], first[0]), name
            torch.testing.assert_close(again[0].float(), ref[0], rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
            first = [t.clone() for t in again.tensors()]


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_cell_decodes_in_and_out_of_inference_mode(dtype):
    """The decode step keeps the parameter list it made (and its float32 buffers); made under inference_mode,
    they are inference tensors, which no step outside inference_mode may write (the step raised
    "Inplace update to inference tensor outside InferenceMode"). Steps alternating between the two modes
    compute the same numbers."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu"), scale=0.3)
    cell = cell.to(dtype)
    x = torch.randn(3, 5, dtype=dtype)
    with torch.inference_mode():
        start = cell(x)
        first = cell(x, start)
    with torch.no_grad():
        second = cell(x, HyperLSTMState(*(t.clone() for t in start.tensors())))
    with torch.inference_mode():
        third = cell(x, start)
    for a, b, c in zip(first.tensors(), second.tensors(), third.tensors(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


def _parametrize(cell, name):
    torch.nn.utils.parametrize.register_parametrization(cell, name, _Doubled())
    return cell.parametrizations[name].original


def _prune(cell, name):
    torch.nn.utils.prune.l1_unstructured(cell, name, amount=0.3)
    return getattr(cell, name + "_orig")


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("wrap", [_parametrize, _prune], ids=["parametrize", "prune"])
@pytest.mark.parametrize("name", ["weight_hh", "scale_weight", "bias_ih"])
def test_a_parametrized_or_pruned_cell_decodes_from_its_weights_as_they_are(wrap, name):
    """torch.nn.utils.parametrize and prune make a weight anew on every access from tensors of their own. The
    decode step reads the weight as it is at each step: after an in-place change of the tensor underneath, it
    agrees with the reference cell to float32 rounding (1e-5 allowed), where a step from the weight as it was
    differs by more than 0.05 (checked below; it was 0.77 for weight_hh)."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu"), scale=0.3)
    ref = hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="reference")
    ref.load_state_dict(cell.state_dict())
    stale = copy.deepcopy(ref)
    originals = [wrap(m, name) for m in (cell, ref, stale)]
    x = torch.randn(3, 5)
    with torch.no_grad():
        s = r = cell(x)
        for step in range(3):
            if step == 2:
                for original in originals[:2]:
                    original.mul_(-1.5)
            s, r, old = cell(x, s), ref(x, r), stale(x, r)
            torch.testing.assert_close(s.tensors(), r.tensors(), rtol=1e-5, atol=1e-5)
    assert (old[0] - r[0]).abs().max() > 0.05


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
def test_a_cell_with_a_non_contiguous_weight_decodes_from_its_values_as_they_are():
    """A parameter whose storage is not contiguous (here scale_weight, set through .data to a transposed layout)
    reaches the decode op as a contiguous copy made on every call: after an in-place change it agrees with the
    reference to float32 rounding (1e-5 allowed), where a step from the old copy was 1.06 off."""
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="cpu"), scale=0.3)
    ref = hyperfused.HyperLSTMCell(5, 8, hyper_size=6, hyper_embed=2, backend="reference")
    ref.load_state_dict(cell.state_dict())
    for m in (cell, ref):
        m.scale_weight.data = m.scale_weight.data.transpose(1, 2).contiguous().transpose(1, 2)
    assert not cell.scale_weight.is_contiguous()
    x = torch.randn(3, 5)
    with torch.no_grad():
        s = r = cell(x)
        for step in range(3):
            if step == 2:
                for m in (cell, ref):
                    m.scale_weight.mul_(-2.0)
            s, r = cell(x, s), ref(x, r)
            torch.testing.assert_close(s.tensors(), r.tensors(), rtol=1e-5, atol=1e-5)


def test_a_call_asks_nothing_that_torch_2_11s_dynamo_cannot_trace(monkeypatch):
    """Whether Triton is installed or interpreted, and which device types have autocast, are read once, at
    import: torch 2.11's Dynamo (the GPU machine's torch) cannot trace importlib.util.find_spec or
    torch._C._is_autocast_available, and torch.compile(fullgraph=True) of every module failed there on them.
    Here each raises if asked, with every backend's answer forgotten: eager calls, under autocast too, and a
    compiled one must not ask."""
    import importlib.util
    import torch._dynamo  # (imported before find_spec is replaced: its import asks it)

    def asked(*args, **kwargs):
        raise AssertionError("asked during a module call")

    monkeypatch.setattr(importlib.util, "find_spec", asked)
    monkeypatch.setattr(torch.amp, "is_autocast_available", asked)
    monkeypatch.setattr(hyperfused.ops.backends, "_RESOLVED", {})
    torch.manual_seed(0)
    m = hyperfused.HyperLSTM(5, 7, hyper_size=6, hyper_embed=3)
    net = hyperfused.StaticHyperNetwork(z_dim=4, in_tile=4, out_tile=4)
    conv = hyperfused.HyperConv2d(4, 8, 3, hypernet=net)
    x = torch.randn(3, 2, 5)
    m(x)[0].sum().backward()
    conv(torch.randn(1, 4, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    torch._dynamo.reset()
    torch.compile(lambda x: m(x)[0], fullgraph=True)(x)


@torch.no_grad()
def test_jit_trace_of_a_sequence_and_of_a_state_passed_in():
    """torch.jit.trace records a whole sequence from no state as the module computes it (its state flattened to
    (h_n, c_n), as nn.LSTM's); a state passed in would reach the trace as a plain (h_0, c_0) tuple without its
    hyper part, so that is refused with the ways that carry it, one of which is traced here: a function of the
    four tensors that builds the HyperLSTMState itself."""
    torch.manual_seed(5)
    m = randomize_(hyperfused.HyperLSTM(5, 7, num_layers=2, hyper_size=6, hyper_embed=3), scale=0.3).eval()
    x, other = torch.randn(4, 2, 5), torch.randn(4, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
        traced = torch.jit.trace(m, (x,), check_trace=False)
        out, (h, c) = traced(other)
        want, state = m(other)
        for a, b in zip((out, h, c), (want, state[0], state[1]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"hx: torch\.jit\.trace.*torch\.export\.export.*builds "
                                               r"HyperLSTMState\(h, c, hyper_h, hyper_c\)"):
            torch.jit.trace(m, (x, (state[0], state[1])), check_trace=False)

        step = _FromFourTensors(m)
        traced = torch.jit.trace(step, (x, *state.tensors()), check_trace=False)
        start = HyperLSTMState(*(torch.randn_like(t) for t in state.tensors()))
        want = step(other, *start.tensors())
        for a, b in zip(traced(other, *start.tensors()), want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        no_hyper = traced(other, start[0], start[1], torch.zeros_like(start.hyper_h), start.hyper_c)
        assert (no_hyper[0] - want[0]).abs().max() > 1e-3  # the trace reads the hyper state it is given


@pytest.mark.parametrize("traced_with_grad", [True, False], ids=["traced-with-grad", "traced-without"])
@pytest.mark.parametrize("T, options", [(4, dict(num_layers=2, bidirectional=True)), (1, {}), (1, dict(zoneout=0.2))],
                         ids=["2-layer-bidirectional", "one-step", "one-step-zoneout"])
def test_jit_trace_passes_its_check_and_the_trace_differentiates(T, options, traced_with_grad):
    """torch.jit.trace's default check reruns the call without gradients and compares the two graphs: the module
    records one path either way (the sequence op, saving for a backward; a one-step call does not switch to the
    decode op). The trace then gives the eager module's outputs and every parameter's gradient, whether it was
    traced with gradients or without (a trace made under no_grad used to keep nothing for a backward)."""
    torch.manual_seed(11)
    m = randomize_(hyperfused.HyperLSTM(5, 7, hyper_size=6, hyper_embed=3, **options), scale=0.3).eval()
    x, other = torch.randn(T, 2, 5), torch.randn(T, 2, 5)
    with warnings.catch_warnings(), torch.set_grad_enabled(traced_with_grad):
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
        traced = torch.jit.trace(m, (x,))  # check_trace=True: fails if the checking run records another graph
    params = list(m.parameters())
    got, want = traced(other), m(other)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1][:2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loss = lambda out: (out[0] * torch.linspace(-1, 1, out[0].shape[-1])).sum() + out[1][1].square().sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(got), params), torch.autograd.grad(loss(want), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _FromFourTensors(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, *tensors):
        out, state = self.m(x, HyperLSTMState(*tensors))
        return (out, *state.tensors())


class _Tagger(torch.nn.Module):
    """A model around a HyperLSTM and a cell, as a user writes it for nn.LSTM and nn.LSTMCell."""

    def __init__(self):
        super().__init__()
        self.rnn = hyperfused.HyperLSTM(5, 7, num_layers=2, hyper_size=6, hyper_embed=3, batch_first=True)
        self.cell = hyperfused.HyperLSTMCell(7, 4, hyper_size=6, hyper_embed=3)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        state = self.cell(out[:, -1])
        return self.head(state[0]) + c.sum(0).mean()


def test_fx_symbolic_trace_records_the_modules_as_nn_lstm_is_recorded():
    """torch.fx.symbolic_trace (which FX graph-mode tools run) records torch.nn's modules as one call each, as
    it records nn.LSTM; hyperfused's modules the same way, not traced through (their checks cannot run on
    proxies). The traced model computes the model's output and gradients; a module traced as the root is
    refused, naming what works."""
    torch.manual_seed(6)
    model = randomize_(_Tagger(), scale=0.3)
    traced = torch.fx.symbolic_trace(model)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert called == ["rnn", "cell", "head"]
    x = torch.randn(2, 4, 5)
    want = model(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = traced(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    for root in (model.rnn, model.cell):
        with pytest.raises(RuntimeError, match=r"torch\.fx\.symbolic_trace: HyperLSTM(Cell)? is recorded as one "
                                               r"call .* trace the model around it"):
            torch.fx.symbolic_trace(root)


@pytest.mark.parametrize("make", [
    lambda: hyperfused.HyperLSTM(5, 7, num_layers=2, hyper_size=6, hyper_embed=3),
    lambda: hyperfused.HyperLSTMCell(5, 7, hyper_size=6, hyper_embed=3),
], ids=["HyperLSTM", "HyperLSTMCell"])
def test_full_backward_hooks_see_the_gradients_and_keep_the_hyper_state(make):
    """register_full_backward_hook (and its pre-hook), as on nn.LSTM and nn.LSTMCell. Setting them up rebuilds a
    returned tuple from its items, type(out)(*items): the cell's state used to fail there, as a HyperLSTMState
    needs its hyper part, which the rebuilt one now keeps. Two steps, so that the hyper state matters."""
    torch.manual_seed(7)
    plain, hooked = make(), make()
    hooked.load_state_dict(randomize_(plain, scale=0.3).state_dict())
    seen = []
    hooked.register_full_backward_pre_hook(lambda mod, grad_out: seen.append(("pre", len(grad_out))))
    hooked.register_full_backward_hook(lambda mod, grad_in, grad_out: seen.append(len(grad_out)))
    cell = isinstance(plain, hyperfused.HyperLSTMCell)
    xs = torch.randn(2, 3, 5) if cell else torch.randn(2, 4, 3, 5)
    results = []
    for m in (plain, hooked):
        x = xs.clone().requires_grad_()
        if cell:
            state = m(x[1], m(x[0]))
            tensors = state.tensors()
        else:
            out, state = m(x[1], m(x[0])[1])
            tensors = (out, *state.tensors())
        assert isinstance(state, HyperLSTMState)
        sum(t.square().sum() for t in tensors).backward()
        results.append([t.detach() for t in tensors] + [x.grad] + [p.grad for p in m.parameters()])
    # the cell's hooks fire for both calls; the layer's for the second only, as nn.LSTM's: hooks see the top-level
    # tensors of a call's output, and the first call's output is used only through its state
    assert seen == [("pre", 2), 2] * (2 if cell else 1)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _WeightDrop(torch.nn.Module):
    """AWD-LSTM's DropConnect on the recurrent weight (Merity et al. 2017, the PTB LSTM baseline), as its code
    does it: the parameter is replaced by a '_raw' one, and each call sets the module's attribute to a
    dropped-out copy, a plain tensor that is neither a parameter nor a buffer."""

    def __init__(self, module, name, p):
        super().__init__()
        self.module, self.name, self.p = module, name, p
        weight = getattr(module, name)
        del module._parameters[name]
        module.register_parameter(name + "_raw", torch.nn.Parameter(weight.data))

    def forward(self, *args):
        raw = getattr(self.module, self.name + "_raw")
        setattr(self.module, self.name, torch.nn.functional.dropout(raw, p=self.p, training=self.training))
        return self.module(*args)


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="compares the fused CPU backend with the reference")
def test_awd_lstm_weight_drop_reaches_the_fused_op():
    """The fused backend reads the dropped-out weight each call sets (a new tensor every call in training, the
    raw one in evaluation, also in the one-step decode path) and sends its gradient to the raw parameter, as the
    reference does. A fused op that kept the previous call's weight would differ by the dropout itself."""
    runs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        model = _WeightDrop(randomize_(hyperfused.HyperLSTM(5, 12, num_layers=2, hyper_size=6, hyper_embed=3,
                                                            backend=backend), scale=0.3), "weight_hh_l0", 0.5)
        torch.manual_seed(1)
        xs = torch.randn(3, 4, 2, 5)
        outs, state = [], None
        for x in xs:
            out, state = model(x, state)
            outs.append(out)
        torch.cat(outs).square().sum().backward()
        model.eval()
        with torch.no_grad():
            step = model(xs[0, :1], state.detach())[0]
        runs.append([*outs, step, model.module.weight_hh_l0_raw.grad])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
