"""What the training loop is given, as data: a `Stage` says what trains, on which batches, with which
optimizer, schedule and `Policy`. The recipe builds its stages in stages.py; tests and library users can build
their own and hand them to `engine.Trainer.run_stage`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from imgtune.optim import LRSchedule

Batch = tuple[torch.Tensor, torch.Tensor] | None  # None: every file of the batch was unreadable
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Policy:
    """How the loop treats a stage's epochs. `ON_IMAGES`: epochs take minutes, so each one is checkpointed,
    shown with its own progress bar and log line, and a stop request is honoured at the next step.
    `ON_FEATURES`: epochs on cached features take milliseconds, so the stage is checkpointed and reported as
    a whole, runs to its end when asked to stop, and ends with its best weights rather than its last."""

    checkpoint_every_epoch: bool = True  # False: best.pt and last.pt once, at the stage's end
    restore_best: bool = False  # end the stage with the weights of its best epoch
    interruptible: bool = True  # a stop request ends the stage at the next step (else at the stage's end)
    report_every_epoch: bool = True  # False: one progress bar and one log line for the whole stage


ON_IMAGES = Policy()
ON_FEATURES = Policy(checkpoint_every_epoch=False, restore_best=True, interruptible=False, report_every_epoch=False)


@dataclass
class Stage:
    number: int
    description: str
    module: nn.Module  # what the batches go through: the head (stage 1) or the whole Classifier (stage 2)
    train_batches: Callable[[], Iterable[Batch]]
    valid_batches: Callable[[], Iterable[Batch]]
    batches_per_epoch: int
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    policy: Policy
    patience: int | None  # stop the stage after this many epochs without a better monitored value
    generator: torch.Generator | None = None  # the train sampler's; saved so a resume reshuffles identically
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # on the whole batch, on the device
    batch_transform: BatchTransform | None = None  # mixup / cutmix: returns soft targets
    ema: torch.optim.swa_utils.AveragedModel | None = None
    # solves the stage's single epoch in one go instead of stepping through batches (the linear head by
    # L-BFGS, probe.py): returns the training loss, accuracy and number of examples of the solution
    fit: Callable[[], tuple[float, float, int]] | None = None
