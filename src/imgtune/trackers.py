"""Experiment trackers: where a run's numbers go besides metrics.csv. TensorBoard (per-step loss and LR,
per-epoch metrics, the sample grid and the confusion matrix as images, hyperparameters with the final
metrics), MLflow (parameters, per-epoch metrics, the report and best.pt as artifacts) and the curves plot
redrawn whenever a checkpoint is written, so an interrupted run has its plot.

Each is a `tracking.Sink` the Tracker feeds; recipe.py picks them from the config (rank 0 only). A new
tracker (Weights & Biases, ...) is one more class with those methods.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgtune.files import atomic_write_text
from imgtune.packages import need, versions

log = logging.getLogger(__name__)
MLFLOW_FILE = "mlflow.json"  # RUN/mlflow.json: where the run's MLflow record is, so a resume continues it


class _Quiet:
    """The methods a sink does not need."""

    def step(self, step: int, stage: int, loss: float, lr: float) -> None:
        pass

    def epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def checkpointed(self) -> None:
        pass

    def finish(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's measured values (not its epoch/stage labels, not the blanks and NaNs of epochs that had
    no validation)."""
    skip = ("epoch", "stage")
    return {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, int | float) and v == v}


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, ...}: a nested config as the flat key/value pairs trackers show as parameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


class CurvesSink(_Quiet):
    """RUN/plots/curves.png, redrawn each time a checkpoint is written (every fine-tuning epoch, and once at
    the end of the head stage: its epochs take milliseconds, a plot ~0.2 s)."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def checkpointed(self) -> None:
        from imgtune.report import plot_curves

        (self.run / "plots").mkdir(exist_ok=True)
        plot_curves(self.run, self.run / "plots" / "curves.png")


class TensorBoardSink(_Quiet):
    """RUN/tensorboard/: scalars per optimizer step (train/loss_step, train/lr) and per epoch (the metrics.csv
    columns), and at the end the report's sample grid and confusion matrix as images and the run's
    hyperparameters beside its final metrics (the HPARAMS tab compares runs)."""

    def __init__(self, run: Path, config: Mapping[str, Any]) -> None:
        need("tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.config = run, config
        self.writer = SummaryWriter(str(run / "tensorboard"))

    def step(self, step: int, stage: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss_step", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: Mapping[str, Any]) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        for tag, name in (("samples", "samples.png"), ("confusion_matrix", "confusion_matrix.png")):
            path = self.run / "plots" / name
            if path.is_file():
                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
                self.writer.add_image(tag, pixels, dataformats="HWC")
        params = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                  for k, v in flat_params(self.config).items() if v is not None}  # fmt: skip
        metrics = {f"hparam/{k}": float(v) for k, v in summary.items()
                   if k in ("best_valid_acc", "test_acc", "test_loss", "best_score") and v is not None}  # fmt: skip
        self.writer.add_hparams(params, metrics, run_name=".")
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowSink(_Quiet):
    """One MLflow run per imgtune run: the config as parameters, every numeric metrics.csv column per epoch,
    the test metrics, and report.html, summary.json, metrics.csv, the plots and best.pt as artifacts. The
    store is MLFLOW_TRACKING_URI when set, else ./mlruns (a local file store); RUN/mlflow.json records it and
    the run id, and a resumed run continues the same MLflow run."""

    def __init__(self, run: Path, config: Mapping[str, Any], resume: bool) -> None:
        self.mlflow = need("mlflow", "--mlflow")
        self.run = run
        record_file = run / MLFLOW_FILE
        record = json.loads(record_file.read_text()) if resume and record_file.is_file() else {}
        uri = record.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or local_store(Path.cwd())
        if uri.startswith("file:"):  # MLflow 3 asks for this opt-in to keep using a plain folder
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow.set_tracking_uri(uri)
        if record.get("run_id"):
            active = self.mlflow.start_run(run_id=record["run_id"])
        else:
            self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "imgtune"))
            active = self.mlflow.start_run(run_name=run.name)
            params = {k: str(v)[:500] for k, v in flat_params(config).items()}
            self.mlflow.log_params(params)
            self.mlflow.set_tags({f"version.{k}": v for k, v in versions().items()} | {"imgtune.run": str(run)})
        self.run_id = active.info.run_id
        atomic_write_text(record_file, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        log.info("MLflow: run %s in %s", self.run_id, uri)

    def epoch(self, row: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(row), step=int(row["epoch"]))

    def finish(self, summary: Mapping[str, Any]) -> None:
        final = {k: float(v) for k, v in summary.items() if k.startswith(("test_", "best_")) and
                 isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        self.mlflow.log_metrics(final)
        for name in ("report.html", "summary.json", "metrics.csv", "config.yaml"):
            if (self.run / name).is_file():
                self.mlflow.log_artifact(str(self.run / name))
        if (self.run / "plots").is_dir():
            self.mlflow.log_artifacts(str(self.run / "plots"), artifact_path="plots")
        best = self.run / "checkpoints" / "best.pt"
        if best.is_file():
            self.mlflow.log_artifact(str(best), artifact_path="checkpoints")

    def close(self, status: str) -> None:
        self.mlflow.end_run(status=status)


def local_store(folder: Path) -> str:
    """The default MLflow store: FOLDER/mlruns, as a file: URI."""
    return (folder / "mlruns").resolve().as_uri()
