"""Durable file writes: every file imgtune writes goes through a temp file + fsync + rename, so a crash
leaves either the old file or the new one, never half of one; a full disk is reported with what was kept."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from imgtune.errors import UserError


class DiskFullError(UserError, OSError):
    """A write failed for lack of space; the message names the file and says what was kept."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def atomic_write_bytes(path: Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """before_replace: called once the new file is complete and synced, just before it replaces `path`
    (checkpoint.keep_previous links the old file there, so the two share an inode for microseconds only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # what open() would give (mkstemp's 0600 hid reports from the group)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
            raise DiskFullError(f"{path}: no space left on the device ({len(data):,} bytes needed); {kept}") from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8, except that file names which were not UTF-8 on disk (Python keeps their bytes as surrogates)
    are written back as the same bytes, so a CSV of paths still names the files it lists."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


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
