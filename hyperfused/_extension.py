"""Loads the compiled extension hyperfused._C, which registers the torch.ops.hyperfused.* operators.

The package works without it (the reference backend needs no compiled code); `EXTENSION_ERROR` says why it
is missing. Setting HYPERFUSED_NO_EXTENSION=1 skips loading it, to exercise that path.
"""
import os

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

EXTENSION_ERROR = None
if os.environ.get("HYPERFUSED_NO_EXTENSION") == "1":
    _C = None
    EXTENSION_ERROR = "disabled by HYPERFUSED_NO_EXTENSION=1"
else:
    try:
        from . import _C  # noqa: F401  (import side effect: operator registration)
    except ImportError as e:  # not built: pip install --no-build-isolation .
        _C = None
        EXTENSION_ERROR = f"hyperfused._C is not built ({e})"

HAS_EXTENSION = _C is not None


def empty_cpu_buffer_cache() -> int:
    """Frees the memory the fused CPU ops keep for their next call (their large buffers, reused when freed:
    HYPERFUSED_CPU_BUFFER_CACHE_MB caps it, default 1024, 0 turns the reuse off), as torch.cuda.empty_cache
    does for CUDA's caching allocator. Returns the bytes freed (0 without the extension)."""
    return _C.empty_cpu_buffer_cache() if _C is not None else 0


def cpu_buffer_cache_bytes() -> int:
    """Bytes the fused CPU ops hold cached for reuse now (0 without the extension)."""
    return _C.cpu_buffer_cache_bytes() if _C is not None else 0
