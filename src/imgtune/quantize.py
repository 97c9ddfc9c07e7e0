"""int8 ONNX models for CPUs: ONNX Runtime static quantization, kept only when it passes an accuracy guard.

The fp32 export (export.onnx_model, already checked against PyTorch) is quantized in QDQ form: int8 weights per
output channel, uint8 activations whose ranges are calibrated on training images decoded by imgtune's own
pixel path. Quantization can quietly cost accuracy (a range clipped too tight, a layer whose activations are
heavy-tailed), so the result is compared with the fp32 model on the validation split and is written only if
top-1 agreement and the accuracy drop stay within the guard; otherwise nothing is written and the error says
by how much it missed. The classifier layer (the last Gemm) stays in fp32: quantizing the logits to 8 bits
costs up to 0.2 of probability for less than 1% of the time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgtune.checkpoint import resolve_checkpoint
from imgtune.export import INPUT, OUTPUT, ExportError, onnx_model, set_metadata
from imgtune.files import atomic_write_bytes
from imgtune.layouts import DataError
from imgtune.packages import need_all
from imgtune.transforms import Preprocessing

log = logging.getLogger(__name__)
MIN_AGREEMENT = 0.99  # top-1 agreement with the fp32 model on the validation split
MAX_DROP = 0.005  # accuracy drop against fp32, in accuracy (0.005 = half a point)
METHODS = ("minmax", "entropy", "percentile")  # "auto" tries them in this order: cheapest first
CALIBRATION_BATCH = 16  # calibration images are used in whole batches of this size (fewer: one batch)
GUARD_LIMIT = 5000  # validation images compared at most (evenly spaced): resolution 0.02%, a minute here


@dataclass
class Guard:
    """fp32 against int8 on the same validation images."""

    images: int
    agreement: float  # share of images with the same top-1 class
    fp32_accuracy: float
    int8_accuracy: float
    max_abs_diff: float  # largest |p_fp32 - p_int8| over images and classes
    speedup: float  # int8 images/s over fp32 images/s, same batches, same session options

    @property
    def drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.drop <= MAX_DROP

    def describe(self) -> str:
        return (
            f"top-1 agreement with fp32 {self.agreement:.2%} (needs {MIN_AGREEMENT:.0%}), accuracy "
            f"{self.fp32_accuracy:.4f} -> {self.int8_accuracy:.4f} (drop {self.drop * 100:+.2f} points, at most "
            f"{MAX_DROP * 100:.1f}) on {self.images} validation images; {self.speedup:.2f}x fp32's images/s"
        )


@dataclass
class Int8Result:
    path: Path
    method: str  # the calibration method that passed
    calibration_images: int
    guard: Guard
    tried: list[tuple[str, Guard]] = field(default_factory=list)  # every method tried, in order


def _even(items: Sequence[Any], n: int) -> list[Any]:
    """n items spread over the whole list: the lists are sorted by class, so every class is represented."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else [items[0]]


def _decode(paths: Sequence[Path], prep: Preprocessing) -> tuple[np.ndarray, list[int]]:
    from imgtune.data import decode_many

    images, ok, _ = decode_many(list(paths), prep)  # it reports the unreadable ones; images holds the rest
    return images.numpy(), ok


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared uint8 images, in batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        batch = max(1, min(batch, len(images)))  # equal batches (see _images)
        self.batches = iter([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self.batches, None)
        return None if b is None else {INPUT: b}


def _classifier_nodes(model_path: Path) -> list[str]:
    """Names of the Gemm/MatMul nodes that produce the logits (those feeding the final Softmax)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    found: list[str] = []
    frontier, seen = [OUTPUT], set()
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:  # residual joins reach a node by several paths
            continue
        seen.add(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            found.append(node.name)
            continue
        frontier += list(node.input)
    return found


def _quantize(fp32: Path, out: Path, calibration: np.ndarray, method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # quantize_static's own default list, less Softmax: 8-bit probabilities would be confidences in 1/255 steps
    ops = sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - {"Softmax"})

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    quantize_static(
        str(fp32), str(out), _Reader(calibration),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=methods[method], nodes_to_exclude=_classifier_nodes(fp32),
        op_types_to_quantize=ops,
    )  # fmt: skip


def compare(fp32: Any, int8: Any, images: np.ndarray, labels: np.ndarray, batch: int = 64) -> Guard:
    """Run both onnxruntime sessions on the same batches; time each one's share."""
    got, want = [], []
    t_fp32 = t_int8 = 0.0
    for i in range(0, len(images), batch):
        b = {INPUT: images[i : i + batch]}
        t0 = time.perf_counter()
        want.append(fp32.run([OUTPUT], b)[0])
        t1 = time.perf_counter()
        got.append(int8.run([OUTPUT], b)[0])
        t_fp32, t_int8 = t_fp32 + t1 - t0, t_int8 + time.perf_counter() - t1
    p, q = np.concatenate(want), np.concatenate(got)
    return Guard(
        images=len(images),
        agreement=float((p.argmax(1) == q.argmax(1)).mean()),
        fp32_accuracy=float((p.argmax(1) == labels).mean()),
        int8_accuracy=float((q.argmax(1) == labels).mean()),
        max_abs_diff=float(np.abs(p - q).max()),
        speedup=t_fp32 / max(t_int8, 1e-9),
    )


def _splits(run_dir: Path, calibration: int) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Calibration files from the training split, guard pairs from the validation split, found as eval finds
    them (the run's labels rule, its own split.csv)."""
    import yaml

    from imgtune.api import eval_samples

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = Path((config or {}).get("data", {}).get("path", ""))
    if not data.is_dir():
        raise DataError(f"int8 export needs the run's data folder for calibration and the guard: {data} is gone")
    train = eval_samples(data, "train", run_dir)
    valid = eval_samples(data, "valid", run_dir)
    if not train or not valid:
        raise DataError(f"{data}: int8 export needs training images (calibration) and validation images (guard)")
    return [p for p, _ in _even(train, calibration)], _even(valid, GUARD_LIMIT)


def _images(
    run_dir: Path, meta: dict[str, str], calibration: int, calibration_images: Sequence[Path] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, validation images, their class indices), prepared as the model's input."""
    prep = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    calib_paths, pairs = _splits(run_dir, calibration)
    if calibration_images:
        from imgtune.predict import expand_inputs

        calib_paths = expand_inputs(list(calibration_images))
    calib, _ = _decode(calib_paths, prep)
    if len(calib) > CALIBRATION_BATCH:  # ORT's histogram calibrators fail on a shorter last batch
        calib = calib[: len(calib) - len(calib) % CALIBRATION_BATCH]
    if not len(calib):
        raise DataError("no readable calibration images: " + ", ".join(map(str, calib_paths[:3])))
    valid, ok = _decode([p for p, _ in pairs], prep)
    classes = json.loads(meta["class_folders"])
    return calib, valid, np.array([classes.index(pairs[i][1]) for i in ok])


def export_int8(
    run: Path | str,
    out: Path | str | None = None,
    *,
    calibration: int = 256,
    method: str = "auto",
    calibration_images: Sequence[Path] | None = None,
    opset: int = 18,
    progress: Callable[[str], None] | None = None,
) -> Int8Result:
    """Write RUN's best checkpoint as an int8 ONNX model (default RUN/model.int8.onnx) if it passes the guard.

    method: minmax, entropy, percentile, or auto (each in turn until one passes). calibration_images: files,
    folders or globs to calibrate on instead of `calibration` training images (photos like those the model
    will see in use); the guard still runs on the validation split."""
    need_all(("onnx", "onnxruntime", "onnxruntime.quantization"), "imgtune export --int8")
    import onnx
    import onnxruntime as ort

    if method != "auto" and method not in METHODS:
        raise ExportError(f"--calibration-method {method!r}: choose auto, {', '.join(METHODS)}")
    if calibration < 1:
        raise ExportError(f"--calibration {calibration}: needs at least one image")
    say = progress or log.info
    ckpt_path = resolve_checkpoint(Path(run))
    run_dir = ckpt_path.parent.parent
    out_path = Path(out) if out is not None else run_dir / "model.int8.onnx"
    data, _ = onnx_model(ckpt_path, opset)
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    calib, valid, labels = _images(run_dir, meta, calibration, calibration_images)
    tried: list[tuple[str, Guard]] = []
    with tempfile.TemporaryDirectory(prefix="imgtune-int8-") as tmp:
        fp32_path, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        fp32_path.write_bytes(data)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32_path), str(pre))  # shape inference + folding: what the quantizer expects
        fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        for name in METHODS if method == "auto" else (method,):
            candidate = Path(tmp) / f"int8-{name}.onnx"
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                _quantize(pre, candidate, calib, name)
            seconds = time.perf_counter() - t0
            int8 = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
            guard = compare(fp32, int8, valid, labels)
            tried.append((name, guard))
            say(f"int8 ({name} calibration on {len(calib)} images, {seconds:.0f} s): {guard.describe()}")
            if guard.passed:
                proto = onnx.load(str(candidate))
                record = {"method": name, "calibration_images": len(calib), **asdict(guard), "drop": guard.drop}
                set_metadata(proto, {**meta, "precision": "int8", "int8": json.dumps(record)})
                atomic_write_bytes(out_path, proto.SerializeToString())
                return Int8Result(out_path, name, len(calib), guard, tried)
    raise ExportError(_missed(tried, calibration, method))


def _missed(tried: list[tuple[str, Guard]], calibration: int, method: str) -> str:
    lines = [f"no int8 model written: it did not pass the accuracy guard (agreement >= {MIN_AGREEMENT:.0%}, "
             f"drop <= {MAX_DROP * 100:.1f} points)"]  # fmt: skip
    for name, g in tried:
        short = max(0.0, MIN_AGREEMENT - g.agreement) * 100
        over = max(0.0, g.drop - MAX_DROP) * 100
        lines.append(f"  {name}: {g.describe()}; missed by {short:.2f} points of agreement, {over:.2f} of accuracy")
    others = [m for m in METHODS if m not in [n for n, _ in tried]]
    hint = (
        f"try --calibration-method {others[0]}" if method != "auto" and others
        else f"try more calibration images (--calibration {calibration * 4})"
    )  # fmt: skip
    lines.append(f"  {hint}, or keep the fp32 model (imgtune export RUN)")
    return "\n".join(lines)
