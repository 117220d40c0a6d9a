"""The workspace layouts are defined once, in triton_kernels/workspace_layouts.def: the C++/CUDA kernels include
it, the Triton kernels and the ops' fakes read it (hyperfused.triton_kernels.layouts). Each backend's saved
workspace must hold what the layout says where it says: the embeddings z and the normalised hyper gates are
checked against the reference at their slots."""
import pytest
import torch

import hyperfused
from hyperfused import reference
from hyperfused._triton_kernels import layouts
from helpers import randomize_

SIZES = [(37, 5, 3), (8, 6, 2)]  # (H, Ĥ, N_z): odd, and small


@pytest.mark.parametrize("H,Hh,Nz", SIZES)
def test_slots_are_contiguous_in_the_listed_order(H, Hh, Nz):
    ws = layouts().ws_layout(H, Hh, Nz)
    assert list(ws)[:-1] == ["n", "cn", "z", "hn", "hcn", "rstd", "crstd", "hrstd", "hcrstd"]
    widths = dict(n=4 * H, cn=H, z=12 * Nz, hn=4 * Hh, hcn=Hh, rstd=4, crstd=1, hrstd=4, hcrstd=1)
    at = 0
    for name, width in widths.items():
        assert ws[name] == at, name
        at += width
    assert ws["width"] == at
    full, lean = layouts().dws_layout(H, Hh, Nz), layouts().dws_layout(H, Hh, Nz, ln_rows=False)
    assert full["width"] - lean["width"] == 5 * H + 5 * Hh  # dy, dcout, dyh, dhcout left out
    assert lean["dy"] == lean["dcout"] == lean["dyh"] == lean["dhcout"] == -1
    assert lean["da"] == 0 and lean["dz"] == 4 * H and lean["width"] == 4 * H + 12 * Nz


def _saved_workspace(backend, H, Hh, Nz):
    torch.manual_seed(0)
    cell = randomize_(hyperfused.HyperLSTMCell(4, H, hyper_size=Hh, hyper_embed=Nz), scale=0.3)
    T, B = 3, 2
    x = torch.randn(T, B, 4)
    zeros = lambda n: torch.zeros(B, n)  # noqa: E731
    params = [p.detach() for p in cell.flat_params()]
    args = (x, zeros(H), zeros(H), zeros(Hh), zeros(Hh), params)
    if backend == "cpu":
        out = torch.ops.hyperfused.hyper_lstm_forward(*args, None, None, True, 1.0, None, None, True)
    else:
        out = hyperfused.triton_kernels.hyper_lstm.forward(*args, None, None, True, 1.0)
    return out[2], out[5], reference.HyperLSTMParams(*params)


@pytest.mark.parametrize("H,Hh,Nz", SIZES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_each_backend_stores_the_slots_where_the_layout_says(backend, H, Hh, Nz):
    if backend not in hyperfused.available_backends():
        pytest.skip(f"the {backend} backend is not available in this build")
    hhs, ws, p = _saved_workspace(backend, H, Hh, Nz)
    L = layouts().ws_layout(H, Hh, Nz)
    assert ws.shape[-1] == L["width"]
    z = reference.hyper_lstm.embeddings(hhs, p)
    expected = torch.cat([z[k, y] for k in ("h", "x", "b") for y in ("i", "f", "g", "o")], -1)
    torch.testing.assert_close(ws[..., L["z"]:L["z"] + 12 * Nz], expected, rtol=1e-4, atol=1e-5)
    hn = ws[..., L["hn"]:L["hn"] + 4 * Hh].reshape(*hhs.shape[:2], 4, Hh)  # each hyper gate normalised
    torch.testing.assert_close(hn.mean(-1), torch.zeros_like(hn[..., 0]), rtol=0, atol=1e-5)
    assert (hn.var(-1, unbiased=False) > 0.5).all()
