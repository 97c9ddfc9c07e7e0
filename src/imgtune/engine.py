"""The training loop. One `Stage` = a module to train, its batches, optimizer and schedule; the Trainer runs
stages in order, validates every epoch, keeps the best checkpoint and stops early.

Stage 1 trains the head on cached backbone features; stage 2 fine-tunes the whole Classifier on images.
Both go through the same `train_epoch`/`validate` code: a batch is (inputs, labels) either way.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtune.checkpoint import save_checkpoint
from imgtune.progress import Progress, SilentProgress, SilentTask
from imgtune.runs import RunFolder

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor] | None
_SILENT_TASK = SilentTask()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values, so last.pt stays loadable with weights_only=True."""
    np_state: Any = np.random.get_state()
    return {
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
        },
        "torch": torch.get_rng_state(),
    }


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> Any:
    """Linear warmup then cosine decay to zero, stepped per batch."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(kind: str, groups: list[dict[str, Any]], momentum: float = 0.9) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"optimizer {kind!r} is not one of adamw, sgd")


@dataclass
class Stage:
    number: int
    description: str
    module: nn.Module  # what the batches go through: the head (stage 1) or the whole Classifier (stage 2)
    train_batches: Callable[[], Iterable[Batch]]
    valid_batches: Callable[[], Iterable[Batch]]
    steps_per_epoch: int
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cheap_epochs: bool  # feature epochs take a fraction of a second: progress per stage, checkpoints at its end
    patience: int | None


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    mean_lr: float = 0.0  # training epochs: the head's LR averaged over the epoch's steps


class Trainer:
    """Runs stages; owns the metrics rows, the best-so-far tracking and checkpoint writing."""

    def __init__(
        self,
        model: nn.Module,
        run: RunFolder,
        checkpoint_base: dict[str, Any],
        *,
        device: torch.device,
        label_smoothing: float = 0.0,
        grad_clip: float | None = None,
        amp_dtype: torch.dtype | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.run = run
        self.checkpoint_base = checkpoint_base
        self.device = device
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss(reduction="sum")
        self.grad_clip = grad_clip
        self.amp_dtype = amp_dtype
        self.progress = progress or SilentProgress()
        self.rows: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.best_epoch = 0
        self.epoch = 0  # global, across stages, 1-based once the first epoch ends
        self.stopped_early = False

    def _autocast(self) -> Any:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled)

    def train_epoch(self, stage: Stage) -> EpochResult:
        module, opt = stage.module, stage.optimizer
        module.train()
        total_loss, correct, seen, lr_sum, steps = 0.0, 0, 0, 0.0, 0
        task = (
            _SILENT_TASK
            if stage.cheap_epochs
            else self.progress.task(f"stage {stage.number} epoch {self.epoch + 1}", stage.steps_per_epoch)
        )
        start = time.perf_counter()
        try:
            for batch in stage.train_batches():
                if batch is None:  # every file of this batch was unreadable
                    continue
                x = batch[0].to(self.device, non_blocking=True)
                y = batch[1].to(self.device, non_blocking=True)
                with self._autocast():
                    logits = module(x)
                    loss = self.train_loss(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip is not None:
                    nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)
                opt.step()
                lr_sum += opt.param_groups[-1]["lr"]  # the head's LR (last group): what this step used
                steps += 1
                stage.scheduler.step()
                n = len(y)
                total_loss += float(loss.detach()) * n
                correct += int((logits.argmax(1) == y).sum())
                seen += n
                elapsed = time.perf_counter() - start
                task.advance(loss=total_loss / seen, acc=correct / seen, img_s=round(seen / max(elapsed, 1e-9)))
        finally:
            task.close()
        return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), seen, lr_sum / max(steps, 1))

    @torch.inference_mode()
    def validate(self, stage: Stage) -> EpochResult:
        stage.module.eval()
        total_loss, correct, seen = 0.0, 0, 0
        for batch in stage.valid_batches():
            if batch is None:
                continue
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            with self._autocast():
                logits = stage.module(x).float()
            total_loss += float(self.eval_loss(logits, y))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), seen)

    def run_stage(self, stage: Stage) -> None:
        if stage.epochs <= 0:
            return
        log.info("%s", stage.description)
        best_in_stage: dict[str, torch.Tensor] | None = None
        stage_best = -1.0
        bad_epochs = 0
        stage_start = time.perf_counter()
        stage_task = self.progress.task(f"stage {stage.number} epochs", stage.epochs) if stage.cheap_epochs else None
        for _ in range(stage.epochs):
            t0 = time.perf_counter()
            train = self.train_epoch(stage)
            train_seconds = time.perf_counter() - t0
            valid = self.validate(stage)
            seconds = time.perf_counter() - t0
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "stage": stage.number,
                "lr": train.mean_lr,
                "train_loss": train.loss,
                "train_acc": train.acc,
                "valid_loss": valid.loss,
                "valid_acc": valid.acc,
                "seconds": seconds,
                "images_per_s": train.images / max(train_seconds, 1e-9),
            }
            self.rows.append(row)
            self.run.write_metrics(self.rows)
            if stage_task is not None:
                stage_task.advance(train_acc=train.acc, valid_acc=valid.acc)
            improved = valid.acc > self.best_acc
            if improved:
                self.best_acc, self.best_epoch = valid.acc, self.epoch
            if valid.acc > stage_best:
                stage_best, bad_epochs = valid.acc, 0
                if stage.cheap_epochs:
                    best_in_stage = {k: v.detach().clone() for k, v in stage.module.state_dict().items()}
            else:
                bad_epochs += 1
            if not stage.cheap_epochs:
                log.info(
                    "epoch %d (stage %d): train loss %.4f acc %.4f | valid loss %.4f acc %.4f | %.0f s, %.1f img/s%s",
                    self.epoch, stage.number, train.loss, train.acc, valid.loss, valid.acc, seconds,
                    row["images_per_s"], "  * best" if improved else "",
                )  # fmt: skip
                if improved:
                    self.save("best", stage)
                self.save("last", stage)
            if stage.patience is not None and bad_epochs >= stage.patience:
                log.info("early stop: no better valid accuracy for %d epochs", bad_epochs)
                self.stopped_early = True
                break
        if stage_task is not None:
            stage_task.close()
        if stage.cheap_epochs:
            if best_in_stage is not None:
                stage.module.load_state_dict(best_in_stage)  # continue from the best head, not the last
            stage_rows = [r for r in self.rows if r["stage"] == stage.number]
            best_row = max(stage_rows, key=lambda r: r["valid_acc"])
            log.info(
                "stage %d: %d epochs in %.1f s; best valid acc %.4f (epoch %d)",
                stage.number, len(stage_rows), time.perf_counter() - stage_start, best_row["valid_acc"],
                best_row["epoch"],
            )  # fmt: skip
            if best_row["epoch"] == self.best_epoch:
                self.save("best", stage)
            self.save("last", stage)

    def save(self, kind: str, stage: Stage) -> None:
        payload = {
            **self.checkpoint_base,
            "state_dict": self.model.state_dict(),
            "epoch": self.epoch,
            "stage": stage.number,
            "best_valid_acc": self.best_acc,
            "best_epoch": self.best_epoch,
        }
        if kind == "last":  # what an exact resume needs
            payload["train_state"] = {
                "optimizer": stage.optimizer.state_dict(),
                "scheduler": stage.scheduler.state_dict(),
                "rng": rng_state(),
                "rows": self.rows,
            }
        save_checkpoint(self.run.best if kind == "best" else self.run.last, payload)
