"""Inference throughput and accuracy per backend (torch fp32, torch bf16 where native, ONNX Runtime fp32 and
int8), side by side in one run, with how close each gets to what the cores can do.

    python benchmarks/inference_speed.py RUN [RUN ...] [--images 2000] [--batch 64]

Each RUN needs model.onnx and model.int8.onnx (imgtune export RUN; imgtune export RUN --int8) and its data
folder; accuracy is on up to --images test images (evenly spaced), decoded once into RAM, so the figures are
the model's alone (the whole predict path is benchmarks/predict_path.py). Throughput: the backends take turns,
three rounds, best round kept (a shared machine's noise hits them alike). Physical limit: multiply-accumulates
per image (counted on the PyTorch model: convolutions and linear layers) times images/s, against a large
fp32 (and bf16) GEMM (torch) and a large u8 x s8 GEMM (ONNX Runtime's MatMulInteger) measured on the same cores.
Results go to benchmarks/results/inference_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_description
from torch import nn

from imgtune.api import eval_samples
from imgtune.checkpoint import load_checkpoint, resolve_checkpoint
from imgtune.data import decode_many
from imgtune.models import model_from_checkpoint
from imgtune.predict import Predictor, load_predictor

OUT = Path(__file__).parent / "results" / "inference_speed.md"


def macs_per_image(model: nn.Module, size: int) -> int:
    total = 0

    def conv(m: nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: nn.Linear, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    for h in hooks:
        h.remove()
    return total


def gemm_peak(n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """GMAC/s of torch's matrix product on all cores: what the convolutions could reach at best."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = max(best, n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def int8_gemm_peak(n: int = 2048) -> float:
    """GMAC/s of ONNX Runtime's u8 x s8 MatMulInteger (the kernel family QLinearConv uses)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    session.run(None, feed)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = max(best, n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def throughput(predictors: dict[str, Predictor], images: torch.Tensor, batch: int) -> dict[str, float]:
    best = dict.fromkeys(predictors, 0.0)
    for _ in range(3):
        for name, p in predictors.items():
            p.logits(images[:batch])
            t0 = time.perf_counter()
            n = 0
            for i in range(0, len(images) - batch + 1, batch):
                p.logits(images[i : i + batch])
                n += batch
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    return best


def latency_ms(p: Predictor, image: torch.Tensor, reps: int = 30) -> float:
    p.logits(image)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        p.logits(image)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def one_run(run: Path, limit: int, batch: int, peaks: dict[str, float]) -> list[str]:
    ckpt = load_checkpoint(resolve_checkpoint(run))
    prep = ckpt.preprocessing
    data = Path(ckpt.config["data"]["path"])
    pairs = eval_samples(data, "test", run)
    pairs = pairs[:: max(1, len(pairs) // limit)][:limit]
    images, ok, _ = decode_many([p for p, _ in pairs], prep)
    labels = torch.tensor([ckpt.classes.index(pairs[i][1]) for i in ok])
    predictors: dict[str, Predictor] = {"torch fp32 (channels_last)": load_predictor(run, "cpu", precision="fp32")}
    auto = load_predictor(run, "cpu")
    if auto.backend != predictors["torch fp32 (channels_last)"].backend:
        predictors[f"{auto.backend} autocast"] = auto
    predictors["ONNX Runtime fp32"] = load_predictor(run / "model.onnx")
    predictors["ONNX Runtime int8"] = load_predictor(run / "model.int8.onnx")
    preds = {}
    for name, p in predictors.items():
        preds[name] = torch.cat([p.logits(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    speed = throughput(predictors, images, batch)
    macs = macs_per_image(model_from_checkpoint(ckpt), prep.img_size)
    ref = preds["torch fp32 (channels_last)"]
    rows = [f"## {run.name}: {ckpt.arch['name']} at {prep.img_size} px, {macs / 1e6:.0f} M multiply-accumulates per "
            f"image; {len(images)} test images", "",
            "| backend | accuracy | same top-1 as torch fp32 | images/s (batch " + str(batch) + ") | vs ORT fp32 | "
            "latency, 1 image (ms) | GMAC/s | of the GEMM peak |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, p in predictors.items():
        gmacs = macs * speed[name] / 1e9
        peak = peaks["int8" if "int8" in name else "bf16" if "bfloat16" in name else "fp32"]
        acc, same = (preds[name] == labels).float().mean(), (preds[name] == ref).float().mean()
        ratio = speed[name] / speed["ONNX Runtime fp32"]
        late = latency_ms(p, images[:1])
        rows.append(f"| {name} | {acc:.4f} | {same:.2%} | {speed[name]:.0f} | {ratio:.2f}x | {late:.1f} | "
                    f"{gmacs:.0f} | {gmacs / peak:.0%} |")  # fmt: skip
        print(rows[-1], flush=True)
    return [*rows, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    peaks = {"fp32": gemm_peak(), "bf16": gemm_peak(dtype=torch.bfloat16), "int8": int8_gemm_peak()}
    lines = ["# Inference speed per backend", "", f"{cpu_description()}, {torch.get_num_threads()} threads; measured "
             f"GEMM peaks on these cores: fp32 {peaks['fp32']:.0f} GMAC/s and bf16 {peaks['bf16']:.0f} GMAC/s "
             f"(torch), u8 x s8 {peaks['int8']:.0f} GMAC/s (ONNX Runtime MatMulInteger)", ""]  # fmt: skip
    for run in args.runs:
        lines += one_run(run, args.images, args.batch, peaks)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
