"""Training checkpoints that cannot silently poison a run.

A checkpoint file is a torch.save'd dict {format, version, sha256, payload}: `payload` holds the torch.save'd
training state as bytes and `sha256` their checksum, so flipped bytes are found on load instead of training
on to NaN. Files are written to `PATH.tmp.<pid>` and renamed over PATH (readers see the old checkpoint or
the new one, never part of one); a writer killed before the rename leaves its temporary file, which the
next writer removes once that process is gone. Every way a file can fail to be a checkpoint of ours is one
CheckpointError with a one-line message.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os

import torch

FORMAT = "hyperfused-train-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A file that is not a usable checkpoint; the message says what it is and what was expected."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes PATH.tmp.<pid> files whose writer is no longer running; returns what it removed."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        suffix = tmp.rsplit(".", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and not _pid_alive(int(suffix)):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def save(state: dict, path: str) -> None:
    """Writes `state` to `path` atomically, with a checksum of its bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(dict(format=FORMAT, version=VERSION, sha256=hashlib.sha256(payload).hexdigest(), payload=payload), tmp)
    os.replace(tmp, path)


def load(path: str, map_location=None) -> dict:
    """The training state saved at `path`, or CheckpointError saying why the file is not one."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling arbitrary bytes fails in arbitrary ways (IndexError, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint ({size} bytes; truncated, or not a file "
                              f"that --checkpoint writes): {str(e).splitlines()[0][:200]}") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        if isinstance(outer, dict) and outer and all(isinstance(v, torch.Tensor) for v in outer.values()):
            raise CheckpointError(f"{path} holds a model state_dict (as --save-final writes), not a training "
                                  "checkpoint: resume from the file that --checkpoint writes")
        raise CheckpointError(f"{path} is not a training checkpoint (a {type(outer).__name__} without the "
                              f"'{FORMAT}' header): resume from the file that --checkpoint writes")
    if outer.get("version") != VERSION:
        raise CheckpointError(f"{path} is a checkpoint of format version {outer.get('version')}; this hyperfused "
                              f"reads version {VERSION}")
    payload = outer.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: the checksum of its contents does not match the one stored "
                              "when it was written")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
