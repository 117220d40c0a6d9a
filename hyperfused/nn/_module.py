"""The base of hyperfused's modules."""
from __future__ import annotations

from torch import nn


class Module(nn.Module):
    """nn.Module with a clear refusal of TorchScript: torch.jit.script would otherwise stop at the first Python
    construct it cannot type, far from anything the user wrote. The modules pick their fused op in Python by
    device, dtype and mode, which TorchScript cannot compile; torch.export and torch.compile can."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"torch.jit.script: {type(self).__name__} cannot be compiled by TorchScript; capture it "
                           "with torch.export.export(module, args), or compile it with torch.compile")
