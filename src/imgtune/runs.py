"""The run folder: one self-contained directory per training run, every file in it written atomically.

runs/<name>/config.yaml, classes.json, split.csv, metrics.csv, summary.json, checkpoints/{best,last}.pt
(metrics.csv and lr.csv are written by tracking.Tracker, checkpoints by checkpoint.save_checkpoint)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.errors import UserError
from imgtune.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def classes(self) -> Path:
        return self.path / "classes.json"

    @property
    def split(self) -> Path:
        return self.path / "split.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def lr_log(self) -> Path:
        return self.path / "lr.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def last_prev(self) -> Path:
        """last.pt as it was before the latest save: what a resume falls back to when last.pt is damaged."""
        return self.path / "checkpoints" / "last.prev.pt"

    def clean_leftovers(self) -> list[Path]:
        """Remove temporary files of writes that a crash interrupted (`.<name>.<random>.tmp`): the real
        files next to them are complete, since every write ends in an atomic rename. Memory-mapped stage-1
        features (`cache/`) left by an interrupted stage 1 go too: a resume rebuilds them if it needs them."""
        removed = [p for folder in (self.path, self.path / "checkpoints") if folder.is_dir()
                   for p in folder.glob(".*.tmp")]  # fmt: skip
        if (self.path / "cache").is_dir():
            removed += sorted((self.path / "cache").glob("features-*.npy"))
        for p in removed:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.path / "cache").rmdir()
        return removed

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class RunFolderError(UserError, FileExistsError):
    """The run folder asked for is taken; the message says how to choose another or continue it."""


LOCK_NAME = "run.lock"


class RunLocked(RunFolderError):
    """Another live process is writing the run folder; the message names it."""


class RunLock:
    """Held by the one process that writes a run folder (rank 0 under torchrun), from before its first file
    to its last: `RUN/run.lock` holds that process's PID, host, start time and command, and an flock on it
    that the kernel drops when the process dies, however it dies. A lock file left by a dead process (a kill,
    a power cut) is taken over with a message; one held by a live process stops the second one at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.created = not self.folder.exists()
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._acquire()
        except RunFolderError:  # RunLocked: an OSError too (FileExistsError), and already the message
            raise
        except OSError as e:  # a read-only or foreign folder: say so, not a traceback
            raise RunFolderError(f"{self.path}: cannot take the run folder's lock ({e.strerror or e}); a run folder "
                                 "must be writable: choose another --out") from None  # fmt: skip

    def _acquire(self) -> RunLock:
        while True:  # the file may be removed by its holder between our open and our flock: retry on a new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if self._still_named(fd):
                break
            os.close(fd)
        self.fd = fd
        if previous:
            log.warning("%s: taking over the lock left by %s, which is no longer running", self.folder,
                        _describe(previous))  # fmt: skip
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    @classmethod
    def check(cls, folder: Path) -> None:
        """Raise RunLocked if a live process holds the folder now (before a resume reads files that the writer
        may not have written yet)."""
        lock = cls(folder)
        if lock.path.is_file():
            with lock:
                pass

    def _take(self, fd: int) -> dict[str, Any]:
        """Lock fd or raise RunLocked; returns what the file held before (a dead holder's record, or {})."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: the record alone decides
            fcntl = None  # type: ignore[assignment]
        previous = _read_record(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return previous
            except BlockingIOError:
                raise RunLocked(self._message(_read_record(fd))) from None
            except OSError:  # a file system without flock: fall through to the PID check
                pass
        if previous and previous.get("host") == socket.gethostname() and _alive(int(previous.get("pid", 0))):
            raise RunLocked(self._message(previous))
        return previous

    def _still_named(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _message(self, holder: dict[str, Any]) -> str:
        return (
            f"{self.folder}: another imgtune process is writing this run folder ({_describe(holder)}); "
            f"wait for it to finish or stop it, then --resume {self.folder}, or choose another --out"
        )

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):  # a run that failed before writing anything leaves no folder
                self.folder.rmdir()


def _read_record(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")  # fmt: skip


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def ensure_free(out: Path) -> None:
    """A new run's folder must be new or empty (its own lock file aside)."""
    if Path(out).exists() and any(p.name != LOCK_NAME for p in Path(out).iterdir()):
        raise RunFolderError(
            f"{out}: run folder exists and is not empty; choose another --out, remove it, or --resume {out}"
        )


def new_run_folder(out: Path | None, data: Path, base: Path = Path("runs")) -> RunFolder:
    """`out` as given (must be new or empty), else runs/<dataset name>, runs/<dataset name>-2, ..."""
    if out is not None:
        out = Path(out)
        ensure_free(out)
        out.mkdir(parents=True, exist_ok=True)
        return RunFolder(out)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data).resolve().name).strip("-") or "run"
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return RunFolder(candidate)
    raise RunFolderError(f"{base}: no free run folder name for {stem}")
