from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FASHION_DIR
from imgtune.layouts import load_split
from imgtune.sources import FASHION_MNIST_CLASSES, SourceError, read_idx, write_fashion_mnist


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """IDX files in the official format: 10 classes x 4 train images, 10 x 1 test images."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    train_y = np.repeat(np.arange(10), 4)
    test_y = np.arange(10)
    _idx(src / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)))
    _idx(src / "train-labels-idx1-ubyte.gz", train_y)
    _idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)))
    _idx(src / "t10k-labels-idx1-ubyte.gz", test_y)
    return src


def test_read_idx_parses_shape_and_rejects_garbage(tiny_source: Path, tmp_path: Path) -> None:
    x = read_idx(tiny_source / "train-images-idx3-ubyte.gz")
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 10))
    with pytest.raises(SourceError, match="expected"):
        read_idx(bad)
    (tmp_path / "text").write_text("hello")
    with pytest.raises(SourceError, match="not an IDX file"):
        read_idx(tmp_path / "text")


def test_writes_image_folders_and_is_idempotent(tiny_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "fm"
    counts = write_fashion_mnist(out, per_class=2, valid_per_class=1, source=tiny_source)
    assert counts == {"train": 20, "valid": 10, "test": 10}
    split = load_split(out)
    assert sorted(split.classes) == sorted(FASHION_MNIST_CLASSES)
    assert (len(split.train), len(split.valid), len(split.test)) == (20, 10, 10)
    assert not {s.path.name for s in split.train} & {s.path.name for s in split.valid}
    # pixel-exact copy of the IDX data
    test_x = read_idx(tiny_source / "t10k-images-idx3-ubyte.gz")
    png = out / "test" / FASHION_MNIST_CLASSES[3] / "3.png"
    assert np.array_equal(np.asarray(Image.open(png)), test_x[3])
    before = png.stat().st_mtime_ns
    assert write_fashion_mnist(out, per_class=2, valid_per_class=1, source=tiny_source) == counts
    assert png.stat().st_mtime_ns == before
    with pytest.raises(SourceError, match="different"):
        write_fashion_mnist(out, per_class=3, valid_per_class=1, source=tiny_source)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files_parse() -> None:
    x = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    y = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
