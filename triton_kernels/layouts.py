"""The per-row workspace layouts of the HyperLSTM step kernels, read from workspace_layouts.def, the file the
C++/CUDA kernels include as an X-macro: one definition for every backend (no Triton import here, so the ops'
fake implementations can read it without Triton)."""
from __future__ import annotations

import functools
import os
import re

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workspace_layouts.def")


@functools.lru_cache(maxsize=None)
def _slots() -> dict:
    with open(SPEC) as f:
        text = re.sub(r"//[^\n]*", "", f.read())
    slots = {"WS": [], "DWS": []}
    for kind, args in re.findall(r"HF_(WS|DWS)_SLOT\(([^)]*)\)", text):
        name, *numbers = (a.strip() for a in args.split(","))
        slots[kind].append((name, *(int(v) for v in numbers)))
    return slots


# Not cached: the fakes call these with symbolic sizes under torch.compile.
def _offsets(kind: str, H: int, Hh: int, Nz: int, ln_rows: bool = True) -> dict:
    out, at = {}, 0
    for name, h, hh, nz, c, *ln in _slots()[kind]:
        if ln and ln[0] and not ln_rows:
            out[name] = -1
            continue
        out[name] = at
        at += h * H + hh * Hh + nz * Nz + c
    out["width"] = at
    return out


def ws_layout(H: int, Hh: int, Nz: int) -> dict:
    """Offset of each forward-workspace slot in a row (n, cn, z, hn, hcn, rstd, crstd, hrstd, hcrstd), and
    "width"."""
    return _offsets("WS", H, Hh, Nz)


def dws_layout(H: int, Hh: int, Nz: int, ln_rows: bool = True) -> dict:
    """Offset of each backward-workspace slot in a row (da, dy, dcout, dz, dyh, dhcout; -1 for a main-LN slot
    left out), and "width"."""
    return _offsets("DWS", H, Hh, Nz, ln_rows)
