"""`imgtune data check`: look at every file before training does, and say what is wrong in plain words."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgtune.data import DataError, Split, load_split
from imgtune.images import ImageError, load_rgb

TINY_PIXELS = 16  # shorter side below this: a warning (upsampling that far invents detail)
MAX_LISTED = 20


@dataclass
class AuditReport:
    root: str
    layout: str
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> readable images
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # exact copies across splits
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
            width = max(5, *(len(c) for c in self.classes)) if self.classes else 5
            lines.append(f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits))
            for c in self.classes:
                lines.append(f"  {c:<{width}} " + " ".join(f"{self.counts[s].get(c, 0):>7}" for s in splits))
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


def _inspect(path: Path) -> tuple[str | None, tuple[int, int] | None, str]:
    """(content hash, (width, height), reason-if-unreadable)."""
    try:
        image = load_rgb(path)
    except ImageError as e:
        return None, None, e.reason
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return digest, (int(image.shape[2]), int(image.shape[1])), ""


def audit(root: Path | str, valid_fraction: float = 0.2, seed: int = 0) -> AuditReport:
    root = Path(root)
    try:
        split = load_split(root, valid_fraction, seed)
    except DataError as e:
        return AuditReport(str(root), "unusable", errors=[str(e)])
    layout = "single folder of classes: imgtune makes a stratified split" if split.made_split else "train/valid"
    if split.test:
        layout += " + labelled test" if split.test_labelled else " + unlabelled test"
    report = AuditReport(str(root), layout, classes=list(split.classes), warnings=list(split.notes))
    _inspect_files(report, split)
    if len(split.classes) < 2:
        report.errors.append(f"need at least 2 classes with images, found {len(split.classes)}")
    if not split.valid:
        report.errors.append("the validation split is empty")
    train_counts = report.counts.get("train", {})
    for c in split.classes:
        if train_counts.get(c, 0) == 0:
            report.errors.append(f"class {c!r} has no readable training images")
    return report


def _inspect_files(report: AuditReport, split: Split) -> None:
    entries = [(name, s) for name, samples in split.subsets().items() for s in samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda e: _inspect(e[1].path), entries))
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name in split.subsets():
        if split.subsets()[name]:
            report.counts[name] = {c: 0 for c in split.classes} if name != "test" or split.test_labelled else {}
    for (name, sample), (digest, size, reason) in zip(entries, results, strict=True):
        if digest is None:
            report.unreadable.append({"path": str(sample.path), "reason": reason})
            continue
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
    if report.tiny:
        t = report.tiny[0]
        report.warnings.append(
            f"{len(report.tiny)} image(s) smaller than {TINY_PIXELS} px on a side (e.g. {t['path']},"
            f" {t['width']}x{t['height']}); they are upsampled to the input size"
        )
