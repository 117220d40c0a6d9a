"""Low precision as cuDNN does it: under torch.autocast and for float16/bfloat16 modules the HyperLSTM's large
GEMMs (input projections, recurrent products, weight gradients) take low-precision operands and accumulate in
float32, while the states, layer norms and pointwise math stay float32 (on the CPU only where oneDNN has
bfloat16 kernels). Kernel generation still stops autocast at the op's boundary. (The ops read the outputs of
the GEMMs they call through pointers of the inputs' dtype: before this was guarded, autocast turned those
GEMMs to bfloat16 and the ops returned garbage.)"""
import pytest
import torch

import hyperfused
from hyperfused import reference
from hyperfused.ops.hyper_lstm import gemm_dtype_for
from conftest import HAS_GPU, HAS_MKL_CBLAS, backend_params, device_for, own_kernel_for
from helpers import randomize_

DEVICE = "cuda" if HAS_GPU else "cpu"
LOW = torch.float16 if HAS_GPU else torch.bfloat16
BACKENDS = backend_params("cpu", "cuda", "triton")
OPS = {"cpu": "hyper_lstm_forward", "cuda": "hyper_lstm_forward", "triton": "hyper_lstm_triton_forward"}


def _low_for(device):
    return LOW if device == DEVICE else torch.bfloat16


def _sequence_run(backend, device, gemm_dtype, layer_norm=True, forget_bias=1.0, low=torch.bfloat16):
    """Outputs and every gradient of one sequence (H=37, odd) from inputs and weights exact in `low`: on a
    fused backend with the given GEMM precision, or on the float32 reference (backend "reference")."""
    torch.manual_seed(0)
    T, B, X, H, Hh, Nz = 7, 3, 6, 37, 12, 4
    cell = randomize_(hyperfused.HyperLSTMCell(X, H, hyper_size=Hh, hyper_embed=Nz), scale=0.5)
    exact = lambda t: t.detach().to(low).float().to(device).requires_grad_()  # noqa: E731
    params = [exact(p) for p in cell.flat_params()]
    x, states = exact(torch.randn(T, B, X)), [exact(torch.randn(B, n)) for n in (H, H, Hh, Hh)]
    if backend == "reference":
        outs = reference.hyper_lstm_sequence(x, *states, reference.HyperLSTMParams(*params), layer_norm,
                                             forget_bias)
    else:
        op = getattr(torch.ops.hyperfused, OPS[backend])
        outs = op(x, *states, params, None, None, layer_norm, forget_bias, None, None, True, gemm_dtype)[:4]
    weights = [torch.linspace(-1, 1, o.numel(), device=device).view_as(o) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, [x, *states, *params], allow_unused=True)
    grads = [torch.zeros(1, device=device) if g is None else g for g in grads]  # no-LN gains have none
    return list(outs), grads


def _relative_error(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item() for x, y in zip(a, b, strict=True))


# Errors relative to each tensor's largest value. Measured on the CPU with bfloat16 GEMMs (H=37): outputs
# 8.5e-3, gradients up to 2.9e-2 off the float32 reference; the bugs these tolerances must catch move the
# reference itself by at least 1.4 (outputs) and 0.45 (gradients): forget bias 0 instead of 1, or no layer
# norm. Both are asserted below, so a tolerance loose enough to hide them fails the test.
TOL_OUT, TOL_GRAD = 3e-2, 8e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_gemms_match_the_float32_reference(backend):
    device = device_for(backend)
    low = _low_for(device)
    ref_out, ref_grads = _sequence_run("reference", device, None, low=low)
    out, grads = _sequence_run(backend, device, low, low=low)
    exact_out, _ = _sequence_run(backend, device, None, low=low)
    assert all(o.dtype == torch.float32 for o in out)  # states stay float32
    assert _relative_error(out, ref_out) < TOL_OUT
    assert _relative_error(grads, ref_grads) < TOL_GRAD
    assert _relative_error(out, exact_out) > 1e-4  # the GEMMs did run in low precision
    for bug in (dict(forget_bias=0.0), dict(layer_norm=False)):
        bug_out, bug_grads = _sequence_run("reference", device, None, low=low, **bug)
        assert _relative_error(bug_out, ref_out) > 5 * TOL_OUT
        assert _relative_error(bug_grads, ref_grads) > 5 * TOL_GRAD


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and HAS_MKL_CBLAS),
                    reason="this torch has no oneDNN or exports no MKL CBLAS")
@pytest.mark.parametrize("library, runs", [("onednn", "mkldnn::_linear_pointwise"),
                                           ("onednn-packed", "mkldnn::_linear_pointwise"),
                                           ("mkl", "hyperfused::mkl_gemm"), ("mm", "aten::mm"),
                                           ("own", "hyperfused::few_rows_gemm")])
def test_cpu_bfloat16_step_gemms_every_way(library, runs, monkeypatch):
    """The recurrent GEMMs with bfloat16 operands in each CPU library the op measures (HYPERFUSED_STEP_GEMM
    forces one): oneDNN (against the weight as it is, or reordered for the batch size) and at::mm return
    bfloat16, MKL and the few-rows kernel (which rounds a to bfloat16 as it reads it) float32, so the
    tolerances above cover them all."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    if library.startswith("onednn") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN has no bfloat16 kernels on this CPU (AVX2 only) and refuses the weight: at::mm runs instead
        library, runs = "mm", "aten::mm"
    if library == "own" and not own_kernel_for(torch.bfloat16):
        library, runs = "mm", "aten::mm"  # a build without the kernel's bfloat16 path runs at::mm
    ref_out, ref_grads = _sequence_run("reference", "cpu", None)
    with torch.profiler.profile() as prof:
        out, grads = _sequence_run("cpu", "cpu", torch.bfloat16)
    assert sum(e.name == runs for e in prof.events()) >= 7  # every forward step at least
    packed = library == "onednn-packed" and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    assert any(e.name == "hyperfused::onednn_pack" for e in prof.events()) == packed
    assert _relative_error(out, ref_out) < TOL_OUT
    assert _relative_error(grads, ref_grads) < TOL_GRAD
    assert _relative_error(out, _sequence_run("cpu", "cpu", None)[0]) > 1e-4  # the GEMMs did run in bfloat16


def test_gemm_precision_follows_the_module_dtype_and_autocast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gemm_dtype_for(torch.float32, cpu) is None and gemm_dtype_for(torch.float64, cpu) is None
    assert gemm_dtype_for(torch.float16, cuda) == torch.float16
    assert gemm_dtype_for(torch.bfloat16, cuda) == torch.bfloat16
    assert gemm_dtype_for(torch.float16, cpu) is None  # the CPU has no fast float16 GEMMs: float32
    cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert gemm_dtype_for(torch.bfloat16, cpu) == (torch.bfloat16 if cpu_bf16 else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_dtype_for(torch.float32, cpu) == (torch.bfloat16 if cpu_bf16 else None)
        assert gemm_dtype_for(torch.float64, cpu) is None


def _lstm_run(m, x):
    m.zero_grad()
    out, (h, c) = m(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    return [out, h, c] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_lstm_under_autocast_runs_its_gemms_in_autocast_dtype(backend):
    """A float32 module under autocast: float32 outputs and gradients, equal to the op called with the GEMM
    precision gemm_dtype_for chooses (float32 where the CPU lacks bfloat16 kernels), close to the plain run."""
    device = device_for(backend)
    torch.manual_seed(0)
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend=backend, device=device)
    x = torch.randn(3, 2, 6, device=device)
    plain = _lstm_run(m, x)
    with torch.autocast(device, dtype=_low_for(device)):
        mixed = _lstm_run(m, x)
        chosen = gemm_dtype_for(torch.float32, torch.device(device))
        state = [torch.zeros(2, n, device=device) for n in (24, 24, 12, 12)]
        params = [p.detach() for p in m.cells[0].flat_params()]
        op = getattr(torch.ops.hyperfused, OPS[backend])
        direct = op(x, *state, params, None, None, m.layer_norm, m.forget_bias, None, None, False, chosen)[0]
    torch.testing.assert_close(mixed[0], direct, rtol=0, atol=0)
    for a, b in zip(mixed, plain, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=5e-2 * b.abs().max().item())


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *backend_params("cpu", "cuda")])
def test_a_projected_layer_in_low_precision_keeps_the_dtypes_of_an_unprojected_one(backend):
    """proj_size > 0 (two fused calls and the products around them, docs/design.md §1; on the reference, its
    steps): under autocast a float32 module gives float32 outputs, states and gradients, close to its plain run,
    and takes its state back (with and without gradients); a bfloat16 module gives bfloat16 ones, close to the
    float32 module with the same (bfloat16) weights. Tolerance 5e-2 of each tensor's largest entry, as above; a
    forget bias of 0 instead of 1 moves the plain run's outputs by more than 0.1 of theirs. (Triton's layer is
    the same Python around its op.)"""
    device = device_for(backend)
    torch.manual_seed(0)
    kw = dict(proj_size=7, hyper_size=12, hyper_embed=4, backend=backend, device=device)
    m = hyperfused.HyperLSTM(6, 24, 2, **kw)
    x = torch.randn(3, 2, 6, device=device)
    plain = _lstm_run(m, x)
    with torch.autocast(device, dtype=_low_for(device)):
        mixed = _lstm_run(m, x)
        for grad in (True, False):  # the state a call returned is one the next call takes
            with torch.set_grad_enabled(grad):
                out, state = m(x[:1], m(x)[1])
            assert out.dtype == state[0].dtype == torch.float32
    low = hyperfused.HyperLSTM(6, 24, 2, **kw, dtype=torch.bfloat16)
    low.load_state_dict(m.state_dict())
    m.load_state_dict(low.state_dict())  # both hold the bfloat16-exact weights
    exact = _lstm_run(m, x.bfloat16().float())
    runs = _lstm_run(low, x.bfloat16())
    for (a, b), dtype in [*((p, torch.float32) for p in zip(mixed, plain, strict=True)),
                          *((p, torch.bfloat16) for p in zip(runs, exact, strict=True))]:
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0, atol=5e-2 * b.abs().max().item())
    no_forget_bias = hyperfused.HyperLSTM(6, 24, 2, forget_bias=0.0, **kw)
    no_forget_bias.load_state_dict(m.state_dict())
    assert (no_forget_bias(x)[0] - m(x)[0]).abs().max() > 0.1 * m(x)[0].abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_generation_under_autocast_matches_float32(backend):
    device = device_for(backend)
    net = hyperfused.StaticHyperNetwork(z_dim=8, in_tile=4, out_tile=4, kernel_size=3, backend=backend).to(device)
    convs = [hyperfused.HyperConv2d(8, 8, 3, hypernet=net), hyperfused.HyperConv2d(8, 4, 3, hypernet=net)]
    convs = [c.to(device) for c in convs]

    def run():
        net.zero_grad()
        kernels = net.generate(convs)
        sum((k * torch.arange(k.numel(), device=device).view_as(k)).sum() for k in kernels).backward()
        return list(kernels) + [p.grad.clone() for p in net.parameters()]

    plain = run()
    with torch.autocast(device, dtype=LOW if device == DEVICE else torch.bfloat16):
        mixed = run()
    for a, b in zip(mixed, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_is_left_to_autocast():
    """Only the fused ops opt out: the reference is plain PyTorch, and autocast runs its GEMMs in low precision."""
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend="reference", device=DEVICE)
    x = torch.randn(3, 2, 6, device=DEVICE)
    plain, _ = m(x)
    with torch.autocast(DEVICE, dtype=LOW):
        mixed, _ = m(x)
    assert (mixed.float() - plain).abs().max() > 1e-4  # low-precision GEMMs, far above float32 rounding


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
def test_compiled_hyper_lstm_under_autocast_is_the_eager_one():
    """torch.compile(fullgraph=True) traces the GEMM-precision choice (a constant) and the op with gemm_dtype."""
    torch.manual_seed(0)
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend="cpu")
    x = torch.randn(5, 3, 6)
    compiled = torch.compile(lambda x: m(x)[0], fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), m(x)[0], rtol=0, atol=0)
