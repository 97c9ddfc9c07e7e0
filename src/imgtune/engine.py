"""The training loop, the "how": one step (`train_step`), one epoch (`train_epoch`), validation (`validate`) and
a stage's epochs with their checkpoints (`run_stage`). What to train is data (a `stage.Stage`, built in
stages.py); what a run measures and remembers is tracking.py's; what a checkpoint holds is checkpoint.py's.
Stage 1 (the head on cached features) and stage 2 (the network on images) run the same code."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from imgtune.checkpoint import Checkpoint, CheckpointSaver, TrainState
from imgtune.distributed import Dist, unwrap
from imgtune.errors import Interrupted, TrainingError
from imgtune.metrics import EvalResult, compute_metrics
from imgtune.progress import Progress, SilentProgress, SilentTask, Task
from imgtune.rng import rng_state, set_rng_state
from imgtune.runs import RunFolder
from imgtune.runtime import StopRequest, autocast
from imgtune.stage import Batch, Stage
from imgtune.step import Stepper, StepSettings
from imgtune.tracking import Tracker, validation_columns

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the loop is: with the Tracker's state, everything an exact resume needs besides the tensors."""

    epoch: int = 0  # global, across stages
    stage: int = 0
    stage_epochs_done: int = 0
    stopped_early: bool = False  # patience or the time budget ended training
    skipped_steps: int = 0  # steps skipped for a non-finite loss


@dataclass
class EpochResult:
    loss: float
    acc: float
    images: int
    mean_lr: float = 0.0  # the head's LR averaged over the epoch's optimizer steps


class Trainer:
    """Runs stages: steps, epochs, validation, best/last checkpoints, early stopping and the time budget."""

    def __init__(
        self,
        model: nn.Module,
        run: RunFolder,
        template: Checkpoint,  # what every checkpoint of this run says besides its weights and training state
        *,
        device: torch.device,
        num_classes: int,
        step: StepSettings = StepSettings(),
        tracker: Tracker | None = None,
        progress: Progress | None = None,
        dist: Dist | None = None,
        stop: StopRequest | None = None,
        deadline: float | None = None,  # time.monotonic() after which no epoch starts (train.max_minutes)
    ) -> None:
        self.model, self.run, self.num_classes = model, run, num_classes
        self.device, self.settings = device, step
        self.dist = dist or Dist()
        self.tracker = tracker or Tracker("valid_acc")
        self.progress = progress or SilentProgress()
        self.stop = stop or StopRequest()
        self.deadline = deadline
        self.stepper = Stepper(step, device, self.dist)
        self.saver = CheckpointSaver(run, template, self.dist)
        self.state = LoopState()
        self.pending_epoch: dict[str, Any] | None = None  # a mid-epoch resume point from last.pt

    def train_step(self, stage: Stage, batch: tuple[torch.Tensor, torch.Tensor], step_now: bool) -> Any:
        """One (micro-)batch through step.Stepper: (loss, logits, hard labels), or None if skipped."""
        return self.stepper(stage, batch, step_now)

    def _non_finite(self) -> None:
        """Count a skipped step; stop the run once more than `max_nonfinite` were skipped (the data or the LR
        is broken, not one batch)."""
        self.state.skipped_steps += 1
        limit = self.settings.max_nonfinite
        if self.state.skipped_steps > limit:
            raise TrainingError(
                f"stopped: {self.state.skipped_steps} steps had a non-finite loss (limit {limit}); the checkpoints "
                f"in {self.run.path / 'checkpoints'} hold the last finite weights. Lower the LR, add --grad-clip, "
                "or check the data."
            )
        self.stepper.fall_back_to_fp32(self.state.skipped_steps)

    def train_epoch(self, stage: Stage, resume: dict[str, Any] | None = None) -> EpochResult:
        """One pass over the training batches. `resume` (from a last.pt written mid-epoch) replays the epoch's
        random draws, skips the batches already trained on, and continues from the very next step."""
        if stage.fit is not None:
            return EpochResult(*stage.fit())
        stage.module.train()
        acc: dict[str, Any] = dict(resume["acc"]) if resume else {"loss": 0.0, "correct": 0, "seen": 0,
                                                                   "lr_sum": 0.0, "steps": 0}  # fmt: skip
        title = f"stage {stage.number} epoch {self.state.epoch + 1}"
        task = self.progress.task(title, stage.batches_per_epoch) if stage.policy.report_every_epoch else SilentTask()
        start, pending = time.perf_counter(), 0
        stage.optimizer.zero_grad(set_to_none=True)
        if resume is not None:
            set_rng_state(resume["epoch_rng"], stage.generator)  # same shuffle, same worker seeds as before
        epoch_rng = rng_state(stage.generator)
        batches, done = self._batches(stage, resume, task)
        try:
            for i, batch in enumerate(batches, start=done):
                # agreed before the forward pass: DDP needs every rank in every step
                empty, stop = self.dist.any(batch is None, self.stop.requested)
                if empty or batch is None:  # every file of this batch was unreadable (on some rank)
                    continue
                step_now = pending + 1 == self.settings.accumulate or i + 1 >= stage.batches_per_epoch
                lr = stage.optimizer.param_groups[-1]["lr"]  # the head's LR (last group): what a step now uses
                out = self.train_step(stage, batch, step_now)
                if out is None:
                    self._non_finite()
                    pending = 0
                    continue
                pending = 0 if step_now else pending + 1
                loss, logits, hard = out
                step_loss = float(loss)  # one device sync a step, as before the trackers wanted it too
                if step_now:
                    acc["lr_sum"], acc["steps"] = acc["lr_sum"] + lr, acc["steps"] + 1
                    self.tracker.log_step(stage.number, lr, step_loss)
                acc["loss"] += step_loss * len(hard)
                acc["correct"] += int((logits.argmax(1) == hard).sum())
                acc["seen"] += len(hard)
                seen, elapsed = acc["seen"], time.perf_counter() - start
                task.advance(loss=acc["loss"] / seen, acc=acc["correct"] / seen, img_s=round(seen / max(elapsed, 1e-9)))
                halt = stop if self.dist.enabled else self.stop.requested  # one process: also a stop during the step
                if pending == 0 and halt and stage.policy.interruptible and i + 1 < stage.batches_per_epoch:
                    in_epoch = {"batches_done": i + 1, "epoch_rng": epoch_rng, "step_rng": rng_state(), "acc": acc}
                    self.save("last", stage, in_epoch=in_epoch)
                    raise Interrupted(self._stopped_message(f"epoch {self.state.epoch + 1}, step {i + 1}"))
        finally:
            task.close()
        totals = self.dist.sum(torch.tensor([acc["loss"], acc["correct"], acc["seen"]], dtype=torch.float64)).tolist()
        n = max(totals[2], 1.0)
        return EpochResult(totals[0] / n, totals[1] / n, int(totals[2]), acc["lr_sum"] / max(acc["steps"], 1))

    def _batches(self, stage: Stage, resume: dict[str, Any] | None, task: Task) -> tuple[Any, int]:
        """The epoch's batch iterator and how many of its batches are already done (a mid-epoch resume)."""
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
        return batches, done

    def _stopped_message(self, where: str) -> str:
        command = f"imgtune train --resume {self.run.path}"
        if self.dist.enabled:
            command = f"torchrun <the same options, {self.dist.world} processes> -m {command}"
        return f"stopped at {where}; {self.run.last} holds everything needed to continue exactly: {command}"

    @torch.inference_mode()
    def validate(self, module: nn.Module, batches: Iterable[Batch]) -> EvalResult | None:
        """The metrics `imgtune eval` computes, over every rank's validation shard (disjoint shards, gathered:
        exact). None when there are no validation images."""
        module = unwrap(module)  # no collectives inside: ranks may hold different numbers of batches
        was_training = module.training
        module.eval()
        logits, labels = [torch.empty(0, self.num_classes)], [torch.empty(0, dtype=torch.long)]
        for batch in batches:
            if batch is not None:
                with autocast(self.device, self.settings.eval_dtype):
                    logits.append(module(batch[0].to(self.device, non_blocking=True)).float().cpu())
                labels.append(batch[1].cpu())
        module.train(was_training)
        all_logits, all_labels = self.dist.gather_cat(torch.cat(logits)), self.dist.gather_cat(torch.cat(labels))
        if not len(all_labels):
            return None
        return compute_metrics(all_logits, all_labels, [str(c) for c in range(self.num_classes)], "valid")

    # ------------------------------------------------------------------------------------------- a stage
    def run_stage(self, stage: Stage) -> None:
        st, tracker, policy = self.state, self.tracker, stage.policy
        if st.stage != stage.number:  # a new stage (on resume, the state already points into this one)
            st.stage, st.stage_epochs_done = stage.number, 0
            tracker.start_stage()
        if stage.epochs <= st.stage_epochs_done or st.stopped_early:
            return
        log.info("%s", stage.description)
        best_weights: dict[str, torch.Tensor] | None = None
        started, done_before = time.perf_counter(), st.stage_epochs_done  # a resumed stage has done some
        stage_task = SilentTask() if policy.report_every_epoch else self.progress.task(f"stage {stage.number} epochs",
                                                                                      stage.epochs)  # fmt: skip
        while st.stage_epochs_done < stage.epochs and not self._out_of_time(stage):
            row = self._epoch(stage)
            verdict = tracker.end_epoch(row)
            if verdict.stage_improved and policy.restore_best:
                best_weights = {k: v.detach().clone() for k, v in unwrap(stage.module).state_dict().items()}
            if tracker.patience_used_up(stage.patience):
                log.info("early stop: no better %s for %d epochs", tracker.monitor.name, tracker.bad_epochs)
                st.stopped_early = True
            stage_task.advance(train_acc=row["train_acc"], valid_acc=row["valid_acc"])
            if policy.report_every_epoch:  # with the stage's ETA: its epochs so far predict the rest
                each = (time.perf_counter() - started) / (st.stage_epochs_done - done_before)
                left = 0 if st.stopped_early else stage.epochs - st.stage_epochs_done
                tracker.log_epoch(row, verdict, (left, each * left))
            if policy.checkpoint_every_epoch:
                if verdict.improved:
                    self.save("best", stage)
                self.save("last", stage)
                tracker.checkpointed()
            if st.stopped_early:
                break
            if policy.interruptible and self.dist.any(self.stop.requested)[0]:  # also a stop during validation
                raise Interrupted(self._stopped_message(f"the end of epoch {st.epoch}"))
        stage_task.close()
        if not policy.checkpoint_every_epoch:  # checkpointed as a whole: continue from the stage's best weights
            if best_weights is not None:
                unwrap(stage.module).load_state_dict(best_weights)
            if tracker.log_stage(stage.number, time.perf_counter() - started):  # the run's best epoch is in it
                self.save("best", stage)
            self.save("last", stage)
            tracker.checkpointed()

    def _epoch(self, stage: Stage) -> dict[str, Any]:
        """Train one epoch, validate (the EMA weights when there are some; the raw ones too at the stage's
        last epoch: every epoch would cost a tenth of the training time) and return its metrics row."""
        st = self.state
        t0 = time.perf_counter()
        train = self.train_epoch(stage, self.pending_epoch)
        self.pending_epoch = None
        train_seconds = time.perf_counter() - t0
        valid = self.validate(stage.ema.module if stage.ema is not None else stage.module, stage.valid_batches())
        last = st.stage_epochs_done + 1 == stage.epochs
        raw = self.validate(stage.module, stage.valid_batches()) if stage.ema is not None and last else None
        row = {"epoch": st.epoch + 1, "stage": stage.number, "lr": train.mean_lr, "train_loss": train.loss,
               "train_acc": train.acc, **validation_columns(valid),
               "images_per_s": train.images / max(train_seconds, 1e-9),
               "raw_valid_acc": raw.accuracy if raw is not None else ""}  # fmt: skip
        stage.scheduler.epoch_end(self.tracker.score(row))
        row["seconds"] = time.perf_counter() - t0
        st.epoch += 1
        st.stage_epochs_done += 1
        return row

    def _out_of_time(self, stage: Stage) -> bool:
        """The time budget (train.max_minutes), agreed across ranks so that all stop together; at least one
        epoch always runs, so best.pt exists."""
        late = self.deadline is not None and self.state.epoch > 0 and time.monotonic() > self.deadline
        if self.deadline is None or not self.dist.any(late)[0]:
            return False
        log.info("time budget used up: no more epochs (stage %d, %d done)", stage.number, self.state.stage_epochs_done)
        self.state.stopped_early = True
        return True

    def save(self, kind: str, stage: Stage, in_epoch: dict[str, Any] | None = None) -> None:
        """best.pt or last.pt, through the CheckpointSaver."""
        weights = self.model.state_dict()
        if stage.ema is not None and unwrap(stage.module) is self.model:
            weights = stage.ema.module.state_dict()  # inference uses the averaged weights
        train_state = TrainState(
            **self.state_dict(), **self.stepper.state_dict(), raw_state_dict=self.model.state_dict(),
            optimizer=stage.optimizer.state_dict(), scheduler=stage.scheduler.state_dict(),
            rng=rng_state(stage.generator), in_epoch=in_epoch, world_size=self.dist.world,
            ema_n_averaged=stage.ema.n_averaged.clone() if stage.ema is not None else None,
        )  # fmt: skip
        self.saver.save(kind, weights, train_state, epoch=self.state.epoch, stage=stage.number,
                        best_valid_acc=self.tracker.best_acc, best_epoch=self.tracker.best_epoch)  # fmt: skip

    def restore(self, ts: TrainState, stage: Stage, checkpoint_state: dict[str, torch.Tensor]) -> None:
        """Continue `stage` exactly where last.pt left it (called after the stage's objects are built)."""
        self.load_state_dict({"loop": ts.loop, "tracker": ts.tracker})
        self.stepper.load_state_dict({"scaler": ts.scaler, "amp": ts.amp})
        self.model.load_state_dict(ts.raw_state_dict)
        stage.optimizer.load_state_dict(ts.optimizer)
        stage.scheduler.load_state_dict(ts.scheduler)
        if stage.ema is not None and ts.ema_n_averaged is not None:
            stage.ema.module.load_state_dict(checkpoint_state)
            stage.ema.n_averaged.copy_(ts.ema_n_averaged)
        rng, self.pending_epoch = ts.for_rank(self.dist.rank, self.dist.world, self.run.last)
        set_rng_state(rng, stage.generator)
        self.tracker.write()  # drop rows written after this checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The loop's and the tracker's state (plain values): a snapshot to restart a stage from."""
        return {"loop": dataclasses.asdict(self.state), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = LoopState(**state["loop"])
        self.tracker.load_state_dict(state["tracker"])
