"""Dataset folders -> a `Split` (which file is in which split, with which label) -> DataLoaders.

Layouts: `train/<class>/...` + `valid|val|validation/<class>/...` [+ `test/<class>/...` or unlabelled
`test/*`]; or one folder of class folders, which imgtune splits (stratified, seeded) and writes down.
Classes are matched across splits by name, never by position.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.errors import UserError
from imgtune.images import ImageError, Source, load_rgb
from imgtune.transforms import Preprocessing, prepare

log = logging.getLogger(__name__)

VALID_NAMES = ("valid", "val", "validation")
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


class DataError(UserError, ValueError):
    """The dataset folder cannot be used as asked; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1: unlabelled


@dataclass
class Split:
    root: Path
    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample] = field(default_factory=list)
    test_labelled: bool = False
    made_split: bool = False  # True when imgtune split one folder (then split.csv is worth writing)
    notes: list[str] = field(default_factory=list)  # things left out, worth telling the user

    def subsets(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def write_csv(self, path: Path) -> None:
        from imgtune.files import atomic_write_text

        rows = ["path,label,split"]
        for name, samples in self.subsets().items():
            for s in samples:
                label = self.classes[s.label] if s.label >= 0 else ""
                rows.append(_csv_line([s.path.relative_to(self.root).as_posix(), label, name]))
        atomic_write_text(path, "\n".join(rows) + "\n")


def _csv_line(values: Sequence[str]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def natural_key(text: str) -> list[object]:
    """Sort "2" before "10" and "class2" before "class10"; case-insensitive, stable for ties."""
    parts: list[object] = []
    for chunk in re.split(r"(\d+)", text):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk.lower()))
    return [*parts, text]


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file below folder (recursively), naturally sorted; hidden folders are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found.extend(Path(dirpath) / f for f in filenames if not is_hidden(f))
    return sorted(found, key=lambda p: natural_key(p.as_posix()))


@dataclass
class FolderScan:
    """One split folder: class name -> files, plus files lying directly in it (no class)."""

    folder: Path
    classes: dict[str, list[Path]]
    loose: list[Path]

    @property
    def empty_classes(self) -> list[str]:
        return [c for c, files in self.classes.items() if not files]


def scan_folder(folder: Path) -> FolderScan:
    classes: dict[str, list[Path]] = {}
    loose: list[Path] = []
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if is_hidden(entry.name):
            continue
        if entry.is_dir():
            classes[entry.name] = list_files(entry)
        elif entry.is_file():
            loose.append(entry)
    return FolderScan(folder, classes, loose)


def find_split_folders(root: Path) -> dict[str, Path]:
    """Which of train/valid/test exist under root (case-insensitive; valid also as val/validation)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a dataset folder of images)")
    by_lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)}
    found: dict[str, Path] = {}
    if "train" in by_lower:
        found["train"] = by_lower["train"]
    valid = [by_lower[n] for n in VALID_NAMES if n in by_lower]
    if len(valid) > 1:
        raise DataError(f"{root}: several validation folders ({', '.join(p.name for p in valid)}); keep one")
    if valid:
        found["valid"] = valid[0]
    if "test" in by_lower:
        found["test"] = by_lower["test"]
    return found


def stratified_split(
    files_by_class: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a seeded shuffle; round(n * fraction) files (at least 1 when n >= 2) go to valid."""
    rng = random.Random(seed)
    keep: dict[str, list[Path]] = {}
    held: dict[str, list[Path]] = {}
    for cls, files in files_by_class.items():
        files = sorted(files, key=lambda p: natural_key(p.as_posix()))
        rng.shuffle(files)
        n_valid = min(len(files) - 1, max(1, round(len(files) * fraction))) if len(files) >= 2 else 0
        held[cls], keep[cls] = files[:n_valid], files[n_valid:]
    return keep, held


def load_split(root: Path, valid_fraction: float = 0.2, seed: int = 0, split_file: Path | None = None) -> Split:
    """Find the layout under root and return its Split (see module docstring for the layouts)."""
    root = Path(root)
    if split_file is not None:
        return read_split_csv(root, split_file)
    folders = find_split_folders(root)
    notes: list[str] = []
    if "train" in folders:
        train_scan = scan_folder(folders["train"])
        source = train_scan
    else:
        if "valid" in folders or "test" in folders:
            raise DataError(f"{root}: has a valid/test folder but no train/ folder")
        source = scan_folder(root)
        train_scan = source
    notes += [f"empty class folder left out: {source.folder / c}" for c in source.empty_classes]
    if source.loose:
        notes.append(f"{len(source.loose)} file(s) directly in {source.folder} (not in a class folder) ignored")
    train_files = {c: f for c, f in train_scan.classes.items() if f}
    if not train_files:
        raise DataError(
            f"{source.folder}: no class folders with files found; expected <class>/<image> folders"
            f" (or train/<class>/... and valid/<class>/...)"
        )
    classes = sorted(train_files, key=natural_key)
    index = {c: i for i, c in enumerate(classes)}

    made_split = "valid" not in folders
    if made_split:
        train_files, valid_files = stratified_split(train_files, valid_fraction, seed)
    else:
        valid_scan = scan_folder(folders["valid"])
        _check_known(valid_scan, index, "valid")
        valid_files = {c: f for c, f in valid_scan.classes.items() if f}
    test: list[Sample] = []
    test_labelled = False
    if "test" in folders:
        test_scan = scan_folder(folders["test"])
        labelled = {c: f for c, f in test_scan.classes.items() if f}
        if labelled:
            _check_known(test_scan, index, "test")
            test = _samples(labelled, index)
            test_labelled = True
            if test_scan.loose:
                notes.append(f"{len(test_scan.loose)} unlabelled file(s) directly in {test_scan.folder} ignored")
        else:
            test = [Sample(p, -1) for p in list_files(test_scan.folder)]
    return Split(
        root=root,
        classes=classes,
        train=_samples(train_files, index),
        valid=_samples(valid_files, index),
        test=test,
        test_labelled=test_labelled,
        made_split=made_split,
        notes=notes,
    )


def _check_known(scan: FolderScan, index: dict[str, int], split: str) -> None:
    unknown = [c for c, files in scan.classes.items() if files and c not in index]
    if unknown:
        raise DataError(
            f"{scan.folder}: class(es) {', '.join(repr(c) for c in unknown)} appear only in {split}, not in"
            f" train; the model could never predict them. Add training images or remove the folder(s)."
        )


def _samples(files_by_class: dict[str, list[Path]], index: dict[str, int]) -> list[Sample]:
    return [Sample(p, index[c]) for c in sorted(files_by_class, key=natural_key) for p in files_by_class[c]]


def read_split_csv(root: Path, split_file: Path) -> Split:
    if not Path(split_file).is_file():
        raise DataError(f"split file not found: {split_file}")
    rows: dict[str, list[tuple[Path, str]]] = {"train": [], "valid": [], "test": []}
    with open(split_file, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
            raise DataError(f"{split_file}: expected the columns path,label,split")
        for lineno, row in enumerate(reader, start=2):
            if row["split"] not in rows:
                raise DataError(f"{split_file}, line {lineno}: split {row['split']!r} is not train, valid or test")
            path = root / row["path"]
            if not path.is_file():
                raise DataError(f"{split_file}, line {lineno}: {path} does not exist")
            rows[row["split"]].append((path, row["label"]))
    classes = sorted({label for _, label in rows["train"]}, key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    for split in ("valid", "test"):
        unknown = sorted({lab for _, lab in rows[split] if lab and lab not in index})
        if unknown:
            raise DataError(f"{split_file}: class(es) {unknown} appear only in {split}, not in train")
    test_labelled = bool(rows["test"]) and all(lab for _, lab in rows["test"])

    def samples(name: str) -> list[Sample]:
        return [Sample(p, index[lab] if lab else -1) for p, lab in rows[name]]

    return Split(root, classes, samples("train"), samples("valid"), samples("test"), test_labelled, True)


def load_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Display names from a JSON object {folder name: display name} (e.g. flowers-102's cat_to_name.json);
    folders it does not name keep their folder name."""
    import json

    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"class-name map not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"{path}: expected a JSON object mapping folder names to display names")
    missing = [c for c in classes if c not in mapping]
    if missing:
        log.warning("%s names no display name for %d class(es), e.g. %s", path, len(missing), missing[:3])
    return [str(mapping.get(c, c)) for c in classes]


# ----------------------------------------------------------------------------------------------- loading


def decode_prepared(path: Source, prep: Preprocessing) -> torch.Tensor:
    """The one deterministic path from a file to model-ready uint8 pixels (train, eval, predict, serve)."""
    return prepare(load_rgb(path, draft_size=prep.img_size), prep)


@dataclass
class Skipped:
    path: str
    reason: str


def decode_many(
    paths: Sequence[Path], prep: Preprocessing, threads: int | None = None
) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Decode and prepare all paths into one N x 3 x S x S uint8 tensor (RAM cache).

    Returns (images, indices of the paths that decoded, skipped files with reasons).
    Threads overlap well here: Pillow and torchvision resize release the GIL.
    """
    s = prep.img_size
    images = torch.empty((len(paths), 3, s, s), dtype=torch.uint8)
    ok: list[int] = []
    skipped: list[Skipped] = []

    def work(i: int) -> tuple[int, ImageError | None]:
        try:
            images[i] = decode_prepared(paths[i], prep)
            return i, None
        except ImageError as e:
            return i, e

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        for i, err in pool.map(work, range(len(paths))):
            if err is None:
                ok.append(i)
            else:
                skipped.append(Skipped(err.path, err.reason))
                log.warning("skipped unreadable image %s: %s", err.path, err.reason)
    if len(ok) < len(paths):
        images = images[torch.tensor(ok, dtype=torch.long)] if ok else images[:0]
    return images, ok, skipped


class ImageDataset(Dataset[tuple[torch.Tensor, int] | None]):
    """Images (from a RAM cache when given one) -> (uint8 CHW, label); augmentation runs later, on whole
    batches (transforms.BatchAugment).

    An undecodable file yields None, which `collate_skip` drops: one bad file never stops an epoch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: Preprocessing,
        cache: torch.Tensor | None = None,
    ) -> None:
        if cache is not None and len(cache) != len(samples):
            raise ValueError("cache and samples differ in length")
        self.samples = list(samples)
        self.prep = prep
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        s = self.samples[i]
        if self.cache is not None:
            img = self.cache[i]
        else:
            try:
                img = decode_prepared(s.path, self.prep)
            except ImageError as e:
                log.warning("skipped unreadable image %s: %s", e.path, e.reason)
                return None
        return img, s.label


def collate_skip(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    items = [b for b in batch if b is not None]
    if not items:
        return None
    return torch.stack([b[0] for b in items]), torch.tensor([b[1] for b in items], dtype=torch.long)


def balanced_sampler(labels: Sequence[int], generator: torch.Generator) -> torch.utils.data.WeightedRandomSampler:
    """Draws every class equally often (with replacement): each sample weighted by 1 / its class count."""
    t = torch.tensor(list(labels), dtype=torch.long)
    weights = (1.0 / torch.bincount(t).clamp(min=1).double())[t]
    return torch.utils.data.WeightedRandomSampler(weights.tolist(), len(t), replacement=True, generator=generator)


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def should_cache(mode: str, n_images: int, img_size: int, budget_fraction: float = 0.3) -> bool:
    """auto: cache when the uint8 tensors take under 30% of the memory available now."""
    if mode == "ram":
        return True
    if mode == "none":
        return False
    return n_images * 3 * img_size * img_size < budget_fraction * available_memory()


def default_workers(cached: bool, device: torch.device) -> int:
    """From RAM-cached tensors, in-process loading wins on small CPU machines (no IPC, no core stolen
    from the model); decoding from disk, or feeding a GPU, wants worker processes."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and (cached or cpus <= 2):
        return 0
    return max(1, min(8, cpus - 1))


def make_loader(
    dataset: Dataset[tuple[torch.Tensor, int] | None],
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    generator: torch.Generator | None = None,
    sampler: torch.utils.data.Sampler[int] | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, int] | None]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
