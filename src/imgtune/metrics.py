"""Evaluation metrics from logits and labels: accuracy, top-k, loss, per-class and averaged P/R/F1, confusion
matrix (counts, row-normalised, most-confused pairs), calibration (ECE, reliability bins) and top losses.
One function, `compute_metrics`, for `imgtune eval`, the report and the training loop's validation alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


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
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    weighted_precision: float = 0.0
    weighted_recall: float = 0.0
    weighted_f1: float = 0.0
    confusion_normalized: list[list[float]] = field(default_factory=list)  # each row sums to 1 (recall)
    most_confused: list[dict[str, Any]] = field(default_factory=list)  # {true, predicted, count}, largest first
    ece: float = 0.0  # expected calibration error, 15 bins
    reliability: list[dict[str, float]] = field(default_factory=list)
    temperature: float = 1.0  # the checkpoint's temperature scaling (1: none)
    tta: bool = False
    accuracy_without_tta: float | None = None  # with --tta: the plain single-view accuracy, for the gain
    top_losses: list[dict[str, Any]] = field(default_factory=list)  # most confidently wrong: {path, true, ...}
    # an int8 model's fp32 counterpart on the same images: {model, accuracy, agreement}
    reference: dict[str, Any] | None = None
    # per image (not in to_dict): path, true and predicted class index, top-1 probability
    samples: list[tuple[str, int, int, float]] = field(default_factory=list, repr=False)

    @property
    def tta_gain(self) -> float | None:
        return None if self.accuracy_without_tta is None else self.accuracy - self.accuracy_without_tta

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        d["tta_gain"] = self.tta_gain
        return d

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
        if self.most_confused:
            lines += ["", "most confused (true -> predicted: count)"]
            lines += [f"  {m['true']} -> {m['predicted']}: {m['count']}" for m in self.most_confused[:5]]
        lines += ["", f"calibration: ECE {self.ece:.4f} (15 bins), temperature {self.temperature:.3f}"]
        if self.tta_gain is not None:
            lines += [f"test-time augmentation: accuracy {self.accuracy:.4f} vs {self.accuracy_without_tta:.4f} "
                      f"without ({self.tta_gain:+.4f})"]  # fmt: skip
        if self.reference is not None:
            r = self.reference
            delta = f" ({self.accuracy - r['accuracy']:+.4f} here)" if r["same_images"] else ""
            lines += [f"fp32 reference ({r['model']}): accuracy {r['accuracy']:.4f}{delta}; same top-1 class on "
                      f"{r['agreement']:.2%} of the images"]  # fmt: skip
        if self.skipped:
            lines += ["", f"{len(self.skipped)} unreadable file(s) skipped:"]
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


# long: one constructor call that fills every field of EvalResult, in its order
def compute_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    split: str = "test",
    skipped: list[dict[str, str]] | None = None,
    *,
    paths: list[str] | None = None,
    temperature: float = 1.0,
    plain_logits: torch.Tensor | None = None,
) -> EvalResult:
    """`logits` are what the model predicts (after temperature scaling and TTA averaging, as log-probabilities);
    `plain_logits`, when TTA was used, the single-view ones, for the TTA gain. The training loop's validation
    calls this too, so valid_* in metrics.csv and `imgtune eval --split valid` are the same numbers."""
    c = len(classes)
    logits, labels = logits.float(), labels.long()
    n = len(labels)
    if n == 0:
        raise ValueError(f"no readable labelled images in the {split} split")
    cm = confusion_matrix(logits.argmax(1), labels, c)
    precision, recall, f1 = per_class_scores(cm)
    support = cm.sum(1)
    present = support > 0
    weights = support.double() / max(1, n)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    names = paths or [""] * n
    return EvalResult(
        split=split,
        classes=list(classes),
        n=n,
        accuracy=float((logits.argmax(1) == labels).double().mean()),  # double: 912/1000 is 0.912, not 0.912000...05
        top5=float((logits.topk(min(5, c), dim=1).indices == labels[:, None]).any(1).double().mean()),
        loss=float(F.cross_entropy(logits, labels)),
        macro_f1=float(f1[present].mean()),
        balanced_accuracy=float(recall[present].mean()),
        per_class=[
            ClassMetrics(classes[i], float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i in range(c)
        ],
        confusion_matrix=cm.tolist(),
        skipped=list(skipped or []),
        macro_precision=float(precision[present].mean()),
        macro_recall=float(recall[present].mean()),
        weighted_precision=float((precision.double() * weights).sum()),
        weighted_recall=float((recall.double() * weights).sum()),
        weighted_f1=float((f1.double() * weights).sum()),
        confusion_normalized=(cm.double() / cm.sum(1, keepdim=True).clamp(min=1)).tolist(),
        most_confused=_most_confused(cm, classes),
        ece=expected_calibration_error(probs, labels),
        reliability=[vars(b) for b in reliability_bins(probs, labels)],
        temperature=temperature,
        tta=plain_logits is not None,
        accuracy_without_tta=(
            float((plain_logits.argmax(1) == labels).double().mean()) if plain_logits is not None else None
        ),
        top_losses=_top_losses(logits, labels, classes, names),
        samples=[(names[i], int(labels[i]), int(pred[i]), float(conf[i])) for i in range(n)],
    )


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows the true class, columns the predicted one."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_scores(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall and F1 of every class from a confusion matrix; 0 where a class was never predicted
    (precision) or never present (recall), as scikit-learn's and torchmetrics' zero_division=0. Plain torch:
    torchmetrics cost 1.8 s of import in every process (it pulls in scipy.signal) for these four numbers."""
    tp = cm.diag().double()
    predicted, support = cm.sum(0).double(), cm.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), 0.0)
    return precision, recall, f1


def _most_confused(cm: torch.Tensor, classes: list[str], most: int = 10) -> list[dict[str, Any]]:
    """The largest off-diagonal cells of the confusion matrix: which class is taken for which, how often."""
    c = len(classes)
    off = cm.clone().fill_diagonal_(0).flatten()
    return [
        {"true": classes[int(i) // c], "predicted": classes[int(i) % c], "count": int(off[i])}
        for i in off.argsort(descending=True)[:most]
        if off[i] > 0
    ]


def _top_losses(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[str], names: list[str], most: int = 16
) -> list[dict[str, Any]]:
    """The most confidently wrong images: what to look at first for label noise or a missing class."""
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    nll = F.cross_entropy(logits, labels, reduction="none")
    wrong = (pred != labels).nonzero().view(-1)
    worst = wrong[nll[wrong].argsort(descending=True)][:most]
    return [
        {"path": names[i], "true": classes[int(labels[i])], "predicted": classes[int(pred[i])],
         "confidence": float(conf[i]), "loss": float(nll[i])}
        for i in worst.tolist()
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- calibration

BINS = 15


@dataclass
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    accuracy: float  # share of correct top-1 predictions among the images in the bin
    confidence: float  # their mean top-1 probability


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[ReliabilityBin]:
    """Top-1 confidence in equal-width bins over [0, 1]."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for i in range(bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        count = int(inside.sum())
        accuracy = float(correct[inside].mean()) if count else 0.0
        out.append(ReliabilityBin(lo, hi, count, accuracy, float(conf[inside].double().mean()) if count else 0.0))
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """sum over bins of |accuracy - confidence| weighted by the bin's share of the images."""
    table = reliability_bins(probs, labels, bins)
    n = max(1, len(labels))
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in table))
