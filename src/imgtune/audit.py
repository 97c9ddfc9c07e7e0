"""`imgtune data check`: look at every file before training does, and say what is wrong in plain words."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtune.data import load_class_names
from imgtune.images import ImageError, load_rgb
from imgtune.layouts import DataError, LabelRule, Split, class_names_file, load_split

TINY_PIXELS = 16  # shorter side below this: a warning (upsampling that far invents detail)
MAX_LISTED = 20


@dataclass
class AuditReport:
    root: str
    layout: str
    classes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # display names, from the dataset's class_names.json
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> readable images
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # exact copies across splits
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)  # perceptual-hash neighbours
    tiny: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable": self.trainable}

    def format(self) -> str:
        lines = [f"dataset {self.root} ({self.layout})", f"{len(self.classes)} classes"]
        splits = list(self.counts)
        if splits:
            shown = {c: f"{c} ({self.names[c]})" if c in self.names else c for c in self.classes}
            width = max(5, *(len(c) for c in shown.values())) if self.classes else 5
            lines.append(f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits))
            for c in self.classes:
                lines.append(f"  {shown[c]:<{width}} " + " ".join(f"{self.counts[s].get(c, 0):>7}" for s in splits))
            lines.append(f"  {'total':<{width}} " + " ".join(f"{sum(self.counts[s].values()):>7}" for s in splits))
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s) (training skips them):")
            lines += [f"  {u['path']}: {u['reason']}" for u in self.unreadable[:MAX_LISTED]]
            if len(self.unreadable) > MAX_LISTED:
                lines.append(f"  ... and {len(self.unreadable) - MAX_LISTED} more (--json lists all)")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        lines.append("trainable: yes" if self.trainable else "trainable: NO")
        return "\n".join(lines)


def fingerprint(image: torch.Tensor) -> tuple[int, np.ndarray]:
    """(64-bit difference hash, 16x16 grey thumbnail). The hash (Krawetz's dHash: one bit per horizontal
    neighbour comparison on a 9x8 grey thumbnail) is cheap to compare for every pair and finds candidates;
    the thumbnail decides, since on small centred objects (Fashion-MNIST) many different images have close
    hashes, and on noisy images a re-encoded copy can flip several bits."""
    grey = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")
    px = np.asarray(grey.resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    thumb = np.asarray(grey.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.uint8)
    return int(np.packbits(bits).view(">u8")[0]), thumb


def _inspect(path: Path) -> tuple[str | None, tuple[int, int] | None, str, tuple[int, np.ndarray] | None]:
    """(content hash, (width, height), reason-if-unreadable, fingerprint)."""
    try:
        image = load_rgb(path)
    except ImageError as e:
        return None, None, e.reason, None
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return digest, (int(image.shape[2]), int(image.shape[1])), "", fingerprint(image)


def audit(
    root: Path | str,
    valid_fraction: float = 0.2,
    seed: int = 0,
    near_tolerance: int | None = 3,
    fail_on_leak: bool = False,
    rule: LabelRule = LabelRule(),
) -> AuditReport:
    """near_tolerance: mean grey-level difference of 16x16 thumbnails that still counts as a near-duplicate;
    None switches the near-duplicate search off. rule: where the classes are, as for training."""
    root = Path(root)
    try:
        split = load_split(root, valid_fraction, seed, rule=rule)
    except DataError as e:
        return AuditReport(str(root), "unusable", errors=[str(e)])
    labels = {"folder": "class folders", "filename": "classes in file names", "csv": f"labels from {rule.csv}"}
    layout = "imgtune makes a stratified split" if split.made_split else "train/valid"
    layout = f"{labels[rule.source]}; {layout}"
    if split.test:
        layout += " + labelled test" if split.test_labelled else " + unlabelled test"
    report = AuditReport(str(root), layout, classes=list(split.classes), warnings=list(split.notes))
    if (names := class_names_file(root)) is not None:
        try:
            report.names = dict(zip(split.classes, load_class_names(names, split.classes), strict=True))
        except DataError as e:
            report.errors.append(str(e))
    _inspect_files(report, split, near_tolerance)
    if fail_on_leak and (report.duplicates or report.near_duplicates):
        report.errors.append(
            f"leakage: {len(report.duplicates)} exact and {len(report.near_duplicates)} near-duplicate image(s)"
            " across splits (--fail-on-leak)"
        )
    if len(split.classes) < 2:
        report.errors.append(f"need at least 2 classes with images, found {len(split.classes)}")
    if not split.valid and valid_fraction > 0:
        report.errors.append("the validation split is empty (--valid-fraction 0 trains without one)")
    elif not split.valid:
        report.warnings.append("no validation split (--valid-fraction 0): the last epoch will be kept as best")
    train_counts = report.counts.get("train", {})
    for c in split.classes:
        if train_counts.get(c, 0) == 0:
            report.errors.append(f"class {c!r} has no readable training images")
    return report


HASH_PREFILTER_BITS = 8  # candidates: dHashes within this many of 64 bits; thumbnails then decide


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64: np.bitwise_count where NumPy has it (2.0+), else a byte table (NumPy 1.x,
    which imgtune still supports)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return popcount_table(x)


def popcount_table(x: np.ndarray) -> np.ndarray:
    return _BYTE_BITS[np.ascontiguousarray(x)[..., None].view(np.uint8)].sum(-1, dtype=np.uint8)


def near_pairs(
    a: Sequence[tuple[int, np.ndarray]], b: Sequence[tuple[int, np.ndarray]] | None, tolerance: float
) -> list[tuple[int, int, float]]:
    """(i, j, mean abs difference) of fingerprints (audit.fingerprint) of a and b whose 16x16 grey thumbnails
    differ by at most `tolerance` grey levels on average; b None: pairs within a, each once (i < j). dHash
    distance narrows the candidates: all pairs are compared by popcount, only close ones by thumbnail."""
    if not a or (b is not None and not b):
        return []

    def arrays(prints: Sequence[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        hashes = np.array([fp[0] for fp in prints], dtype=np.uint64)
        return hashes, np.stack([fp[1] for fp in prints]).astype(np.int16).reshape(len(prints), -1)

    ha, ta = arrays(a)
    hb, tb = (ha, ta) if b is None else arrays(b)
    found = []
    for start in range(0, len(a), 256):
        dist = popcount(ha[start : start + 256, None] ^ hb[None, :])
        ii, jj = np.nonzero(dist <= HASH_PREFILTER_BITS)
        ii = ii + start
        if b is None:
            ii, jj = ii[ii < jj], jj[ii < jj]
        if not len(ii):
            continue
        mad = np.abs(ta[ii] - tb[jj]).mean(axis=1)
        found += [(int(i), int(j), float(m)) for i, j, m in zip(ii, jj, mad, strict=True) if m <= tolerance]
    return found


def _near_duplicates(report: AuditReport, prints: dict[str, list[tuple[Any, str, str]]], tolerance: int) -> None:
    """Pairs across splits whose thumbnails are within `tolerance` (near_pairs), and which are not
    byte-identical: those are exact duplicates."""
    names = [n for n in ("train", "valid", "test") if prints.get(n)]
    for k, first in enumerate(names):
        a = prints[first]
        for second in names[k + 1 :]:
            b = prints[second]
            for i, j, m in near_pairs([fp for fp, _, _ in a], [fp for fp, _, _ in b], tolerance):
                if a[i][2] != b[j][2]:
                    report.near_duplicates.append({"mean_abs_diff": round(m, 2), "files": [
                        {"split": first, "path": a[i][1]}, {"split": second, "path": b[j][1]}]})  # fmt: skip
    if report.near_duplicates:
        shown = "; ".join(
            " ~ ".join(f"{f['path']} ({f['split']})" for f in d["files"]) for d in report.near_duplicates[:3]
        )
        report.warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) across splits (16x16 thumbnails within "
            f"{tolerance} grey levels): {shown}{' ...' if len(report.near_duplicates) > 3 else ''}"
        )


def _inspect_files(report: AuditReport, split: Split, near_tolerance: int | None) -> None:
    entries = [(name, s) for name, samples in split.subsets().items() for s in samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda e: _inspect(e[1].path), entries))
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in split.subsets():
        if split.subsets()[name]:
            report.counts[name] = {c: 0 for c in split.classes} if name != "test" or split.test_labelled else {}
    prints: dict[str, list[tuple[Any, str, str]]] = defaultdict(list)  # split -> (fingerprint, path, digest)
    for (name, sample), (digest, size, reason, fp) in zip(entries, results, strict=True):
        if digest is None:
            report.unreadable.append({"path": str(sample.path), "reason": reason})
            continue
        prints[name].append((fp, str(sample.path), digest))
        label = split.classes[sample.label] if sample.label >= 0 else "(unlabelled)"
        report.counts[name][label] = report.counts[name].get(label, 0) + 1
        by_hash[digest].append((name, str(sample.path)))
        if size is not None and min(size) < TINY_PIXELS:
            report.tiny.append({"path": str(sample.path), "width": size[0], "height": size[1]})
    for copies in by_hash.values():
        if len({name for name, _ in copies}) > 1:
            report.duplicates.append({"files": [{"split": n, "path": p} for n, p in copies]})
    if report.duplicates:
        shown = "; ".join(" = ".join(f"{f['path']} ({f['split']})" for f in d["files"]) for d in report.duplicates[:3])
        report.warnings.append(
            f"{len(report.duplicates)} image(s) appear byte-for-byte in more than one split (leakage inflates "
            f"valid/test scores): {shown}{' ...' if len(report.duplicates) > 3 else ''}"
        )
    if near_tolerance is not None:
        _near_duplicates(report, prints, near_tolerance)
    if report.tiny:
        t = report.tiny[0]
        report.warnings.append(
            f"{len(report.tiny)} image(s) smaller than {TINY_PIXELS} px on a side (e.g. {t['path']},"
            f" {t['width']}x{t['height']}); they are upsampled to the input size"
        )
