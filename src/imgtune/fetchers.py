"""`imgtune data imagenette|imagewoof|flowers102 OUT`: the tutorials' public datasets, from the official
archives to a folder `imgtune train` reads as it is, with a `class_names.json` that turns folder names
(ImageNet wnids, flower numbers) into the names people know.

The files come from the cache, `--source` or a download (resumable, checksummed: download.py). Extraction reads
the archive member by member into `OUT.partial` - only regular files under the expected folders, never a path
that leaves it - and renames it to OUT when complete, so an interrupted conversion never looks finished.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from imgtune.download import cache_dir, download, file_md5
from imgtune.files import atomic_write_text
from imgtune.layouts import CLASS_NAMES_FILE
from imgtune.matfile import load_mat
from imgtune.progress import Progress
from imgtune.sources import MARKER, SourceError, already_written

log = logging.getLogger(__name__)

FASTAI_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

# Published MD5 sums: fastai's (docs and fastai.data.external), and the second sum torchvision lists for
# Imagenette's archives (they were re-uploaded once); Oxford's for flowers-102 as torchvision checks them.
CHECKSUMS: dict[str, tuple[str, ...]] = {
    "imagenette2.tgz": ("2c774ecb40005b35d7937d50f5d42336", "fe2fc210e6bb7c5664d602c3cd71e612"),
    "imagenette2-320.tgz": ("1f1f74f133caff120e575856659b87a2", "3df6f0d01a2c9592104656642f5e78a3"),
    "imagenette2-160.tgz": ("c475f8f7617a200ba35b9facc48443c3", "e793b78cc4c9e9a4ccc0c1155377a412"),
    "imagewoof2.tgz": ("2cc1c1e36e20cb6fd24ffb978edcb487",),
    "imagewoof2-320.tgz": ("7a1fd92672a559a85de76e4810a20c21",),
    "imagewoof2-160.tgz": ("3559b194123981a540b87132dbda412f",),
    "102flowers.tgz": ("52808999861908f626f3c1f4e79d11fa",),
    "imagelabels.mat": ("e0620be6f572b9609742df49c70aed4d",),
    "setid.mat": ("a5357ecc9cb78c4bef273ce3793fc85c",),
}
FASTAI_SIZES = {"full": "", "320": "-320", "160": "-160"}
FLOWER_FILES = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
FLOWER_SPLITS = {  # our split -> setid.mat's variable
    "official": {"train": "trnid", "valid": "valid", "test": "tstid"},
    "large": {"train": "tstid", "valid": "valid", "test": "trnid"},  # train on the 6,149, test on 1,020
}


@dataclass
class Fetched:
    """Where the dataset is and how many images each split holds."""

    out: Path
    counts: dict[str, int]


def obtain(
    filename: str,
    source: Path | None,
    mirror: str | None,
    base: str,
    checksums: Mapping[str, Collection[str]] | None,
    progress: Progress | None,
) -> Path:
    """A local copy of one published file: `source` (the file or its folder), else the download cache, else
    `mirror or base` + filename. A downloaded file must match the published MD5; a file you hand in is used
    as it is (its MD5 goes to the log, so a repacked copy is visible)."""
    if source is not None:
        path = Path(source) / filename if Path(source).is_dir() else Path(source)
        if not path.is_file():
            raise SourceError(f"{path}: not found; --source is the downloaded {filename} or the folder holding it")
        log.info("%s: md5 %s", path, file_md5(path))
        return path
    sums = (checksums or CHECKSUMS).get(filename, ())
    url = (mirror or base).rstrip("/") + "/" + filename
    return download(url, cache_dir() / filename, sums, progress)


def _done(out: Path, params: dict[str, object]) -> Fetched | None:
    counts = already_written(out, params)
    return None if counts is None else Fetched(out, counts)


@contextmanager
def _building(out: Path) -> Iterator[Path]:
    """OUT.partial to build in; removed when the conversion fails (a killed one is cleared by the next try)."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _extract(archive: Path, into: Path, place: Callable[[tuple[str, ...]], Path | None]) -> int:
    """Regular files of `archive` that `place` maps to a path under `into`; the others are left out."""
    written = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or not parts or parts[0] == "/" or ".." in parts:
                    continue  # folders, links, devices, and anything that would leave OUT
                rel = place(parts)
                if rel is None:
                    continue
                target = into / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
                written += 1
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # a full disk says so itself
        raise SourceError(f"{archive}: not a readable .tgz archive ({type(e).__name__}: {e})") from None
    return written


def _finish(staging: Path, out: Path, params: dict[str, object], names: dict[str, str]) -> Fetched:
    counts = {d.name: sum(1 for f in d.rglob("*") if f.is_file()) for d in sorted(staging.iterdir()) if d.is_dir()}
    if not any(counts.values()):
        raise SourceError(f"no images of {params['dataset']} found in the archive; is it the right file?")
    atomic_write_text(staging / CLASS_NAMES_FILE, json.dumps(names, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(staging / MARKER, json.dumps({"params": params, "counts": counts}, indent=2))
    if out.is_dir():
        out.rmdir()  # empty: checked by _done
    staging.rename(out)
    return Fetched(out, counts)


def wnid_names(wnids: Collection[str]) -> dict[str, str]:
    """ImageNet wnid -> its first common name ("n02086240" -> "Shih-Tzu"), from timm's offline table."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    known = set(info.label_names())
    return {w: info.label_name_to_description(w).split(", ")[0] for w in sorted(wnids) if w in known}


def fetch_fastai(
    dataset: str,
    out: Path,
    size: str = "160",
    source: Path | None = None,
    mirror: str | None = None,
    checksums: Mapping[str, Collection[str]] | None = None,
    progress: Progress | None = None,
) -> Fetched:
    """Imagenette or Imagewoof (fastai's 10-class ImageNet subsets) at `size` (160, 320 px shortest side, or
    full): OUT/train|val/<wnid>/*.JPEG, the noisy-label CSV as shipped, and class_names.json (wnid -> name)."""
    if dataset not in ("imagenette", "imagewoof"):
        raise SourceError(f"unknown dataset {dataset!r}: choose imagenette or imagewoof")
    if size not in FASTAI_SIZES:
        raise SourceError(f"--size {size!r}: choose {', '.join(FASTAI_SIZES)}")
    out = Path(out)
    params: dict[str, object] = {"dataset": dataset, "size": size}
    if (done := _done(out, params)) is not None:
        return done
    filename = f"{dataset}2{FASTAI_SIZES[size]}.tgz"
    archive = obtain(filename, source, mirror, FASTAI_URL, checksums, progress)

    def place(parts: tuple[str, ...]) -> Path | None:  # <top>/{train,val}/<wnid>/<file>, <top>/noisy_*.csv
        if len(parts) == 4 and parts[1] in ("train", "val"):
            return Path(*parts[1:])
        if len(parts) == 2 and parts[1].endswith(".csv"):
            return Path(parts[1])
        return None

    with _building(out) as staging:
        _extract(archive, staging, place)
        wnids = {
            d.name for split in ("train", "val") if (staging / split).is_dir() for d in (staging / split).iterdir()
        }
        return _finish(staging, out, params, wnid_names(wnids))


def flower_names() -> list[str]:
    """The 102 category names in label order (1..102), as in flowers-102 tutorials' cat_to_name.json."""
    return resources.files("imgtune").joinpath("flowers102.txt").read_text().splitlines()


def fetch_flowers102(
    out: Path,
    split: str = "official",
    source: Path | None = None,
    mirror: str | None = None,
    checksums: Mapping[str, Collection[str]] | None = None,
    progress: Progress | None = None,
) -> Fetched:
    """Oxford flowers-102: OUT/train|valid|test/<1..102>/image_NNNNN.jpg from 102flowers.tgz, imagelabels.mat
    and setid.mat, and class_names.json (number -> name). `official` keeps Oxford's split (10 training and
    10 validation images per class, 6,149 test); `large` swaps train and test, as many tutorials do."""
    if split not in FLOWER_SPLITS:
        raise SourceError(f"--split {split!r}: choose {', '.join(FLOWER_SPLITS)}")
    out = Path(out)
    params: dict[str, object] = {"dataset": "flowers102", "split": split}
    if (done := _done(out, params)) is not None:
        return done
    files = {f: obtain(f, source, mirror, FLOWERS_URL, checksums, progress) for f in FLOWER_FILES}
    labels = _mat_vector(files["imagelabels.mat"], "labels")
    sets = {ours: _mat_vector(files["setid.mat"], theirs) for ours, theirs in FLOWER_SPLITS[split].items()}
    if labels.min() < 1 or labels.max() > 102:
        raise SourceError(f"{files['imagelabels.mat']}: labels outside 1..102")
    where: dict[int, str] = {}
    for ours, ids in sets.items():
        if ids.min() < 1 or ids.max() > len(labels):
            raise SourceError(f"{files['setid.mat']}: image ids outside 1..{len(labels)}")
        where |= {int(i): ours for i in ids}

    def place(parts: tuple[str, ...]) -> Path | None:  # jpg/image_00001.jpg
        name = parts[-1]
        if not (name.startswith("image_") and name.endswith(".jpg") and name[6:-4].isdigit()):
            return None
        index = int(name[6:-4])
        return Path(where[index], str(int(labels[index - 1])), name) if index in where else None

    with _building(out) as staging:
        written = _extract(files["102flowers.tgz"], staging, place)
        if written < len(where):
            log.warning("%s holds %d of the %d images setid.mat names", files["102flowers.tgz"], written, len(where))
        return _finish(staging, out, params, {str(i + 1): n for i, n in enumerate(flower_names())})


def _mat_vector(path: Path, name: str) -> np.ndarray:
    data = load_mat(path)
    if name not in data:
        raise SourceError(f"{path}: no variable {name!r} (has {', '.join(sorted(data)) or 'none'})")
    return np.asarray(data[name]).astype(np.int64).ravel()
