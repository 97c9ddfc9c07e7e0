"""The checks behind `imgtune explain`, as figures: the pointing game and the randomisation check on a synthetic
folder where the class is decided by one small object, and the time an explanation costs.

    python benchmarks/explain_checks.py [--run RUN]   # RUN: a trained run to time on (e.g. make demo's)

The folder (also the tests' fixture): 200 x 150 photos of a smooth grey background with two 40-px
checkerboards at random places inside the centre square the model sees, one in the class's colour (red,
green, blue), one grey in every class, so that a map of what stands out in the image (rather than of what the
model learnt) points at the right one only half the time. lite0 (ImageNet weights) at 224 px with a head
trained on cached features (100 epochs, LR 0.03). A hit: the map's peak, in the original's pixels, within
TOLERANCE pixels of the class object's box (Zhang et al., 2016's pointing game, which allows 15), for the true
class. The randomisation check (Adebayo et al., 2018): the same maps from the model with every layer
re-initialised, their Pearson correlation with the trained model's, and their hit rate. Results go to
benchmarks/results/explain_checks.md.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_description
from PIL import Image

OUT = Path(__file__).parent / "results" / "explain_checks.md"
TOLERANCE = 15

COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220)}
W, H, BOX = 200, 150, 40  # landscape originals: the crop policy's geometry is part of what is tested


def _place(rng: np.random.Generator, avoid: tuple[int, int] | None = None) -> tuple[int, int]:
    """A box's top-left corner inside the centre square the crop keeps, not overlapping `avoid`."""
    while True:
        x0, y0 = int(rng.integers((W - H) // 2, (W + H) // 2 - BOX)), int(rng.integers(0, H - BOX))
        if avoid is None or abs(x0 - avoid[0]) >= BOX + 8 or abs(y0 - avoid[1]) >= BOX + 8:
            return x0, y0


def object_folder(root: Path, per_class: int, seed: int) -> dict[str, tuple[int, int, int, int]]:
    """A smooth grey background with two checkerboards at random places inside the centre square the model
    sees: one in the class's colour, one in grey, the same in every class (a map that shows what stands out
    in the image rather than what decides the class points at either). Returns path -> the class object's
    box (x0, y0, x1, y1) in the image's pixels."""
    rng = np.random.default_rng(seed)
    checker = (np.add.outer(np.arange(BOX) // 8, np.arange(BOX) // 8) % 2 == 0)[..., None]
    boxes = {}
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ramp = np.linspace(0, 1, W)[None, :, None] * rng.uniform(-40, 40)
            ramp = ramp + np.linspace(0, 1, H)[:, None, None] * rng.uniform(-40, 40)
            arr = np.clip(128 + ramp + rng.normal(0, 4, (H, W, 3)), 0, 255).astype(np.uint8)
            x0, y0 = _place(rng)
            arr[y0 : y0 + BOX, x0 : x0 + BOX] = np.where(checker, np.array(colour, dtype=np.uint8), 20)
            dx, dy = _place(rng, avoid=(x0, y0))
            arr[dy : dy + BOX, dx : dx + BOX] = np.where(checker, np.uint8(200), np.uint8(20))
            path = root / name / f"{i}.png"
            Image.fromarray(arr).save(path)
            boxes[str(path)] = (x0, y0, x0 + BOX, y0 + BOX)
    return boxes


def hits(explanations: list, boxes: dict[str, tuple[int, int, int, int]]) -> float:
    """The share of explanations whose peak lies within TOLERANCE pixels of its image's box."""

    def hit(e: object) -> bool:
        x0, y0, x1, y1 = boxes[e.path]  # type: ignore[attr-defined]
        if e.peak is None:  # type: ignore[attr-defined]
            return False  # no evidence anywhere: a miss
        x, y = e.peak  # type: ignore[attr-defined]
        return x0 - TOLERANCE <= x < x1 + TOLERANCE and y0 - TOLERANCE <= y < y1 + TOLERANCE

    return sum(map(hit, explanations)) / len(explanations)


def train_object_model(root: Path) -> tuple[Path, dict[str, tuple[int, int, int, int]]]:
    import imgtune

    object_folder(root / "train", 24, seed=1)
    object_folder(root / "valid", 8, seed=2)
    boxes = object_folder(root.parent / "probe", 20, seed=3)
    cfg = imgtune.build_config(overrides={
        "data.path": root, "out": root.parent / "run", "data.img_size": 224, "data.augment": "light",
        "train.epochs_frozen": 100, "train.lr": 0.03, "train.epochs": 0, "train.report": False,
    })  # fmt: skip
    return imgtune.train(cfg).run_dir, boxes


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(model)
    torch.manual_seed(0)
    for m in out.modules():
        if hasattr(m, "reset_parameters") and m is not out:
            m.reset_parameters()
    return out


def pearson(a: list, b: list) -> float:
    x = torch.from_numpy(np.stack([e.heatmap for e in a])).flatten(1)
    y = torch.from_numpy(np.stack([e.heatmap for e in b])).flatten(1)
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)).mean())


def main() -> None:
    import imgtune
    from imgtune.explain import explain_images, make_explainer
    from imgtune.images import load_rgb

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, help="a trained run to time explanations on")
    args = parser.parse_args()
    lines = ["# explain: the pointing game, the randomisation check, time", "", f"Machine: {cpu_description()}", ""]
    work = Path(tempfile.mkdtemp(prefix="imgtune-explain-"))
    run, boxes = train_object_model(work / "objects")
    predictor = imgtune.load(run, precision="fp32")
    model = predictor.model  # type: ignore[attr-defined]
    scrambled = randomised(model)
    images = [(p, load_rgb(Path(p))) for p in sorted(boxes)]
    lines += ["| method | hits (trained) | hits (random weights) | correlation trained vs random | s / image |",
              "|---|---|---|---|---|"]  # fmt: skip
    for method in ("gradcam", "occlusion"):
        names = predictor.display_names
        found, shuffled, seconds = [], [], 0.0
        for c, name in enumerate(names):  # the true class of each image
            mine = [im for im in images if Path(im[0]).parent.name == name]
            t0 = time.perf_counter()
            found += explain_images(make_explainer(model, 224, method), predictor.prep, mine, names, c)
            seconds += time.perf_counter() - t0
            shuffled += explain_images(make_explainer(scrambled, 224, method), predictor.prep, mine, names, c)
        lines.append(f"| {method} | {hits(found, boxes):.0%} | {hits(shuffled, boxes):.0%} | "
                     f"{pearson(found, shuffled):.2f} | {seconds / len(images):.3f} |")  # fmt: skip
        print(lines[-1], flush=True)
    lines += ["", f"{len(images)} probe images; a random point in the centre square: "
              f"{(BOX + 2 * TOLERANCE) ** 2 / H**2:.0%}; a map of what stands out: about 50%.", ""]  # fmt: skip
    if args.run is not None:
        lines += _timing(args.run)
    shutil.rmtree(work, ignore_errors=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


def _timing(run: Path) -> list[str]:
    """Seconds per image of `imgtune explain` on RUN's own test images (decode, maps, overlay PNG, files)."""
    import imgtune

    predictor = imgtune.load(run)
    data = Path(predictor.checkpoint["config"]["data"]["path"])
    paths = sorted((data / "test").rglob("*.png"))[:64]
    out = ["| run | input | method | images | s / image (imgtune.explain, files written) |", "|---|---|---|---|---|"]
    for method in ("gradcam", "occlusion"):
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            imgtune.explain(run, paths, folder, method=method)
            spent = time.perf_counter() - t0
        out.append(f"| {run} | {predictor.prep.img_size} px | {method} | {len(paths)} | {spent / len(paths):.3f} |")
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
