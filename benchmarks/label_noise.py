"""`imgtune data issues` against known label noise, then what acting on it is worth.

    python benchmarks/label_noise.py [DATA] [--rates 0.05,0.2] [--skip-training]

DATA: the demo's Fashion-MNIST folder (make fashion-mnist: train 10,000, valid 1,000, test 10,000). For each
rate, a copy of DATA (hard links) where that share of the *training* images, drawn with a fixed seed, sits in
a wrong class folder drawn uniformly among the other nine (valid and test stay clean, so test accuracy measures
what the noise did to training). `data issues` runs on it (the default pretrained lite0 at 112 px, 5 folds);
precision and recall are counted among its top N flagged, N = the number flipped, and over all it flagged.
Then the demo recipe (112 px, 30 head epochs, 2 fine-tuning epochs) trains on the clean folder, on each noisy
folder, on each noisy folder with `--exclude` of all it flagged, and with `--exclude` of only the surest (score
<= 0.01, what `data issues --max-score 0.01` writes); each run's test accuracy. Results go to
benchmarks/results/label_noise.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
from machine import cpu_description

import imgtune
from imgtune.curate import find_issues

OUT = Path(__file__).parent / "results" / "label_noise.md"
WORK = Path("/tmp/imgtune-label-noise")
DEMO = {"data.img_size": 112, "train.epochs_frozen": 30, "train.epochs": 2}
SURE = 0.01  # data issues --max-score: only the issues whose given label has at most this probability


def noisy_copy(data: Path, rate: float, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """DATA with `rate` of train/ moved to wrong class folders (hard links); returns it and {new path: true}."""
    out = WORK / f"noisy{round(rate * 100)}"
    shutil.rmtree(out, ignore_errors=True)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    files = sorted((data / "train").glob("*/*"))
    rng = np.random.default_rng(seed)
    flip = set(rng.choice(len(files), size=round(rate * len(files)), replace=False).tolist())
    truth = {}
    for i, f in enumerate(files):
        label = f.parent.name
        if i in flip:
            label = str(rng.choice([c for c in classes if c != label]))
        target = out / "train" / label / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
        if i in flip:
            truth[str(target)] = f.parent.name
    for split in ("valid", "test"):
        shutil.copytree(data / split, out / split, copy_function=os.link)
    return out, truth


def train_test_acc(data: Path, name: str, **extra: object) -> tuple[float, float]:
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cfg = imgtune.build_config(overrides={"data.path": data, "out": out, **DEMO, **extra})
    result = imgtune.train(cfg)
    assert result.test is not None
    return result.test.accuracy, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--rates", default="0.05,0.2")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    lines = ["# data issues against known label noise", "", f"Machine: {cpu_description()}", "",
             f"Data: {args.data} (train 10,000 / valid 1,000 / test 10,000); labels flipped in train/ only, seed 0.",
             "Features: tf_efficientnet_lite0 (ImageNet, offline) at 112 px; 5-fold linear heads.", "",
             "| flipped | images flagged | precision@N | recall@N | precision (all flagged) | recall (all flagged)"
             " | time |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    trainings: list[str] = []
    if not args.skip_training:
        acc, secs = train_test_acc(args.data, "clean")
        trainings.append(f"| clean | {acc:.4f} | {secs:.0f} s |")
    for rate in (float(r) for r in args.rates.split(",")):
        noisy, truth = noisy_copy(args.data, rate)
        cfg = imgtune.build_config(overrides={"data.path": noisy, "data.img_size": 112})
        found = find_issues(cfg, out=WORK / f"issues{round(rate * 100)}.csv")
        flagged = [r["path"] for r in found.issues]
        n = len(truth)
        top = flagged[:n]
        hits_top = sum(p in truth for p in top)
        hits_all = sum(p in truth for p in flagged)
        right = sum(truth.get(r["path"]) == r["suggested"] for r in found.issues if r["path"] in truth)
        precision_top, precision_all = hits_top / max(1, len(top)), hits_all / max(1, len(flagged))
        lines.append(f"| {n} ({rate:.0%}) | {len(flagged)} | {precision_top:.3f} | {hits_top / n:.3f} | "
                     f"{precision_all:.3f} | {hits_all / n:.3f} | {found.seconds:.0f} s |")  # fmt: skip
        lines.append(f"|  | suggested label right for {right} of the {hits_all} flipped images it found | | | | | |")
        print("\n".join(lines[-2:]), flush=True)
        if not args.skip_training:
            acc, secs = train_test_acc(noisy, f"noisy{round(rate * 100)}")
            trainings.append(f"| {rate:.0%} flipped | {acc:.4f} | {secs:.0f} s |")
            exclude = WORK / f"issues{round(rate * 100)}.csv"
            acc, secs = train_test_acc(noisy, f"excluded{round(rate * 100)}", **{"data.exclude": exclude})
            trainings.append(f"| {rate:.0%} flipped, --exclude the {len(flagged)} flagged | {acc:.4f} | {secs:.0f} s |")
            sure = [r for r in found.issues if r["score"] <= SURE]
            (WORK / "sure.txt").write_text("".join(f"{r['path']}\n" for r in sure))
            acc, secs = train_test_acc(noisy, f"sure{round(rate * 100)}", **{"data.exclude": WORK / "sure.txt"})
            caught = sum(r["path"] in truth for r in sure)
            trainings.append(f"| {rate:.0%} flipped, --exclude the {len(sure)} with score <= {SURE} "
                             f"({caught} of them flipped) | {acc:.4f} | {secs:.0f} s |")  # fmt: skip
            print("\n".join(trainings), flush=True)
    if trainings:
        lines += ["", "Test accuracy (official 10,000 test images) with the demo recipe (112 px, 30 head epochs,"
                  " 2 fine-tuning epochs):", "", "| training data | test accuracy | run time |", "|---|---|---|",
                  *trainings]  # fmt: skip
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
