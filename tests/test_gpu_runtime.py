"""What only a GPU can show: the fused ops on a non-default stream, repeatable bit for bit, traced by
torch.compile(fullgraph=True), captured in a CUDA graph (by hand and by make_graphed_callables) and replayed,
with masks at N_z = 64. (The paper's sizes with and without layer norm:
test_hyper_lstm_fused.test_matches_reference.) Every test here needs a CUDA GPU."""
import pytest
import torch

import hyperfused
from benchmarks.gpu_timings import OutputOnly
from conftest import backend_params, requires_gpu
from helpers import make_pair, randomize_

pytestmark = requires_gpu
GPU_BACKENDS = backend_params("cuda", "triton")
TOL = dict(rtol=1e-3, atol=1e-4)


def _model(backend, X=16, H=64, Hh=32, Nz=8, **kw):
    return randomize_(hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend=backend, device="cuda", **kw))


def _fwd_bwd(m, x):
    m.zero_grad(set_to_none=True)
    out, state = m(x)
    (out.square().sum() + state.hyper_c.sum()).backward()
    return [out.detach(), state[1].detach()] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_masks_match_reference(backend):
    ref, fast = make_pair(backend, 16, 1000, hyper_size=128, hyper_embed=64, recurrent_dropout=0.3,
                          dtype=torch.float32)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(4, 8, 16, device="cuda")
    results = []
    for m in (ref, fast):
        torch.manual_seed(3)
        results.append(_fwd_bwd(m, x))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("groups", ["", "1"], ids=["groups-rule", "groups-1"])
@pytest.mark.parametrize("cluster", ["1", "2", "4", "8"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_every_cuda_launch_shape_matches_reference(backend, cluster, groups, layer_norm, monkeypatch):
    """The CUDA step kernels with 1, 2, 4 and 8 blocks per row (a thread-block cluster on sm_90+; elsewhere the
    setting is ignored) and one or four thread groups per block, at an odd H, every output and gradient against
    the reference: the hardware's cluster barrier and shared-memory reads, which the CPU's emulator stands in
    for."""
    ref, fast = make_pair(backend, 16, 300, hyper_size=40, hyper_embed=8, layer_norm=layer_norm, dtype=torch.float32)
    ref, fast = ref.cuda(), fast.cuda()
    monkeypatch.setenv("HYPERFUSED_CUDA_CLUSTER", cluster)
    monkeypatch.setenv("HYPERFUSED_CUDA_THREAD_GROUPS", groups)
    x = torch.randn(3, 3, 16, device="cuda")
    for a, b in zip(_fwd_bwd(fast, x), _fwd_bwd(ref, x), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_launches_use_clusters_where_the_gpu_has_them(backend):
    """The launches give a small batch's main cell a cluster on a 9.0+ GPU, when the extension holds code for
    it (the check's build targets the GPU it runs on), and never below 9.0: csrc/hyper_lstm_simt.h,
    clusters_runnable, from the device and the cluster kernels' ptxVersion. If the runtime reported that
    version wrongly, every forced cluster above would silently run one block per row."""
    from hyperfused import _C

    multiprocessors, clusters = _C._cuda_step_device()
    assert multiprocessors == torch.cuda.get_device_properties(0).multi_processor_count
    assert clusters == (torch.cuda.get_device_capability(0) >= (9, 0))


def _on_side_stream(fn):
    """fn() on a fresh non-default stream, ordered after and before the current stream's work (the warm-up
    torch.cuda.graph requires is done this way too)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream_and_bitwise_repeatable(backend):
    m = _model(backend)
    x = torch.randn(5, 4, 16, device="cuda")
    first = _fwd_bwd(m, x)
    second = _on_side_stream(lambda: _fwd_bwd(m, x))
    torch.cuda.synchronize()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    m = _model(backend)
    x = torch.randn(5, 4, 16, device="cuda")

    def run(x):
        out, state = m(x)
        return out.square().sum() + state.hyper_h.sum()

    expected = run(x)
    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, **TOL)
    got.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_reduce_overhead_replays_cuda_graphs(backend):
    """torch.compile's CUDA-graph mode captures the layer's forward and backward and replays them: the loss and
    the gradients on fresh inputs match the eager layer's."""
    m = _model(backend)

    def run(x):
        out, state = m(x)
        return out.square().sum() + state.hyper_h.sum()

    torch._dynamo.reset()
    compiled = torch.compile(run, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # recorded on the first calls, replayed after
        x = torch.randn(5, 4, 16, device="cuda")
        results = []
        for fn in (compiled, run):
            m.zero_grad(set_to_none=True)
            loss = fn(x)
            loss.backward()
            results.append([loss.detach().clone()] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_compiled_loop_over_plain_tuples_carries_the_hyper_state(backend, mode):
    """nn.LSTM's truncated-BPTT loop, the state detached into a plain (h, c) tuple each batch, compiled (with
    CUDA graphs in reduce-overhead mode, whose outputs the carry keeps): the losses and gradients of the eager
    loop."""
    eager = _model(backend)
    compiled = _model(backend)
    compiled.load_state_dict(eager.state_dict())
    xs = [torch.randn(5, 4, 16, device="cuda") for _ in range(4)]

    def losses(m):
        step = torch.compile(m, mode=mode, fullgraph=True) if m is compiled else m
        hidden, out = None, []
        for x in xs:
            m.zero_grad(set_to_none=True)
            y, state = step(x, hidden)
            loss = y.square().sum()
            loss.backward()
            out.append([loss.detach().clone()] + [p.grad.clone() for p in m.parameters()])
            hidden = (state[0].detach().clone(), state[1].detach().clone())
        return out

    torch._dynamo.reset()
    for got, want in zip(losses(compiled), losses(eager), strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_of_forward_and_backward(backend):
    m = _model(backend)
    static_x = torch.randn(5, 4, 16, device="cuda")
    eager = _fwd_bwd(m, static_x)
    _on_side_stream(lambda: [_fwd_bwd(m, static_x) for _ in range(2)])
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out, state = m(static_x)
        (out.square().sum() + state.hyper_c.sum()).backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager[0], **TOL)
    for p, g in zip(m.parameters(), eager[2:], strict=True):
        torch.testing.assert_close(p.grad, g, **TOL)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_make_graphed_callables_replays_forward_and_backward_on_new_inputs(backend):
    """The whole forward and backward captured once (torch.cuda.make_graphed_callables) and replayed on inputs
    it has not seen: outputs, input gradient and every parameter gradient as the eager layer gives them."""
    m = _model(backend)
    sample = torch.randn(5, 4, 16, device="cuda", requires_grad=True)  # requires_grad as in the real calls
    graphed = torch.cuda.make_graphed_callables(OutputOnly(m), (sample,))
    for _ in range(2):
        x = torch.randn(5, 4, 16, device="cuda", requires_grad=True)
        results = []
        for run in (graphed, lambda x: m(x)[0]):
            m.zero_grad(set_to_none=True)
            x.grad = None
            out = run(x)
            out.square().sum().backward()
            results.append([out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_of_kernel_generation(backend):
    net = randomize_(hyperfused.StaticHyperNetwork(8, 4, 4, 3, backend=backend, device="cuda"))
    convs = [hyperfused.HyperConv2d(8, 8, 3, hypernet=net, device="cuda"),
             hyperfused.HyperConv2d(8, 4, 3, hypernet=net, device="cuda")]
    eager = [k.clone() for k in net.generate(convs)]
    _on_side_stream(lambda: net.generate(convs))
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        kernels = net.generate(convs)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(kernels, eager, strict=True):
        torch.testing.assert_close(a, b)
