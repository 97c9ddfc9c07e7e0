"""What a run measures and keeps, epoch by epoch: the monitors (which number picks the best epoch and stops a
stage early, and which way is better), the metrics rows, the best epoch and the patience count, and the files
that record them (metrics.csv, lr.csv, TensorBoard).

One table, `MONITORS`, says for each monitor which metrics.csv column holds it, its direction and how it is
read from the validation metrics (`metrics.EvalResult`, the same object `imgtune eval` prints). Config
validation, the best/patience logic, the plateau schedule, the metrics.csv columns and the report all read
that table, so a new metric is one `register_monitor` call:

    register_monitor("valid_top5", maximize=True, label="top-5 accuracy", read=lambda r: r.top5)
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imgtune.files import atomic_write_text
from imgtune.progress import duration
from imgtune.runs import RunFolder

if TYPE_CHECKING:
    from imgtune.metrics import EvalResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Monitor:
    name: str  # what train.monitor / --monitor takes
    column: str  # the metrics.csv column that holds it
    maximize: bool  # True: higher is better
    label: str  # how the report and the logs name it
    read: Callable[[EvalResult], float] | None = None  # from validation's metrics; None: a column the loop fills


MONITORS: dict[str, Monitor] = {}

# metrics.csv's built-in columns, in file order; a registered monitor's own column is appended after them
METRIC_COLUMNS = [
    "epoch",
    "stage",
    "lr",
    "train_loss",
    "train_acc",
    "valid_loss",
    "valid_acc",
    "seconds",
    "images_per_s",
    "valid_macro_f1",
    "valid_balanced_acc",
    "raw_valid_acc",  # with weight EMA: the raw (non-averaged) weights' valid accuracy; valid_* are the EMA's
]


def register_monitor(
    name: str,
    *,
    column: str | None = None,
    maximize: bool = True,
    label: str | None = None,
    read: Callable[[EvalResult], float] | None = None,
) -> Monitor:
    """Add a monitor (and, unless it is a built-in column, a metrics.csv column named `column` or `name`)."""
    if name in MONITORS:
        raise ValueError(f"monitor {name!r} is registered twice")
    monitor = Monitor(name, column or name, maximize, label or name.replace("_", " "), read)
    MONITORS[name] = monitor
    return monitor


register_monitor("valid_acc", label="valid accuracy", read=lambda r: r.accuracy)
register_monitor("valid_loss", maximize=False, label="valid loss", read=lambda r: r.loss)
register_monitor("macro_f1", column="valid_macro_f1", label="valid macro F1", read=lambda r: r.macro_f1)
register_monitor(
    "balanced_acc", column="valid_balanced_acc", label="valid balanced accuracy", read=lambda r: r.balanced_accuracy
)
# training metrics: what there is to monitor without a validation split (the loop fills their columns)
register_monitor("train_loss", maximize=False, label="training loss")
register_monitor("train_acc", label="training accuracy")


def check_monitor(name: str) -> str:
    """For config validation: the name, if it is a registered monitor."""
    if name not in MONITORS:
        raise ValueError(f"{name!r} is not a registered monitor; choose one of {', '.join(map(repr, MONITORS))}")
    return name


def metric_columns() -> list[str]:
    extra = [m.column for m in MONITORS.values() if m.column not in METRIC_COLUMNS]
    return METRIC_COLUMNS + list(dict.fromkeys(extra))


def validation_columns(result: EvalResult | None) -> dict[str, float | str]:
    """The row's validation columns, read through the monitor table; empty without validation images."""
    if result is None:
        return {m.column: "" for m in MONITORS.values() if m.read is not None}
    return {m.column: float(m.read(result)) for m in MONITORS.values() if m.read is not None}


class Sink(Protocol):
    """Where a run's numbers go besides metrics.csv (trackers.py: TensorBoard, MLflow, the curves plot)."""

    def step(self, step: int, stage: int, loss: float, lr: float) -> None: ...
    def epoch(self, row: Mapping[str, Any]) -> None: ...
    def checkpointed(self) -> None: ...
    def finish(self, summary: Mapping[str, Any]) -> None: ...
    def close(self, status: str) -> None: ...  # FINISHED, FAILED (an error) or KILLED (stopped: resumable)


@dataclass(frozen=True)
class Verdict:
    improved: bool  # the best epoch of the run so far
    stage_improved: bool  # the best epoch of this stage so far (resets the patience count)


class Tracker:
    """The metrics rows, the per-step LR log and the best/patience bookkeeping of one run; writes metrics.csv
    and lr.csv when it has a run folder and feeds the trackers (trackers.Sink: TensorBoard, MLflow, the curves
    plot) it is given (rank 0 under torchrun; the others keep the same state and have none)."""

    def __init__(self, monitor: str, run: RunFolder | None = None, sinks: Sequence[Sink] = ()) -> None:
        self.monitor = MONITORS[check_monitor(monitor)]
        self.run = run
        self.sinks = list(sinks)
        self.rows: list[dict[str, Any]] = []
        self.lr_log: list[list[float]] = []  # [global optimizer step, stage, head LR]
        self.best_score: float | None = None
        self.best_epoch = 0
        self.best_acc = 0.0  # valid accuracy at the best epoch, whatever the monitor
        self.stage_best: float | None = None
        self.bad_epochs = 0  # epochs since the stage's best

    def score(self, row: dict[str, Any]) -> float:
        """The monitored value of a row; NaN when the epoch has none (no validation split)."""
        value = row[self.monitor.column]
        return math.nan if value == "" else float(value)

    def better(self, score: float, than: float | None) -> bool:
        if than is None:
            return not math.isnan(score)
        return score > than if self.monitor.maximize else score < than

    def start_stage(self) -> None:
        self.stage_best, self.bad_epochs = None, 0

    def log_step(self, stage: int, lr: float, loss: float) -> None:
        self.lr_log.append([len(self.lr_log) + 1, stage, lr])
        for sink in self.sinks:
            sink.step(len(self.lr_log), stage, loss, lr)

    def checkpointed(self) -> None:
        """A checkpoint was just written: views of the whole history (the curves plot) catch up."""
        for sink in self.sinks:
            sink.checkpointed()

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run's final figures (summary.json's) and files (report, best.pt) go to the trackers."""
        for sink in self.sinks:
            sink.finish(summary)

    def end_epoch(self, row: dict[str, Any]) -> Verdict:
        """Record an epoch's row, update best and patience, write the files. An epoch with no value for the
        monitor (a validation metric, and no validation split) is the best so far: the last epoch is kept."""
        self.rows.append(row)
        score = self.score(row)
        unmeasured = row[self.monitor.column] == ""
        improved = unmeasured or self.better(score, self.best_score)
        if improved:
            acc = row["valid_acc"]
            self.best_score, self.best_epoch = score, int(row["epoch"])
            self.best_acc = math.nan if acc == "" else float(acc)
        stage_improved = unmeasured or self.better(score, self.stage_best)
        if stage_improved:
            self.stage_best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        self.write()
        for sink in self.sinks:
            sink.epoch(row)
        return Verdict(improved, stage_improved)

    def patience_used_up(self, patience: int | None) -> bool:
        return patience is not None and self.bad_epochs >= patience

    def log_epoch(self, row: dict[str, Any], verdict: Verdict, eta: tuple[int, float] = (0, 0.0)) -> None:
        """The epoch's line; eta = (epochs left in the stage, their estimated seconds) adds the stage's ETA."""
        left = f" | {eta[0]} epoch{'s' if eta[0] > 1 else ''} left, eta {duration(eta[1])}" if eta[0] else ""
        valid = (
            "no validation"
            if row["valid_acc"] == ""
            else f"valid loss {row['valid_loss']:.4f} acc {row['valid_acc']:.4f}"
        )
        log.info(
            "epoch %d (stage %d): train loss %.4f acc %.4f | %s | %.0f s, %.1f img/s%s%s",
            row["epoch"], row["stage"], row["train_loss"], row["train_acc"], valid, row["seconds"],
            row["images_per_s"], "  * best" if verdict.improved else "", left,
        )  # fmt: skip

    def log_stage(self, stage: int, seconds: float) -> bool:
        """One line for a stage reported as a whole; returns whether the run's best epoch is in it."""
        rows = [r for r in self.rows if r["stage"] == stage]
        epochs = f"{len(rows)} epoch{'s' if len(rows) != 1 else ''}"
        if rows[-1]["valid_acc"] == "":
            log.info("stage %d: %s in %.1f s; no validation: its last epoch is kept", stage, epochs, seconds)
        else:
            best = max(rows, key=lambda r: r["valid_acc"])
            log.info("stage %d: %s in %.1f s; best valid acc %.4f (epoch %d)", stage, epochs, seconds,
                     best["valid_acc"], best["epoch"])  # fmt: skip
        return self.best_epoch in {r["epoch"] for r in rows}

    def write(self) -> None:
        """metrics.csv and lr.csv, each rewritten whole and atomically (they are small): never a half row."""
        if self.run is None:
            return
        columns = metric_columns()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})
        atomic_write_text(self.run.metrics, buf.getvalue())
        lines = ["step,stage,lr"] + [f"{int(n)},{int(st)},{lr:.8g}" for n, st, lr in self.lr_log]
        atomic_write_text(self.run.lr_log, "\n".join(lines) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """Plain values for last.pt. The lists are copied, not their items: rows and log entries are never
        changed once appended, so this is a snapshot all the same."""
        return {
            "rows": list(self.rows), "lr_log": list(self.lr_log), "best_score": self.best_score,
            "best_epoch": self.best_epoch, "best_acc": self.best_acc, "stage_best": self.stage_best,
            "bad_epochs": self.bad_epochs,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.lr_log = list(state["rows"]), list(state["lr_log"])
        self.best_score, self.best_epoch, self.best_acc = state["best_score"], state["best_epoch"], state["best_acc"]
        self.stage_best, self.bad_epochs = state["stage_best"], state["bad_epochs"]


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
