"""Label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021), on out-of-fold probabilities
from linear heads over frozen-backbone features.

Why our own rather than cleanlab: `cleanlab.filter.find_label_issues` with its defaults (prune by noise rate,
ranked by self-confidence) is a few array operations, and cleanlab would bring scikit-learn, pandas and SciPy
into every install. This module follows those defaults step by step - per-class thresholds, the calibrated
confident joint, pruning each off-diagonal count by margin, dropping examples whose given label is also the
argmax - and the tests check that it flags the same images as cleanlab on the same probabilities.

Why linear heads on cached features: K cross-validated heads on a pretrained backbone's features give every
image a prediction from a model that never saw its label, in seconds (the backbone runs once per image);
confident learning needs exactly that (probabilities of a model trained on an image predict its own label).
"""

from __future__ import annotations

import numpy as np
import torch

from imgtune.probe import fit_linear, stratified_folds

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)  # the L2 strengths tried on the first fold; the best held-out loss wins


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    """Integers that sum to the row's rounded total: the largest remainders are rounded up (cleanlab's rule)."""
    ints = np.round(row)
    diff = int(np.round(row.sum()) - ints.sum())
    if diff:
        order = np.argsort(row - ints)
        pick = order[::-1][:diff] if diff > 0 else order[:-diff]
        ints[pick] += 1 if diff > 0 else -1
    return ints.astype(np.int64)


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """K x K counts, rows = given label, columns = the label the model is confident of, calibrated so that
    each row sums to its class's count and the whole to N."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    confident = probs >= thresholds - 1e-6
    n_confident = confident.sum(1)
    guess = np.where(n_confident > 1, probs.argmax(1), confident.argmax(1))
    keep = n_confident > 0
    joint = np.zeros((k, k), dtype=np.float64)
    np.add.at(joint, (labels[keep], guess[keep]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    joint = joint / np.clip(joint.sum(1, keepdims=True), 1e-12, None) * counts[:, None]
    joint = joint / max(joint.sum(), 1e-12) * counts.sum()
    return np.stack([_round_preserving_sum(r) for r in joint])


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of likely label errors, most suspicious first (lowest probability of the given label)."""
    labels = np.asarray(labels, dtype=np.int64)
    joint = confident_joint(labels, probs)
    flagged = np.zeros(len(labels), dtype=bool)
    for given in range(probs.shape[1]):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:
            continue
        for true in range(probs.shape[1]):
            n = int(joint[given, true])
            if true != given and n > 0:
                margin = probs[members, true] - probs[members, given]
                flagged[members[np.argsort(-margin, kind="stable")[:n]]] = True
    nudged = probs.copy()
    nudged[np.arange(len(labels)), labels] += 1e-6
    flagged &= nudged.argmax(1) != labels
    found = np.flatnonzero(flagged)
    return found[np.argsort(probs[found, labels[found]], kind="stable")]


@torch.no_grad()
def out_of_fold_probabilities(
    features: torch.Tensor, labels: np.ndarray, classes: int, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, float]:
    """(N x classes probabilities, each from the head of the fold that held the example out; the weight
    decay used). Features are standardised on each fold's training part."""
    fold = stratified_folds(labels, folds, seed)
    y = torch.as_tensor(labels)
    x = features.float()

    def fit_predict(train: np.ndarray, held: np.ndarray, wd: float) -> torch.Tensor:
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        with torch.enable_grad():
            w, b, _ = fit_linear((x[train] - mean) / std, y[train], classes, wd)
        return torch.addmm(b, (x[held] - mean) / std, w.t()).log_softmax(1)

    train0, held0 = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    losses = {wd: float(-fit_predict(train0, held0, wd).gather(1, y[held0].view(-1, 1)).mean())
              for wd in WEIGHT_DECAYS}  # fmt: skip
    best = min(losses, key=lambda wd: losses[wd])
    probs = torch.empty(len(labels), classes)
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        probs[held] = fit_predict(np.flatnonzero(fold != f), held, best).exp()
    return probs.numpy(), best
