"""Where the images and their labels are: a dataset folder -> a `Split` (which file is in which split, with
which label). Nothing here decodes an image.

Split folders: `train|training/`, `valid|val|validation/`, `test|testing|evaluation/`, or none (imgtune splits
the training images, stratified and seeded, and writes the split down). Labels, by `LabelRule`:
- `folder` (default): class folders, `train/<class>/<image>`;
- `filename`: the class is in the file name, `train/3_127.jpg` (the text before the first `_`, or the first group
  of a regular expression); files whose name has no class are unlabelled (a test folder for a submission);
- a CSV file: one row per image with its path, class and optionally its split (imgtune's own split.csv,
  fastai's Imagewoof/Imagenette CSVs as shipped, or any file whose columns are named with `columns`).
Classes are matched across splits by name, never by position, and sorted naturally.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgtune.errors import UserError

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": ("train", "training"), "valid": ("valid", "val", "validation"),
               "test": ("test", "testing", "evaluation")}  # fmt: skip
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}
# a labels CSV's columns when they are not named: the first header that matches, case-insensitively
PATH_COLUMNS = ("path", "file", "filename", "fname", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "noisy_labels_0")
SPLIT_COLUMNS = ("split", "is_valid", "subset", "set")
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}
CLASS_NAMES_FILE = "class_names.json"  # a dataset's own {folder name: display name} map, as `imgtune data` writes


class DataError(UserError, ValueError):
    """The dataset folder cannot be used as asked; the message names the folder or file and what to do."""


def class_names_file(root: Path, chosen: Path | None = None) -> Path | None:
    """The display-name map to use: the one chosen, else the dataset's own class_names.json if it has one."""
    if chosen is not None:
        return Path(chosen)
    own = Path(root) / CLASS_NAMES_FILE
    return own if own.is_file() else None


LAYOUTS = """imgtune reads these layouts:
  DATA/<class>/<image> or DATA/train|training/<class>/... (+ valid|val|validation/, test|testing|evaluation/)
      class folders: --labels folder (the default)
  DATA/train/3_127.jpg, DATA/3_127.jpg, ...: the class in the file name (here 3)
      --labels filename [--label-pattern REGEX: its first group is the class; default: the text before the first _]
  a CSV of image paths and classes (and splits), e.g. Imagewoof's noisy_imagewoof.csv or an earlier run's split.csv
      --labels FILE.csv [--label-columns path,label[,split]]"""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1: unlabelled


@dataclass(frozen=True)
class LabelRule:
    """Where a file's class comes from: class folders, the file name, or a CSV file."""

    source: str = "folder"  # folder | filename | csv
    pattern: str | None = None  # filename: a regex whose first group is the class
    csv: Path | None = None
    columns: tuple[str, ...] | None = None  # csv: the path, label [and split] column names

    @classmethod
    def parse(cls, labels: str, pattern: str | None = None, columns: Sequence[str] | None = None) -> LabelRule:
        """From the config's data.labels: "folder", "filename", or the path of a CSV file."""
        if labels in ("folder", "filename"):
            return cls(labels, pattern, None, tuple(columns) if columns else None)
        return cls("csv", pattern, Path(labels), tuple(columns) if columns else None)

    def class_of(self, path: Path) -> str | None:
        """The class in a file name (filename rule); None when the name has none (an unlabelled file)."""
        if self.pattern is None:
            stem, sep, _ = path.name.partition("_")
            return stem if sep and stem else None
        m = re.search(self.pattern, path.name)
        return m.group(1) if m and m.groups() and m.group(1) else None


@dataclass
class Split:
    root: Path
    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample] = field(default_factory=list)
    test_labelled: bool = False
    made_split: bool = False  # True when imgtune split the training images (then split.csv is worth writing)
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
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def natural_key(text: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Sort "2" before "10" and "class2" before "class10"; case-insensitive, ties broken by the exact text.
    Every chunk is a (kind, number, text) triple, and the tie-break sits outside the chunks, so any two names
    compare (`cat` against `cat2` is a shorter tuple against a longer one, never a str against a tuple)."""
    chunks = tuple(
        (0, int(chunk), chunk) if i % 2 else (1, 0, chunk.casefold())  # odd chunks are the runs of ASCII digits
        for i, chunk in enumerate(re.split(r"([0-9]+)", text))
    )
    return chunks, text


def readable(name: str) -> str:
    """A file or folder name as text that people, fonts and JSON encoders take: bytes that were not UTF-8 on
    disk (which Python keeps as lone surrogates) become U+FFFD. For display only; files are matched by the
    exact name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file below folder (recursively), naturally sorted; hidden folders are skipped.
    Linked folders are followed (datasets are often assembled from links), each real folder once, so a link
    that points back up ends there instead of looping; a folder that cannot be read is reported, not fatal."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(e: OSError) -> None:
        log.warning("%s: cannot read this folder (%s); its files are left out", e.filename, e.strerror)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:  # removed or cut off since it was listed
            unreadable(e)
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not is_hidden(d) and not _is_link_loop(Path(dirpath) / d)]
        found.extend(Path(dirpath) / f for f in filenames if not is_hidden(f))
    return sorted(found, key=lambda p: natural_key(p.as_posix()))


@dataclass
class FolderScan:
    """One split folder: class name -> files, plus the files that have no class (loose or unlabelled)."""

    folder: Path
    classes: dict[str, list[Path]]
    loose: list[Path]

    @property
    def empty_classes(self) -> list[str]:
        return [c for c, files in self.classes.items() if not files]

    @property
    def labelled(self) -> dict[str, list[Path]]:
        return {c: f for c, f in self.classes.items() if f}


def scan_folder(folder: Path, rule: LabelRule = LabelRule()) -> FolderScan:
    """Class folders (folder rule), or every file below `folder` grouped by the class in its name."""
    if rule.source == "filename":
        classes: dict[str, list[Path]] = {}
        loose: list[Path] = []
        for path in list_files(folder):
            label = rule.class_of(path)
            (classes.setdefault(label, []) if label is not None else loose).append(path)
        return FolderScan(folder, {c: classes[c] for c in sorted(classes, key=natural_key)}, loose)
    classes, loose = {}, []
    for entry in sorted(entries(folder), key=lambda p: natural_key(p.name)):
        if is_hidden(entry.name):
            continue
        if entry.is_dir():
            classes[entry.name] = list_files(entry)
        elif entry.is_file():
            loose.append(entry)
    return FolderScan(folder, classes, loose)


def _is_link_loop(folder: Path) -> bool:
    """A linked folder that points at itself or a folder above it: following it would list its parent again."""
    if not folder.is_symlink():
        return False
    try:
        target = folder.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, or a chain of links that loops on itself
        log.warning("%s: a link that leads nowhere; not followed", folder)
        return True
    if folder.parent.resolve().is_relative_to(target):
        log.warning("%s: links back to %s, a folder above it; not followed", folder, target)
        return True
    return False


def entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot read this folder ({e.strerror})") from None


def find_split_folders(root: Path) -> dict[str, Path]:
    """Which of train/valid/test exist under root, under any of their names (case-insensitive)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a dataset folder of images)")
    by_lower = {p.name.lower(): p for p in entries(root) if p.is_dir() and not is_hidden(p.name)}
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        present = [by_lower[n] for n in names if n in by_lower]
        if len(present) > 1:
            raise DataError(f"{root}: several {split} folders ({', '.join(p.name for p in present)}); keep one")
        if present:
            found[split] = present[0]
    return found


def stratified_split(
    files_by_class: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a seeded shuffle; round(n * fraction) files (at least 1 when n >= 2) go to valid; none when the
    fraction is 0 (training without validation)."""
    rng = random.Random(seed)
    keep: dict[str, list[Path]] = {}
    held: dict[str, list[Path]] = {}
    for cls, files in files_by_class.items():
        files = sorted(files, key=lambda p: natural_key(p.as_posix()))
        rng.shuffle(files)
        n_valid = min(len(files) - 1, max(1, round(len(files) * fraction))) if len(files) >= 2 and fraction > 0 else 0
        held[cls], keep[cls] = files[:n_valid], files[n_valid:]
    return keep, held


def load_split(
    root: Path, valid_fraction: float = 0.2, seed: int = 0, split_file: Path | None = None,
    rule: LabelRule = LabelRule(),
) -> Split:  # fmt: skip
    """Find the layout under root and return its Split (see the module docstring for the layouts)."""
    root = Path(root)
    if split_file is not None:
        return read_labels_csv(root, split_file, valid_fraction=valid_fraction, seed=seed)
    if rule.source == "csv":
        assert rule.csv is not None
        return read_labels_csv(root, rule.csv, rule.columns, valid_fraction, seed)
    folders = find_split_folders(root)
    if "train" not in folders and ("valid" in folders or "test" in folders):
        names = ", ".join(p.name for p in folders.values())
        raise DataError(f"{root}: has {names} but no training folder (train/ or training/)\n{LAYOUTS}")
    source = scan_folder(folders.get("train", root), rule)
    notes = [f"empty class folder left out: {source.folder / c}" for c in source.empty_classes]
    if source.loose:
        what = "without a class in their name" if rule.source == "filename" else "not in a class folder"
        notes.append(f"{len(source.loose)} file(s) in {source.folder} {what} ignored")
    train_files = source.labelled
    if not train_files:
        found = (
            "no image file with a class in its name (such as 3_127.jpg)"
            if rule.source == "filename"
            else "no class folders with images"
        )
        raise DataError(f"{source.folder}: {found}\n{LAYOUTS}")
    classes = sorted(train_files, key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    made_split = "valid" not in folders
    if made_split:
        train_files, valid_files = stratified_split(train_files, valid_fraction, seed)
    else:
        valid_scan = scan_folder(folders["valid"], rule)
        _check_known(valid_scan, index, "valid")
        valid_files = valid_scan.labelled
    test, test_labelled = _test_samples(folders.get("test"), rule, index, notes)
    return Split(root, classes, _samples(train_files, index), _samples(valid_files, index), test, test_labelled,
                 made_split, notes)  # fmt: skip


def _test_samples(
    folder: Path | None, rule: LabelRule, index: dict[str, int], notes: list[str]
) -> tuple[list[Sample], bool]:
    """A labelled test folder is evaluated after training; an unlabelled one (files only) is for predict."""
    if folder is None:
        return [], False
    scan = scan_folder(folder, rule)
    if not scan.labelled:
        return [Sample(p, -1) for p in list_files(folder)], False
    _check_known(scan, index, "test")
    if scan.loose:
        notes.append(f"{len(scan.loose)} unlabelled file(s) in {scan.folder} ignored")
    return _samples(scan.labelled, index), True


def _check_known(scan: FolderScan, index: dict[str, int], split: str) -> None:
    unknown = [c for c in scan.labelled if c not in index]
    if unknown:
        raise DataError(
            f"{scan.folder}: class(es) {', '.join(repr(c) for c in unknown)} appear only in {split}, not in"
            f" train; the model could never predict them. Add training images or remove them."
        )


def _samples(files_by_class: dict[str, list[Path]], index: dict[str, int]) -> list[Sample]:
    return [Sample(p, index[c]) for c in sorted(files_by_class, key=natural_key) for p in files_by_class[c]]


# ------------------------------------------------------------------------------------------- labels CSV


def _column(header: list[str], wanted: str | None, candidates: Sequence[str], what: str, path: Path) -> str | None:
    lower = {h.lower().strip(): h for h in header}
    if wanted is not None:
        if wanted.lower() not in lower:
            raise DataError(f"{path}: no column {wanted!r} for the {what}; its columns are {', '.join(header)}")
        return lower[wanted.lower()]
    return next((lower[c] for c in candidates if c in lower), None)


def _split_of(value: str, path: Path, lineno: int) -> str:
    v = value.strip().lower()
    if v in TRUE:
        return "valid"  # an is_valid column
    if v in FALSE:
        return "train"
    for split, names in SPLIT_NAMES.items():
        if v in names:
            return split
    raise DataError(f"{path}, line {lineno}: split {value!r} is not one of train, valid, test (or True/False)")


def read_labels_csv(
    root: Path, path: Path, columns: Sequence[str] | None = None, valid_fraction: float = 0.2, seed: int = 0
) -> Split:
    """A CSV of image paths (relative to root, or to the CSV's folder), classes and optional splits. Without a
    split column imgtune splits the rows, stratified and seeded; empty classes are unlabelled (test) rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        wanted = list(columns or []) + [None] * (3 - len(columns or []))
        path_col = _column(header, wanted[0], PATH_COLUMNS, "image paths", path)
        label_col = _column(header, wanted[1], LABEL_COLUMNS, "classes", path)
        split_col = _column(header, wanted[2], SPLIT_COLUMNS, "splits", path)
        if path_col is None or label_col is None:
            raise DataError(
                f"{path}: which columns hold the image paths and the classes? Its columns are {', '.join(header)};"
                " name them with --label-columns PATH,LABEL[,SPLIT]"
            )
        rows = list(enumerate(reader, start=2))
    by_split: dict[str, list[tuple[Path, str]]] = {"train": [], "valid": [], "test": []}
    for lineno, row in rows:
        file = _resolve(root, path, row[path_col] or "", lineno)
        split = _split_of(row[split_col] or "", path, lineno) if split_col else "train"
        by_split[split].append((file, (row[label_col] or "").strip()))
    return _split_from_rows(root, path, by_split, split_col is None, valid_fraction, seed)


def _resolve(root: Path, csv_path: Path, value: str, lineno: int) -> Path:
    for base in (root, csv_path.parent):
        candidate = base / value
        if candidate.is_file():
            return candidate
    raise DataError(f"{csv_path}, line {lineno}: {root / value} does not exist")


def _split_from_rows(
    root: Path, path: Path, rows: dict[str, list[tuple[Path, str]]], split_here: bool, fraction: float, seed: int
) -> Split:
    """The Split of a labels CSV's rows; without a split column the labelled rows are split here."""
    labelled = [(p, lab) for p, lab in rows["train"] if lab]
    unlabelled = [(p, "") for p, lab in rows["train"] if not lab]
    if split_here:
        by_class: dict[str, list[Path]] = {}
        for p, lab in labelled:
            by_class.setdefault(lab, []).append(p)
        keep, held = stratified_split(by_class, fraction, seed)
        rows = {"train": [(p, c) for c, ps in keep.items() for p in ps],
                "valid": [(p, c) for c, ps in held.items() for p in ps], "test": rows["test"] + unlabelled}  # fmt: skip
    classes = sorted({lab for _, lab in rows["train"] if lab}, key=natural_key)
    if not classes:
        raise DataError(f"{path}: no labelled training rows\n{LAYOUTS}")
    index = {c: i for i, c in enumerate(classes)}
    for split in ("valid", "test"):
        unknown = sorted({lab for _, lab in rows[split] if lab and lab not in index})
        if unknown:
            raise DataError(f"{path}: class(es) {unknown} appear only in {split}, not in train")

    def samples(name: str) -> list[Sample]:
        return [Sample(p, index[lab] if lab else -1) for p, lab in rows[name] if lab or name == "test"]

    test_labelled = bool(rows["test"]) and all(lab for _, lab in rows["test"])
    return Split(root, classes, samples("train"), samples("valid"), samples("test"), test_labelled, split_here)


def labelled_pairs(
    data: Path, split: str, rule: LabelRule = LabelRule(), split_csv: Path | None = None
) -> list[tuple[Path, str]]:
    """(file, class) pairs of one labelled split of DATA, found by the run's label rule (eval, calibrate).
    split_csv: the run's split.csv, which says exactly which images it validated on when it made the split."""
    data = Path(data)
    has_csv = split_csv is not None and split_csv.is_file()
    if rule.source == "csv":
        return _pairs(read_labels_csv(data, split_csv if has_csv else rule.csv, rule.columns), split)  # type: ignore[arg-type]
    folders = find_split_folders(data)
    if split in folders:
        scan = scan_folder(folders[split], rule)
    elif split == "valid" and has_csv:
        return _pairs(read_labels_csv(data, split_csv), split)  # type: ignore[arg-type]
    elif not folders:
        scan = scan_folder(data, rule)  # one folder of labelled images: evaluated whole
    else:
        raise DataError(f"{data}: no {split} folder with labelled images (found: {', '.join(folders)})\n{LAYOUTS}")
    pairs = [(p, c) for c, files in scan.labelled.items() for p in files]
    if not pairs:
        raise DataError(f"{scan.folder}: no labelled images to evaluate on\n{LAYOUTS}")
    return pairs


def _pairs(split: Split, name: str) -> list[tuple[Path, str]]:
    pairs = [(x.path, split.classes[x.label]) for x in split.subsets()[name] if x.label >= 0]
    if not pairs:
        raise DataError(f"{split.root}: no labelled {name} images")
    return pairs
