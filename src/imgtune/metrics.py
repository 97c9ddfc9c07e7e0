"""Evaluation metrics from logits and labels: accuracy, top-k, loss, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


@dataclass
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalResult:
    split: str
    classes: list[str]
    n: int
    accuracy: float
    top5: float
    loss: float
    macro_f1: float
    balanced_accuracy: float
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    skipped: list[dict[str, str]]  # unreadable files: {path, reason}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        width = max(12, *(len(c) for c in self.classes))
        lines = [
            f"{self.split}: {self.n} images",
            f"accuracy {self.accuracy:.4f}   top-5 {self.top5:.4f}   loss {self.loss:.4f}   "
            f"macro F1 {self.macro_f1:.4f}   balanced accuracy {self.balanced_accuracy:.4f}",
            "",
            f"{'class':<{width}}  precision  recall     f1  support",
        ]
        lines += [
            f"{m.label:<{width}}  {m.precision:9.4f} {m.recall:7.4f} {m.f1:6.4f} {m.support:8d}" for m in self.per_class
        ]
        idx_width = max(5, *(len(str(v)) for row in self.confusion_matrix for v in row))
        lines += ["", "confusion matrix (rows: true, columns: predicted; classes in the order above)"]
        lines += [" ".join(f"{v:>{idx_width}d}" for v in row) for row in self.confusion_matrix]
        if self.skipped:
            lines += ["", f"{len(self.skipped)} unreadable file(s) skipped:"]
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def compute_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    split: str = "test",
    skipped: list[dict[str, str]] | None = None,
) -> EvalResult:
    c = len(classes)
    logits, labels = logits.float(), labels.long()
    n = len(labels)
    if n == 0:
        raise ValueError(f"no readable labelled images in the {split} split")
    k = min(5, c)
    kw: dict[str, Any] = {"num_classes": c, "average": None, "zero_division": 0}
    precision = multiclass_precision(logits, labels, **kw)
    recall = multiclass_recall(logits, labels, **kw)
    f1 = multiclass_f1_score(logits, labels, **kw)
    support = torch.bincount(labels, minlength=c)
    present = support > 0
    per_class = [
        ClassMetrics(classes[i], float(precision[i]), float(recall[i]), float(f1[i]), int(support[i])) for i in range(c)
    ]
    return EvalResult(
        split=split,
        classes=list(classes),
        n=n,
        accuracy=float((logits.argmax(1) == labels).float().mean()),
        top5=float(multiclass_accuracy(logits, labels, num_classes=c, top_k=k, average="micro")),
        loss=float(F.cross_entropy(logits, labels)),
        macro_f1=float(f1[present].mean()),
        balanced_accuracy=float(recall[present].mean()),
        per_class=per_class,
        confusion_matrix=multiclass_confusion_matrix(logits, labels, num_classes=c).tolist(),
        skipped=list(skipped or []),
    )
