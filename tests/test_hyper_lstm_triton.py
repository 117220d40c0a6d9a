"""The Triton HyperLSTM kernels against the reference: outputs, final main and hyper states, and the
gradients of the input, the initial states and every parameter. On CPU they run under the Triton
interpreter (TRITON_INTERPRET=1, set in conftest) at tiny sizes; on a GPU at real sizes as well."""
import pytest
import torch

import hyperfused
from conftest import HAS_GPU, requires_gpu
from helpers import assert_same_run, make_pair, random_state

pytestmark = pytest.mark.skipif("triton" not in hyperfused.available_backends(),
                                reason="Triton is not installed, or neither a GPU nor TRITON_INTERPRET=1 is present")
DEVICE = "cuda" if HAS_GPU else "cpu"

# (T, B, X, H, Hh, Nz): H and Ĥ not powers of two, N_z = 4; tiny, since the interpreter is slow.
SIZES = [(3, 2, 5, 24, 12, 4), (2, 1, 3, 37, 20, 4), (1, 3, 4, 8, 6, 3)]
F32 = dict(rtol=2e-4, atol=2e-5)


def _pair(*args, dtype=torch.float32, **kwargs):
    ref, fast = make_pair("triton", *args, dtype=dtype, **kwargs)
    return ref.to(DEVICE), fast.to(DEVICE)


def _state(ref, B, dtype=torch.float32):
    return random_state(ref, B, dtype, requires_grad=False).to(DEVICE)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}B{}X{}H{}Hh{}Nz{}".format(*s))
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_triton_matches_reference(size, layer_norm):
    T, B, X, H, Hh, Nz = size
    ref, fast = _pair(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm)
    assert_same_run(ref, fast, torch.randn(T, B, X, device=DEVICE), _state(ref, B), **F32)


def test_triton_float64_is_exact():
    ref, fast = _pair(4, 10, hyper_size=6, hyper_embed=4, dtype=torch.float64)
    # The kernels accumulate in float32 whatever the input dtype, hence float32 tolerances.
    assert_same_run(ref, fast, torch.randn(3, 2, 4, dtype=torch.float64, device=DEVICE),
                    _state(ref, 2, torch.float64), **F32)


def test_triton_recurrent_dropout_and_no_bias():
    ref, fast = _pair(4, 10, hyper_size=6, hyper_embed=4, recurrent_dropout=0.3, bias=False)
    x = torch.randn(3, 2, 4, device=DEVICE)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(2)
        out, state = m(x)
        (out.square().sum() + state.hyper_c.sum()).backward()
        outs.append([out, state.hyper_c] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **F32)


def test_auto_never_picks_triton_for_cpu_tensors():
    m = hyperfused.HyperLSTM(3, 4, hyper_size=4, hyper_embed=2)
    assert hyperfused.ops.resolve_backend("auto", torch.device("cpu")) != "triton"
    assert m(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)


@requires_gpu
@pytest.mark.parametrize("size", [(20, 64, 128, 256, 128, 16), (10, 8, 64, 1000, 128, 16)],
                         ids=lambda s: "T{}B{}X{}H{}Hh{}Nz{}".format(*s))
def test_triton_matches_reference_at_real_sizes(size):
    T, B, X, H, Hh, Nz = size
    ref, fast = _pair(X, H, hyper_size=Hh, hyper_embed=Nz)
    assert_same_run(ref, fast, torch.randn(T, B, X, device="cuda"), _state(ref, B), rtol=1e-3, atol=1e-4)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_against_float32_reference(dtype):
    ref, fast = _pair(32, 64, hyper_size=32, hyper_embed=8)
    x = torch.randn(10, 8, 32, device="cuda")
    out, _ = fast.to(dtype)(x.to(dtype))
    torch.testing.assert_close(out.float(), ref(x)[0], rtol=0.05, atol=0.02)
