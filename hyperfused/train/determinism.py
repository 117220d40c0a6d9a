"""torch's deterministic algorithms for a block of code, with the caller's setting given back after it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_algorithms(warn_only: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` inside the block, then the caller's
    setting back, both flags, however the block ends. On the CPU hyperfused measures no library then (a
    sequence's products run as ``torch.mm`` does, a decode step's in fixed libraries), so two processes give the
    same bits."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
