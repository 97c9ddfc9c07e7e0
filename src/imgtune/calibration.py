"""Calibration: how far confidence is from accuracy (expected calibration error, reliability bins), and
temperature scaling (Guo et al. 2017) - one scalar T fitted on validation logits, logits / T at prediction.

T > 1 softens an over-confident model; the argmax, hence accuracy, never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from imgtune.predict import Predictor

BINS = 15


@dataclass
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    accuracy: float  # share of correct top-1 predictions among the images in the bin
    confidence: float  # their mean top-1 probability


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[ReliabilityBin]:
    """Top-1 confidence in equal-width bins over [0, 1]."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for i in range(bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        inside = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        accuracy = float(correct[inside].mean()) if n else 0.0
        out.append(ReliabilityBin(lo, hi, n, accuracy, float(conf[inside].double().mean()) if n else 0.0))
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """sum over bins of |accuracy - confidence| weighted by the bin's share of the images."""
    table = reliability(probs, labels, bins)
    n = max(1, len(labels))
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in table))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T that minimises the negative log-likelihood of softmax(logits / T) (optimised as log T, so T > 0)."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@dataclass
class Calibration:
    temperature: float
    ece_before: float
    ece_after: float
    n: int

    def to_summary(self) -> dict[str, float]:
        return {"temperature": self.temperature, "valid_ece_before": self.ece_before, "valid_ece_after": self.ece_after}


def calibrate_predictor(
    predictor: Predictor, pairs: Sequence[tuple[Path, str]], batch_size: int = 64, workers: int | None = None
) -> Calibration:
    """Fit the predictor's temperature on labelled (file, class) pairs - the validation split, never the test
    split - and set it on the predictor. Returns the fit and the ECE before and after."""
    index = {c: i for i, c in enumerate(predictor.classes)}
    predictor.temperature = 1.0
    scores = predictor.scores_for_paths([p for p, _ in pairs], batch_size, workers)
    labels = torch.tensor([index[pairs[i][1]] for i in scores.kept], dtype=torch.long)
    if not len(labels):
        raise ValueError("no readable labelled images to calibrate on")
    before = expected_calibration_error(scores.logits.softmax(1), labels)
    temperature = fit_temperature(scores.logits, labels)
    after = expected_calibration_error((scores.logits / temperature).softmax(1), labels)
    predictor.temperature = temperature
    return Calibration(temperature, before, after, len(labels))
