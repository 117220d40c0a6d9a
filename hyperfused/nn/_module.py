"""The base of hyperfused's modules."""
from __future__ import annotations

import torch
from torch import nn


class Module(nn.Module):
    """nn.Module with a clear refusal of TorchScript: torch.jit.script would otherwise stop at the first Python
    construct it cannot type, far from anything the user wrote. The modules pick their fused op in Python by
    device, dtype and mode, which TorchScript cannot compile; torch.export and torch.compile can."""

    def __prepare_scriptable__(self):
        raise RuntimeError(f"torch.jit.script: {type(self).__name__} cannot be compiled by TorchScript; capture it "
                           "with torch.export.export(module, args), or compile it with torch.compile")

    def _fx_node(self, *args):
        """Under torch.fx.symbolic_trace (an argument is a Proxy): this call as one call_module node, the
        proxy of its result, as FX records torch.nn's own modules (nn.LSTM, nn.Conv2d) rather than tracing
        through them. A forward that checks its inputs and picks its op by their device, dtype and grad mode
        cannot run on proxies, which have none. Else None: an ordinary call."""
        for a in args:
            if isinstance(a, torch.fx.Proxy):
                return a.tracer.create_proxy("call_module", self._fx_path(a.tracer), args, {})
        return None

    def _fx_path(self, tracer) -> str:
        """This module's name in the model being traced; tracing it as the root is refused (its one call
        would be the whole graph, a call of itself)."""
        path = tracer.path_of_module(self)
        if not path:
            raise RuntimeError(f"torch.fx.symbolic_trace: {type(self).__name__} is recorded as one call of it "
                               "inside a model that holds it (as FX records nn.LSTM), not traced as the root: "
                               "trace the model around it, or capture it with torch.export.export")
        return path
