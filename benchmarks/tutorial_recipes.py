"""Three of the tutorials' recipes (examples/seed00*.yaml) run through the imgtune CLI on real Fashion-MNIST laid
out the food-11 way, each scored on images it never trained on. Writes benchmarks/results/tutorial_recipes.md.

- food-11 (seed002): labels in file names (training/3_127.png), validation/, an unlabelled evaluation/ folder;
  the tutorial's CNN and recipe; `imgtune predict --format submission --columns Id,Category`; the submission
  scored against the hidden labels, as the course's Kaggle page scores it.
- DLI fruit (seed000): its augmentation and two stages on the same folder. The tutorial's VGG16 needs hub
  weights, so the offline EfficientNet-Lite0 takes its place (keep_fc is a VGG key: unset).
- CIFAR-10 (seed004): VGG16-BN from scratch on every training image (no validation split, plateau on the
  training loss), tested on the labelled test images.

CPU-sized: --per-class images per class, fewer epochs where a line says so (each override is in the table).

usage: python benchmarks/tutorial_recipes.py [--per-class 300] [--out benchmarks/results/tutorial_recipes.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from PIL import Image

from imgtune.sources import FASHION_MNIST_DIR, read_idx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def food11_folder(out: Path, per_class: int, valid_per_class: int, test_per_class: int) -> dict[str, str]:
    """training/<class>_<i>.png, validation/<class>_<i>.png, evaluation/<i>.png; returns the hidden labels."""
    rng = np.random.default_rng(0)
    x, y = (
        read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"),
        read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"),
    )
    tx, ty = (
        read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"),
        read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"),
    )
    for split in ("training", "validation", "evaluation"):
        (out / split).mkdir(parents=True, exist_ok=True)
    hidden: dict[str, str] = {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i in idx[:per_class]:
            Image.fromarray(x[i]).save(out / "training" / f"{c}_{i}.png")
        for i in idx[per_class : per_class + valid_per_class]:
            Image.fromarray(x[i]).save(out / "validation" / f"{c}_{i}.png")
        for i in rng.permutation(np.flatnonzero(ty == c))[:test_per_class]:
            Image.fromarray(tx[i]).save(out / "evaluation" / f"{i}.png")
            hidden[str(i)] = str(c)
    return hidden


def labelled_test(food: Path, hidden: dict[str, str], out: Path) -> Path:
    """The CIFAR recipe's folder: train/<class>/ = training + validation, test/<class>/ = evaluation."""
    for split in ("training", "validation"):
        for f in (food / split).iterdir():
            (out / "train" / f.stem.split("_")[0]).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / "train" / f.stem.split("_")[0] / f.name)
    for f in (food / "evaluation").iterdir():
        (out / "test" / hidden[f.stem]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, out / "test" / hidden[f.stem] / f.name)
    return out


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start, proc.stdout + proc.stderr


def summary(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgtune-tutorial-recipes"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tutorial_recipes.md")
    ap.add_argument("--only", default="food11,dli,cifar")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    food = args.work / "food-11"
    hidden = food11_folder(food, args.per_class, args.per_class // 6, 100)
    imgtune = str(BIN / "imgtune")
    rows = []
    recipes = {
        "food11": ("seed002_food11_cnn.yaml", food, []),
        "dli": ("seed000_fruit_vgg16.yaml", food,
                ["--labels", "filename", "--model", "tf_efficientnet_lite0", "--set", "model.keep_fc=null",
                 "--img-size", "112"]),
        "cifar": ("seed004_cifar10_vgg16bn.yaml", labelled_test(food, hidden, args.work / "fm-cifar-layout"),
                  ["--img-size", "32", "--epochs", "15"]),
    }  # fmt: skip
    for name in args.only.split(","):
        config, data, extra = recipes[name]
        run_dir = args.work / f"run-{name}"
        wall, _ = run([imgtune, "train", str(data), "--config", str(ROOT / "examples" / config),
                         "--out", str(run_dir), "--no-report", *extra])  # fmt: skip
        s = summary(run_dir)
        row = {"recipe": config, "overrides": " ".join(extra) or "none", "wall_s": round(wall),
               "epochs_run": s.get("epochs_run"), "best_epoch": s.get("best_epoch"),
               "best_valid_acc": s.get("best_valid_acc"), "test_acc": s.get("test_acc"),
               "monitor": s.get("monitor")}  # fmt: skip
        if data == food:  # the evaluation folder is unlabelled: score a submission against the hidden labels
            sub = args.work / f"submission-{name}.csv"
            run([imgtune, "predict", str(run_dir), str(food / "evaluation"), "--format", "submission",
                 "--columns", "Id,Category", "--out", str(sub)])  # fmt: skip
            with open(sub) as f:
                got = list(csv.DictReader(f))
            row["submission_acc"] = round(sum(r["Category"] == hidden[r["Id"]] for r in got) / len(got), 4)
            row["submission_rows"] = len(got)
            row["submission_header"] = ",".join(got[0].keys())
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [
        "# Tutorial recipes on Fashion-MNIST in the food-11 layout", "",
        f"Machine: {cpu_description()}; "
        f"{args.per_class} training and {args.per_class // 6} validation images per class (10 classes) from the "
        "official training set, 100 per class from the official test set as the unlabelled evaluation/ folder.", "",
        "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
    ]  # fmt: skip
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
