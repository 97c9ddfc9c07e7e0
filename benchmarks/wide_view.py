"""What data.train_aspect does on a photo-like folder: the same run with training crops drawn from the centre
square (1.0) and from up to a 4:3 view of each photo (1.33), side by side, a few seeds each.
Writes benchmarks/results/wide_view.md.

The folder: real photographs bundled with scikit-image (no download) - 11 of them, one class each - cut into
4:3 and 3:4 pictures (96 x 72 / 72 x 96 px) of 10-25% of a photo's area. Training pictures come from the left
60% of each photo, validation pictures from the right 40%, so validation asks for the photo's look, not a
memorised patch. Photo-like, non-square and offline; small, so a figure here is a direction, not a benchmark.

usage: python benchmarks/wide_view.py [--seeds 0,1] [--per-class 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "grass", "gravel", "brick", "camera"]  # fmt: skip


def photo_folder(out: Path, per_class: int, valid_per_class: int, seed: int = 0) -> Path:
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        photo = Image.fromarray(img if img.ndim == 3 else np.stack([img] * 3, -1)).convert("RGB")
        w, h = photo.size
        for split, n, (x0, x1) in (("train", per_class, (0.0, 0.6)), ("valid", valid_per_class, (0.6, 1.0))):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                portrait = i % 2 == 1
                area = rng.uniform(0.10, 0.25) * w * h
                cw = int(np.sqrt(area * (3 / 4 if portrait else 4 / 3)))
                ch = int(cw * (4 / 3 if portrait else 3 / 4))
                cw, ch = min(cw, int((x1 - x0) * w)), min(ch, h)
                left = int(rng.uniform(x0 * w, x1 * w - cw))
                top = int(rng.uniform(0, h - ch))
                pic = photo.crop((left, top, left + cw, top + ch)).resize((72, 96) if portrait else (96, 72))
                pic.save(out / split / name / f"{i}.jpg", quality=92)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgtune-wide-view"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "wide_view.md")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    data = photo_folder(args.work / "photos", args.per_class, args.per_class // 2)
    imgtune = str(Path(sys.executable).parent / "imgtune")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for aspect in (1.0, 4 / 3):
            run = args.work / f"run-{aspect:.2f}-{seed}"
            t0 = time.monotonic()
            subprocess.run([imgtune, "train", str(data), "--img-size", "64", "--epochs-frozen", "10", "--epochs", "4",
                            "--augment", "strong", "--set", f"data.train_aspect={aspect}", "--seed", str(seed),
                            "--out", str(run), "--no-report", "--patience", "100"],
                           check=True, capture_output=True)  # fmt: skip
            s = json.loads((run / "summary.json").read_text())
            acc = round(s["best_valid_acc"], 4)
            rows.append({"train_aspect": round(aspect, 2), "seed": seed, "best_valid_acc": acc,
                         "best_epoch": s["best_epoch"], "wall_s": round(time.monotonic() - t0)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    mean = {a: float(np.mean([r["best_valid_acc"] for r in rows if r["train_aspect"] == a])) for a in (1.0, 1.33)}
    lines = ["# data.train_aspect on a photo-like folder", "", f"Machine: {cpu_description()}. {len(PHOTOS)} classes, "
             f"{args.per_class} training / {args.per_class // 2} validation pictures per class; tf_efficientnet_lite0 "
             "(offline ImageNet weights), 64 px, --augment strong (random resized crops of 30-100% of the area), "
             "10 head epochs on cached features then 4 fine-tuning epochs on augmented crops.", "",
             "| train_aspect | seed | best valid acc | best epoch | wall s |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {r['train_aspect']} | {r['seed']} | {r['best_valid_acc']} | {r['best_epoch']} | {r['wall_s']} |"
        for r in rows
    ]
    lines += ["", f"mean best valid acc: 1.0 -> {mean[1.0]:.4f}, 1.33 -> {mean[1.33]:.4f}"]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
