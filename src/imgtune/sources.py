"""Public datasets -> image folders: `imgtune data fashion-mnist OUT`.

Parses the IDX files itself (the format is four lines of spec) and writes PNGs, so the result is the same
folder layout users have for their own data.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgtune.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot",
]  # fmt: skip
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}
MARKER = ".imgtune-source.json"


class SourceError(ValueError):
    """A dataset source is missing or malformed; the message names the file."""


def read_idx(path: Path) -> np.ndarray:
    """IDX (optionally gzipped): 2 zero bytes, a type byte, a dimension count, big-endian uint32 sizes, data."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SourceError(f"{path}: damaged gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_TYPES[raw[2]]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise SourceError(f"{path}: {len(raw) - header} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise SourceError(f"{source}: {stem}(.gz) not found")


def fashion_mnist_source(source: Path | None, download: bool) -> Path:
    """Where the IDX files are: --source, the Debian package's folder, or torchvision's downloader."""
    if source is not None:
        return Path(source)
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_DIR
    cache = Path(os.environ.get("IMGTUNE_CACHE", Path.home() / ".cache" / "imgtune")) / "fashion-mnist"
    raw = cache / "FashionMNIST" / "raw"
    if (raw / "train-images-idx3-ubyte.gz").is_file() or (raw / "train-images-idx3-ubyte").is_file():
        return raw
    if not download:
        raise SourceError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (Debian: apt-get install dataset-fashion-mnist); "
            f"pass --source DIR, or --download to fetch it with torchvision"
        )
    from torchvision.datasets import FashionMNIST

    log.info("downloading Fashion-MNIST with torchvision into %s", cache)
    FashionMNIST(str(cache), train=True, download=True)
    FashionMNIST(str(cache), train=False, download=True)
    return raw


def _select(labels: np.ndarray, per_class: int | None, valid_per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class selection: first valid_per_class shuffled indices -> valid, next per_class -> train."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    valid: list[int] = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        if valid_per_class + (per_class or 1) > len(idx):
            raise SourceError(f"class {c} has {len(idx)} images: cannot take {valid_per_class} + {per_class}")
        valid += sorted(idx[:valid_per_class].tolist())
        rest = idx[valid_per_class:]
        train += sorted((rest if per_class is None else rest[:per_class]).tolist())
    return train, valid


def write_fashion_mnist(
    out: Path,
    per_class: int | None = None,
    valid_per_class: int = 500,
    source: Path | None = None,
    seed: int = 0,
    download: bool = False,
) -> dict[str, int]:
    """OUT/{train,valid,test}/<class>/<index>.png; test = the official 10,000 test images. Idempotent."""
    out = Path(out)
    params: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "per_class": per_class,
        "valid_per_class": valid_per_class,
        "seed": seed,
    }
    marker = out / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params:
            log.info("%s already holds this Fashion-MNIST selection; nothing to do", out)
            counts: dict[str, int] = done["counts"]
            return counts
        raise SourceError(f"{out} holds a different Fashion-MNIST selection ({done.get('params')}); use another OUT")
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out}: exists and is not empty; choose a new folder")
    src = fashion_mnist_source(source, download)
    train_x = read_idx(_find(src, "train-images-idx3-ubyte"))
    train_y = read_idx(_find(src, "train-labels-idx1-ubyte"))
    test_x = read_idx(_find(src, "t10k-images-idx3-ubyte"))
    test_y = read_idx(_find(src, "t10k-labels-idx1-ubyte"))
    for x, y, name in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SourceError(f"{src}: {name} images {x.shape} and labels {y.shape} do not match")
    train_idx, valid_idx = _select(train_y, per_class, valid_per_class, seed)
    jobs: list[tuple[Path, np.ndarray]] = []
    for split, images, labels, indices in (
        ("train", train_x, train_y, train_idx),
        ("valid", train_x, train_y, valid_idx),
        ("test", test_x, test_y, list(range(len(test_y)))),
    ):
        for c in FASHION_MNIST_CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        jobs += [(out / split / FASHION_MNIST_CLASSES[int(labels[i])] / f"{i}.png", images[i]) for i in indices]

    def save(job: tuple[Path, np.ndarray]) -> None:
        Image.fromarray(job[1], mode="L").save(job[0])

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(save, jobs))
    counts = {"train": len(train_idx), "valid": len(valid_idx), "test": len(test_y)}
    atomic_write_text(marker, json.dumps({"params": params, "counts": counts, "source": str(src)}, indent=2))
    return counts
