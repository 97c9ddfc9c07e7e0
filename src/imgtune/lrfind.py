"""LR range test (Smith 2015; fastai's lr_find): raise the LR exponentially batch by batch, record the
smoothed loss, and suggest the LR at the loss minimum divided by 10 — the loss is still falling fast
there, an order of magnitude below where training diverges. The first 10% of batches are ignored for the
minimum: the bias-corrected average of a handful of losses is noise (on a fine-tuning curve that is flat
at first, that noise used to win and suggest 1e-8). Weights and optimizer state are restored.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from imgtune.checkpoint import atomic_write_bytes
from imgtune.engine import Batch, Stage, Trainer

log = logging.getLogger(__name__)
RULE = (
    "LR at the minimum of the smoothed loss (first 10% of batches ignored: the average is still settling),"
    " divided by 10"
)


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # exponentially smoothed (0.98), bias-corrected
    suggestion: float
    rule: str = RULE

    def csv(self) -> str:
        return "lr,loss\n" + "".join(f"{lr:.6g},{loss:.6g}\n" for lr, loss in zip(self.lrs, self.losses, strict=True))


def _cycle(stage: Stage) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in stage.train_batches():
            empty = False
            yield batch
        if empty:
            return


def range_test(stage: Stage, trainer: Trainer, steps: int = 200, start: float = 1e-7, end: float = 1.0) -> LRFindResult:
    module, opt = stage.module, stage.optimizer
    saved_weights = copy.deepcopy(module.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    base = stage.scheduler.base_lrs
    ratios = [b / base[-1] for b in base]  # keep the backbone/head LR ratios of the stage
    module.train()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    batches = _cycle(stage)
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            break
        lr = start * (end / start) ** (i / max(1, steps - 1))
        for g, r in zip(opt.param_groups, ratios, strict=True):
            g["lr"] = lr * r
        x, y = batch[0].to(trainer.device), batch[1].to(trainer.device)
        if stage.augment is not None:
            x = stage.augment(x)
        if stage.batch_transform is not None:
            x, y = stage.batch_transform(x, y)
        loss = trainer.train_loss(module(x).float(), y)
        if not torch.isfinite(loss):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = 0.98 * avg + 0.02 * float(loss.detach())
        smooth = avg / (1 - 0.98 ** (i + 1))
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if i > 10 and smooth > 4 * best:  # diverging: the rest of the curve says nothing new
            break
    module.load_state_dict(saved_weights)
    opt.load_state_dict(saved_opt)
    stage.scheduler.rescale(1.0)  # re-applies the schedule's LRs to the restored groups
    if not losses:
        raise RuntimeError("LR range test: no batch produced a finite loss")
    settled = min(len(losses) - 1, max(5, len(losses) // 10))
    tail = losses[settled:]
    suggestion = lrs[settled + tail.index(min(tail))] / 10
    return LRFindResult(lrs, losses, suggestion)


def plot(result: LRFindResult, path: Path, title: str = "") -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title or "LR range test")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def tune_lr(stage: Stage, trainer: Trainer, plot_path: Path, steps: int = 200) -> float:
    """`--lr auto`: run the range test on this stage and scale its LRs so the head gets the suggestion."""
    result = range_test(stage, trainer, steps=steps)
    plot(result, plot_path, f"stage {stage.number}")
    factor = result.suggestion / stage.scheduler.base_lrs[-1]
    stage.scheduler.rescale(factor)
    log.info("stage %d: LR finder suggests %.3g (%s); plot in %s", stage.number, result.suggestion, RULE, plot_path)
    return result.suggestion
