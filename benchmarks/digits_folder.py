"""Write scikit-learn's real handwritten digits (1,797 8x8 images, bundled with scikit-learn: no download) as an
image folder: DIR/train/<digit>/*.png (1,437) and DIR/test/<digit>/*.png (360, stratified, seed 0). imgtune
holds out 20% of train/ for validation, which leaves the 1,150 training images of the results issue. The 8x8
grey levels (0-16) are scaled to 0-255 and written at 8x8; imgtune resizes them (--img-size 64).

usage: python benchmarks/digits_folder.py data/digits      (needs scikit-learn: pip install scikit-learn)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        n_test = round(len(members) * test_fraction)
        for rank, i in enumerate(members):
            split = "test" if rank < n_test else "train"
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
            counts[split] += 1
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    print(write_digits(args.out))
