"""The Triton HyperLSTM kernels against the reference: outputs, final main and hyper states, and the
gradients of the input, the initial states and every parameter. On CPU they run under the Triton
interpreter (TRITON_INTERPRET=1, set in conftest) at tiny sizes; on a GPU at real sizes as well."""
import pytest
import torch

import hyperfused
from conftest import HAS_GPU
from helpers import make_pair

pytestmark = pytest.mark.skipif("triton" not in hyperfused.available_backends(),
                                reason="Triton is not installed, or neither a GPU nor TRITON_INTERPRET=1 is present")
DEVICE = "cuda" if HAS_GPU else "cpu"

F32 = dict(rtol=2e-4, atol=2e-5)


def _pair(*args, dtype=torch.float32, **kwargs):
    ref, fast = make_pair("triton", *args, dtype=dtype, **kwargs)
    return ref.to(DEVICE), fast.to(DEVICE)


def test_triton_refuses_float64_clearly():
    """The Triton kernels compute in float32; a float64 model would be rounded without a word."""
    m = hyperfused.HyperLSTM(4, 10, hyper_size=6, hyper_embed=4, backend="triton", dtype=torch.float64,
                             device=DEVICE)
    with pytest.raises(RuntimeError, match=r"backend='triton' computes in float32 and takes no float64 tensors"):
        m(torch.randn(3, 2, 4, dtype=torch.float64, device=DEVICE))
    net = hyperfused.StaticHyperNetwork(4, 2, 2, 3, backend="triton", dtype=torch.float64, device=DEVICE)
    conv = hyperfused.HyperConv2d(2, 2, 3, hypernet=net, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"takes no float64 tensors \(got 'z' of dtype torch.float64\)"):
        net.generate([conv])


def test_triton_recurrent_dropout_and_no_bias():
    ref, fast = _pair(4, 10, hyper_size=6, hyper_embed=4, recurrent_dropout=0.3, bias=False)
    x = torch.randn(3, 2, 4, device=DEVICE)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(2)
        out, state = m(x)
        (out.square().sum() + state.hyper_c.sum()).backward()
        outs.append([out, state.hyper_c] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **F32)


def test_auto_never_picks_triton_for_cpu_tensors():
    """The interpreter is for tests: 'auto' on CPU tensors runs the C++ kernels (or the reference)."""
    assert hyperfused.ops.resolve_backend("auto", torch.device("cpu")) in ("cpu", "reference")
    m = hyperfused.HyperLSTM(3, 4, hyper_size=4, hyper_embed=2)
    pinned = hyperfused.HyperLSTM(3, 4, hyper_size=4, hyper_embed=2,
                                  backend=hyperfused.ops.resolve_backend("auto", torch.device("cpu")))
    pinned.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 3)
    with torch.profiler.profile() as prof:
        out = m(x)[0]
    assert not any("triton" in e.name for e in prof.events())
    torch.testing.assert_close(out, pinned(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("config", ["forward_config", "backward_config"])
def test_triton_main_cell_widens_at_small_batch(config):
    """The GEMM-shaped main cell (phase 2) runs up to one warp per 32 features while the batch leaves most
    multiprocessors idle (the CUDA kernels' rule), and 8 warps otherwise; the hyper cell keeps its width.
    benchmarks/gpu_resources.py compiles both shapes for sm_80/sm_90 (tests/test_gpu_compile.py)."""
    from hyperfused.triton_kernels import hyper_lstm

    warps = lambda **kw: getattr(hyper_lstm, config)(1000, 128, 16, True, **kw)[1]  # noqa: E731
    assert warps(phase=2, rows=8, multiprocessors=132) == 32
    assert warps(phase=2, rows=264, multiprocessors=132) == warps(phase=2) == 8
    assert warps(phase=1, rows=8, multiprocessors=132) == warps(phase=1)
    assert hyper_lstm.forward_config(256, 128, 16, True, phase=2, rows=8, multiprocessors=132)[1] == 8
