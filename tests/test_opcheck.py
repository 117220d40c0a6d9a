"""torch.library.opcheck on every hyperfused op, forward and backward: schema, fake (meta) implementation,
autograd registration, and AOT dispatch with static and dynamic shapes. The Triton ops run on CPU tensors
under the interpreter here, on the GPU where there is one."""
import pytest
import torch

import hyperfused
from conftest import HAS_GPU, requires_extension
from helpers import randomize_

HAS_TRITON = "triton" in hyperfused.available_backends()
DEVICE = "cuda" if HAS_GPU else "cpu"
ops = torch.ops.hyperfused

# (op family, device): the C++ ops on the CPU (and the GPU where there is one), the same ops on the CPU running
# the CUDA backend's configuration and kernel code under the SIMT emulator ("cpp-emulated-cuda": its outputs'
# shapes must match the fakes as the GPU's do), the same with the sequence ops recorded and replayed
# ("-graphs": HYPERFUSED_CUDA_GRAPHS=1, CUDA graphs on a GPU; opcheck calls each op several times with the same
# inputs, so later calls replay), the Triton ops on DEVICE, also recorded.
CPP_CASES = [("cpp", "cpu"), ("cpp-emulated-cuda", "cpu"), ("cpp-emulated-cuda-graphs", "cpu")] + (
    [("cpp", "cuda"), ("cpp-graphs", "cuda")] if HAS_GPU else [])
LSTM_CASES = CPP_CASES + ([("triton", DEVICE), ("triton-graphs", DEVICE)] if HAS_TRITON else [])


@pytest.fixture(autouse=True)
def _emulate_cuda_for_its_family(request, monkeypatch):
    """The cpp-emulated-cuda cases run with HYPERFUSED_EMULATE_CUDA set (an H200's 132 multiprocessors), the
    -graphs ones with HYPERFUSED_CUDA_GRAPHS=1."""
    family = getattr(request.node, "callspec", None) and request.node.callspec.params.get("family")
    if family and family.startswith("cpp-emulated-cuda"):
        monkeypatch.setenv("HYPERFUSED_EMULATE_CUDA", "132")
    if family and family.endswith("-graphs"):
        monkeypatch.setenv("HYPERFUSED_CUDA_GRAPHS", "1")


def _skip_unless_built(family):
    if not hyperfused.HAS_EXTENSION:
        pytest.skip("hyperfused._C not built (run scripts/bootstrap.sh)")
    if family.startswith("triton") and not HAS_TRITON:
        pytest.skip("Triton is not installed, or neither a GPU nor TRITON_INTERPRET=1 is present")


def _lstm_args(device, layer_norm, masks, dtype):
    T, B, X, H, Hh, Nz = 2, 2, 3, 5, 4, 2
    m = randomize_(hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, dtype=dtype,
                                        device=device))
    params = [p.detach().clone().requires_grad_() for p in m.cells[0].flat_params()]
    x = torch.randn(T, B, X, dtype=dtype, device=device, requires_grad=True)
    state = [torch.randn(B, n, dtype=dtype, device=device, requires_grad=True) for n in (H, H, Hh, Hh)]
    mask = hyper_mask = zoneout = hyper_zoneout = None
    if masks:  # recurrent dropout and zoneout
        mask = torch.bernoulli(torch.full((T, B, H), 0.7, dtype=dtype, device=device)) / 0.7
        hyper_mask = torch.bernoulli(torch.full((T, B, Hh), 0.7, dtype=dtype, device=device)) / 0.7
        zoneout = torch.bernoulli(torch.full((T, B, H), 0.6, dtype=dtype, device=device))
        hyper_zoneout = torch.full((T, B, Hh), 0.8, dtype=dtype, device=device)
    return [x, *state, params, mask, hyper_mask, layer_norm, 1.0, zoneout, hyper_zoneout]


@pytest.mark.parametrize("family, device", LSTM_CASES, ids=lambda v: v)
@pytest.mark.parametrize("layer_norm, masks", [(True, False), (False, True)], ids=["ln", "noln-dropout-zoneout"])
def test_opcheck_hyper_lstm(family, device, layer_norm, masks):
    _skip_unless_built(family)
    dtype = torch.float64 if not family.startswith("triton") else torch.float32
    fwd, bwd = (ops.hyper_lstm_forward, ops.hyper_lstm_backward) if not family.startswith("triton") else \
        (ops.hyper_lstm_triton_forward, ops.hyper_lstm_triton_backward)
    args = _lstm_args(device, layer_norm, masks, dtype)
    torch.library.opcheck(fwd, args)
    with torch.no_grad():
        outs = fwd(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]]
    params = [p.detach() for p in args[5]]
    grads = [torch.randn_like(outs[i]) for i in range(4)]
    zone = args[10:12]
    torch.library.opcheck(bwd, [*grads, *detached, params, *args[6:8], *outs, layer_norm, 1.0, *zone])
    # Gradients for only some outputs (the others None) are part of the schema too.
    torch.library.opcheck(bwd, [grads[0], None, None, None, *detached, params, *args[6:8], *outs, layer_norm, 1.0,
                                *zone])
    # Inference: nothing saved for a backward (g and ws come back empty).
    inference = [*detached, params, *args[6:]]
    torch.library.opcheck(fwd, inference, {"save_for_backward": False},
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("family, device", LSTM_CASES, ids=lambda v: v)
def test_opcheck_hyper_lstm_with_low_precision_gemms(family, device):
    """gemm_dtype (bfloat16 GEMM operands, float32 everywhere else) through the schema, fakes and autograd."""
    _skip_unless_built(family)
    fwd, bwd = (ops.hyper_lstm_forward, ops.hyper_lstm_backward) if not family.startswith("triton") else \
        (ops.hyper_lstm_triton_forward, ops.hyper_lstm_triton_backward)
    args = _lstm_args(device, True, False, torch.float32)
    torch.library.opcheck(fwd, args, {"gemm_dtype": torch.bfloat16})
    with torch.no_grad():
        outs = fwd(*args, gemm_dtype=torch.bfloat16)
    detached = [a.detach() for a in args[:5]]
    grads = [torch.randn_like(outs[i]) for i in range(4)]
    torch.library.opcheck(bwd, [*grads, *detached, [p.detach() for p in args[5]], *args[6:8], *outs, True, 1.0,
                                None, None], {"gemm_dtype": torch.bfloat16})
    with pytest.raises(RuntimeError, match="'gemm_dtype' must be bfloat16, float16 or None"):
        fwd(*args, gemm_dtype=torch.float64)


@pytest.mark.parametrize("layer_norm, masks", [(True, False), (False, True)], ids=["ln", "noln-dropout-zoneout"])
def test_opcheck_hyper_lstm_reference(layer_norm, masks):
    """The forward in PyTorch ops, which the fused ops' backward with create_graph=True recomputes through: a
    composite op (its autograd is that of the ops it calls), with the fused op's outputs."""
    args = _lstm_args(DEVICE, layer_norm, masks, torch.float64 if DEVICE == "cpu" else torch.float32)
    torch.library.opcheck(ops.hyper_lstm_reference, args)
    if hyperfused.HAS_EXTENSION and DEVICE == "cpu":
        with torch.no_grad():
            for a, b in zip(ops.hyper_lstm_reference(*args), ops.hyper_lstm_forward(*args)[:4], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# (the kernel generation records nothing: its cases without -graphs)
GEN_CASES = [c for c in CPP_CASES if not c[0].endswith("-graphs")] + ([("triton", DEVICE)] if HAS_TRITON else [])


@pytest.mark.parametrize("family, device", GEN_CASES, ids=lambda v: v)
def test_opcheck_generate_kernels(family, device):
    _skip_unless_built(family)
    dtype = torch.float64 if not family.startswith("triton") else torch.float32
    net = randomize_(hyperfused.StaticHyperNetwork(3, 2, 3, 3, dtype=dtype, device=device))
    meta, _, numel = hyperfused.ops.tile_layout([(6, 2), (3, 4)], 3, 2, 3)
    meta = meta.to(device)
    z = torch.randn(meta.shape[0], 3, dtype=dtype, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in (net.w_in, net.b_in, net.w_out, net.b_out)]
    fwd, bwd = (ops.generate_kernels, ops.generate_kernels_backward) if not family.startswith("triton") else \
        (ops.generate_kernels_triton, ops.generate_kernels_triton_backward)
    torch.library.opcheck(fwd, [z, *params, meta, numel, 3])
    grad = torch.randn(numel, dtype=dtype, device=device)
    torch.library.opcheck(bwd, [grad, z.detach(), *(p.detach() for p in params[:3]), meta, 3])


@pytest.mark.parametrize("family, device", CPP_CASES, ids=lambda v: v)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_opcheck_hyper_lstm_step_with_half_precision_weights(family, device, half):
    """A bfloat16 or float16 cell's decoding step: float32 states and small parameters, the four weights of the
    input and recurrent products in the cell's dtype, which the op and its fake accept; any other half-precision
    parameter, or a weight in another dtype, is refused with its name."""
    _skip_unless_built("cpp")
    args = _lstm_args(device, True, False, torch.float32)
    params = [p.detach().to(half) if i in (0, 1, 3, 4) else p.detach() for i, p in enumerate(args[5])]
    step = [args[0][0].detach(), *(a.detach() for a in args[1:5]), params, True, 1.0]
    torch.library.opcheck(ops.hyper_lstm_step, step)
    for i, name, dtype, also in ((1, "weight_hh", torch.float64, ", BFloat16 or Half"), (2, "bias", half, "")):
        wrong = list(params)
        wrong[i] = wrong[i].to(dtype)
        with pytest.raises(RuntimeError, match=rf"'{name}' has dtype \w+, expected Float \(the dtype of 'x'\){also}$"):
            ops.hyper_lstm_step(*step[:5], wrong, True, 1.0)


@pytest.mark.parametrize("family, device", CPP_CASES, ids=lambda v: v)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_opcheck_hyper_lstm_step(family, device, layer_norm, monkeypatch):
    """The decoding step: opcheck, and bit for bit the sequence op's T = 1 forward in the step design a decode
    step runs (GEMM-shaped)."""
    _skip_unless_built("cpp")
    args = _lstm_args(device, layer_norm, False, torch.float64)
    step = [args[0][0].detach(), *(a.detach() for a in args[1:5]), [p.detach() for p in args[5]], layer_norm, 1.0]
    torch.library.opcheck(ops.hyper_lstm_step, step)
    monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", "gemm")
    seq = ops.hyper_lstm_forward(step[0][None], *step[1:6], None, None, layer_norm, 1.0)
    for a, b in zip(ops.hyper_lstm_step(*step), seq[:4], strict=True):
        assert torch.equal(a, b[0])
    x = step[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="has no backward"):
        ops.hyper_lstm_step(x, *step[1:])[0].sum().backward()
    with pytest.raises(RuntimeError, match=r"'x' must have shape \(B, input_size\)"):
        ops.hyper_lstm_step(step[0][None], *step[1:])


@pytest.mark.parametrize("family, device", CPP_CASES, ids=lambda v: v)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck_hyper_lstm_step_of_a_projected_cell(family, device, dtype):
    """A projected cell's decoding step: h (B, P) as it is, W_h (4H, P), Ŵ_x (4Ĥ, X + P), c giving H; the op
    returns the unprojected h (B, H), and its fake says so. Against the reference's step on the same P-wide h:
    float64 to 1e-12, float32 to 1e-5 (measured over five seeds: up to 5e-7). Plausible bugs move the result by
    0.2–1.5 (measured on the reference, five seeds): h's entries read one place off, or Ŵ_x's h columns. An h
    whose width W_h does not read is refused by name."""
    _skip_unless_built("cpp")
    torch.manual_seed(5)
    X, H, P, B = 3, 7, 4, 2  # H not a multiple of 4 and one that is (below): both scaling-vector products
    for H in (7, 8):
        cell = randomize_(hyperfused.HyperLSTMCell(X, H, hyper_size=5, hyper_embed=2, proj_size=P, dtype=dtype,
                                                   device=device), scale=0.4)
        params = [p.detach() for p in cell.flat_params()]
        state = [torch.randn(B, n, dtype=dtype, device=device) for n in (P, H, 5, 5)]
        step = [torch.randn(B, X, dtype=dtype, device=device), *state, params, True, 1.0]
        torch.library.opcheck(ops.hyper_lstm_step, step)
        out = ops.hyper_lstm_step(*step)
        assert [tuple(t.shape) for t in out] == [(B, H), (B, H), (B, 5), (B, 5)]
        ref = hyperfused.reference.hyper_lstm_step(step[0], state, hyperfused.reference.HyperLSTMParams(*params))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(out, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=tol)
    wrong = torch.randn(B, P + 1, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match=rf"'weight_hh' has shape \[32, {P}\], expected \[32, {P + 1}\]"):
        ops.hyper_lstm_step(step[0], wrong, *step[2:])


@requires_extension
def test_every_registered_op_is_covered():
    """A new op without an opcheck here fails this test."""
    covered = {"hyper_lstm_forward", "hyper_lstm_backward", "hyper_lstm_step", "generate_kernels",
               "generate_kernels_backward", "hyper_lstm_reference",
               "hyper_lstm_triton_forward", "hyper_lstm_triton_backward", "generate_kernels_triton",
               "generate_kernels_triton_backward"}
    registered = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("hyperfused::")}
    assert registered <= covered, registered - covered
