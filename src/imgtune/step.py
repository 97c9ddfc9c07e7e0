"""One training step, the one every loop shares (the Trainer's epochs and the LR finder alike): forward under
autocast, the loss, the non-finite guard agreed across ranks, backward (DDP's `no_sync` while accumulating,
loss scaling for fp16), then the optimizer step with gradient clipping, the LR schedule's step and the weight
EMA's update."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imgtune.distributed import Dist, unwrap
from imgtune.stage import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """How each step is taken: the loss, the gradient's treatment, precision, and when to give up."""

    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    grad_clip: float | None = None
    grad_clip_mode: str = "norm"  # or "value"
    accumulate: int = 1  # micro-batches per optimizer step
    amp_dtype: torch.dtype | None = None  # training autocast (None: fp32)
    eval_dtype: torch.dtype | None = None  # validation is inference: runtime.inference_dtype
    max_nonfinite: int = 20  # skipped steps before the run stops


class Stepper:
    """Takes steps; owns what changes from step to step outside the model: the autocast dtype (fp32 after a
    non-finite loss under mixed precision) and the gradient scaler."""

    def __init__(self, settings: StepSettings, device: torch.device, dist: Dist) -> None:
        self.settings, self.device, self.dist = settings, device, dist
        weight = settings.class_weights.to(device) if settings.class_weights is not None else None
        self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.label_smoothing)
        self.amp_dtype = settings.amp_dtype
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not (a disabled scaler is a no-op)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    def __call__(self, stage: Stage, batch: tuple[torch.Tensor, torch.Tensor], step_now: bool) -> Any:
        """Forward, loss and backward of one (micro-)batch, then the optimizer step when `step_now` (the last
        micro-batch of `accumulate`). Returns (loss, logits, hard labels), or None when the loss was
        non-finite on some rank: then every rank drops this batch's gradients together."""
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        hard = y
        if stage.augment is not None:
            x = stage.augment(x)
        if stage.batch_transform is not None:
            x, y = stage.batch_transform(x, y)
            hard = y.argmax(1)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = stage.module(x)
        loss = self.loss(logits.float(), y)
        if self.dist.any(not bool(torch.isfinite(loss)))[0]:
            stage.optimizer.zero_grad(set_to_none=True)
            return None
        no_sync = getattr(stage.module, "no_sync", None)  # DDP's: all-reduce gradients on the last micro-batch only
        with no_sync() if no_sync is not None and not step_now else contextlib.nullcontext():
            self.scaler.scale(loss / self.settings.accumulate).backward()
        if step_now:
            self._optimizer_step(stage)
        return loss.detach(), logits, hard

    def _optimizer_step(self, stage: Stage) -> None:
        opt, clip = stage.optimizer, self.settings.grad_clip
        if clip is not None:
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.settings.grad_clip_mode == "value":
                nn.utils.clip_grad_value_(params, clip)
            else:
                nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        stage.scheduler.step()
        if stage.ema is not None:
            stage.ema.update_parameters(unwrap(stage.module))

    def fall_back_to_fp32(self, skipped: int) -> None:
        """After a skipped step: under mixed precision, continue in fp32 for the rest of the run."""
        if self.amp_dtype is not None:
            log.warning("non-finite loss under %s autocast: continuing in fp32", self.amp_dtype)
            self.amp_dtype = None
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        else:
            log.warning("non-finite loss: step skipped (%d so far)", skipped)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "amp": None if self.amp_dtype is None else str(self.amp_dtype)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if state["amp"] is None and self.amp_dtype is not None:  # the run had fallen back to fp32 before it stopped
            self.amp_dtype = None
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
