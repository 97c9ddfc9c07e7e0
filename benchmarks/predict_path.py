"""The predict path stage by stage (decode -> resize -> batch -> model -> CSV) on PNGs and on JPEG photos, then
`imgtune predict` end to end against the tutorial-style predict loop, each a fresh process as a user runs it.

    python benchmarks/predict_path.py RUN DATA [--photos 200] [--skip-end-to-end]

RUN: a trained run with model.onnx and model.int8.onnx beside it (imgtune export RUN; imgtune export RUN --int8).
DATA: its dataset folder; DATA/test holds the PNGs (the demo's 10,000 Fashion-MNIST test images).
JPEG photos: the colour photographs shipped with scikit-image and matplotlib (astronaut, coffee, chelsea,
motorcycle, rocket, retina, Hubble field, Grace Hopper...), (a) at their own size (0.2-0.9 MP) and (b) tiled
at full resolution into 12-MP (4000 x 3000) camera-sized frames, JPEG quality 90: real photographic detail,
which is what JPEG decoding time depends on. Results go to benchmarks/results/predict_path.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_description
from PIL import Image

from imgtune.checkpoint import load_checkpoint, resolve_checkpoint
from imgtune.images import load_rgb
from imgtune.models import model_from_checkpoint
from imgtune.predict import Prediction, expand_inputs, load_predictor, predictions_csv
from imgtune.transforms import prepare

OUT = Path(__file__).parent / "results" / "predict_path.md"
HERE = Path(__file__).parent


def sample_photos() -> list[Image.Image]:
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "motorcycle_right.png",
             "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "ihc.png", "color.png"]  # fmt: skip
    photos = [Image.open(data / n).convert("RGB") for n in names if (data / n).is_file()]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return photos + ([Image.open(hopper).convert("RGB")] if hopper.is_file() else [])


def write_photos(folder: Path, count: int) -> tuple[list[Path], list[Path]]:
    """(photos at their own size, 12-MP mosaics of them), `count` files each, JPEG quality 90."""
    photos = sample_photos()
    small, large = folder / "photos", folder / "camera"
    small.mkdir(parents=True)
    large.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        p = photos[i % len(photos)]
        if i >= len(photos):  # a different crop of the same photo: not byte-identical files
            w, h = p.size
            x, y = int(rng.integers(0, w // 8)), int(rng.integers(0, h // 8))
            p = p.crop((x, y, x + w * 7 // 8, y + h * 7 // 8))
        p.save(small / f"{i:05d}.jpg", quality=90)
        frame = Image.new("RGB", (4000, 3000))
        x = y = 0
        order = rng.permutation(len(photos))
        k = 0
        while y < 3000:
            tile = photos[order[k % len(order)]]
            frame.paste(tile, (x, y))
            x += tile.size[0]
            if x >= 4000:
                x, y = 0, y + min(t.size[1] for t in photos)
            k += 1
        frame.save(large / f"{i:05d}.jpg", quality=90)
    return sorted(small.iterdir()), sorted(large.iterdir())


def per_image(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def stages(paths: list[Path], prep: Any, models: dict[str, Any], batch: int = 64) -> dict[str, float]:
    """Milliseconds per image of each stage, one thread, in this process."""
    out: dict[str, float] = {}
    it = iter(paths * 2)
    out["decode (full size)"] = per_image(lambda: load_rgb(next(it)), min(len(paths), 60)) * 1e3
    it = iter(paths * 2)
    out["decode (JPEG draft)"] = per_image(lambda: load_rgb(next(it), draft_size=prep.img_size), len(paths)) * 1e3
    decoded = [load_rgb(p, draft_size=prep.img_size) for p in paths]
    it2 = iter(decoded * 2)
    out["resize + crop"] = per_image(lambda: prepare(next(it2), prep), len(decoded)) * 1e3
    prepared = [prepare(d, prep) for d in decoded]
    while len(prepared) < batch:
        prepared += prepared
    t0 = time.perf_counter()
    stacked = torch.stack(prepared[:batch])
    out["batch (stack)"] = (time.perf_counter() - t0) / batch * 1e3
    for name, predictor in models.items():
        predictor.logits(stacked)
        t0 = time.perf_counter()
        for _ in range(3):
            predictor.logits(stacked)
        out[f"model: {name}"] = (time.perf_counter() - t0) / (3 * batch) * 1e3
    rows = [Prediction(str(p), [("class", 0.9), ("other", 0.05), ("third", 0.01)]) for p in paths]
    t0 = time.perf_counter()
    predictions_csv(rows, 3)
    out["CSV rows"] = (time.perf_counter() - t0) / len(rows) * 1e3
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, res.stdout


def end_to_end(run: Path, data: Path, tmp: Path) -> list[tuple[str, float, int]]:
    """Fresh processes on DATA/test: imgtune predict per backend, and the tutorial loop."""
    n = len(expand_inputs([data / "test"]))
    weights = tmp / "weights.pt"
    torch.save(model_from_checkpoint(load_checkpoint(resolve_checkpoint(run))).state_dict(), weights)
    imgtune = [sys.executable, "-m", "imgtune", "predict"]
    rows = []
    size = str(load_checkpoint(resolve_checkpoint(run)).preprocessing.img_size)
    seconds, _ = timed([sys.executable, str(HERE / "tutorial_baseline.py"), str(data), "--predict", str(weights),
                          "--img-size", size])  # fmt: skip
    rows.append(("tutorial loop (ImageFolder + DataLoader(2 workers) + eager fp32)", seconds, n))
    for label, model in (("imgtune predict, torch (auto precision)", run),
                         ("imgtune predict, model.onnx (ORT fp32)", run / "model.onnx"),
                         ("imgtune predict, model.int8.onnx (ORT int8)", run / "model.int8.onnx")):  # fmt: skip
        seconds, _ = timed([*imgtune, str(model), str(data / "test"), "--out", str(tmp / "p.csv")])
        rows.append((label, seconds, n))
    print(json.dumps(rows), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--photos", type=int, default=120)
    ap.add_argument("--skip-end-to-end", action="store_true")
    args = ap.parse_args()
    prep = load_checkpoint(resolve_checkpoint(args.run)).preprocessing
    models = {"torch fp32": load_predictor(args.run, "cpu", precision="fp32")}
    auto = load_predictor(args.run, "cpu")
    if auto.backend != models["torch fp32"].backend:
        models[auto.backend] = auto
    models["ORT fp32"] = load_predictor(args.run / "model.onnx")
    models["ORT int8"] = load_predictor(args.run / "model.int8.onnx")
    lines = ["# Predict path, stage by stage", "", f"{cpu_description()}; run {args.run} ({prep.img_size} px)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        small, large = write_photos(Path(tmp), args.photos)
        pngs = expand_inputs([args.data / "test"])[:: max(1, 10000 // 500)][:500]
        sets = {"PNG (Fashion-MNIST, 28 px)": pngs, "JPEG photos, own size": small, "JPEG photos, 12 MP": large}
        table = {name: stages(paths, prep, models) for name, paths in sets.items()}
        keys = list(next(iter(table.values())))
        lines += ["ms per image in this process; decode and resize on one thread, the model rows on all cores at batch "
                  "64 from prepared uint8 tensors in RAM:", "",
                  "| stage | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]  # fmt: skip
        lines += [f"| {k} | " + " | ".join(f"{table[s][k]:.2f}" for s in table) + " |" for k in keys]
        print("\n".join(lines), flush=True)
        if not args.skip_end_to_end:
            rows = end_to_end(args.run, args.data, Path(tmp))
            base = rows[0][1]
            lines += ["", f"End to end on the {rows[0][2]} test PNGs, fresh process each (start-up included):", "",
                      "| command | seconds | images/s | vs tutorial |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {label} | {s:.1f} | {n / s:.0f} | {base / s:.2f}x |" for label, s, n in rows]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
