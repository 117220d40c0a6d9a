"""pytest-benchmark timings of the core ops (not part of the test command):

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch

import hyperfused
from hyperfused.models import HyperWRN

T, B, X, H, HH, NZ = 50, 16, 64, 128, 64, 8


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(T, B, X)


def _fwd_bwd(m, x):
    def run():
        m.zero_grad(set_to_none=True)
        m(x)[0].sum().backward()
    return run


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in hyperfused.available_backends()])
def test_hyper_lstm_fwd_bwd(benchmark, x, backend):
    m = hyperfused.HyperLSTM(X, H, hyper_size=HH, hyper_embed=NZ, backend=backend)
    benchmark(_fwd_bwd(m, x))


def test_nn_lstm_fwd_bwd(benchmark, x):
    benchmark(_fwd_bwd(torch.nn.LSTM(X, H), x))


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in hyperfused.available_backends()])
def test_static_generation_fwd_bwd(benchmark, backend):
    model = HyperWRN(16, 2, backend=backend)

    def run():
        model.zero_grad(set_to_none=True)
        sum(k.sum() for k in model.generate_kernels()).backward()
    benchmark(run)
