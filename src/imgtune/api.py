"""The library API: train, evaluate, predict, load. The CLI is a thin layer over these functions."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.calibration import Calibration
from imgtune.checkpoint import resolve_checkpoint
from imgtune.config import Config, ConfigError, resolve
from imgtune.data import load_class_names
from imgtune.files import atomic_write_bytes, atomic_write_text
from imgtune.keywords import keyword_overrides
from imgtune.layouts import LabelRule, labelled_pairs
from imgtune.metrics import EvalResult
from imgtune.predict import (
    EnsemblePredictor,
    InputError,
    OnnxPredictor,
    Prediction,
    Predictor,
    expand_inputs,
    load_predictor,
    predictions_csv,
    rows_csv,
    submission_csv,
    write_predictions,
)
from imgtune.progress import Progress, auto_progress, in_notebook
from imgtune.recipe import TrainResult, resume
from imgtune.recipe import train as train_config
from imgtune.runs import RunLock
from imgtune.runtime import StopRequest

log = logging.getLogger(__name__)


Runs = Path | str | Sequence[Path | str]


def train(
    data: Config | Path | str | None = None,
    /,
    config: Config | Path | str | None = None,
    *,
    recipe: str | None = None,
    progress: Progress | None = None,
    stop: StopRequest | None = None,
    verbose: bool | None = None,
    **keys: Any,
) -> TrainResult:
    """Train on a dataset folder, every config key a keyword:

        imgtune.train("data/flowers", model="resnet18", epochs=5, img_size=224, smoothing=0.1)

    `keys` are config keys by their last part (epochs, img_size, lr, hflip), any key with `__` for its dots
    (train__stage2__lr=1e-4), or a flag's name (smoothing, reprob, layer_decay, model_ema, scratch=True);
    see keywords.py. `config`: a YAML file or a Config under the keywords; `recipe`: transfer or scratch (by
    default the one the model calls for). A Config alone (`train(cfg)`) is trained as it is. verbose (default:
    in a notebook): epoch lines and progress shown as the run goes. Returns a TrainResult: run_dir, history
    (the metrics rows), plot() (the curves), report (report.html), test, summary."""
    if isinstance(data, Config):
        if config is not None:
            raise ConfigError("give a Config or a dataset folder with config=, not both")
        config, data = data, None
    if isinstance(config, Config) and not keys and data is None and recipe is None:
        cfg = config
    else:
        given = {**({"data.path": data} if data is not None else {}), **keyword_overrides(keys)}
        if isinstance(config, Config):
            cfg = resolve(None, None, given, recipe, base=config.to_plain())
        else:
            cfg = resolve(Path(config) if config is not None else None, None, given, recipe)
    show = in_notebook() if verbose is None else verbose
    with _showing_logs(show):
        return train_config(cfg, progress or (auto_progress() if show else None), stop)


@contextlib.contextmanager
def _showing_logs(show: bool) -> Iterator[None]:
    """imgtune's INFO lines (epochs, test accuracy, the run folder) on stdout for the call, unless logging is
    configured already (the CLI, an application's own handlers)."""
    logger = logging.getLogger("imgtune")
    if not show or logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load(
    run: Runs,
    device: str = "auto",
    backend: str = "torch",
    *,
    weights: Sequence[float] | None = None,
    class_names: Path | str | None = None,
    precision: str = "auto",
) -> Predictor:
    """A ready-to-use Predictor from a run folder or checkpoint file (backend torch), or from an exported
    model.onnx / run folder holding one (backend onnxruntime). Several runs: their weighted ensemble.
    class_names: a JSON {folder name: display name} file that replaces the names the run was trained with.
    precision: auto (bf16 on GPUs and on CPUs with native bf16, where it measured 1.5-2.5x faster, else
    fp32), fp32, bf16 or fp16."""
    if isinstance(run, str | Path):
        predictor = load_predictor(run, device, backend, precision)
    elif len(run) == 1:
        predictor = load_predictor(run[0], device, backend, precision)
    else:
        predictor = EnsemblePredictor([load_predictor(r, device, backend, precision) for r in run], weights)
    if class_names is not None:
        predictor.display_names = load_class_names(Path(class_names), predictor.classes)
    return predictor


def _first_run_dir(run: Runs) -> Path:
    first = Path(run if isinstance(run, str | Path) else run[0])
    if first.suffix.lower() == ".onnx":  # RUN/model.onnx, exported beside the run's files
        return first.parent
    return first if first.is_dir() else resolve_checkpoint(first).parent.parent


# ------------------------------------------------------------------------------------------------ evaluate


def eval_samples(data: Path, split: str, run_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(file, class name) pairs of one labelled split of DATA, found the way the run found its own data (its
    config.yaml's data.labels: class folders, file names or a CSV; for the valid split of a run that made its
    own split, its split.csv)."""
    rule = LabelRule()
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        from imgtune.config import Config

        rule = Config.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text())).data.label_rule()
    return labelled_pairs(Path(data), split, rule, run_dir / "split.csv" if run_dir is not None else None)


def evaluate(
    run: Runs,
    data: Path | str,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
    tta: bool = False,
    weights: Sequence[float] | None = None,
    class_names: Path | str | None = None,
    precision: str = "auto",
) -> EvalResult:
    """Metrics of a trained run (its best checkpoint), or of an ensemble of runs, on one labelled split of a
    dataset folder; with tta, averaged over test-time augmentation views (and the gain over one view)."""
    predictor = load(run, device, weights=weights, class_names=class_names, precision=precision)
    pairs = eval_samples(Path(data), split, _first_run_dir(run))
    result = predictor.evaluate(pairs, split, batch_size, workers, tta=tta)
    if isinstance(predictor, OnnxPredictor) and predictor.precision == "int8":
        result.reference = _fp32_reference(predictor, pairs, result, batch_size, workers, tta)
    return result


def _fp32_reference(
    int8: OnnxPredictor, pairs: Sequence[tuple[Path, str]], result: EvalResult, batch_size: int,
    workers: int | None, tta: bool,
) -> dict[str, Any]:  # fmt: skip
    """The fp32 model an int8 file was made from, on the same images: the run's checkpoint beside it, or
    else the export guard's validation figures from the file's metadata."""
    run_dir = Path(int8.checkpoint["path"]).parent
    if (run_dir / "checkpoints").is_dir():
        fp32 = load_predictor(run_dir, "cpu", "torch", precision="fp32")
        ref = fp32.evaluate(pairs, result.split, batch_size, workers, tta=tta)
        mine = {path: pred for path, _, pred, _ in result.samples}
        same = [mine[path] == pred for path, _, pred, _ in ref.samples if path in mine]
        model = str(fp32.checkpoint["path"])
        agreement = sum(same) / max(1, len(same))
        return {"model": model, "accuracy": ref.accuracy, "agreement": agreement, "same_images": True}
    guard = json.loads(int8.metadata.get("int8", "{}"))
    if not guard:
        return {"model": "unknown", "accuracy": float("nan"), "agreement": float("nan"), "same_images": False}
    return {"model": f"the export guard's {guard['images']} validation images", "accuracy": guard["fp32_accuracy"],
            "agreement": guard["agreement"], "same_images": False}  # fmt: skip


def calibrate(
    run: Path | str,
    data: Path | str,
    split: str = "valid",
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
) -> Calibration:
    """Fit temperature scaling for RUN's best checkpoint on a labelled split (validation: never test) and
    store it in the checkpoint, where predict, eval, export and serve pick it up."""
    from imgtune.calibration import calibrate_checkpoint

    path = resolve_checkpoint(Path(run))
    pairs = eval_samples(Path(data), split, _first_run_dir(run))
    # it rewrites the checkpoint: not while a train writes the same run folder (its next best.pt would undo it)
    in_run = path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file()
    with RunLock(path.parent.parent) if in_run else contextlib.nullcontext():
        return calibrate_checkpoint(path, load_predictor(path, device), pairs, batch_size, workers)


@dataclass
class PredictResult:
    rows: list[Prediction]
    skipped: list[dict[str, str]]
    out: Path | None
    top_k: int  # labels per row actually given (at most the number of classes)
    format: str = "csv"
    id_from: str = "stem"
    columns: tuple[str, str] = ("id", "label")  # the submission's header

    def csv(self) -> str:
        if self.format == "submission":
            return submission_csv(self.rows, self.id_from, self.columns)
        return predictions_csv(self.rows, self.top_k)


def predict(
    run: Runs,
    inputs: Sequence[str | Path],
    *,
    out: Path | str | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
    backend: str = "torch",
    tta: bool = False,
    weights: Sequence[float] | None = None,
    class_names: Path | str | None = None,
    format: str = "csv",
    id_from: str = "stem",
    columns: Sequence[str] = ("id", "label"),
    precision: str = "auto",
) -> PredictResult:
    """Classify files, folders (recursively, labelled or not) and globs with a run or an ensemble of runs;
    optionally write `out` (atomically): the predictions CSV, or with format="submission" a Kaggle-style
    `id,label` file whose ids are the file stems (id_from="stem"), names ("name") or paths ("path")."""
    if format not in ("csv", "submission"):
        raise InputError(f"format {format!r}: choose csv or submission")
    if id_from not in ("stem", "name", "path"):
        raise InputError(f"id_from {id_from!r}: choose stem, name or path")
    predictor = load(run, device, backend, weights=weights, class_names=class_names, precision=precision)
    paths = expand_inputs(inputs)
    rows, skipped = predictor.predict(paths, top_k=top_k, batch_size=batch_size, workers=workers, tta=tta)
    k = max(1, min(top_k, len(predictor.classes)))
    if len(columns) != 2 or not all(c.strip() for c in columns):
        raise InputError(f"columns {list(columns)}: a submission has two columns, the id's and the label's")
    header = (columns[0].strip(), columns[1].strip())
    result = PredictResult(rows, skipped, Path(out) if out is not None else None, k, format, id_from, header)
    if out is not None:
        write_predictions(Path(out), result.csv())
    return result


__all__ = [
    "ExplainResult",
    "PredictResult",
    "TrainResult",
    "calibrate",
    "eval_samples",
    "evaluate",
    "explain",
    "load",
    "predict",
    "resume",
    "train",
]


# ------------------------------------------------------------------------------------------------- explain


@dataclass
class ExplainResult:
    rows: list[dict[str, Any]]  # explain.csv's rows (explain.CSV_COLUMNS)
    skipped: list[dict[str, str]]
    out: Path
    layer: str
    method: str


def explain(
    run: Path | str,
    inputs: Sequence[str | Path],
    out: Path | str,
    *,
    method: str = "gradcam",
    target: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> ExplainResult:
    """Class activation maps for files, folders and globs: OUT/<stem>.png overlays, OUT/heatmaps.npz (one
    S x S float32 map per input, keyed by the path as given) and OUT/explain.csv (explain.CSV_COLUMNS: the
    peak in the original image's pixels). Each file is written atomically; the CSV last."""
    from imgtune.explain import CSV_COLUMNS, NpzWriter, overlay, overlay_name, png_bytes

    predictor = load(run, device, precision="fp32")
    cam = predictor.explainer(method, layer)
    paths = expand_inputs(inputs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    skipped: list[dict[str, str]] = []
    found = predictor.iter_explanations(paths, cam, target=target, batch_size=batch_size, skipped=skipped)
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    with NpzWriter(folder / "heatmaps.npz") as npz:
        for e, image in found:
            name = overlay_name(e.path, taken)
            atomic_write_bytes(folder / name, png_bytes(overlay(image, e)))
            npz.add(e.path, e.heatmap)
            rows.append({"path": e.path, "label": e.label, "confidence": round(e.confidence, 6),
                         "explained": e.explained, "explained_p": round(e.explained_p, 6),
                         "peak_x": e.peak[0] if e.peak else "", "peak_y": e.peak[1] if e.peak else "",
                         "width": e.size[0], "height": e.size[1], "overlay": name})  # fmt: skip
    atomic_write_text(folder / "explain.csv", rows_csv(rows, CSV_COLUMNS))
    return ExplainResult(rows, skipped, folder, cam.layer, method)
