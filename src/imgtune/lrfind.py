"""LR range test (Smith 2015; fastai's lr_find): raise the LR exponentially step by step, record the
smoothed loss, and suggest the LR at the loss minimum divided by 10 — the loss is still falling fast
there, an order of magnitude below where training diverges. The first 10% of batches are ignored for the
minimum: the bias-corrected average of a handful of losses is noise (on a fine-tuning curve that is flat
at first, that noise used to win and suggest 1e-8). Weights and optimizer state are restored.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from imgtune.engine import Trainer
from imgtune.optim import LRSchedule, OptimSettings
from imgtune.stage import Batch, Stage

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


class _Ramp(LRSchedule):
    """The range test's schedule: the head's LR rises exponentially from `start` to `end` over `steps` optimizer
    steps; every other param group keeps its ratio to the head's (discriminative LRs stay as configured)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, start: float, end: float) -> None:
        self.start, self.end, self.steps = start, end, steps
        super().__init__(optimizer, OptimSettings(schedule="constant", warmup_fraction=0.0), steps, 1)

    def factor(self, step: int) -> float:
        lr = self.start * (self.end / self.start) ** (min(step, self.steps - 1) / max(1, self.steps - 1))
        return lr / self.base_lrs[-1]


def range_test(stage: Stage, trainer: Trainer, steps: int = 200, start: float = 1e-7, end: float = 1.0) -> LRFindResult:
    """Train `stage` for up to `steps` optimizer steps on the Trainer's own step (so with its precision,
    accumulation, clipping and augmentation) under an exponentially rising LR; weights, optimizer and loss
    scaler are put back afterwards. No weight EMA, no metrics rows, no checkpoints."""
    module, opt = stage.module, stage.optimizer
    saved = copy.deepcopy((module.state_dict(), opt.state_dict(), trainer.stepper.state_dict()))
    ramp = _Ramp(opt, steps, start, end)
    probe = dataclasses.replace(stage, scheduler=ramp, ema=None)
    accumulate = trainer.settings.accumulate
    module.train()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    batches = _cycle(stage)
    for i in range(steps):
        lr = opt.param_groups[-1]["lr"]
        step_losses = []
        for micro in range(accumulate):
            batch = next(batches, None)
            out = trainer.train_step(probe, batch, step_now=micro + 1 == accumulate) if batch is not None else None
            if out is None:  # out of data, or a non-finite loss: the LR is past any use
                break
            step_losses.append(float(out[0]))
        if len(step_losses) < accumulate:
            break
        avg = 0.98 * avg + 0.02 * sum(step_losses) / accumulate
        smooth = avg / (1 - 0.98 ** (i + 1))
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if i > 10 and smooth > 4 * best:  # diverging: the rest of the curve says nothing new
            break
    opt.zero_grad(set_to_none=True)
    module.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    trainer.stepper.load_state_dict(saved[2])
    stage.scheduler.rescale(1.0)  # re-applies the stage's own schedule to the restored groups
    if not losses:
        raise RuntimeError("LR range test: no batch produced a finite loss")
    settled = min(len(losses) - 1, max(5, len(losses) // 10))
    tail = losses[settled:]
    suggestion = lrs[settled + tail.index(min(tail))] / 10
    return LRFindResult(lrs, losses, suggestion)


def plot(result: LRFindResult, path: Path, title: str = "") -> None:
    from imgtune.report import save_figure, subplots

    fig, ax = subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title or "LR range test")
    ax.legend()
    save_figure(fig, path)


def tune_lr(stage: Stage, trainer: Trainer, plot_path: Path, steps: int = 200) -> float:
    """`--lr auto`: run the range test on this stage and scale its LRs so the head gets the suggestion."""
    result = range_test(stage, trainer, steps=steps)
    plot(result, plot_path, f"stage {stage.number}")
    factor = result.suggestion / stage.scheduler.base_lrs[-1]
    stage.scheduler.rescale(factor)
    log.info("stage %d: LR finder suggests %.3g (%s); plot in %s", stage.number, result.suggestion, RULE, plot_path)
    return result.suggestion
