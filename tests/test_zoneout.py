"""Zoneout (Krueger et al. 2016) on h and ĥ, as haste applies it: masks from torch's RNG in training, the
expectation at evaluation; every backend against the reference, with every gradient."""
import pytest
import torch

import hyperfused
from conftest import backend_params, device_for
from helpers import assert_same_run, make_pair, random_state

F32 = dict(rtol=2e-4, atol=2e-5)
F64 = dict(rtol=1e-9, atol=1e-10)


def test_reference_zoneout_keeps_or_takes_each_unit():
    m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, zoneout=0.5, hyper_zoneout=0.5,
                             backend="reference")
    x = torch.randn(4, 2, 3)
    torch.manual_seed(0)
    out, _ = m(x)
    torch.manual_seed(0)
    m_keep_all = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, backend="reference")
    m_keep_all.load_state_dict(m.state_dict())
    plain, _ = m_keep_all(x)
    # Where a unit zoned out its h stays the previous step's exactly; elsewhere it moved.
    stayed = (out[1:] == out[:-1])
    assert stayed.any() and (~stayed).any()
    assert not torch.equal(out, plain)
    m.eval()
    expected_eval, _ = m(x)  # the expectation: no randomness
    assert torch.equal(expected_eval, m(x)[0])


RUNS = backend_params("cpu", "cuda", "triton")


@pytest.mark.parametrize("backend", RUNS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zoneout_matches_reference_with_every_gradient(backend, layer_norm, training):
    device = device_for(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    ref, fast = make_pair(backend, 4, 11, hyper_size=6, hyper_embed=3, layer_norm=layer_norm, zoneout=0.3,
                          hyper_zoneout=0.4, recurrent_dropout=0.2, dtype=dtype)
    ref, fast = ref.to(device).train(training), fast.to(device).train(training)
    x = torch.randn(5, 3, 4, dtype=dtype, device=device)
    state = random_state(ref, 3, dtype)
    assert_same_run(ref, fast, x, state, **(F64 if dtype == torch.float64 else F32), seed=7)


@pytest.mark.skipif(not hyperfused.HAS_EXTENSION, reason="hyperfused._C not built (run scripts/bootstrap.sh)")
def test_gradcheck_cpu_op_with_zoneout():
    m = hyperfused.HyperLSTM(3, 5, hyper_size=4, hyper_embed=2, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_(p.requires_grad) for p in m.cells[0].flat_params()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (5, 5, 4, 4)]
    zm = torch.bernoulli(torch.full((3, 2, 5), 0.6, dtype=torch.float64))
    hzm = torch.full((3, 2, 4), 0.7, dtype=torch.float64)
    trainable = [p for p in params if p.requires_grad]

    def f(x, h0, c0, hh0, hc0, *ps):
        it = iter(ps)
        full = [next(it) if p.requires_grad else p for p in params]
        return tuple(torch.ops.hyperfused.hyper_lstm_forward(x, h0, c0, hh0, hc0, full, None, None, True, 1.0, zm,
                                                             hzm)[:4])

    assert torch.autograd.gradcheck(f, (x, *state, *trainable))
