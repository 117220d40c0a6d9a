"""What breaks on a GPU's first contact, checked where this machine can: test helpers that keep every tensor
on the model's device (run on fake CUDA tensors), workspaces written in full, no host sync in the kernel
generation, tile layouts that cannot send a kernel out of bounds, Triton launches on the tensors' device,
and torch.compile through every Triton op's backward."""
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hyperfused
from hyperfused.train.determinism import deterministic_algorithms
from conftest import HAS_GPU, requires_extension, requires_gpu
from helpers import forward_and_loss, random_state, randomize_, seeded_weights

HAS_TRITON = "triton" in hyperfused.available_backends()
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed, or neither a GPU nor "
                                                            "TRITON_INTERPRET=1 is present")
DEVICE = "cuda" if HAS_GPU else "cpu"


def test_helpers_keep_every_tensor_on_the_models_device():
    """The comparison helpers on a model living on 'cuda' — fake tensors, so no GPU is needed: any tensor a
    helper makes on the CPU and mixes with the model's raises a device mismatch, as it would on a GPU. (The
    backward pass itself cannot run on fake CUDA tensors without a driver; the helpers make no tensors there.)"""
    m = randomize_(hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend="reference"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = m.to("cuda")
        state = random_state(m, 2, torch.float32)
        assert all(t.device.type == "cuda" for t in state.tensors())
        outs, loss = forward_and_loss(m, torch.randn(4, 2, 3, device="cuda"), state)
        assert all(o.device.type == "cuda" for o in outs) and loss.device.type == "cuda"
        w = seeded_weights(outs[0], torch.Generator().manual_seed(0))
        assert w.device.type == "cuda" and w.shape == outs[0].shape


@contextmanager
def _fill_uninitialized_with_nan(monkeypatch):
    """torch.empty (and at::empty inside the ops) returns NaN-filled memory in the block: whatever an op leaves
    unwritten in an output shows up as NaN."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    with deterministic_algorithms(warn_only=True):
        yield


FULL_WRITE_BACKENDS = [b for b in ("cpu", "cuda", "triton") if b in hyperfused.available_backends()]


@pytest.mark.parametrize("backend", FULL_WRITE_BACKENDS)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_saved_workspace_is_fully_written(backend, layer_norm, monkeypatch):
    """Without layer norm the LN-only workspace slots (normalised c, ĉ and the rstd values) used to be left
    unwritten, and the backward read them (a sanitizer's initcheck flags it). Every output of forward and
    backward must be defined."""
    if backend == "cuda" and not HAS_GPU:
        pytest.skip("no CUDA GPU on this machine; CUDA tests need one")
    device = "cpu" if backend == "cpu" else DEVICE
    m = randomize_(hyperfused.HyperLSTM(3, 6, hyper_size=5, hyper_embed=2, layer_norm=layer_norm,
                                        device=device))
    params = [p.detach().requires_grad_() for p in m.cells[0].flat_params()]
    x = torch.randn(2, 2, 3, device=device, requires_grad=True)
    state = [torch.randn(2, n, device=device) for n in (6, 6, 5, 5)]
    op = torch.ops.hyperfused.hyper_lstm_triton_forward if backend == "triton" else \
        torch.ops.hyperfused.hyper_lstm_forward
    with _fill_uninitialized_with_nan(monkeypatch):
        outs = op(x, *state, params, None, None, layer_norm, 1.0)
        torch.autograd.backward(outs[:4], [torch.ones_like(o) for o in outs[:4]])
    for name, t in zip(("hs", "cs", "hhs", "hcs", "g", "ws"), outs, strict=True):
        assert torch.isfinite(t).all(), f"{backend}: forward output {name} has unwritten (NaN) entries"
    for i, p in enumerate([x] + params):
        assert torch.isfinite(p.grad).all(), f"{backend}: gradient {i} has unwritten (NaN) entries"


def _generation_inputs(dtype=torch.float64, device="cpu"):
    net = randomize_(hyperfused.StaticHyperNetwork(3, 2, 3, 3, dtype=dtype, device=device))
    meta, _, numel = hyperfused.ops.tile_layout([(6, 2), (3, 4)], 3, 2, 3)
    z = torch.randn(meta.shape[0], 3, dtype=dtype, device=device)
    return z, [p.detach() for p in (net.w_in, net.b_in, net.w_out, net.b_out)], meta.to(device), numel


@requires_extension
def test_generation_reads_nothing_back_to_the_host():
    """The tile-layout check used to reduce tile_meta with ATen and read the results with .item(): on a GPU,
    six host syncs per training step, and no CUDA-graph capture. It now walks a CPU tile_meta directly."""
    z, (w_in, b_in, w_out, b_out), meta, numel = _generation_inputs()
    z.requires_grad_()
    with torch.profiler.profile() as prof:
        out = torch.ops.hyperfused.generate_kernels(z, w_in, b_in, w_out, b_out, meta, numel, 3)
        torch.ops.hyperfused.generate_kernels_backward(torch.ones_like(out), z.detach(), w_in, b_in, w_out, meta, 3)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::min", "aten::max"}, names


@requires_extension
@pytest.mark.parametrize("offset, stride", [(2 ** 62, 18), (0, 2 ** 62), (-(2 ** 62), 18), (2 ** 63 - 1, 2 ** 63 - 1)],
                         ids=["offset-2^62", "stride-2^62", "offset--2^62", "both-max"])
def test_tile_meta_that_would_overflow_is_refused(offset, stride):
    """The bounds check used to compute offset + (out_tile-1)·stride + in_tile·k² in int64, which wraps for
    offsets or strides near 2^62 and let the tile through to an out-of-bounds write. Run in a subprocess, so
    that a regression fails this test instead of killing the test run."""
    code = f"""
import torch, hyperfused
net = hyperfused.StaticHyperNetwork(3, 2, 3, 3, dtype=torch.float64)
meta = torch.tensor([[{offset}, {stride}]])
try:
    torch.ops.hyperfused.generate_kernels(torch.randn(1, 3, dtype=torch.float64), net.w_in.detach(),
        net.b_in.detach(), net.w_out.detach(), net.b_out.detach(), meta, 100, 3)
except RuntimeError as e:
    print("REFUSED", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"crashed with {run.returncode}: {run.stderr[-2000:]}"
    assert "REFUSED" in run.stdout and "'tile_meta' row 0" in run.stdout, run.stdout + run.stderr[-2000:]


@requires_extension
def test_absurd_kernel_size_is_refused():
    z, (w_in, b_in, w_out, b_out), meta, numel = _generation_inputs()
    with pytest.raises(RuntimeError, match=r"'kernel_size' must be in \[1, 1024\], got 4294967296"):
        torch.ops.hyperfused.generate_kernels(z, w_in, b_in, w_out, b_out, meta, numel, 2 ** 32)


@requires_triton
def test_triton_generation_leaves_a_tile_outside_the_buffer_untouched():
    """The Triton kernels check each tile's bounds themselves (the host does not read a GPU tile_meta back):
    a tile that would land outside the buffer writes nothing, and its gradient reads as zero."""
    z, params, meta, numel = _generation_inputs(torch.float32, DEVICE)
    meta = meta.clone()
    meta[1, 0] = numel - 1  # tile 1 would run past the end
    out = torch.ops.hyperfused.generate_kernels_triton(z, *params, meta, numel, 3)
    keep = [0, 2, 3]
    good = torch.ops.hyperfused.generate_kernels_triton(z[keep].contiguous(), *params, meta[keep].contiguous(),
                                                        numel, 3)
    torch.testing.assert_close(out, good)  # every tile but tile 1 was written
    dz = torch.ops.hyperfused.generate_kernels_triton_backward(torch.ones_like(out), z, *params[:3], meta, 3)[0]
    assert dz[1].abs().max() == 0 and dz[0].abs().max() > 0


@requires_triton
def test_triton_launches_on_the_tensors_device():
    """Triton launches on the current device; the drivers make the tensors' device current, as the C++ ops'
    DeviceGuard does. On fake tensors of cuda:1 the guard names device 1."""
    from hyperfused.triton_kernels._common import on_device_of
    assert not hasattr(on_device_of(torch.zeros(1)), "idx")  # CPU tensors: no guard
    with FakeTensorMode():
        t = torch.empty(2, device="cuda:1")
    guard = on_device_of(t)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_model_on_a_second_gpu_without_set_device(backend):
    ref = randomize_(hyperfused.HyperLSTM(4, 16, hyper_size=8, hyper_embed=4, backend="reference")).to("cuda:1")
    fast = hyperfused.HyperLSTM(4, 16, hyper_size=8, hyper_embed=4, backend=backend).to("cuda:1")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4, device="cuda:1")
    torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-3, atol=1e-4)


@requires_gpu
@requires_extension
def test_cuda_generation_that_needs_too_much_shared_memory_is_a_clear_error():
    net = hyperfused.StaticHyperNetwork(4, in_tile=64, out_tile=2, kernel_size=1, backend="cuda",
                                        device="cuda")
    with torch.no_grad():
        net.w_in.data = torch.randn(64, 2048, 4, device="cuda")  # 64·2048 floats: 512 KB of hidden layer
        net.b_in.data = torch.zeros(64, 2048, device="cuda")
        net.w_out.data = torch.randn(2, 2048, device="cuda")
    conv = hyperfused.HyperConv2d(64, 2, 1, hypernet=net, device="cuda")
    with pytest.raises(RuntimeError, match=r"in shared memory: \d+ bytes, but this GPU allows \d+ per block"):
        net.generate([conv])


@requires_triton
def test_triton_generation_traces_under_torch_compile_fullgraph():
    """The Triton generation op's backward is a registered op with a fake; it used to launch Triton straight
    from the autograd formula, which torch.compile cannot trace."""
    net = randomize_(hyperfused.StaticHyperNetwork(z_dim=4, in_tile=2, out_tile=2, kernel_size=3,
                                                   backend="triton", device=DEVICE))
    convs = [hyperfused.HyperConv2d(2, 4, 3, hypernet=net, device=DEVICE),
             hyperfused.HyperConv2d(4, 2, 3, hypernet=net, device=DEVICE)]

    def run():
        return [k.square().sum() for k in net.generate(convs)]

    expected = sum(run())
    expected.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch._dynamo.reset()
    got = sum(torch.compile(run, fullgraph=True, backend="aot_eager")())
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip((p.grad for p in net.parameters()), grads, strict=True):
        torch.testing.assert_close(a, b)


@requires_triton
def test_triton_lstm_traces_under_torch_compile_fullgraph():
    m = randomize_(hyperfused.HyperLSTM(3, 8, hyper_size=6, hyper_embed=2, backend="triton", device=DEVICE))
    x = torch.randn(2, 2, 3, device=DEVICE)

    def run(x):
        out, state = m(x)
        return out.square().sum() + state.hyper_c.sum()

    expected = run(x)
    expected.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip((p.grad for p in m.parameters()), grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_gpu_checks_test_list_holds_every_file_with_gpu_cases():
    # benchmarks/gpu_check.sh runs only the files listed in benchmarks/gpu_tests.txt on the GPU: a file
    # with GPU cases left out of it would never run them anywhere.
    root = Path(__file__).resolve().parents[1]
    lines = (root / "benchmarks" / "gpu_tests.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert all((root / path).is_file() for path in listed), listed
    with_gpu_cases = {
        f"tests/{p.name}" for p in (root / "tests").glob("test_*.py")
        # backend_params / backend_cases / device_for give a "cuda" or "triton" case its GPU (or its skip mark)
        if re.search(r"\b(requires_gpu|HAS_GPU|backend_params|backend_cases|device_for)\b", p.read_text())
    }
    assert with_gpu_cases <= listed, f"add to benchmarks/gpu_tests.txt: {sorted(with_gpu_cases - listed)}"
