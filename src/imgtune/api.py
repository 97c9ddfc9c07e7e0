"""The library API: train, evaluate, predict, load. The CLI is a thin layer over these functions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgtune.checkpoint import resolve_checkpoint
from imgtune.data import DataError, find_split_folders, read_split_csv, scan_folder
from imgtune.metrics import EvalResult
from imgtune.predict import Prediction, Predictor, expand_inputs, load_predictor, predictions_csv, write_predictions
from imgtune.recipe import TrainResult, resume, train

log = logging.getLogger(__name__)


def load(run: Path | str, device: str = "auto", backend: str = "torch") -> Predictor:
    """A ready-to-use Predictor from a run folder or checkpoint file (backend torch), or from an exported
    model.onnx / run folder holding one (backend onnxruntime)."""
    return load_predictor(run, device, backend)


# ------------------------------------------------------------------------------------------------ evaluate


def eval_samples(data: Path, split: str, run_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(file, class name) pairs of one labelled split of DATA.

    DATA/<split>/<class>/... when it exists; for the valid split of a run that made its own split, the
    run's split.csv; a folder of class folders with no split folders is evaluated whole.
    """
    data = Path(data)
    folders = find_split_folders(data)
    if split in folders:
        scan = scan_folder(folders[split])
        pairs = [(p, c) for c, files in scan.classes.items() for p in files]
        if not pairs:
            raise DataError(f"{folders[split]}: no labelled images (class folders) to evaluate on")
        return pairs
    if split == "valid" and run_dir is not None and (run_dir / "split.csv").is_file():
        s = read_split_csv(data, run_dir / "split.csv")
        return [(x.path, s.classes[x.label]) for x in s.valid]
    if not folders:
        scan = scan_folder(data)
        return [(p, c) for c, files in scan.classes.items() for p in files]
    raise DataError(f"{data}: no {split}/ folder with class folders (found: {', '.join(folders)})")


def evaluate(
    run: Path | str,
    data: Path | str,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
) -> EvalResult:
    """Metrics of a trained run (its best checkpoint) on one labelled split of a dataset folder."""
    predictor = load(run, device)
    run_path = Path(run)
    run_dir = run_path if run_path.is_dir() else resolve_checkpoint(run_path).parent.parent
    pairs = eval_samples(Path(data), split, run_dir)
    return predictor.evaluate(pairs, split, batch_size, workers)


@dataclass
class PredictResult:
    rows: list[Prediction]
    skipped: list[dict[str, str]]
    out: Path | None
    top_k: int  # labels per row actually given (at most the number of classes)

    def csv(self) -> str:
        return predictions_csv(self.rows, self.top_k)


def predict(
    run: Path | str,
    inputs: Sequence[str | Path],
    *,
    out: Path | str | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
    backend: str = "torch",
) -> PredictResult:
    """Classify files, folders (recursively) and globs; optionally write the CSV `out` (atomically)."""
    predictor = load(run, device, backend)
    paths = expand_inputs(inputs)
    rows, skipped = predictor.predict(paths, top_k=top_k, batch_size=batch_size, workers=workers)
    k = max(1, min(top_k, len(predictor.classes)))
    if out is not None:
        write_predictions(Path(out), rows, k)
    return PredictResult(rows, skipped, Path(out) if out is not None else None, k)


__all__ = [
    "PredictResult",
    "TrainResult",
    "eval_samples",
    "evaluate",
    "load",
    "predict",
    "resume",
    "train",
]
