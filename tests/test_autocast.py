"""Under torch.autocast the fused ops still compute in their inputs' dtype: autocast stops at the op's
boundary. (The ops read the outputs of the GEMMs they call through pointers of the inputs' dtype; before
this was guarded, autocast turned those GEMMs to bfloat16 and the ops returned garbage.)"""
import pytest
import torch

import hyperfused
from conftest import HAS_GPU, backend_params, device_for

DEVICE = "cuda" if HAS_GPU else "cpu"
LOW = torch.float16 if HAS_GPU else torch.bfloat16
BACKENDS = backend_params("cpu", "cuda", "triton")


def _lstm_run(m, x):
    m.zero_grad()
    out, (h, c) = m(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    return [out, h, c] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_lstm_under_autocast_matches_float32(backend):
    device = device_for(backend)
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend=backend, device=device)
    x = torch.randn(3, 2, 6, device=device)
    plain = _lstm_run(m, x)
    with torch.autocast(device, dtype=LOW if device == DEVICE else torch.bfloat16):
        mixed = _lstm_run(m, x)
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


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
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(a, b)


def test_reference_is_left_to_autocast():
    """Only the fused ops opt out: the reference is plain PyTorch, and autocast runs its GEMMs in low precision."""
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend="reference", device=DEVICE)
    x = torch.randn(3, 2, 6, device=DEVICE)
    plain, _ = m(x)
    with torch.autocast(DEVICE, dtype=LOW):
        mixed, _ = m(x)
    assert (mixed.float() - plain).abs().max() > 1e-4  # low-precision GEMMs, far above float32 rounding
