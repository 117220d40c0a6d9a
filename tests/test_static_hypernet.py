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


def test_generate_refuses_layers_of_another_hypernet():
    a, b = hyperfused.StaticHyperNetwork(z_dim=4), hyperfused.StaticHyperNetwork(z_dim=4)
    conv = hyperfused.HyperConv2d(16, 16, 3, hypernet=b)
    with pytest.raises(ValueError, match=r"layers\[0\]: this HyperConv2d is served by another"):
        a.generate([conv])
