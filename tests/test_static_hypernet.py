"""Static hypernetwork: tile generation and layout, parameter counts, HyperConv2d."""
import pytest
import torch

import hyperfused
from hyperfused import reference


def test_tile_is_the_two_layer_hypernetwork():
    net = hyperfused.StaticHyperNetwork(z_dim=4, in_tile=3, out_tile=2, kernel_size=3, dtype=torch.float64)
    z = torch.randn(4, dtype=torch.float64)
    tile = reference.generate_tile(z, net.w_in, net.b_in, net.w_out, net.b_out, 2, 3)
    assert tile.shape == (2, 3, 3, 3)
    for i in range(3):
        a = net.w_in[i] @ z + net.b_in[i]
        torch.testing.assert_close(tile[:, i], (net.w_out @ a + net.b_out).view(2, 3, 3))


def test_kernel_is_assembled_row_major_from_tiles():
    net = hyperfused.StaticHyperNetwork(z_dim=4, in_tile=2, out_tile=3, kernel_size=1, dtype=torch.float64)
    conv = hyperfused.HyperConv2d(4, 6, 1, hypernet=net, dtype=torch.float64)  # 2 × 2 tiles
    (kernel,) = net.generate([conv])
    assert kernel.shape == (6, 4, 1, 1)
    for r in range(2):
        for c in range(2):
            tile = reference.generate_tile(conv.z[r * 2 + c], net.w_in, net.b_in, net.w_out, net.b_out, 3, 1)
            torch.testing.assert_close(kernel[3 * r:3 * r + 3, 2 * c:2 * c + 2], tile)


def test_mnist_hypernetwork_has_the_papers_4240_parameters():
    net = hyperfused.StaticHyperNetwork(z_dim=4, in_tile=16, out_tile=16, kernel_size=7)
    assert sum(p.numel() for p in net.parameters()) == 4240


def test_hyper_conv2d_forward_and_gradients():
    net = hyperfused.StaticHyperNetwork(z_dim=8, kernel_size=3)
    conv = hyperfused.HyperConv2d(16, 32, 3, padding=1, hypernet=net)
    x = torch.randn(2, 16, 8, 8)
    y = conv(x)
    assert y.shape == (2, 32, 8, 8)
    y.square().mean().backward()
    for p in (conv.z, net.w_in, net.b_in, net.w_out, net.b_out):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fx_symbolic_trace_records_a_hyper_conv_as_one_call():
    """torch.fx.symbolic_trace records a HyperConv2d inside a model as one call, as it records nn.Conv2d (its
    input checks cannot run on proxies); the traced model convolves with the kernel the layer generates."""
    torch.manual_seed(0)
    shared = hyperfused.StaticHyperNetwork(z_dim=4)
    model = torch.nn.Sequential(hyperfused.HyperConv2d(16, 16, 3, padding=1, hypernet=shared), torch.nn.ReLU(),
                                hyperfused.HyperConv2d(16, 16, 3, hypernet=shared))
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        model[2].z.add_(0.1)  # the traced model generates from the layer's current embeddings
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("hyper", [True, False])
def test_fx_symbolic_trace_of_a_hyper_wrn_records_the_generation_as_one_call(hyper):
    """A whole HyperWRN through torch.fx.symbolic_trace: the model-wide generation is one call of the
    hypernetwork (its layers passed as attributes), each 3×3 conv one call with its kernel; the traced model's
    output and every gradient are the model's own, and it generates from the embeddings as they are."""
    from hyperfused.models import HyperWRN
    torch.manual_seed(0)
    model = HyperWRN(depth=10, widen_factor=1, hyper=hyper).eval()
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls.count("hypernet") == hyper and all(f"blocks.{j}.conv{k}" in calls for j in range(3) for k in (1, 2))
    x = torch.randn(2, 3, 8, 8)

    def output_and_grads(run):
        model.zero_grad(set_to_none=True)
        y = run(x)
        y.square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters()]
    got, want = output_and_grads(traced), output_and_grads(model)
    assert all(g is not None for g in got[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if hyper:
        with torch.no_grad():
            model.blocks[1].conv2.z.add_(0.1)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_generate_refuses_layers_of_another_hypernet():
    a, b = hyperfused.StaticHyperNetwork(z_dim=4), hyperfused.StaticHyperNetwork(z_dim=4)
    conv = hyperfused.HyperConv2d(16, 16, 3, hypernet=b)
    with pytest.raises(ValueError, match=r"layers\[0\]: this HyperConv2d is served by another"):
        a.generate([conv])


def test_calling_the_hypernetwork_generates_as_generate_does():
    net = hyperfused.StaticHyperNetwork(z_dim=8, kernel_size=3)
    convs = [hyperfused.HyperConv2d(16, 32, 3, hypernet=net), hyperfused.HyperConv2d(32, 16, 3, hypernet=net)]
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(len(out)))
    kernels = net(convs)
    assert seen == [2]  # called as a module: its hooks run
    for got, want in zip(kernels, net.generate(convs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"layers: expected a sequence of HyperConv2d"):
        net(torch.randn(3, 8))


# -- the fused generation op against the per-tile reference ----------------------------------------------

from conftest import HAS_GPU, backend_cases, backend_params, device_for, requires_extension  # noqa: E402
from helpers import randomize_, seeded_weights  # noqa: E402


def _layers(net, shapes, device="cpu", dtype=torch.float64):
    return [hyperfused.HyperConv2d(i * net.in_tile, o * net.out_tile, net.kernel_size, hypernet=net, device=device,
                                   dtype=dtype) for o, i in shapes]


def _generate_and_grads(net, layers, backend):
    net.backend = backend
    for p in [*net.parameters(), *(l.z for l in layers)]:
        p.grad = None
    kernels = net.generate(layers)
    gen = torch.Generator().manual_seed(7)
    loss = sum((k * seeded_weights(k, gen)).sum() for k in kernels)
    loss.backward()
    grads = [net.w_in.grad, net.b_in.grad, net.w_out.grad, net.b_out.grad] + [l.z.grad for l in layers]
    return kernels, grads


FUSED_CASES = [  # (z_dim, in_tile, out_tile, kernel_size, layer tile grids (rows, cols))
    (4, 16, 16, 7, [(1, 1)]),             # the paper's MNIST layer
    (64, 16, 16, 3, [(2, 2), (2, 4), (1, 1)]),
    (4, 3, 5, 1, [(2, 3), (1, 1)]),
    (6, 2, 3, 5, [(3, 1), (1, 2)]),
]


# float64 on the C++ backends; the Triton backend computes in float32 and refuses float64. The interpreter
# (Triton without a GPU) runs the small cases only: it takes milliseconds per program and loop step.
GENERATION_RUNS = backend_cases(
    [(b, d, c) for b in ("cpu", "cuda") for d in (torch.float64, torch.float32) for c in FUSED_CASES] +
    [("triton", torch.float32, c) for c in (FUSED_CASES if HAS_GPU else FUSED_CASES[:1] + FUSED_CASES[2:])],
    case_id=lambda v: "{}-z{}-in{}-out{}-k{}".format(str(v[0])[6:], *v[1][:4]))


@pytest.mark.parametrize("backend, dtype, case", GENERATION_RUNS)
def test_fused_generation_matches_reference(backend, dtype, case):
    z_dim, in_tile, out_tile, k, grids = case
    device = device_for(backend)
    net = randomize_(hyperfused.StaticHyperNetwork(z_dim, in_tile, out_tile, k, dtype=dtype)).to(device)
    layers = _layers(net, grids, device=device, dtype=dtype)
    ref_k, ref_g = _generate_and_grads(net, layers, "reference")
    got_k, got_g = _generate_and_grads(net, layers, backend)
    for a, b in zip(got_k + got_g, ref_k + ref_g, strict=True):
        # float32: gradients sum over many tiles in a different order, so the error scales with their size.
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-6 * b.abs().max().item())
        torch.testing.assert_close(a, b, **tol)


@requires_extension
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("library, in_onednn", [("onednn", True), ("mm", False), ("", None)],
                         ids=["onednn", "mm", "measured"])
def test_cpu_float32_generation_products_every_way(library, in_onednn, monkeypatch):
    """On the CPU in float32 the tiles' product (with b_out) and W_out's gradient run in at::mm or oneDNN's matmul,
    as the HyperLSTM's sequence products do (HYPERFUSED_STEP_GEMM forces one, else the faster measured): every way,
    the kernels and all gradients match the reference at the float32 tolerance of the fused test above."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    z_dim, in_tile, out_tile, k, grids = FUSED_CASES[1]
    net = randomize_(hyperfused.StaticHyperNetwork(z_dim, in_tile, out_tile, k, dtype=torch.float32))
    layers = _layers(net, grids, dtype=torch.float32)
    ref_k, ref_g = _generate_and_grads(net, layers, "reference")
    with torch.profiler.profile() as prof:
        got_k, got_g = _generate_and_grads(net, layers, "cpu")
    for a, b in zip(got_k + got_g, ref_k + ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * b.abs().max().item())
    if in_onednn is not None:
        assert ("hyperfused::onednn_sequence_gemm" in {e.name for e in prof.events()}) == in_onednn


@requires_extension
def test_gradcheck_cpu_generation_op():
    net = randomize_(hyperfused.StaticHyperNetwork(3, 2, 3, 3, dtype=torch.float64))
    layers = _layers(net, [(2, 1), (1, 2)])
    meta, spans, numel = hyperfused.ops.tile_layout([(l.out_channels, l.in_channels) for l in layers], 3, 2, 3)
    z = torch.cat([l.z for l in layers]).detach().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (net.w_in, net.b_in, net.w_out, net.b_out)]
    f = lambda z, *p: torch.ops.hyperfused.generate_kernels(z, *p, meta, numel, 3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, *params))


@requires_extension
def test_pytorch_einsum_path_matches_reference():
    net = randomize_(hyperfused.StaticHyperNetwork(5, 2, 3, 3, dtype=torch.float64))
    layers = _layers(net, [(2, 3), (1, 1)])
    ref_k, ref_g = _generate_and_grads(net, layers, "reference")
    net.backend = "reference"
    meta, spans, numel = hyperfused.ops.tile_layout([(l.out_channels, l.in_channels) for l in layers], 3, 2, 3)
    flat = hyperfused.ops.generate_kernels("torch", torch.cat([l.z for l in layers]), net.w_in, net.b_in,
                                           net.w_out, net.b_out, meta, numel, 3)
    for (off, n), k in zip(spans, ref_k, strict=True):
        torch.testing.assert_close(flat[off:off + n].view_as(k), k)


@requires_extension
def test_generation_op_checks_its_inputs():
    net = hyperfused.StaticHyperNetwork(4, 2, 2, 3, dtype=torch.float64)
    meta, _, numel = hyperfused.ops.tile_layout([(2, 2)], 2, 2, 3)
    z = torch.randn(1, 4, dtype=torch.float64)
    op = torch.ops.hyperfused.generate_kernels
    with pytest.raises(RuntimeError, match=r"'w_in' has shape \[2, 4, 4\], expected \(in_tile, hidden, 5\)"):
        op(torch.randn(1, 5, dtype=torch.float64), net.w_in, net.b_in, net.w_out, net.b_out, meta, numel, 3)
    with pytest.raises(RuntimeError, match=r"'b_out' has dtype Float, expected Double"):
        op(z, net.w_in, net.b_in, net.w_out, net.b_out.float(), meta, numel, 3)
    with pytest.raises(RuntimeError, match=r"'tile_meta' row 0 \(offset 0, row stride 18\) places a tile outside a buffer of 10 elements"):
        op(z, net.w_in, net.b_in, net.w_out, net.b_out, meta, 10, 3)
    with pytest.raises(RuntimeError, match=r"'tile_meta' must be a contiguous int64 tensor of shape \[1, 2\]"):
        op(z, net.w_in, net.b_in, net.w_out, net.b_out, meta.int(), numel, 3)


def test_dtype_mismatch_between_layer_and_hypernet():
    net = hyperfused.StaticHyperNetwork(z_dim=4)
    conv = hyperfused.HyperConv2d(16, 16, 3, hypernet=net)
    with pytest.raises(TypeError, match=r"input: expected dtype torch.float32 \(the layer's\), got torch.float64"):
        conv(torch.randn(1, 16, 5, 5, dtype=torch.float64))


def test_model_parameter_counts_are_close_to_the_papers():
    from hyperfused.models import PAPER_PARAMS, HyperWRN, count_parameters

    assert len(HyperWRN(40, 2).hyper_convs) == 36
    for kind, depth, widen in PAPER_PARAMS:
        ours = count_parameters(HyperWRN(depth, widen, hyper=kind == "hyper"))
        assert abs(ours - PAPER_PARAMS[kind, depth, widen]) / PAPER_PARAMS[kind, depth, widen] < 0.06, (kind, ours)


@requires_extension
def test_generation_traces_under_torch_compile_without_graph_breaks():
    net = hyperfused.StaticHyperNetwork(z_dim=4, in_tile=4, out_tile=4, kernel_size=3, backend="cpu")
    convs = [hyperfused.HyperConv2d(4, 8, 3, padding=1, hypernet=net), hyperfused.HyperConv2d(8, 8, 3, hypernet=net)]
    x = torch.randn(2, 4, 6, 6)

    def run(x):
        k1, k2 = net.generate(convs)
        return convs[1](convs[0](x, k1), k2)

    expected = run(x)
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert net.w_out.grad is not None and convs[0].z.grad is not None


# nn.Conv2d's options on a HyperConv2d: (kernel size, stride, padding, dilation, groups, bias, padding_mode).
# "same" pads d·(k - 1) in all, split unevenly where that is odd (k = 4, d = 1: one more on the right and at the
# bottom); a (2, 1) dilation pads the height and the width differently.
CONV_OPTIONS = [
    (3, 1, 0, 1, 1, False, "zeros"),
    (3, (2, 1), (1, 2), 1, 1, True, "zeros"),
    (3, 1, "same", 2, 1, False, "zeros"),
    (4, 1, "same", 1, 2, False, "zeros"),
    (3, 1, "valid", (1, 2), 2, True, "zeros"),
    (3, 2, 1, 1, 4, False, "reflect"),
    (3, 1, "same", (2, 1), 2, True, "circular"),
    (4, 1, "same", (1, 2), 1, False, "reflect"),
    (3, 1, (2, 1), 1, 1, False, "replicate"),
]


@pytest.mark.parametrize("k, stride, padding, dilation, groups, bias, padding_mode", CONV_OPTIONS)
@pytest.mark.parametrize("backend", ["reference", *backend_params("cpu", "cuda", "triton")])
def test_hyper_conv2d_options_act_as_nn_conv2ds(backend, k, stride, padding, dilation, groups, bias, padding_mode):
    """nn.Conv2d with the same options and the generated kernel as its weight: the same output, exactly (the
    same convolution), and the same gradients of the input, the kernel and the bias; the kernel is
    (out, in / groups, k, k) and the embeddings' gradients reach the hypernetwork. float64 (Triton: float32)."""
    device, dtype = device_for(backend), torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    net = hyperfused.StaticHyperNetwork(z_dim=3, in_tile=2, out_tile=4, kernel_size=k, backend=backend,
                                        dtype=dtype, device=device)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    conv = hyperfused.HyperConv2d(8, 8, k, hypernet=net, **kw)
    kernel = net([conv])[0]
    assert kernel.shape == conv.weight_shape == (8, 8 // groups, k, k)
    plain = torch.nn.Conv2d(8, 8, k, **kw, dtype=dtype, device=device)
    with torch.no_grad():
        plain.weight.copy_(kernel)
        if bias:
            plain.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 9, 7, dtype=dtype, device=device)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    out, expected = conv(xs[0]), plain(xs[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    if bias:
        torch.testing.assert_close(conv.bias.grad, plain.bias.grad)
    # the kernel's gradient, carried to z: z's gradient is that of <kernel, plain.weight.grad>
    z_grad = torch.autograd.grad((net([conv])[0] * plain.weight.grad).sum(), conv.z)[0]
    torch.testing.assert_close(conv.z.grad, z_grad)


def test_hyper_conv2d_is_bias_free_by_default_and_keeps_its_state_dict_keys():
    """bias=False by default (the paper's layers): no bias in the state dict, so that earlier checkpoints load;
    bias=True adds nn.Conv2d's, initialised within its ±1/√(in/groups·k²)."""
    net = hyperfused.StaticHyperNetwork(z_dim=3, in_tile=2, out_tile=4, kernel_size=3)
    assert "bias" not in hyperfused.HyperConv2d(8, 8, 3, hypernet=net).state_dict()
    conv = hyperfused.HyperConv2d(8, 8, 3, hypernet=net, bias=True, groups=2)
    assert conv.bias.shape == (8,) and conv.bias.abs().max() <= 1 / (4 * 9) ** 0.5 and conv.bias.abs().sum() > 0
    assert "groups=2, bias=True" in repr(conv)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(groups=3), ValueError, r"in_channels: expected a multiple of groups=3"),
    (dict(groups=8), ValueError, r"in_channels: expected a multiple of groups=8 whose share per group is a multiple "
                                 r"of the hypernet's tile size 2, got 8"),
    (dict(groups=0), ValueError, r"groups: expected a positive int, got 0"),
    (dict(padding="same", stride=2), ValueError, r"padding: 'same' needs stride 1 \(as nn.Conv2d\), got stride=\(2, 2\)"),
    (dict(padding="full"), ValueError, r"padding: expected 'valid', 'same', a non-negative int or a pair of them"),
    (dict(padding=(1, 2, 3)), ValueError, r"padding: expected a non-negative int or a pair of them, got \(1, 2, 3\)"),
    (dict(stride=(1, 0)), ValueError, r"stride: expected a positive int or a pair of them, got \(1, 0\)"),
    (dict(dilation=0), ValueError, r"dilation: expected a positive int or a pair of them, got 0"),
    (dict(padding_mode="mirror"), ValueError, r"padding_mode: expected one of \('zeros', 'reflect'"),
    (dict(bias="yes"), TypeError, r"bias: expected a bool, got 'yes'"),
])
def test_hyper_conv2d_refuses_bad_options_by_name(kwargs, error, match):
    net = hyperfused.StaticHyperNetwork(z_dim=3, in_tile=2, out_tile=4, kernel_size=3)
    with pytest.raises(error, match=match):
        hyperfused.HyperConv2d(8, 8, 3, hypernet=net, **kwargs)
