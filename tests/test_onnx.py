"""torch.onnx.export of the modules, run by ONNX Runtime: an exported model computes what the module computes.

While the exporter traces, every backend resolves to the reference (the fused ops are not ONNX operators), so
these tests compare ONNX Runtime's result with the module's own, which runs the fused CPU ops: float32 sums
in a different order, agreeing to ~5e-7 here. The tolerance, 1e-5, is far below what a plausible fault
moves (each test measures one: a dropped forget bias, the hyper state not carried), and asserted so.
"""
import warnings

import numpy as np
import onnxruntime as ort  # a test requirement (requirements-dev.txt), as is onnxscript, torch.onnx's exporter
import pytest
import torch

import hyperfused
from hyperfused import HyperConv2d, HyperLSTM, HyperLSTMCell, HyperLSTMState, StaticHyperNetwork
from hyperfused.models.wrn import HyperWRN

from helpers import randomize_

ATOL = 1e-5


def _export(module, args, path, **kwargs):
    """The module exported to `path` (the exporter's own progress messages and warnings about packages it
    does not need, such as torchvision, left out), and an ONNX Runtime session on it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, args, str(path), verbose=False, **kwargs)
    assert not [w for w in caught if "assigned during export" in str(w.message)], "cells' tables left behind"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, *tensors) -> list:
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(tensors), names
    feed = dict(zip(names, (t.numpy() for t in tensors), strict=True))
    return [torch.from_numpy(np.asarray(v)) for v in session.run(None, feed)]


def _max_diff(got, want) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


@torch.no_grad()
def test_an_exported_cell_steps_as_the_module_does_at_any_batch_size(tmp_path):
    """A HyperLSTMCell exported with a dynamic batch, stepped in ONNX Runtime with the state it returns (the
    deployment of a sampling loop), at a batch size other than the example's: every step's h, c, ĥ, ĉ match
    the module's steps (its fused decode op)."""
    torch.manual_seed(0)
    cell = randomize_(HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3), scale=0.3).eval()
    x = torch.randn(3, 5)
    start = cell(x)
    batch = torch.export.Dim("batch")
    session = _export(cell, (x, start), tmp_path / "cell.onnx", dynamic_shapes=({0: batch}, [{0: batch}] * 4))
    xs = torch.randn(6, 1, 5)  # B = 1
    ours = list(cell(xs[0]).tensors())
    no_forget_bias = HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3, forget_bias=0.0).eval()
    no_forget_bias.load_state_dict(cell.state_dict())
    worst, fault = 0.0, float("inf")
    for x_t in xs[1:]:
        want = cell(x_t, HyperLSTMState(*ours))
        wrong = no_forget_bias(x_t, HyperLSTMState(*ours))
        got = _run(session, x_t, *ours)
        worst = max(worst, _max_diff(got, want.tensors()))
        fault = min(fault, _max_diff(wrong.tensors(), want.tensors()))
        ours = got
    assert worst < ATOL, worst
    assert fault > 100 * ATOL, fault  # a dropped forget bias: far beyond the tolerance


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(bias=False, layer_norm=False),
], ids=["2 layers, bidirectional, batch_first", "no bias, no layer norm"])
@torch.no_grad()
def test_an_exported_layer_continues_a_sequence_as_the_module_does(tmp_path, kwargs):
    """A HyperLSTM exported with the HyperLSTMState it returned as hx: ONNX Runtime returns the output and the
    whole final state (h_n, c_n and the hyper state) the module returns, and the hyper state given is used (a
    model that ignored it, starting the hyper-LSTM at zero, is far off)."""
    torch.manual_seed(1)
    m = randomize_(HyperLSTM(5, 37, hyper_size=6, hyper_embed=3, **kwargs), scale=0.3).eval()
    x = torch.randn(3, 2, 5)  # (B, T, X) with batch_first, else (T, B, X)
    _, state = m(x)
    session = _export(m, (x, state), tmp_path / "layer.onnx")
    got = _run(session, x, *state.tensors())
    out, final = m(x, state)
    want = (out,) + final.tensors()
    assert len(got) == 5
    assert _max_diff(got, want) < ATOL
    out_fresh, fresh = m(x, HyperLSTMState(state[0], state[1], *(torch.zeros_like(t) for t in state.tensors()[2:])))
    assert _max_diff((out_fresh,) + fresh.tensors(), want) > 100 * ATOL


def _convs_sharing_a_hypernet():
    net = StaticHyperNetwork(z_dim=4, in_tile=4, out_tile=4)
    return torch.nn.Sequential(HyperConv2d(4, 8, 3, padding=1, hypernet=net), torch.nn.ReLU(),
                               HyperConv2d(8, 4, 3, hypernet=net)), torch.randn(2, 4, 9, 9)


@pytest.mark.parametrize("make", [
    _convs_sharing_a_hypernet,
    lambda: (HyperWRN(depth=10, widen_factor=1), torch.randn(2, 3, 32, 32)),
], ids=["convs sharing a hypernet", "HyperWRN-10-1"])
@torch.no_grad()
def test_a_hyper_cnn_exports_with_its_generated_kernels(tmp_path, make):
    """Convolutions whose kernels a shared StaticHyperNetwork generates, layer by layer or (HyperWRN) for the
    whole model at once: the exported model generates them (the fused op's computation in plain PyTorch) and
    convolves as the module does with its fused generation."""
    torch.manual_seed(2)
    model, x = make()
    model.eval()
    session = _export(model, (x,), tmp_path / "cnn.onnx")
    assert _max_diff(_run(session, x), (model(x),)) < ATOL
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "z":
            p.add_(0.01)  # kernels generated from other embeddings
    assert _max_diff(_run(session, x), (model(x),)) > 100 * ATOL


@torch.no_grad()
def test_the_torchscript_exporter_exports_a_first_step_and_refuses_a_state(tmp_path):
    """torch.onnx.export(dynamo=False), the exporter before torch.export, traces with torch.jit.trace, which
    passes a state in as a plain (h, c) tuple and returns only (h, c). From no state, the step it records is
    the module's (two outputs). Given a state it would lose the hyper state between calls (and it used to bake
    the hyper state the module carried into the model as a constant): that is refused, naming the exporter
    that carries it."""
    torch.manual_seed(3)
    cell = randomize_(HyperLSTMCell(5, 7, hyper_size=6, hyper_embed=3), scale=0.3).eval()
    x = torch.randn(2, 5)
    state = cell(x, cell(x))  # the module now carries a hyper state for these (h, c)
    session = _export(cell, (x,), tmp_path / "cell.onnx", dynamo=False)
    got = _run(session, x)
    assert len(got) == 2
    assert _max_diff(got, cell(x)[:2]) < ATOL
    assert _max_diff(got, state[:2]) > 100 * ATOL  # a step from another state
    with pytest.raises(RuntimeError, match=r"hx: torch\.jit\.trace, and torch\.onnx\.export\(dynamo=False\).*"
                                           r"hyper state .* would be lost.*torch\.onnx\.export\(dynamo=True\)"):
        torch.onnx.export(cell, (x, (state[0], state[1])), str(tmp_path / "step.onnx"), dynamo=False)


def test_export_leaves_the_modules_on_their_fused_backend(tmp_path):
    """The reference runs only while the exporter traces: afterwards the module's calls take the fused op."""
    cell = HyperLSTMCell(5, 7, hyper_size=6, hyper_embed=3).eval()
    x = torch.randn(2, 5)
    with torch.no_grad():
        _export(cell, (x, cell(x)), tmp_path / "cell.onnx")
        assert hyperfused.ops.resolve_backend(cell.backend, x.device) == "cpu"
        with torch.autograd.profiler.profile() as prof:
            cell(x, cell(x))
    assert any(e.name == "hyperfused::hyper_lstm_step" for e in prof.function_events)


def _fused_ops(ep) -> set:
    return {str(n.target) for n in ep.graph.nodes if str(n.target).startswith("hyperfused.")}


@pytest.mark.parametrize("make", [
    lambda: (HyperLSTM(5, 37, hyper_size=6, hyper_embed=3, num_layers=2, bidirectional=True), torch.randn(3, 2, 5)),
    _convs_sharing_a_hypernet,
], ids=["HyperLSTM, 2 layers, bidirectional", "convs sharing a hypernet"])
def test_an_exported_program_decomposes_for_onnx(tmp_path, make):
    """A program torch.export captured keeps the fused ops, which torch.onnx.export cannot translate;
    run_decompositions(hyperfused.decompositions()) writes them out in ATen, and that program, exported to ONNX,
    computes what the module computes (exported with gradients on, so the LSTM op's saved rows are written out
    too). A program decomposed with a fault (the LSTM's forget bias dropped; other embeddings z) is far off."""
    torch.manual_seed(4)
    model, x = make()
    with torch.no_grad():
        model = randomize_(model, scale=0.3).eval()
    ep = torch.export.export(model, (x,))
    assert _fused_ops(ep), "torch.export kept no fused op: nothing to decompose"
    decomposed = ep.run_decompositions(hyperfused.decompositions())
    assert not _fused_ops(decomposed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(decomposed, (x,), str(tmp_path / "program.onnx"), verbose=False)
    session = ort.InferenceSession(str(tmp_path / "program.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x)
        want = want[:1] + want[1].tensors() if isinstance(model, HyperLSTM) else (want,)
        got = _run(session, x)
        assert len(got) == len(want)
        assert _max_diff(got, want) < ATOL
        if isinstance(model, HyperLSTM):
            for cell in model.cells:
                cell.forget_bias = 0.0
        else:
            for name, p in model.named_parameters():
                if name.split(".")[-1] == "z":
                    p.add_(0.01)  # kernels generated from other embeddings
        wrong = model(x)
        wrong = wrong[:1] + wrong[1].tensors() if isinstance(model, HyperLSTM) else (wrong,)
        assert _max_diff(wrong, want) > 100 * ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@torch.no_grad()
def test_the_decode_steps_decomposition_is_the_step(dtype):
    """The decode op (never in an exported program, which takes the sequence op, but in the table so that none
    is missing) against its decomposition, on the parameter list a cell gives it: float32, and float16 whose
    product weights the op widens as the decomposition does. A dropped forget bias moves it ~1e-1."""
    torch.manual_seed(5)
    cell = randomize_(HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3), scale=0.3).to(dtype).eval()
    x = torch.randn(2, 5)
    state = [t.float() for t in cell(x.to(dtype)).tensors()]
    args = (x, *state, cell._decode_params(), True)
    op = torch.ops.hyperfused.hyper_lstm_step.default
    step = hyperfused.decompositions({})[op]
    want = op(*args, 1.0)
    assert _max_diff(step(*args, 1.0), want) < ATOL
    assert _max_diff(step(*args, 0.0), want) > 100 * ATOL


def test_decompositions_extend_the_table_given():
    """The table given is extended, not replaced; the backward ops stay out (an exported program has none)."""
    table = hyperfused.decompositions({torch.ops.aten.relu.default: torch.relu})
    assert torch.ops.aten.relu.default in table
    assert torch.ops.hyperfused.hyper_lstm_forward.default in table
    assert torch.ops.hyperfused.generate_kernels.default in table
    assert torch.ops.hyperfused.hyper_lstm_backward.default not in table
