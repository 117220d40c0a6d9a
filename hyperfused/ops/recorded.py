"""The Triton ops' own CUDA graphs (HYPERFUSED_CUDA_GRAPHS=1): the Python counterpart of the C++ ops' cache
(csrc/graphs.h, where the design is described), with the same rules, since the Triton drivers are Python.

From a key's second call an op replays a CUDA graph of its whole body instead of launching each step's
kernels and GEMMs from Python. The key holds the op, the caller's stream, every setting the body reads when
it runs, the inputs' layouts and the parameters' layouts and addresses. Each graph keeps static copies of the
activation inputs (and of b_0, which the layer sums per call at a new address), which a call copies its
inputs into, and the outputs it writes, which a call clones. On CPU tensors (the Triton interpreter) a
recording keeps the body and a replay reruns it into those outputs, so that the tests check everything but
the capture itself without a GPU."""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import warnings
from typing import Callable, Optional, Sequence

import torch

from ..reference import PARAM_NAMES

MAX_ENTRIES = 16
_BIAS = PARAM_NAMES.index("bias")
_lock = threading.Lock()
_entries: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()  # least recently used first
_counts = [0, 0]  # recordings made, replays run


def requested() -> bool:
    """Whether HYPERFUSED_CUDA_GRAPHS asks for recordings ("1"; "0" or unset: never)."""
    value = os.environ.get("HYPERFUSED_CUDA_GRAPHS", "")
    if value not in ("", "0", "1"):
        raise RuntimeError(f"hyperfused: HYPERFUSED_CUDA_GRAPHS must be '0', '1' or unset, got '{value}'")
    return value == "1"


def counts() -> tuple[int, int]:
    """Tests: (recordings made, replays run) by the Triton ops since the process started."""
    return tuple(_counts)


class _Entry:
    def __init__(self):
        self.failed = False
        self.replay: Optional[Callable[[], None]] = None  # None until the key's second call
        self.inputs: list = []
        self.outputs: list = []
        self.replayed: Optional[torch.cuda.Event] = None  # after the last replay, on a GPU

    def release(self):
        """Dropped from the cache: a graph's private memory returns to the allocator with it, so its last
        replay must finish first."""
        if self.replayed is not None:
            self.replayed.synchronize()


def _layout(t: Optional[torch.Tensor]):
    return None if t is None else (t.dtype, t.device, tuple(t.shape), t.stride())


def _clones(ts):
    return [None if t is None else t.clone() for t in ts]


def _record_cuda(body, inputs, device):
    """A CUDA graph of body(inputs) and its outputs, captured on a side stream after a warm-up run there (lazy
    initialisations and Triton's compilation must not happen inside a capture); None when the capture fails."""
    caller = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(caller)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            body(inputs)
        with torch.cuda.graph(graph, stream=side):
            outputs = list(body(inputs))
    except Exception as exc:  # the op still runs, without a graph for this key
        warnings.warn(f"hyperfused: capturing the op as a CUDA graph failed, so it runs without one for these "
                      f"shapes: {type(exc).__name__}: {exc}")
        caller.wait_stream(side)
        return None
    caller.wait_stream(side)
    return graph.replay, outputs


def _record_rerun(body, inputs):
    outputs = list(body(inputs))

    def replay():
        for out, fresh in zip(outputs, body(inputs)):
            if out is not None:
                out.copy_(fresh)
    return replay, outputs


def run_recorded(op: str, copied: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor],
                 config: tuple, body: Callable[[list, list], Sequence[torch.Tensor]]) -> list:
    """The op's outputs, from a replay where its key was recorded before, or else from body(inputs, params) run
    eagerly. copied: the activation inputs (None for an absent optional one); params: the op's parameters, of
    which b_0 is copied and the rest read in place; config: every other setting the body reads."""
    device = params[0].device
    # (no_grad: the static copies must not carry the first call's autograd history)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), torch.no_grad():
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return list(body(list(copied), list(params)))  # inside the caller's own capture
        return _run(op, copied, params, config, body, device)


def _run(op, copied, params, config, body, device):
    kept = list(params)
    copied = [*copied, kept.pop(_BIAS)]

    def body_on(inputs):
        return body(inputs[:-1], kept[:_BIAS] + [inputs[-1]] + kept[_BIAS:])

    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (op, stream, config, tuple(map(_layout, copied)), tuple((_layout(p), p.data_ptr()) for p in kept))
    with _lock:
        entry = _entries.get(key)
        if entry is None:  # first sight: remember the key, run eagerly (below, without the lock)
            _entries[key] = _Entry()
            while len(_entries) > MAX_ENTRIES:
                _entries.popitem(last=False)[1].release()
        else:
            _entries.move_to_end(key)
        if entry is not None and not entry.failed:
            return _replayed(entry, body_on, copied, device)
    return list(body_on(copied))


def _replayed(entry, body_on, copied, device):
    """The entry's outputs for this call's inputs, recording it first at the key's second call (under the lock,
    which keeps the static inputs one call's at a time)."""
    if entry.replay is None:
        entry.inputs = _clones(copied)
        recording = _record_cuda(body_on, entry.inputs, device) if device.type == "cuda" else \
            _record_rerun(body_on, entry.inputs)
        if recording is None:
            entry.failed, entry.inputs = True, []
            return list(body_on(copied))
        entry.replay, entry.outputs = recording
        _counts[0] += 1
    else:
        for static, t in zip(entry.inputs, copied):
            if t is not None:
                static.copy_(t)
    entry.replay()
    if device.type == "cuda":
        entry.replayed = entry.replayed or torch.cuda.Event()
        entry.replayed.record()
    _counts[1] += 1
    return _clones(entry.outputs)
