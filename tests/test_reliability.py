"""Malformed input is a clear error, the raw ops cannot be crashed, half-precision modules construct."""
import os
import random
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hyperfused
from conftest import requires_extension

CLASSES = {
    "HyperLSTM": lambda **kw: hyperfused.HyperLSTM(**{"input_size": 4, "hidden_size": 6, **kw}),
    "HyperLSTMCell": lambda **kw: hyperfused.HyperLSTMCell(**{"input_size": 4, "hidden_size": 6, **kw}),
    "StaticHyperNetwork": lambda **kw: hyperfused.StaticHyperNetwork(**{"z_dim": 4, **kw}),
    "HyperConv2d": lambda **kw: hyperfused.HyperConv2d(**{"in_channels": 16, "out_channels": 16,
                                                          "kernel_size": 3, **kw}),
}


@pytest.mark.parametrize("cls", ["HyperLSTM", "HyperLSTMCell"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_construct_and_run(cls, dtype):
    """nn.init.orthogonal_ has no half-precision QR on the CPU; the weights are drawn in float32 and cast."""
    m = CLASSES[cls](hyper_size=5, hyper_embed=2, dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    w = m.cells[0].weight_ih if cls == "HyperLSTM" else m.weight_ih
    gram = w.float().T @ w.float()  # orthogonal columns, up to the dtype's rounding
    torch.testing.assert_close(gram, torch.eye(4), atol=0.05, rtol=0)
    x = torch.randn(3, 2, 4, dtype=dtype) if cls == "HyperLSTM" else torch.randn(2, 4, dtype=dtype)
    out = m(x)[0]
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("cls, kwargs, exc, match", [
    ("HyperLSTM", dict(dropout="0.5"), TypeError, r"dropout: expected a real number, got '0.5'"),
    ("HyperLSTM", dict(forget_bias="a"), TypeError, r"forget_bias: expected a real number, got 'a'"),
    ("HyperLSTM", dict(layer_norm="no"), TypeError, r"layer_norm: expected a bool, got 'no'"),
    ("HyperLSTM", dict(hidden_size=True), ValueError, r"hidden_size: expected a positive int, got True"),
    ("HyperLSTM", dict(num_layers=2.0), ValueError, r"num_layers: expected a positive int, got 2.0"),
    ("HyperLSTM", dict(dropout=1.5), ValueError, r"dropout: expected a probability in \[0, 1\], got 1.5"),
    ("HyperLSTM", dict(recurrent_dropout=1.0), ValueError, r"recurrent_dropout: expected a probability in \[0, 1\)"),
    ("HyperLSTM", dict(bidirectional="yes"), TypeError, r"bidirectional: expected a bool, got 'yes'"),
    ("HyperLSTM", dict(batch_first=None), TypeError, r"batch_first: expected a bool, got None"),
    ("HyperLSTM", dict(forget_bias=float("nan")), TypeError, r"forget_bias: expected a real number, got nan"),
    ("HyperLSTMCell", dict(hyper_embed=0), ValueError, r"hyper_embed: expected a positive int, got 0"),
    ("HyperLSTMCell", dict(bias="False"), TypeError, r"bias: expected a bool, got 'False'"),
    ("StaticHyperNetwork", dict(in_tile=True), ValueError, r"in_tile: expected a positive int, got True"),
    ("StaticHyperNetwork", dict(z_dim=True), ValueError, r"z_dim: expected a positive int, got True"),
    ("StaticHyperNetwork", dict(kernel_size="3"), ValueError, r"kernel_size: expected a positive int, got '3'"),
    ("HyperConv2d", dict(stride=0), ValueError, r"stride: expected a positive int or a pair of them, got 0"),
    ("HyperConv2d", dict(padding=-1), ValueError, r"padding: expected a non-negative int or a pair of them, got -1"),
    ("HyperConv2d", dict(in_channels=True), ValueError, r"in_channels: expected a positive multiple"),
])
def test_constructor_arguments_are_checked_and_named(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CLASSES[cls](**kwargs)


def test_generate_nothing_gives_nothing():
    net = hyperfused.StaticHyperNetwork(z_dim=4)
    assert net.generate([]) == []
    with pytest.raises(TypeError, match="layers: expected a sequence of HyperConv2d, got HyperConv2d"):
        net.generate(hyperfused.HyperConv2d(16, 16, 3, hypernet=net))


# -- the fake (meta) implementations check what the real ops check --------------------------------------

def _lstm_op_args(device="cpu"):
    m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2)
    params = [p.detach().to(device) for p in m.cells[0].flat_params()]
    x = torch.randn(2, 1, 3, device=device)
    state = [torch.zeros(1, n, device=device) for n in (5, 5, 4, 4)]
    return x, state, params


@requires_extension
@pytest.mark.parametrize("change, match", [
    (lambda x, s, p: (x, s, p[:1] + [torch.zeros(20, 4)] + p[2:]), r"'weight_hh' has shape \[20, 4\], expected \[20, 5\]"),
    (lambda x, s, p: (x, s, p[:5]), r"'params' must hold 19 tensors, got 5"),
    (lambda x, s, p: (x[0], s, p), r"'x' must have shape \(T, B, input_size\)"),
    (lambda x, s, p: (x, [s[0], s[1].double(), *s[2:]], p), r"'c0' has dtype torch.float64, expected torch.float32"),
])
def test_fake_lstm_op_checks_like_the_real_one(change, match):
    x, state, params = _lstm_op_args()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, state, params = change(x, state, params)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.hyperfused.hyper_lstm_forward(x, *state, params, None, None, True, 1.0)


@requires_extension
def test_one_meta_argument_among_cpu_tensors_is_an_error():
    """The dispatcher sends a call with any meta tensor to the fake, which used to return meta outputs."""
    x, state, params = _lstm_op_args()
    with pytest.raises(RuntimeError, match=r"'h0' is on meta but 'x' is on cpu"):
        torch.ops.hyperfused.hyper_lstm_forward(x, state[0].to("meta"), *state[1:], params, None, None, True, 1.0)
    net = hyperfused.StaticHyperNetwork(3, 2, 3, 3)
    meta, _, numel = hyperfused.ops.tile_layout([(3, 2)], 3, 2, 3)
    with pytest.raises(RuntimeError, match=r"'b_in' is on meta but 'z' is on cpu"):
        torch.ops.hyperfused.generate_kernels(torch.randn(1, 3), net.w_in.detach(), net.b_in.detach().to("meta"),
                                              net.w_out.detach(), net.b_out.detach(), meta, numel, 3)


@requires_extension
def test_fake_generation_op_checks_like_the_real_one():
    net = hyperfused.StaticHyperNetwork(3, 2, 3, 3)
    meta, _, numel = hyperfused.ops.tile_layout([(3, 2)], 3, 2, 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        z = torch.randn(1, 4)
        with pytest.raises(RuntimeError, match=r"'w_in' has shape \[2, 3, 3\], expected \(in_tile, hidden, 4\)"):
            torch.ops.hyperfused.generate_kernels(z, net.w_in.detach(), net.b_in.detach(), net.w_out.detach(),
                                                  net.b_out.detach(), meta, numel, 3)
        with pytest.raises(RuntimeError, match=r"'kernel_size' must be in \[1, 1024\]"):
            torch.ops.hyperfused.generate_kernels(torch.randn(1, 3), net.w_in.detach(), net.b_in.detach(),
                                                  net.w_out.detach(), net.b_out.detach(), meta, numel, 0)


# -- fuzzing: modules in this process, raw ops in a subprocess (a crash fails the test, not the run) -------

def _random_value(rng):
    return rng.choice([0, 1, -1, 3, 2 ** 40, 2.5, -0.5, float("nan"), True, None, "x", (2,), [], 1e-9])


@pytest.mark.parametrize("cls", list(CLASSES))
def test_fuzz_constructors_fail_clearly_or_build(cls):
    """Random values for each argument: either a module, or a ValueError/TypeError naming that argument."""
    rng = random.Random(zlib_seed(cls))
    names = {"HyperLSTM": ["num_layers", "bias", "dropout", "hyper_size", "hyper_embed", "layer_norm", "forget_bias",
                           "recurrent_dropout", "batch_first", "bidirectional"],
             "HyperLSTMCell": ["hyper_size", "hyper_embed", "layer_norm", "forget_bias", "recurrent_dropout", "bias"],
             "StaticHyperNetwork": ["in_tile", "out_tile", "kernel_size", "z_dim"],
             "HyperConv2d": ["stride", "padding", "in_channels", "out_channels", "dilation", "groups", "bias",
                             "padding_mode"]}[cls]
    for _ in range(60):
        name, value = rng.choice(names), _random_value(rng)
        if name in ("hyper_size", "hyper_embed", "num_layers", "z_dim", "in_tile", "out_tile", "in_channels",
                    "out_channels") and value == 2 ** 40:
            continue  # valid, but far too large to allocate
        try:
            CLASSES[cls](**{name: value})
        except (ValueError, TypeError) as e:
            assert str(e).startswith(f"{name}:") or name in str(e), (name, value, e)


def zlib_seed(text):
    import zlib
    return zlib.crc32(text.encode())


_RAW_FUZZ = r"""
import random, sys, torch, hyperfused
rng = random.Random(1234)
m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2)
params = [p.detach() for p in m.cells[0].flat_params()]
net = hyperfused.StaticHyperNetwork(3, 2, 3, 3)
gp = [t.detach() for t in (net.w_in, net.b_in, net.w_out, net.b_out)]
big = [0, 1, -1, 7, 2 ** 31, 2 ** 32, 2 ** 62, -(2 ** 62), 2 ** 63 - 1, -(2 ** 63)]
def tensor(shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-5, 50, shape, dtype=dtype)
cases = 0
for i in range(int(sys.argv[1])):
    kind = rng.random()
    try:
        if kind < 0.5:  # tile metadata and sizes
            tiles = rng.choice([1, 2])
            meta = torch.tensor([[rng.choice(big), rng.choice(big)] for _ in range(tiles)])
            z = torch.randn(tiles, rng.choice([3, 3, 2]))
            numel = rng.choice([0, 10, 54, 108, 2 ** 40, -1])
            if numel == 2 ** 40:
                numel = 108
            torch.ops.hyperfused.generate_kernels(z, *gp, meta, numel, rng.choice([3, 3, 1, 0, -3, 2 ** 32, 2 ** 31]))
        else:  # LSTM op with one argument of the wrong shape, dtype or rank
            args = [torch.randn(2, 1, 3)] + [torch.zeros(1, n) for n in (5, 5, 4, 4)]
            ps = list(params)
            which = rng.randrange(len(args) + len(ps))
            bad = rng.choice(["shape", "dtype", "rank", "empty"])
            target = args[which] if which < len(args) else ps[which - len(args)]
            new = {"shape": lambda t: torch.zeros(*(s + 1 for s in t.shape)),
                   "dtype": lambda t: t.double(), "rank": lambda t: t.reshape(-1),
                   "empty": lambda t: torch.zeros(0, *t.shape[1:])}[bad](target)
            if which < len(args):
                args[which] = new
            else:
                ps[which - len(args)] = new
            torch.ops.hyperfused.hyper_lstm_forward(*args, ps, None, None, True, 1.0)
    except RuntimeError as e:
        assert "hyperfused::" in str(e), str(e)[:300]
    cases += 1
    print("case", i, flush=True)
print("DONE", cases)
"""


@requires_extension
def test_fuzz_raw_ops_never_crash():
    """A few hundred malformed raw-op calls: each ends in a RuntimeError from the op's own checks (naming
    hyperfused::...) or a result, never a crash. A crash shows as a non-zero exit, with the case it hit."""
    run = subprocess.run([sys.executable, "-c", _RAW_FUZZ, "300"], capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1:] or ["(no case ran)"]
    assert run.returncode == 0 and "DONE 300" in run.stdout, (run.returncode, last, run.stderr[-2000:])


@requires_extension
def test_nan_in_the_input_propagates_as_in_the_reference():
    from helpers import make_pair
    ref, fast = make_pair("cpu", 3, 7, hyper_size=5, hyper_embed=2)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    x[1, 2, 0] = float("nan")  # sample 2 from step 1 on
    out_r, st_r = ref(x)
    out_f, st_f = fast(x)
    torch.testing.assert_close(out_f, out_r, equal_nan=True)
    assert out_f[:1].isfinite().all() and out_f[1:, 2].isnan().all() and out_f[:, :2].isfinite().all()
    torch.testing.assert_close(st_f.hyper_c, st_r.hyper_c, equal_nan=True)


def _resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@requires_extension
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read resident memory")
def test_no_memory_growth_over_200_training_iterations():
    # Each iteration saves about 5 MB for backward (T·B rows of 11H + 11Ĥ + 12N_z + 10 floats plus the
    # outputs): keeping one iteration's worth alive per iteration would grow by hundreds of MB.
    m = hyperfused.HyperLSTM(8, 128, hyper_size=16, hyper_embed=4, backend="cpu")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randn(50, 16, 8)
    state = None
    rss = []
    for i in range(200):
        out, state = m(x, state)
        state = state.detach()
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i in (50, 199):
            rss.append(_resident_mb())
    assert rss[1] - rss[0] < 16, rss  # a leak of the graph or the saved buffers would add MBs per iteration
