"""Timing that is fair between rows: warm-up first, then repeats interleaved across rows, so that clock
and cache drift hit every row alike; CUDA work is timed with events."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes (on CUDA: between events recorded around it on the current stream).
    Python's cyclic GC is off during the call, as in timeit: a collection of torch's million objects would
    land on whichever row happened to be running."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _timed(fn, device)
    finally:
        if was_enabled:
            gc.enable()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Samples:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def iqr(self) -> float:
        if len(self.values) < 4:
            return max(self.values) - min(self.values)
        q = statistics.quantiles(self.values, n=4)
        return q[2] - q[0]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated above what was live before one call of fn (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
