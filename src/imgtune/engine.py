"""The training loop. One `Stage` = a module to train, its batches, optimizer and schedule; the Trainer runs
stages in order, validates every epoch, keeps the best checkpoint, stops early and can resume exactly.

Stage 1 trains the head on cached backbone features; stage 2 fine-tunes the Classifier on images.
Both go through the same `train_epoch`/`validate` code: a batch is (inputs, labels) either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from imgtune.checkpoint import save_checkpoint
from imgtune.distributed import Dist, unwrap
from imgtune.errors import UserError
from imgtune.optim import LRSchedule
from imgtune.progress import Progress, SilentProgress, SilentTask
from imgtune.runs import RunFolder
from imgtune.runtime import autocast

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor] | None
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_SILENT_TASK = SilentTask()
MAXIMIZE = {"valid_acc": True, "macro_f1": True, "balanced_acc": True, "valid_loss": False}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """RNG states as tensors and plain values, so last.pt stays loadable with weights_only=True."""
    np_state: Any = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py[0], "internal": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what rng_state saved; the loader generator only when one is given."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


class TrainingError(UserError, RuntimeError):
    """Training cannot go on safely; the message says what was kept and what to change."""


class Interrupted(TrainingError):
    """Stopped on request (SIGINT/SIGTERM) after a complete step, with last.pt written."""


class StopRequest:
    """Set by the first SIGINT/SIGTERM: the loop finishes its current step, saves and stops. A second
    signal aborts at once. The CLI installs the handlers; library users may call `request()` themselves."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def install(self) -> None:
        import signal
        import sys

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt  # the second signal: abort now
            self.requested = True
            print(f"\n{signal.Signals(signum).name}: stopping after the current step "
                  "(send it again to abort at once)", file=sys.stderr, flush=True)  # fmt: skip

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


STOP = StopRequest()


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
    cheap_epochs: bool  # feature epochs take a fraction of a second: progress per stage, checkpoints at its end
    patience: int | None
    generator: torch.Generator | None = None  # the train sampler's; saved so a resume reshuffles identically
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # on the whole batch, on the device
    batch_transform: BatchTransform | None = None  # mixup / cutmix: returns soft targets
    ema: torch.optim.swa_utils.AveragedModel | None = None


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    mean_lr: float = 0.0  # training epochs: the head's LR averaged over the epoch's optimizer steps
    macro_f1: float = 0.0
    balanced_acc: float = 0.0


@dataclass
class TrainerState:
    """Everything about the loop that an exact resume needs besides weights and optimizer."""

    epoch: int = 0  # global, across stages
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = 0
    best_acc: float = 0.0
    stage: int = 0
    stage_epochs_done: int = 0
    stage_best: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0
    lr_log: list[list[float]] = field(default_factory=list)  # [global optimizer step, stage, head LR]


def _macro_scores(cm: torch.Tensor) -> tuple[float, float]:
    """(macro F1, balanced accuracy) from a confusion matrix (rows: true class), over the classes present."""
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    present = support > 0
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return float(f1[present].mean()), float(recall[present].mean())


class Trainer:
    """Runs stages; owns the metrics rows, best-so-far tracking, checkpoint writing and resume state."""

    def __init__(
        self,
        model: nn.Module,
        run: RunFolder,
        checkpoint_base: dict[str, Any],
        *,
        device: torch.device,
        num_classes: int,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        grad_clip: float | None = None,
        grad_clip_mode: str = "norm",
        accumulate: int = 1,
        amp_dtype: torch.dtype | None = None,
        eval_dtype: torch.dtype | None = None,
        monitor: str = "valid_acc",
        progress: Progress | None = None,
        tensorboard: Any = None,
        max_nonfinite: int = 20,
        dist: Dist | None = None,
    ) -> None:
        self.model = model
        self.dist = dist or Dist()
        self.run = run
        self.checkpoint_base = checkpoint_base
        self.device = device
        self.num_classes = num_classes
        weight = class_weights.to(device) if class_weights is not None else None
        self.train_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss(reduction="sum")
        self.grad_clip, self.grad_clip_mode, self.accumulate = grad_clip, grad_clip_mode, accumulate
        self.amp_dtype = amp_dtype
        self.eval_dtype = eval_dtype  # validation is inference: runtime.inference_dtype (bf16 where native)
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not (a disabled scaler is a no-op)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.monitor = monitor
        self.progress = progress or SilentProgress()
        self.tensorboard = tensorboard
        self.max_nonfinite = max_nonfinite
        self.state = TrainerState()
        self.pending_epoch: dict[str, Any] | None = None  # a mid-epoch resume point from last.pt
        self.oom_retries = 0
        self.deadline: float | None = None  # time.monotonic() after which no epoch starts (a time budget)

    # ------------------------------------------------------------------------------------------ one epoch

    def _autocast(self) -> Any:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled)

    def _non_finite(self, stage: Stage) -> None:
        """Skip this step; under mixed precision switch to fp32 for the rest of the run; stop the run once
        more than `max_nonfinite` steps were skipped (the data or the LR is broken, not one batch)."""
        stage.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        if self.state.skipped_steps > self.max_nonfinite:
            raise TrainingError(
                f"stopped: {self.state.skipped_steps} steps had a non-finite loss (limit {self.max_nonfinite}); "
                f"the checkpoints in {self.run.path / 'checkpoints'} hold the last finite weights. "
                "Lower the LR, add --grad-clip, or check the data."
            )
        if self.amp_dtype is not None:
            log.warning("non-finite loss under %s autocast: continuing in fp32", self.amp_dtype)
            self.amp_dtype = None
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        else:
            log.warning("non-finite loss: step skipped (%d so far)", self.state.skipped_steps)

    def _optimizer_step(self, stage: Stage) -> None:
        opt = stage.optimizer
        if self.grad_clip is not None:
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.grad_clip_mode == "value":
                nn.utils.clip_grad_value_(params, self.grad_clip)
            else:
                nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        stage.scheduler.step()
        if stage.ema is not None:
            stage.ema.update_parameters(unwrap(stage.module))

    def train_epoch(self, stage: Stage, resume: dict[str, Any] | None = None) -> EpochResult:
        """One pass over the training batches. `resume` (from a last.pt written mid-epoch) replays the epoch's
        random draws, skips the batches already trained on, and continues from the very next step."""
        module, opt = stage.module, stage.optimizer
        module.train()
        acc: dict[str, Any] = (
            dict(resume["acc"]) if resume else {"loss": 0.0, "correct": 0, "seen": 0, "lr_sum": 0.0, "steps": 0}
        )
        pending = 0
        task = (
            _SILENT_TASK
            if stage.cheap_epochs
            else self.progress.task(f"stage {stage.number} epoch {self.state.epoch + 1}", stage.batches_per_epoch)
        )
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if resume is not None:
            set_rng_state(resume["epoch_rng"], stage.generator)  # same shuffle, same worker seeds as before
        epoch_rng = rng_state(stage.generator)
        source = stage.train_batches()
        sampler = getattr(source, "sampler", None)
        if isinstance(sampler, DistributedSampler):  # a new shuffle each epoch, the same on all ranks
            sampler.set_epoch(self.state.epoch)
        batches = iter(source)
        done = int(resume["batches_done"]) if resume else 0
        for _ in range(done):  # data only: reproduces the RNG draws of the batches already trained on
            next(batches, None)
        if resume is not None:
            set_rng_state(resume["step_rng"])
            task.advance(done)
        d = self.dist
        stop = False
        try:
            for i, batch in enumerate(batches, start=done):
                if d.enabled:  # agreed before the forward pass: DDP needs every rank in every step
                    empty, stop_now = d.any(batch is None, STOP.requested)
                    stop = stop or stop_now
                else:
                    empty, stop = batch is None, STOP.requested
                if empty or batch is None:  # every file of this batch was unreadable (on some rank)
                    continue
                x = batch[0].to(self.device, non_blocking=True)
                y = batch[1].to(self.device, non_blocking=True)
                hard = y
                if stage.augment is not None:
                    x = stage.augment(x)
                if stage.batch_transform is not None:
                    x, y = stage.batch_transform(x, y)
                    hard = y.argmax(1)
                with self._autocast():
                    logits = module(x)
                loss = self.train_loss(logits.float(), y)
                (non_finite,) = d.any(not bool(torch.isfinite(loss)))
                if non_finite:  # on any rank: all skip this step together
                    self._non_finite(stage)
                    pending = 0
                    continue
                last_micro = pending + 1 == self.accumulate or i + 1 >= stage.batches_per_epoch
                no_sync = getattr(module, "no_sync", None)  # DDP's
                sync = no_sync() if no_sync is not None and not last_micro else contextlib.nullcontext()
                with sync:  # accumulating under DDP: all-reduce gradients only on the last micro-batch
                    self.scaler.scale(loss / self.accumulate).backward()
                pending += 1
                if last_micro:
                    lr = opt.param_groups[-1]["lr"]  # the head's LR (last group): what this step used
                    acc["lr_sum"] += lr
                    acc["steps"] += 1
                    self.state.lr_log.append([len(self.state.lr_log) + 1, stage.number, lr])
                    self._optimizer_step(stage)
                    pending = 0
                n = len(hard)
                acc["loss"] += float(loss.detach()) * n
                acc["correct"] += int((logits.argmax(1) == hard).sum())
                acc["seen"] += n
                seen = acc["seen"]
                elapsed = time.perf_counter() - start
                task.advance(loss=acc["loss"] / seen, acc=acc["correct"] / seen, img_s=round(seen / max(elapsed, 1e-9)))
                halt = stop if d.enabled else STOP.requested  # one process: also a signal during this step
                if pending == 0 and halt and not stage.cheap_epochs and i + 1 < stage.batches_per_epoch:
                    in_epoch = {"batches_done": i + 1, "epoch_rng": epoch_rng, "step_rng": rng_state(), "acc": acc}
                    self.save("last", stage, in_epoch=in_epoch)
                    raise Interrupted(self._stopped_message(f"epoch {self.state.epoch + 1}, step {i + 1}"))
        finally:
            task.close()
        totals = d.sum(torch.tensor([acc["loss"], acc["correct"], acc["seen"]], dtype=torch.float64)).tolist()
        n = max(totals[2], 1.0)
        return EpochResult(totals[0] / n, totals[1] / n, int(totals[2]), acc["lr_sum"] / max(acc["steps"], 1))

    def _stopped_message(self, where: str) -> str:
        command = f"imgtune train --resume {self.run.path}"
        if self.dist.enabled:
            command = f"torchrun <the same options, {self.dist.world} processes> -m {command}"
        return f"stopped at {where}; {self.run.last} holds everything needed to continue exactly: {command}"

    @torch.inference_mode()
    def validate(self, module: nn.Module, batches: Iterable[Batch]) -> EpochResult:
        """Loss and confusion matrix over this rank's batches, summed over ranks (disjoint shards: exact)."""
        module = unwrap(module)  # no collectives inside: ranks may hold different numbers of batches
        was_training = module.training
        module.eval()
        k = self.num_classes
        total_loss = torch.zeros((), dtype=torch.float64)
        cm = torch.zeros(k * k, dtype=torch.float64)
        for batch in batches:
            if batch is None:
                continue
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            with autocast(self.device, self.eval_dtype):
                logits = module(x).float()
            total_loss += float(self.eval_loss(logits, y))
            cm += torch.bincount((y * k + logits.argmax(1)).cpu(), minlength=k * k).double()
        module.train(was_training)
        sums = self.dist.sum(torch.cat([total_loss.view(1), cm]))
        total_loss, cm = sums[0], sums[1:].view(k, k)
        seen = int(cm.sum())
        if not seen:
            return EpochResult(float("nan"), 0.0, 0)
        f1, bal = _macro_scores(cm)
        return EpochResult(float(total_loss) / seen, float(cm.diag().sum()) / seen, seen, macro_f1=f1, balanced_acc=bal)

    # -------------------------------------------------------------------------------------------- a stage

    def _score(self, valid: EpochResult) -> float:
        return {
            "valid_acc": valid.acc,
            "valid_loss": valid.loss,
            "macro_f1": valid.macro_f1,
            "balanced_acc": valid.balanced_acc,
        }[self.monitor]

    def _better(self, score: float, than: float | None) -> bool:
        if than is None:
            return not math.isnan(score)
        return score > than if MAXIMIZE[self.monitor] else score < than

    def run_stage(self, stage: Stage) -> None:
        st = self.state
        if st.stage != stage.number:  # a new stage (on resume, the state already points into this one)
            st.stage, st.stage_epochs_done, st.stage_best, st.bad_epochs = stage.number, 0, None, 0
        if stage.epochs <= st.stage_epochs_done or st.stopped_early:
            return
        log.info("%s", stage.description)
        best_in_stage: dict[str, torch.Tensor] | None = None
        stage_start = time.perf_counter()
        stage_task = self.progress.task(f"stage {stage.number} epochs", stage.epochs) if stage.cheap_epochs else None
        while st.stage_epochs_done < stage.epochs:
            # the time budget (train.max_minutes), agreed across ranks so that all stop together
            over = self.deadline is not None and st.epoch > 0 and time.monotonic() > self.deadline  # >= 1 epoch
            if self.deadline is not None and self.dist.any(over)[0]:
                log.info("time budget used up: no more epochs (stage %d, %d done)", stage.number, st.stage_epochs_done)
                st.stopped_early = True
                break
            t0 = time.perf_counter()
            train = self.train_epoch(stage, self.pending_epoch)
            self.pending_epoch = None
            train_seconds = time.perf_counter() - t0
            evaluated = stage.ema.module if stage.ema is not None else stage.module
            valid = self.validate(evaluated, stage.valid_batches())
            # the raw weights once, at the stage's last epoch: every epoch would cost a tenth of the training time
            last = st.stage_epochs_done + 1 == stage.epochs
            raw = self.validate(stage.module, stage.valid_batches()) if stage.ema is not None and last else None
            stage.scheduler.epoch_end(self._score(valid))
            seconds = time.perf_counter() - t0
            st.epoch += 1
            st.stage_epochs_done += 1
            row = {
                "epoch": st.epoch,
                "stage": stage.number,
                "lr": train.mean_lr,
                "train_loss": train.loss,
                "train_acc": train.acc,
                "valid_loss": valid.loss,
                "valid_acc": valid.acc,
                "seconds": seconds,
                "images_per_s": train.images / max(train_seconds, 1e-9),
                "valid_macro_f1": valid.macro_f1,
                "valid_balanced_acc": valid.balanced_acc,
                "raw_valid_acc": raw.acc if raw is not None else "",
            }
            st.rows.append(row)
            if self.dist.is_main:
                self.run.write_metrics(st.rows)
                self.run.write_lr_log(st.lr_log)
                self._log_tensorboard(row)
            if stage_task is not None:
                stage_task.advance(train_acc=train.acc, valid_acc=valid.acc)
            score = self._score(valid)
            improved = self._better(score, st.best_score)
            if improved:
                st.best_score, st.best_epoch, st.best_acc = score, st.epoch, valid.acc
            if self._better(score, st.stage_best):
                st.stage_best, st.bad_epochs = score, 0
                if stage.cheap_epochs:
                    best_in_stage = {k: v.detach().clone() for k, v in unwrap(stage.module).state_dict().items()}
            else:
                st.bad_epochs += 1
            if stage.patience is not None and st.bad_epochs >= stage.patience:
                log.info("early stop: no better %s for %d epochs", self.monitor, st.bad_epochs)
                st.stopped_early = True
            if not stage.cheap_epochs:
                log.info(
                    "epoch %d (stage %d): train loss %.4f acc %.4f | valid loss %.4f acc %.4f | %.0f s, %.1f img/s%s",
                    st.epoch, stage.number, train.loss, train.acc, valid.loss, valid.acc, seconds,
                    row["images_per_s"], "  * best" if improved else "",
                )  # fmt: skip
                if improved:
                    self.save("best", stage)
                self.save("last", stage)
            if st.stopped_early:
                break
            # also a signal that arrived during validation; under torchrun, on any rank
            if not stage.cheap_epochs and self.dist.any(STOP.requested)[0]:
                raise Interrupted(self._stopped_message(f"the end of epoch {st.epoch}"))
        if stage_task is not None:
            stage_task.close()
        if stage.cheap_epochs:
            if best_in_stage is not None:
                unwrap(stage.module).load_state_dict(best_in_stage)  # continue from the best head, not the last
            stage_rows = [r for r in st.rows if r["stage"] == stage.number]
            best_row = max(stage_rows, key=lambda r: r["valid_acc"])
            log.info(
                "stage %d: %d epochs in %.1f s; best valid acc %.4f (epoch %d)",
                stage.number, len(stage_rows), time.perf_counter() - stage_start, best_row["valid_acc"],
                best_row["epoch"],
            )  # fmt: skip
            if st.best_epoch in {r["epoch"] for r in stage_rows}:
                self.save("best", stage)
            st.stopped_early = False  # patience is a fine-tuning rule; the head stage always runs to its end
            self.save("last", stage)

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        if self.tensorboard is None:
            return
        for key, value in row.items():
            if key not in ("epoch", "stage") and isinstance(value, int | float):
                self.tensorboard.add_scalar(key, value, row["epoch"])
        self.tensorboard.flush()

    # ------------------------------------------------------------------------------------ checkpoints

    def save(self, kind: str, stage: Stage, in_epoch: dict[str, Any] | None = None) -> None:
        weights = stage.ema.module.state_dict() if stage.ema is not None else None
        model_state = self.model.state_dict()
        if weights is not None and unwrap(stage.module) is self.model:
            model_state = weights  # inference uses the averaged weights
        bad = [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never replace a good checkpoint with broken weights
            raise TrainingError(
                f"weights became non-finite ({bad[:3]}...); {kind}.pt was not overwritten and keeps the last "
                "finite weights. Lower the LR or add --grad-clip."
            )
        payload: dict[str, Any] = {
            **self.checkpoint_base,
            "state_dict": model_state,
            "epoch": self.state.epoch,
            "stage": stage.number,
            "best_valid_acc": self.state.best_acc,
            "best_epoch": self.state.best_epoch,
        }
        rank_state = {"rng": rng_state(stage.generator), "in_epoch": in_epoch}
        # every rank's RNG and place in its shard (collective: all ranks save together; rank 0 writes)
        rank_states = self.dist.gather_objects(rank_state) if kind == "last" else []
        if not self.dist.is_main:
            return
        if kind == "last":  # what an exact resume needs
            payload["train_state"] = {
                "trainer": vars(self.state).copy(),
                "raw_state_dict": self.model.state_dict(),
                "optimizer": stage.optimizer.state_dict(),
                "scheduler": stage.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_n_averaged": stage.ema.n_averaged.clone() if stage.ema is not None else None,
                "amp": str(self.amp_dtype) if self.amp_dtype is not None else None,
                "rng": rank_state["rng"],
                "in_epoch": in_epoch,  # set when stopped mid-epoch: where to continue inside the epoch
                "world_size": self.dist.world,
            }
            if self.dist.enabled:
                payload["train_state"]["ranks"] = rank_states
        save_checkpoint(self.run.best if kind == "best" else self.run.last, payload)

    def restore(self, train_state: dict[str, Any], stage: Stage, checkpoint_state: dict[str, torch.Tensor]) -> None:
        """Continue `stage` exactly where last.pt left it (called after the stage's objects are built)."""
        self.state = TrainerState(**train_state["trainer"])
        self.model.load_state_dict(train_state["raw_state_dict"])
        stage.optimizer.load_state_dict(train_state["optimizer"])
        stage.scheduler.load_state_dict(train_state["scheduler"])
        if train_state.get("scaler"):
            self.scaler.load_state_dict(train_state["scaler"])
        if train_state.get("amp") is None and self.amp_dtype is not None:
            self.amp_dtype = None  # the run had fallen back to fp32 before it stopped
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        if stage.ema is not None and train_state.get("ema_n_averaged") is not None:
            stage.ema.module.load_state_dict(checkpoint_state)
            stage.ema.n_averaged.copy_(train_state["ema_n_averaged"])
        own = self._own_rank_state(train_state)
        set_rng_state(own["rng"], stage.generator)
        self.pending_epoch = own["in_epoch"]
        if self.dist.is_main:
            self.run.write_metrics(self.state.rows)  # drop rows written after this checkpoint
            self.run.write_lr_log(self.state.lr_log)

    def _own_rank_state(self, train_state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG and in-epoch position. A different number of processes cannot continue inside an
        epoch (the shards differ); at an epoch boundary it can, with fresh per-rank random streams."""
        saved_world = int(train_state.get("world_size", 1))
        if saved_world == self.dist.world:
            ranks = train_state.get("ranks")
            return ranks[self.dist.rank] if ranks else {"rng": train_state["rng"], "in_epoch": train_state["in_epoch"]}
        if train_state.get("in_epoch") is not None:
            raise TrainingError(
                f"{self.run.last} was written mid-epoch by {saved_world} process(es); resume it with the same "
                f"number (torchrun --nproc-per-node ...), not {self.dist.world}"
            )
        log.warning("resuming a %d-process run with %d processes: it continues, but not bit for bit",
                    saved_world, self.dist.world)  # fmt: skip
        return {"rng": train_state["rng"], "in_epoch": None}
