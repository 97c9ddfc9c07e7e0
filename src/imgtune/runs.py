"""The run folder: one self-contained directory per training run, every file in it written atomically.

runs/<name>/config.yaml, classes.json, split.csv, metrics.csv, summary.json, checkpoints/{best,last}.pt
(metrics.csv and lr.csv are written by tracking.Tracker, checkpoints by checkpoint.save_checkpoint)
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.errors import UserError
from imgtune.files import atomic_write_text


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


def ensure_free(out: Path) -> None:
    if Path(out).exists() and any(Path(out).iterdir()):
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
