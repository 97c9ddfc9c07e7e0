"""Groundwork for int8 export: ONNX Runtime static quantization (QDQ) of a run's model.onnx under several
settings, each against the fp32 model on the run's validation images, side by side in one run.

    python benchmarks/int8_probe.py RUN [--calibration 88] [--batch 32]

RUN needs model.onnx (imgtune export RUN) and its data folder. Calibration images come from the training
split, through imgtune's own pixel path (decode_prepared), in equal batches of 8. For each setting: top-1
agreement with fp32, accuracy, max |Δp| and images/s against fp32 (one batch, same session options).
Results go to benchmarks/results/int8_probe.md (that file predates the export's padding fix). imgtune's own
`export --int8` (quantize.py) uses minmax on every op but the classifier and softmax, behind an accuracy guard.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from machine import cpu_description
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from imgtune.api import eval_samples
from imgtune.checkpoint import load_checkpoint, resolve_checkpoint
from imgtune.data import decode_prepared

OUT = Path(__file__).parent / "results" / "int8_probe.md"
CONV_ONLY = {"op_types_to_quantize": ["Conv", "Gemm", "MatMul"]}
SETTINGS: dict[str, dict[str, Any]] = {
    "MinMax, Conv/Gemm/MatMul only": {**CONV_ONLY},
    "MinMax, every op": {},
    "Percentile, Conv/Gemm/MatMul only": {**CONV_ONLY, "calibrate_method": CalibrationMethod.Percentile},
    "Percentile, every op": {"calibrate_method": CalibrationMethod.Percentile},
    "Entropy, every op": {"calibrate_method": CalibrationMethod.Entropy},
    "MinMax, symmetric int8 activations, every op": {
        "activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}},
}  # fmt: skip


class Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self.batches = iter([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self.batches, None)
        return None if b is None else {"image": b}


def throughput(session: ort.InferenceSession, images: np.ndarray, reps: int = 5) -> float:
    session.run(None, {"image": images})
    t0 = time.perf_counter()
    for _ in range(reps):
        session.run(None, {"image": images})
    return reps * len(images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--calibration", type=int, default=88)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    ckpt = load_checkpoint(resolve_checkpoint(args.run))
    data = Path(ckpt.config["data"]["path"])
    train = eval_samples(data, "train", args.run)
    step = max(1, len(train) // args.calibration)
    calib = np.stack([decode_prepared(p, ckpt.preprocessing).numpy() for p, _ in train[::step][: args.calibration]])
    valid = eval_samples(data, "valid", args.run)
    images = np.stack([decode_prepared(p, ckpt.preprocessing).numpy() for p, _ in valid])
    labels = np.array([ckpt.classes.index(c) for _, c in valid])
    fp32 = ort.InferenceSession(str(args.run / "model.onnx"), providers=["CPUExecutionProvider"])
    want = fp32.run(None, {"image": images})[0]
    base_speed = throughput(fp32, images[: args.batch])
    rows = [f"| fp32 | 100% | {(want.argmax(1) == labels).mean():.4f} | 0 | {base_speed:.0f} | 1.00 |"]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(args.run / "model.onnx"), str(pre))
        for name, extra in SETTINGS.items():
            out = Path(tmp) / "int8.onnx"
            options: dict[str, Any] = {
                "quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8, **extra,
            }  # fmt: skip
            t0 = time.perf_counter()
            quantize_static(str(pre), str(out), Batches(calib), **options)
            seconds = time.perf_counter() - t0
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": images})[0]
            speed = throughput(session, images[: args.batch])
            rows.append(f"| {name} ({seconds:.0f} s) | {(got.argmax(1) == want.argmax(1)).mean():.1%} | "
                        f"{(got.argmax(1) == labels).mean():.4f} | {np.abs(got - want).max():.3f} | {speed:.0f} | "
                        f"{speed / base_speed:.2f} |")  # fmt: skip
            print(rows[-1], flush=True)
    text = "\n".join([
        "# int8 probe", "",
        f"{cpu_description()}; run {args.run} ({ckpt.arch['name']}, {ckpt.preprocessing.img_size} px), "
        f"{len(calib)} calibration images, {len(valid)} validation images, batch {args.batch}", "",
        "| setting | top-1 agreement with fp32 | accuracy | max abs diff of p | images/s | vs fp32 |",
        "|---|---|---|---|---|---|", *rows, "",
    ])  # fmt: skip
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
