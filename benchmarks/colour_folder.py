"""A colour image folder where colour is (half of) the label, as with fruit: six classes - red, green and blue
discs and squares - drawn at a random place, size and angle on patches of real photographs (scikit-learn's two
bundled sample photos, china.jpg and flower.jpg: no download), with random lighting and JPEG compression. A
hue shift turns one class into another and the backgrounds are busy, so it checks what the grey workloads
cannot: colour augmentation that is too strong, and a head that must ignore photographic clutter.

DIR/train/<class>/*.jpg (per-class, default 160) and DIR/test/<class>/*.jpg (60 per class); imgtune holds out
20% of train/ for validation.

usage: python benchmarks/colour_folder.py data/colour [--per-class 160] [--size 96]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

COLOURS = {"red": (205, 40, 35), "green": (40, 165, 60), "blue": (45, 70, 200)}
SHAPES = ("disc", "square")


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(img) for img in load_sample_images().images]


def _one(photos: list[Image.Image], colour: tuple[int, int, int], shape: str, size: int,
         rng: np.random.Generator) -> Image.Image:  # fmt: skip
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(size, min(photo.size)))
    x0, y0 = int(rng.integers(photo.width - side)), int(rng.integers(photo.height - side))
    canvas = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BILINEAR)
    r = int(rng.integers(size // 8, size // 4))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    layer = Image.new("L", (4 * r, 4 * r))
    draw = ImageDraw.Draw(layer)
    box = (r, r, 3 * r, 3 * r)
    draw.ellipse(box, fill=255) if shape == "disc" else draw.rectangle(box, fill=255)
    layer = layer.rotate(float(rng.uniform(0, 90)), resample=Image.Resampling.BILINEAR)
    shade = tuple(int(np.clip(c * rng.uniform(0.75, 1.15), 0, 255)) for c in colour)
    canvas.paste(Image.new("RGB", layer.size, shade), (cx - 2 * r, cy - 2 * r), layer)
    return ImageEnhance.Brightness(canvas).enhance(float(rng.uniform(0.7, 1.3)))


def write_colour_folder(out: Path, per_class: int = 160, test_per_class: int = 60, size: int = 96,
                        seed: int = 0) -> dict[str, int]:  # fmt: skip
    photos = _photos()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            for split, n in (("train", per_class), ("test", test_per_class)):
                folder = out / split / f"{name}_{shape}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _one(photos, colour, shape, size, rng).save(
                        folder / f"{i:04d}.jpg", quality=int(rng.integers(70, 95))
                    )
                    counts[split] += 1
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    print(write_colour_folder(args.out, args.per_class, size=args.size))
