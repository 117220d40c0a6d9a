"""The ops' own recordings (HYPERFUSED_CUDA_GRAPHS=1; csrc/graphs.h for the C++ ops, hyperfused/ops/recorded.py
for the Triton ones): from a key's second call the forward, the backward and the decode step replay a
recording of their whole body instead of launching each step's work.

On a GPU the recording is a CUDA graph. Without one, the CUDA backend's configuration under the SIMT emulator,
and the Triton ops under the interpreter, record by keeping the body and replay by running it again into the
outputs a graph would write in place, so everything but the capture itself is checked here: the keys (shapes,
settings, parameter addresses), the copies of the inputs into the recording's own, and the clones of its
outputs. A replay that skipped the copies, or returned its own outputs (which the next call overwrites), was
checked to fail these tests."""
import dataclasses

import pytest
import torch

import hyperfused
from conftest import HAS_GPU, requires_extension, requires_gpu, requires_triton
from helpers import penalty_grads, random_state, randomize_, run_and_grad


@dataclasses.dataclass
class Case:
    backend: str  # the module's backend
    device: str
    dtype: torch.dtype
    tol: dict

    def counts(self):
        """(recordings made, replays run) by this backend's ops so far."""
        if self.backend == "triton":
            return hyperfused.ops.recorded.counts()
        return hyperfused._C._recording_counts()


# The same computation on the same inputs: equal but for a GPU's run-to-run GEMM order (float64), or a
# float32 rounding (Triton computes in float32).
F64, F32 = dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-5, atol=1e-6)
CASES = {"emulated": Case("cpu", "cpu", torch.float64, F64), "cuda": Case("cuda", "cuda", torch.float64, F64),
         "triton": Case("triton", "cuda" if HAS_GPU else "cpu", torch.float32, F32)}
CPP = [pytest.param("emulated", marks=requires_extension, id="emulated"),
       pytest.param("cuda", marks=[requires_extension, requires_gpu], id="cuda")]
ALL = CPP + [pytest.param("triton", marks=requires_triton, id="triton")]


@pytest.fixture
def case(request, monkeypatch):
    """The backend under test ('emulated': the CUDA configuration on the CPU; 'triton': on the GPU where there
    is one, else under the interpreter)."""
    if request.param == "emulated":
        monkeypatch.setenv("HYPERFUSED_EMULATE_CUDA", "132")
    return CASES[request.param]


def twins(case, **kw):
    torch.manual_seed(0)
    make = lambda: hyperfused.HyperLSTM(5, 37, hyper_size=6, hyper_embed=3, dtype=case.dtype,  # noqa: E731
                                        backend=case.backend, **kw).to(case.device)
    plain, recorded = randomize_(make()), make()
    recorded.load_state_dict(plain.state_dict())
    return plain, recorded


def compare(case, a, b):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for x, y in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(x, y, **case.tol)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **case.tol, msg=lambda m, n=name: f"grad {n}: {m}")


def run(m, monkeypatch, recorded, x, state):
    monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1" if recorded else "0")
    return run_and_grad(m, x, state)


def since(case, start):
    return tuple(n - s for n, s in zip(case.counts(), start, strict=True))


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_recorded_training_gives_what_the_plain_ops_give(case, monkeypatch):
    """Training steps with fresh inputs, initial states and recurrent-dropout masks each call, and SGD updating
    the weights in place in between: the replays read each call's inputs and the current weights. A weight
    moved to new storage is a new key: its first call runs plainly, its second records anew."""
    plain, recorded = twins(case, recurrent_dropout=0.2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, recorded)]
    start = case.counts()
    for step in range(5):
        if step == 3:
            for m in (plain, recorded):
                m.cells[0].weight_hh.data = m.cells[0].weight_hh.data.clone()
        x = torch.randn(4, 3, 5, dtype=case.dtype, device=case.device)
        state = random_state(plain, 3, case.dtype)
        results = []
        for m, opt, rec in ((plain, opts[0], False), (recorded, opts[1], True)):
            torch.manual_seed(100 + step)  # the same dropout masks for both
            results.append(run(m, monkeypatch, rec, x, state))
            opt.step()
        compare(case, *results)
    # forward and backward: recorded at steps 1 and 4 (the new storage), replayed at steps 1, 2 and 4
    assert since(case, start) == (4, 6)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_gradients_of_gradients_after_a_recorded_forward(case, monkeypatch):
    """A backward with create_graph=True recomputes from the forward's saved inputs, not from what a replay left
    in the recording's buffers: a gradient penalty after replayed forwards gives the plain ops' answer."""
    plain, recorded = twins(case)
    start = case.counts()
    for step in range(3):  # the first call with the key runs plainly, the second records, the third replays
        x = torch.randn(3, 2, 5, dtype=case.dtype, device=case.device)
        state = random_state(plain, 2, case.dtype)
        results = []
        for m, rec in ((plain, False), (recorded, True)):
            monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1" if rec else "0")
            (first, named) = penalty_grads(m, x, state)
            results.append(first + list(named.values()))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **case.tol)
    assert since(case, start) == (1, 2)  # forwards only: recorded at step 1, replayed at steps 1 and 2


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_two_forwards_before_their_backwards(case, monkeypatch):
    """Gradient accumulation: the second forward's replay must not overwrite what the first one returned (the
    outputs, and the saved tensors its backward reads), nor the second backward's the first one's gradients."""
    plain, recorded = twins(case)
    x1, x2, w1, w2 = (torch.randn(3, 2, d, dtype=case.dtype, device=case.device) for d in (5, 5, 37, 37))
    results = []
    for m, rec in ((plain, False), (recorded, True)):
        monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1" if rec else "0")
        for _ in range(2):  # the first call with the key runs plainly, the second records
            (m(x1)[0] * w1).sum().backward()
        m.zero_grad()
        start = case.counts()
        out1, out2 = m(x1)[0], m(x2)[0]
        first = out1.detach().clone()
        ((out1 * w1).sum() + (out2 * w2).sum()).backward()
        results.append((first, out2.detach(), [p.grad.clone() for p in m.parameters()], since(case, start)))
    (a1, a2, ga, _), (b1, b2, gb, replays) = results
    assert replays == (0, 4)  # both forwards and both backwards replayed
    torch.testing.assert_close(a1, b1, **case.tol)
    torch.testing.assert_close(a2, b2, **case.tol)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, **case.tol)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_a_changed_setting_records_anew(case, monkeypatch):
    """The settings a body reads when it runs (the step design, torch's TF32 switch) are part of the key: a
    replay never runs another setting's recording."""
    plain, recorded = twins(case)
    x = torch.randn(2, 3, 5, dtype=case.dtype, device=case.device)
    state = random_state(plain, 3, case.dtype)
    seen = []
    for design in ("gemm", "gemm", "fused", "fused", "gemm"):
        monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", design)
        start = case.counts()
        compare(case, run(plain, monkeypatch, False, x, state), run(recorded, monkeypatch, True, x, state))
        seen.append(since(case, start))
    # per call (forward and backward): plain, recorded, plain (a new key), recorded, the first one replayed
    assert seen == [(0, 0), (2, 2), (0, 0), (2, 2), (0, 2)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        start = case.counts()
        recorded(x)
        assert case.counts() == start  # a new key: its first call runs plainly
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("case", CPP, indirect=True)
def test_recorded_decode_steps(case, monkeypatch):
    """Sampling: a HyperLSTMCell stepped from its own state under no_grad (hyperfused::hyper_lstm_step) replays
    from its second step on, and each step gives what the plain op gives."""
    cell = randomize_(hyperfused.HyperLSTMCell(5, 37, hyper_size=6, hyper_embed=3, dtype=case.dtype,
                                               backend=case.backend)).to(case.device)
    xs = torch.randn(6, 2, 5, dtype=case.dtype, device=case.device)
    runs = []
    for rec in (False, True):
        monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1" if rec else "0")
        start = case.counts()
        with torch.no_grad():
            states = [cell(xs[0])]  # from no state: a step too (a call with T = 1 and no grad decodes)
            for x in xs[1:]:
                states.append(cell(x, states[-1]))
        runs.append(([t.clone() for st in states for t in st.tensors()], since(case, start)))
    (plain, plain_counts), (recorded, recorded_counts) = runs
    assert plain_counts == (0, 0)
    assert recorded_counts == (1, 5)  # six decode steps: plain, then recorded, then replayed
    for a, b in zip(recorded, plain, strict=True):
        torch.testing.assert_close(a, b, **case.tol)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_without_the_setting_nothing_is_recorded(case):
    plain, _ = twins(case)
    start = case.counts()
    for _ in range(3):
        plain(torch.randn(2, 3, 5, dtype=case.dtype, device=case.device))[0].sum().backward()
    assert case.counts() == start


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_a_bad_setting_is_an_error(case, monkeypatch):
    plain, _ = twins(case)
    monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "yes")
    with pytest.raises(RuntimeError, match="HYPERFUSED_CUDA_GRAPHS must be '0', '1' or unset, got 'yes'"):
        plain(torch.randn(2, 1, 5, dtype=case.dtype, device=case.device))


@requires_gpu
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=requires_extension),
                                     pytest.param("triton", marks=requires_triton)])
def test_inside_the_callers_own_cuda_graph_the_ops_record_nothing(backend, monkeypatch):
    """A layer captured in the caller's torch.cuda.graph: the ops see the capture and issue their launches into
    it (a capture cannot start inside another); the caller's graph replays what the eager layer computes."""
    monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1")
    case = CASES[backend]
    m = randomize_(hyperfused.HyperLSTM(16, 64, hyper_size=32, hyper_embed=8, backend=backend, device="cuda"))
    x = torch.randn(5, 4, 16, device="cuda")

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        out, state = m(x)
        (out.square().sum() + state.hyper_c.sum()).backward()
        return out

    eager = [fwd_bwd().detach().clone()] + [p.grad.clone() for p in m.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graph asks: these calls record and replay their own
        for _ in range(3):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    start = case.counts()
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out, state = m(x)
        (out.square().sum() + state.hyper_c.sum()).backward()
    assert case.counts() == start
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip([out] + [p.grad for p in m.parameters()], eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
