"""Atomic writes and safe checkpoint loading.

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(weights_only=True)` can read
it and nothing in it can execute code. Every file imgtune writes goes through a temp file + fsync + rename:
a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imgtune.errors import UserError

FORMAT = "imgtune-checkpoint"
VERSION = 1


class DiskFullError(UserError, OSError):
    """A write failed for lack of space; the message names the file and says what was kept."""


class CheckpointError(UserError, ValueError):
    """A file is not a usable imgtune checkpoint; the message names the file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
            raise DiskFullError(f"{path}: no space left on the device ({len(data):,} bytes needed); {kept}") from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on every platform, harmless to skip there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True and a clear error; never falls back to unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain-tensor checkpoint, or damaged ({first[:300]})"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    data = safe_torch_load(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an imgtune checkpoint (no '{FORMAT}' marker)")
    if int(data.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: written by a newer imgtune (format {data['version']}); upgrade imgtune")
    for key in ("arch", "state_dict", "classes", "preprocessing"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return data


def resolve_checkpoint(run: Path) -> Path:
    """RUN may be a run folder (-> checkpoints/best.pt, else last.pt) or a checkpoint file."""
    run = Path(run)
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = run / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{run}: no checkpoints/best.pt or checkpoints/last.pt in this run folder")
    if run.is_file():
        return run
    raise CheckpointError(f"{run}: no such run folder or checkpoint file")
