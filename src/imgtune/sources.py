"""Public datasets -> image folders: `imgtune data fashion-mnist|cifar10|cifar100 OUT`.

Parses the IDX files itself (the format is four lines of spec) and the CIFAR pickle batches with an
unpickler that only rebuilds arrays, and writes PNGs, so the result is the same folder layout users have for
their own data.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import os
import pickle
import struct
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from imgtune.download import cache_root
from imgtune.errors import UserError
from imgtune.files import atomic_write_text

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


class SourceError(UserError, ValueError):
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
    cache = cache_root() / "fashion-mnist"
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


def _select(
    labels: np.ndarray, num_classes: int, per_class: int | None, valid_per_class: int, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded per-class selection: first valid_per_class shuffled indices -> valid, next per_class -> train."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    valid: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        if valid_per_class + (per_class or 1) > len(idx):
            raise SourceError(f"class {c} has {len(idx)} images: cannot take {valid_per_class} + {per_class}")
        valid += sorted(idx[:valid_per_class].tolist())
        rest = idx[valid_per_class:]
        train += sorted((rest if per_class is None else rest[:per_class]).tolist())
    return train, valid


@dataclass
class Arrays:
    """A labelled image dataset in memory: uint8 N x H x W (grey) or N x H x W x 3 (RGB), labels N."""

    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    origin: str


def already_written(out: Path, params: dict[str, Any]) -> dict[str, int] | None:
    """OUT's image counts when it already holds exactly this selection or conversion (a repeat is a no-op);
    an error when it holds another one or anything else; None when OUT is free."""
    marker = out / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params:
            log.info("%s already holds this %s selection; nothing to do", out, params["dataset"])
            counts: dict[str, int] = done["counts"]
            return counts
        raise SourceError(f"{out} holds a different conversion ({done.get('params')}); use another OUT")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # a file named OUT included
        raise SourceError(f"{out}: exists and is not empty; choose a new folder")
    return None


def write_folders(
    out: Path, data: Arrays, params: dict[str, Any], per_class: int | None, valid_per_class: int, seed: int
) -> dict[str, int]:
    """OUT/{train,valid,test}/<class>/<index>.png: valid drawn per class from the official train set, test =
    the official test set. A marker file records the selection, so a repeat is a no-op and a clash an error."""
    for x, y, name in ((data.train_x, data.train_y, "train"), (data.test_x, data.test_y, "test")):
        if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
            raise SourceError(f"{data.origin}: {name} images {x.shape} and labels {y.shape} do not match")
        if len(y) and (y.min() < 0 or y.max() >= len(data.classes)):
            raise SourceError(f"{data.origin}: {name} labels outside 0..{len(data.classes) - 1}")
    train_idx, valid_idx = _select(data.train_y, len(data.classes), per_class, valid_per_class, seed)
    jobs: list[tuple[Path, np.ndarray]] = []
    for split, images, labels, indices in (
        ("train", data.train_x, data.train_y, train_idx),
        ("valid", data.train_x, data.train_y, valid_idx),
        ("test", data.test_x, data.test_y, list(range(len(data.test_y)))),
    ):
        for c in data.classes if indices else ():  # --valid-per-class 0: no valid/ at all (train on everything)
            (out / split / c).mkdir(parents=True, exist_ok=True)
        jobs += [(out / split / data.classes[int(labels[i])] / f"{i}.png", images[i]) for i in indices]

    def save(job: tuple[Path, np.ndarray]) -> None:
        Image.fromarray(job[1], mode="L" if job[1].ndim == 2 else "RGB").save(job[0])

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(save, jobs))
    counts = {"train": len(train_idx), "valid": len(valid_idx), "test": len(data.test_y)}
    marker = {"params": params, "counts": counts, "source": data.origin}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2))
    return counts


def convert(
    dataset: str, out: Path, per_class: int | None, valid_per_class: int, seed: int, read: Callable[[], Arrays]
) -> dict[str, int]:
    """The shared path of every `imgtune data <dataset>`: nothing to do when OUT already holds this selection,
    else read the arrays (only then: it may download) and write the folders."""
    out = Path(out)
    params = {"dataset": dataset, "per_class": per_class, "valid_per_class": valid_per_class, "seed": seed}
    done = already_written(out, params)
    if done is not None:
        return done
    return write_folders(out, read(), params, per_class, valid_per_class, seed)


def write_fashion_mnist(
    out: Path,
    per_class: int | None = None,
    valid_per_class: int = 500,
    source: Path | None = None,
    seed: int = 0,
    download: bool = False,
) -> dict[str, int]:
    """OUT/{train,valid,test}/<class>/<index>.png; test = the official 10,000 test images. Idempotent."""

    def read() -> Arrays:
        src = fashion_mnist_source(source, download)
        return Arrays(
            classes=FASHION_MNIST_CLASSES,
            train_x=read_idx(_find(src, "train-images-idx3-ubyte")),
            train_y=read_idx(_find(src, "train-labels-idx1-ubyte")),
            test_x=read_idx(_find(src, "t10k-images-idx3-ubyte")),
            test_y=read_idx(_find(src, "t10k-labels-idx1-ubyte")),
            origin=str(src),
        )

    return convert("fashion-mnist", out, per_class, valid_per_class, seed, read)


# ------------------------------------------------------------------------------------------- CIFAR-10/100

# (archive folder, train files, test file, meta file, label key, class-names key, torchvision dataset class)
_CIFAR: dict[str, tuple[str, tuple[str, ...], str, str, bytes, bytes, str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", "CIFAR100"),
}


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR batches are pickles of dicts of bytes, lists and numpy arrays. Anything else - in
    particular a callable that a hostile file names to run code - is refused, never imported."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def __init__(self, file: Any, origin: str) -> None:
        super().__init__(file, encoding="bytes")  # written by Python 2: str keys come as bytes
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise SourceError(f"{self.origin}: refused to load {module}.{name}: not a CIFAR data batch")
        if module == "_codecs":
            return codecs.encode
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        return getattr(np, name)


def _read_batch(data: bytes, origin: str) -> dict[bytes, Any]:
    try:
        batch = _ArraysOnly(io.BytesIO(data), origin).load()
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{origin}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise SourceError(f"{origin}: not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return batch


def _cifar_files(source: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    """name -> bytes from a .tar.gz archive or an extracted folder (the batches folder or its parent)."""
    if source.is_file():
        try:
            with tarfile.open(source) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise SourceError(f"{source}: {missing} not in the archive; is it the {folder} archive?")
                return {n: tar.extractfile(members[n]).read() for n in names}  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SourceError(f"{source}: not a readable tar archive ({e})") from None
    root = source / folder if (source / folder).is_dir() else source
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise SourceError(f"{root}: {missing} not found; pass the {folder} folder or its .tar.gz archive")
    return {n: (root / n).read_bytes() for n in names}


def cifar_source(which: str, source: Path | None, download: bool) -> Path:
    """--source, an earlier download in the cache, or torchvision's downloader (checksummed archive)."""
    if source is not None:
        return Path(source)
    folder = _CIFAR[which][0]
    cache = cache_root() / which
    if (cache / folder).is_dir():
        return cache / folder
    if not download:
        raise SourceError(f"{which}: pass --source with the python-version archive (or its folder), or --download")
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    spec = getattr(tvd, _CIFAR[which][6])
    log.info("downloading %s with torchvision into %s", which, cache)
    download_and_extract_archive(spec.url, str(cache), filename=spec.filename, md5=spec.tgz_md5)
    return cache / folder


def read_cifar(which: str, source: Path) -> Arrays:
    folder, train_files, test_file, meta_file, label_key, names_key, _ = _CIFAR[which]
    raw = _cifar_files(source, folder, [*train_files, test_file, meta_file])

    def images_labels(name: str) -> tuple[np.ndarray, np.ndarray]:
        batch = _read_batch(raw[name], f"{source}:{name}")
        try:
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise SourceError(f"{source}:{name}: missing or misshapen CIFAR field ({e})") from None
        return np.ascontiguousarray(x), y

    parts = [images_labels(n) for n in train_files]
    test_x, test_y = images_labels(test_file)
    meta = _read_batch(raw[meta_file], f"{source}:{meta_file}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if not classes:
        raise SourceError(f"{source}:{meta_file}: no class names ({names_key.decode()})")
    return Arrays(
        classes=classes,
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        origin=str(source),
    )


def write_cifar(
    which: str,
    out: Path,
    per_class: int | None = None,
    valid_per_class: int = 500,
    source: Path | None = None,
    seed: int = 0,
    download: bool = False,
) -> dict[str, int]:
    """CIFAR-10 or CIFAR-100 (fine labels) as PNG class folders; test = the official 10,000 test images."""
    if which not in _CIFAR:
        raise SourceError(f"unknown dataset {which!r}: choose {', '.join(_CIFAR)}")
    read = lambda: read_cifar(which, cifar_source(which, source, download))  # noqa: E731
    return convert(which, out, per_class, valid_per_class, seed, read)
