"""The one place that decides which implementation runs: `resolve_backend`."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .._extension import EXTENSION_ERROR, HAS_EXTENSION

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def _has_cuda_kernels() -> bool:
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("hyperfused::hyper_lstm_forward", "CUDA")


# Read once, at import, as Triton reads TRITON_INTERPRET when its kernels are defined: constants, which
# torch.compile need not trace (torch 2.11's Dynamo refuses to trace importlib.util.find_spec).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED = _TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreted() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors (tests only)."""
    return _TRITON_INTERPRETED


def _has_triton() -> bool:
    """Triton kernels need a CUDA device, or the interpreter (tests)."""
    if not _TRITON_INSTALLED:
        return False
    return torch.cuda.is_available() or triton_interpreted()


def _probe_backends() -> tuple:
    names = ["reference"]
    if HAS_EXTENSION:
        names.append("cpu")
    if _has_cuda_kernels():
        names.append("cuda")
    if _has_triton():
        names.append("triton")
    return tuple(names)


# Fixed for the life of the process; a constant also keeps torch.compile from tracing the probes.
_AVAILABLE = _probe_backends()


def available_backends() -> list[str]:
    """The backends this build can run, for some device."""
    return list(_AVAILABLE)


def _why_missing(name: str) -> str:
    if name in ("cpu", "cuda") and not HAS_EXTENSION:
        return str(EXTENSION_ERROR)
    if name == "cuda":
        return "the extension was built without CUDA (torch without CUDA, or nvcc not found at build time)"
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for tests on CPU)"
    return "unknown"


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name != "auto" and name not in available_backends():
        raise ValueError(f"backend={name!r} is not available: {_why_missing(name)}. "
                         f"Available backends: {available_backends()}")
    return name


def backends_for(device: torch.device) -> list[str]:
    """Available backends that can run on tensors of `device`."""
    fits = ("reference", "cuda", "triton") if device.type == "cuda" else \
        ("reference", "cpu", "triton") if triton_interpreted() else ("reference", "cpu")
    return [b for b in available_backends() if b in fits]


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing a model (either exporter). Without importing torch.onnx: where
    nothing has imported it, nothing is exporting."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def jit_tracing() -> bool:
    """Whether torch.jit.trace (or torch.onnx.export(dynamo=False), which traces with it) is recording. It passes
    a tuple input as a plain tuple and flattens a returned one to its items, so a HyperLSTMState's hyper part is
    neither an input nor an output of the trace, and any tensor read from elsewhere becomes a constant."""
    return not torch.compiler.is_compiling() and torch.jit.is_tracing()


def func_transforming() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, jacrev, ...) is running. The fused ops' autograd (C++,
    and the Triton ops' Python Function) and their lack of batching rules cannot run under one. (Under
    torch.compile the question is not asked: its graphs are not functorch's.)"""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def exporting() -> bool:
    """Whether torch.export is tracing. torch.compiler.is_exporting() answers from a flag that export sets, but
    Dynamo in some releases (torch 2.11 among them) replaces that call with True in every graph it traces,
    torch.compile's included; the flag itself it reads as the value it has (a guarded constant)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad.dual_level is open: the fused ops' autograd has no forward-mode
    (jvp) rule, and a dual tensor may be among the inputs."""
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0


def reference_only() -> bool:
    """Whether only plain PyTorch can run now: torch.onnx.export tracing, a torch.func transform, or
    forward-mode AD."""
    return onnx_exporting() or func_transforming() or forward_ad_active()


# (name, device) -> the backend resolve_backend found there: what is available is fixed for the process (as is
# TRITON_INTERPRET, for the tests: set before hyperfused is imported, it decides whether Triton is available)
_RESOLVED: dict = {}


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for `name` on `device`; raises ValueError if it cannot run there.

    While torch.onnx.export traces, the reference whatever `name` is: an ONNX graph holds standard operators
    only, and the reference computes the same function from them (as nn.LSTM exports as ONNX's LSTM). Under a
    torch.func transform or in forward-mode AD, "auto" is the reference too (its plain PyTorch ops have every
    transform's rules, and forward derivatives); a fused backend named there is an error."""
    # Remembered (every module's every call asks: 3 µs of a decode step's Python otherwise), except under
    # torch.compile, which traces the answer into its graph.
    key = (name, device)
    backend = None if torch.compiler.is_compiling() else _RESOLVED.get(key)
    if backend is None:
        backend = _resolve(name, device)
        if not torch.compiler.is_compiling():
            _RESOLVED[key] = backend
    if backend == "reference" or not reference_only():
        return backend
    if name == "auto" or onnx_exporting():
        return "reference"
    under = ("a torch.func transform (grad, vjp, vmap, ...)" if func_transforming() else
             "forward-mode AD (a torch.autograd.forward_ad.dual_level)")
    raise ValueError(f"backend={name!r} cannot run under {under}: the fused ops' autograd has no rules for it. "
                     "backend='auto' runs the reference there")


def _resolve(name: str, device: torch.device) -> str:
    check_backend_name(name)
    usable = backends_for(device)
    if name == "auto":  # never Triton on CPU: the interpreter is for tests only
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(b for b in order if b in usable)
    if name not in usable:
        raise ValueError(f"backend={name!r} cannot run on device {device}; backends for {device.type} tensors: "
                         f"{usable}")
    return name
