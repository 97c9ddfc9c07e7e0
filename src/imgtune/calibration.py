"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits, logits / T at prediction.
How far confidence is from accuracy (ECE, reliability bins) is measured in metrics.py, with the other metrics.

T > 1 softens an over-confident model; the argmax, hence accuracy, never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from imgtune.checkpoint import set_temperature
from imgtune.metrics import expected_calibration_error

if TYPE_CHECKING:
    from imgtune.predict import Predictor


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


def calibrate_checkpoint(
    path: Path, predictor: Predictor, pairs: Sequence[tuple[Path, str]], batch_size: int = 64,
    workers: int | None = None,
) -> Calibration:  # fmt: skip
    """`calibrate_predictor` on the checkpoint at `path`, then the temperature stored in that file, where
    predict, eval, export and serve pick it up (train --calibrate and imgtune calibrate both end here)."""
    fit = calibrate_predictor(predictor, pairs, batch_size, workers)
    set_temperature(path, fit.temperature)
    return fit
