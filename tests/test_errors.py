"""Bad input gets a clear ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import hyperfused


@pytest.fixture
def m():
    return hyperfused.HyperLSTM(4, 6, num_layers=2, hyper_size=5, hyper_embed=3, backend="reference")


@pytest.mark.parametrize("shape, match", [
    ((3, 2, 2, 4), r"input: expected a 3-D \(T, B, input_size\)"),
    ((4,), r"input: expected a 3-D"),
    ((3, 2, 5), r"input: expected last dimension input_size=4, got shape \(3, 2, 5\)"),
    ((0, 2, 4), r"input: expected a sequence of at least one step, got shape \(0, 2, 4\)"),  # (nn.LSTM refuses T = 0)
    ((0, 4), r"input: expected a sequence of at least one step, got shape \(0, 4\)"),
])
def test_bad_input_shape(m, shape, match):
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))


def test_wrong_dtype(m):
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32 \(the module's\), got torch.float64"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))


def test_wrong_device(m):
    with pytest.raises(ValueError, match=r"input: expected a tensor on cpu \(the module's device\), got meta"):
        m(torch.randn(3, 2, 4, device="meta"))


def test_not_a_tensor(m):
    with pytest.raises(TypeError, match="input: expected a torch.Tensor, got list"):
        m([[1.0, 2.0]])


@pytest.mark.parametrize("hx, exc, match", [
    (lambda: (torch.zeros(2, 3, 6), torch.zeros(1, 3, 6)), ValueError,
     r"hx\[1\] \(c_0\): expected shape \(2, 3, 6\), got \(1, 3, 6\)"),
    (lambda: (torch.zeros(2, 2, 6), torch.zeros(2, 3, 6)), ValueError, r"hx\[0\] \(h_0\): expected shape \(2, 3, 6\)"),
    (lambda: torch.zeros(2, 3, 6), TypeError, r"hx: expected a tuple \(h_0, c_0\)"),
    (lambda: (torch.zeros(2, 3, 6, dtype=torch.float64), torch.zeros(2, 3, 6)), TypeError,
     r"hx\[0\] \(h_0\): expected dtype torch.float32"),
    (lambda: hyperfused.HyperLSTMState(torch.zeros(2, 3, 6), torch.zeros(2, 3, 6), torch.zeros(2, 3, 4),
                                       torch.zeros(2, 3, 5)), ValueError,
     r"hx.hyper_h: expected shape \(2, 3, 5\), got \(2, 3, 4\)"),
])
def test_bad_hx(m, hx, exc, match):
    with pytest.raises(exc, match=match):
        m(torch.randn(4, 3, 4), hx())


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'reference'"):
        hyperfused.HyperLSTM(4, 6, backend="fastest")


def test_unavailable_backend_lists_the_available_ones(monkeypatch):
    from hyperfused.ops import backends

    monkeypatch.setattr(backends, "_AVAILABLE", ("reference", "cpu"))  # as in a build without CUDA
    with pytest.raises(ValueError, match=r"backend='cuda' is not available: .*Available backends: \['reference', 'cpu'\]"):
        hyperfused.HyperLSTM(4, 6, backend="cuda")


def test_backend_that_does_not_fit_the_device():
    if "cuda" not in hyperfused.available_backends():
        pytest.skip("needs a CUDA build of the extension to ask for backend='cuda'")
    m = hyperfused.HyperLSTM(4, 6, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run on device cpu; backends for cpu tensors"):
        m(torch.randn(3, 2, 4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=20, out_channels=16), r"in_channels: expected a positive multiple of the hypernet's tile size 16"),
    (dict(in_channels=16, out_channels=8), r"out_channels: expected a positive multiple of the hypernet's tile size 16"),
])
def test_channels_not_a_tile_multiple(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hyperfused.HyperConv2d(kernel_size=3, **kwargs)


def test_kernel_size_must_match_the_hypernet():
    net = hyperfused.StaticHyperNetwork(z_dim=4, kernel_size=3)
    with pytest.raises(ValueError, match=r"kernel_size: expected 3 \(the hypernet's\), got 5"):
        hyperfused.HyperConv2d(16, 16, 5, hypernet=net)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
        hyperfused.HyperLSTM(4, 0)
    with pytest.raises(ValueError, match="recurrent_dropout: expected a probability"):
        hyperfused.HyperLSTM(4, 6, recurrent_dropout=1.5)
    with pytest.raises(TypeError, match="lstm: expected a torch.nn.LSTM"):
        hyperfused.HyperLSTM.from_lstm(torch.nn.GRU(4, 6))


FUSED = [b for b in ("cpu", "triton") if b in hyperfused.available_backends()]


@pytest.mark.parametrize("backend", FUSED)
def test_an_unknown_step_design_is_refused(backend, monkeypatch):
    """HYPERFUSED_STEP_DESIGN mistyped must not silently run the default design."""
    m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend=backend)
    monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", "gemm-shaped")
    with pytest.raises((RuntimeError, ValueError), match="HYPERFUSED_STEP_DESIGN must be 'gemm', 'fused' or unset, "
                                                         "got 'gemm-shaped'"):
        m(torch.randn(2, 1, 3))


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
@pytest.mark.parametrize("decode", [False, True], ids=["sequence", "decode"])
def test_an_unknown_step_gemm_library_is_refused(decode, monkeypatch):
    """HYPERFUSED_STEP_GEMM mistyped must not silently measure the libraries."""
    m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend="cpu")
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "onednn_packed")
    with pytest.raises(RuntimeError, match="HYPERFUSED_STEP_GEMM must be 'onednn', 'onednn-packed', 'mkl', 'mm', "
                                           "'own' or unset, got 'onednn_packed'"), torch.set_grad_enabled(not decode):
        m(torch.randn(1 if decode else 4, 2, 3))


def test_data_parallel_gathering_a_state_is_a_clear_error():
    # nn.DataParallel's gather rebuilds each output tuple as type(out)(gathered items); a HyperLSTMState's items
    # are (h, c), so that would drop the hyper state. The tensors here are on the CPU: the constructor refuses
    # before gather reaches its first tensor (Gather itself needs CUDA tensors).
    from torch.nn.parallel.scatter_gather import gather
    m = hyperfused.HyperLSTM(4, 6, hyper_size=5, hyper_embed=3, backend="reference")
    outs = [m(torch.randn(2, 3, 4)) for _ in range(2)]
    with pytest.raises(TypeError, match=r"expected 4 tensors, got 1 .*DistributedDataParallel"):
        gather([state for _, state in outs], "cpu")
