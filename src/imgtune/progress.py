"""Progress reporting: a rich bar on a terminal, plain periodic lines otherwise (logs, CI, notebooks' files).

The library only calls `Progress.task(...)`; the CLI decides which implementation to hand in.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int) -> Task: ...


class SilentTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class SilentProgress:
    def task(self, description: str, total: int) -> Task:
        return SilentTask()


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 1 h 02 min: what a person reads in an ETA."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class _Line:
    def __init__(self, description: str, total: int, every_s: float, stream: TextIO | None = None) -> None:
        self.description, self.total, self.every_s, self.stream = description, total, every_s, stream
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.fields: dict[str, Any] = {}

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if 0 < self.done < self.total else None
        eta = f", eta {duration(left)}" if left is not None else ""
        print(
            f"{self.description}: {self.done}/{self.total} ({elapsed:.0f} s{eta})  {_fmt(self.fields)}",
            file=self.stream or sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        self._print(time.perf_counter())


class LineProgress:
    """Plain lines every `every_s` seconds and at the end: readable in log files."""

    def __init__(self, every_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.every_s, self.stream = every_s, stream  # None: whatever sys.stderr is when a line is printed

    def task(self, description: str, total: int) -> Task:
        return _Line(description, total, self.every_s, self.stream)


class _RichTask:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.progress.update(self.task_id, advance=n, info=_fmt(fields))

    def close(self) -> None:
        self.progress.stop()


class RichProgress:
    """One live bar per task (epoch), left on screen when done."""

    def task(self, description: str, total: int) -> Task:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        progress.start()
        return _RichTask(progress, progress.add_task(description, total=total, info=""))


def in_notebook() -> bool:
    """A Jupyter kernel (its shell is ZMQInteractiveShell): output goes to a cell, not a terminal."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def auto_progress() -> Progress:
    """A live bar on a terminal; in a notebook, a line per epoch (and every 10 s) on stdout, which the cell
    keeps readable, where a live bar's redraws would pile up in a saved notebook; else a line every 30 s."""
    if in_notebook():
        return LineProgress(every_s=10.0, stream=sys.stdout)
    return RichProgress() if sys.stderr.isatty() else LineProgress()
