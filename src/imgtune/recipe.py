"""The recipe, orchestration only: config -> Workbench (workbench.py) -> stage 1 (head) -> stage 2 (fine-tune),
each built by stages.py and run by the engine's Trainer -> test of the best checkpoint -> summary and report.

`train(config)` starts a run; `resume(run)` rebuilds the same Workbench from the run folder and continues from
checkpoints/last.pt; `find_lr` is the LR range test on the same stages. Nothing here reaches into another
object: a changed setting (a halved batch after running out of GPU memory) is a new Workbench and a new
Trainer loaded with the old one's state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from imgtune.calibration import calibrate_checkpoint
from imgtune.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from imgtune.config import Config
from imgtune.distributed import Dist, setup
from imgtune.engine import Trainer
from imgtune.errors import Interrupted
from imgtune.files import atomic_write_text
from imgtune.lrfind import LRFindResult, plot, range_test, tune_lr
from imgtune.metrics import EvalResult
from imgtune.packages import versions
from imgtune.predict import TorchPredictor
from imgtune.progress import Progress, SilentProgress
from imgtune.runs import RunFolder, RunLock, ensure_free, new_run_folder
from imgtune.runtime import StopRequest, inference_dtype, pick_device, training_dtype, tune_allocator
from imgtune.stage import Stage
from imgtune.stages import finetune_stage, head_stage
from imgtune.step import StepSettings
from imgtune.trackers import CurvesSink, MlflowSink, TensorBoardSink
from imgtune.tracking import Sink, Tracker
from imgtune.workbench import Workbench, prepare, with_batch_size

log = logging.getLogger(__name__)

StageBuilder = Callable[[Workbench], contextlib.AbstractContextManager[Stage]]


@dataclass
class TrainResult:
    """What a run produced: its folder, best epoch, test metrics, summary.json's values and the metrics rows
    (`history`, one dict per epoch as in metrics.csv)."""

    run_dir: Path
    best_epoch: int
    best_valid_acc: float
    test: EvalResult | None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def report(self) -> Path | None:
        """RUN/report.html, when the run wrote one."""
        page = self.run_dir / "report.html"
        return page if page.is_file() else None

    def plot(self) -> Any:
        """Loss and accuracy per epoch as a matplotlib Figure (shown inline when a notebook cell returns it)."""
        from imgtune.report import curves_figure

        return curves_figure(self.history)


def train(config: Config, progress: Progress | None = None, stop: StopRequest | None = None) -> TrainResult:
    """Two-stage transfer learning (or from-scratch training) as configured; returns the run's outcome.
    stop: call `stop.request()` (a signal handler, another thread) to end the run after the current step with
    last.pt written; `engine.Interrupted` is raised then."""
    return _run(config, progress, stop or StopRequest(), resume_from=None)


def resume(run: Path | str, progress: Progress | None = None, stop: StopRequest | None = None) -> TrainResult:
    """Continue an interrupted run from RUN/checkpoints/last.pt: same epoch, optimizer, schedule, RNG."""
    folder = RunFolder(Path(run))
    RunLock.check(folder.path)
    if not folder.config.is_file():
        raise CheckpointError(f"{run}: no config.yaml: not an imgtune run folder")
    config = Config.model_validate(yaml.safe_load(folder.config.read_text()))
    return _run(config, progress, stop or StopRequest(), resume_from=folder)


def find_lr(config: Config, stage: int = 1, steps: int = 200, out: Path = Path("lr_find.png")) -> LRFindResult:
    """`imgtune lr-find`: the range test for stage 1 (head on frozen features) or stage 2 (all layers,
    after training the head as configured, since fine-tuning starts from a trained head)."""
    wb = prepare(config)
    with tempfile.TemporaryDirectory(prefix="imgtune-lrfind-") as tmp:
        trainer = make_trainer(wb, RunFolder(Path(tmp)))
        with head_stage(wb, solve=stage != 1) as head:  # a solved head has no LR to find
            if stage == 1:
                result = range_test(head, trainer, steps=steps)
            else:
                trainer.run_stage(head)
        if stage == 2:
            result = range_test(finetune_stage(wb), trainer, steps=steps)
    plot(result, out, f"{config.model.name}, stage {stage}")
    atomic_write_text(out.with_suffix(".csv"), result.csv())
    return result


def make_trainer(
    wb: Workbench, run: RunFolder, progress: Progress | None = None, sinks: Sequence[Sink] = (),
    stop: StopRequest | None = None, deadline: float | None = None,
) -> Trainer:  # fmt: skip
    """The Trainer for a Workbench: its step settings and monitor from the config; files from rank 0 only."""
    tcfg, main = wb.cfg.train, wb.dist.is_main
    step = StepSettings(
        label_smoothing=tcfg.label_smoothing, class_weights=wb.class_weights, grad_clip=tcfg.grad_clip,
        grad_clip_mode=tcfg.grad_clip_mode, accumulate=tcfg.accumulate,
        amp_dtype=training_dtype(tcfg.precision, wb.device), eval_dtype=inference_dtype(tcfg.precision, wb.device),
        max_nonfinite=tcfg.max_nonfinite,
    )  # fmt: skip
    return Trainer(
        wb.model, run, wb.template(), device=wb.device, num_classes=wb.num_classes, step=step,
        tracker=Tracker(tcfg.monitor, run if main else None, sinks if main else ()),
        progress=progress if main else SilentProgress(), dist=wb.dist, stop=stop, deadline=deadline,
    )  # fmt: skip


def _run(cfg: Config, progress: Progress | None, stop: StopRequest, resume_from: RunFolder | None) -> TrainResult:
    with contextlib.ExitStack() as held:  # rank 0 holds the run folder's lock (runs.RunLock) until the end
        return _locked_run(cfg, progress, stop, resume_from, held)


def _claim(held: contextlib.ExitStack, folder: Path, new: bool) -> None:
    """Lock the run folder, then (a new run) check that it is free: in this order, two runs started together
    with one --out cannot both find it empty."""
    held.enter_context(RunLock(folder))
    if new:
        ensure_free(folder)


def _locked_run(
    cfg: Config, progress: Progress | None, stop: StopRequest, resume_from: RunFolder | None,
    held: contextlib.ExitStack,
) -> TrainResult:  # fmt: skip
    started = time.perf_counter()
    tune_allocator()
    d = setup(pick_device(cfg.device))  # joins torchrun's process group; a no-op in one process
    if resume_from is None and cfg.out is not None:
        out = cfg.out
        d.on_main(lambda: _claim(held, out, new=True))  # before minutes of caching, not after
    elif resume_from is not None:
        folder = resume_from.path
        d.on_main(lambda: _claim(held, folder, new=False))
    last = _last_checkpoint(resume_from, d) if resume_from is not None else None
    split_file = resume_from.split if resume_from is not None and resume_from.split.is_file() else None
    # resuming from last.pt: its weights replace the pretrained ones, so don't load (or download) those
    wb = prepare(cfg, load_pretrained=last is None, split_file=split_file)
    _log_distributed(wb)
    if resume_from is None:
        run = RunFolder(d.on_main(lambda: _start_run_folder(wb, held)))  # rank 0 creates it; all ranks use it
        wb = wb.with_config(wb.cfg.model_copy(update={"out": run.path}))
    else:
        run = resume_from
    log.info("run folder: %s", run.path)
    tcfg = wb.cfg.train
    with _trackers(wb, run, resume_from is not None) as sinks:
        deadline = None
        if tcfg.max_minutes is not None:
            deadline = time.monotonic() + tcfg.max_minutes * 60 - (time.perf_counter() - started)
        trainer = make_trainer(wb, run, progress, sinks, stop, deadline)
        resume_stage = last.stage if last is not None else 0
        retries = 0
        if tcfg.epochs_frozen > 0 and wb.pretrained_start and resume_stage <= 1:
            wb, trainer, retries = _run_stage(lambda w: head_stage(w, run.path), wb, trainer, last, resume_stage == 1)
        elif tcfg.epochs_frozen > 0 and not wb.pretrained_start:
            log.info("training from scratch: no frozen-backbone stage (a random backbone has nothing to keep)")
        if tcfg.epochs > 0:
            wb, trainer, more = _run_stage(
                lambda w: contextlib.nullcontext(finetune_stage(w)), wb, trainer, last, resume_stage == 2
            )
            retries += more
        final = wb
        test, summary = d.on_main(lambda: _finish(final, run, trainer, started, retries))
    tracker = trainer.tracker
    return TrainResult(run.path, tracker.best_epoch, tracker.best_acc, test, summary, list(tracker.rows))


def _last_checkpoint(folder: RunFolder, d: Dist) -> Checkpoint | None:
    """last.pt of a run being resumed (None: it stopped before writing one, and starts again). Leftovers of
    interrupted writes go first; a damaged or hostile last.pt is refused before any data is prepared."""
    for leftover in d.on_main(folder.clean_leftovers):
        log.info("removed %s, left by an interrupted write", leftover)
    if not folder.last.is_file() and not folder.last_prev.is_file():
        log.info("%s has no last.pt yet: starting it again from the beginning", folder.path)
        return None
    try:
        last = load_checkpoint(folder.last)
    except CheckpointError as e:
        if not folder.last_prev.is_file():
            raise
        last = load_checkpoint(folder.last_prev)
        log.warning("%s; resuming from %s instead (epoch %d, one save earlier)", e, folder.last_prev, last.epoch)
    if last.train_state is None:
        raise CheckpointError(f"{folder.last}: holds no training state to resume from")
    log.info("resuming %s from epoch %d (stage %d)", folder.path, last.epoch, last.stage)
    return last


def _run_stage(
    build: StageBuilder, wb: Workbench, trainer: Trainer, last: Checkpoint | None, resuming: bool
) -> tuple[Workbench, Trainer, int]:
    """Build and run a stage (resumed from last.pt when it stopped in this one; after an LR search with
    --lr auto). On CUDA out-of-memory, restart the stage from its beginning with half the batch: a new
    Workbench and Trainer carrying the state the stage started from. Returns them and the restart count."""
    weights = {k: v.detach().clone() for k, v in wb.model.state_dict().items()}
    snapshot = (trainer.state_dict(), trainer.stepper.state_dict())
    retries = 0
    while True:
        try:
            with build(wb) as stage:  # feature extraction runs here: it can run out of memory too
                if resuming and last is not None and last.train_state is not None:
                    trainer.restore(last.train_state, stage, last.state_dict)
                elif wb.cfg.train.lr_find and stage.fit is None:  # a solved stage has no LR
                    curve = trainer.run.path / f"lr_find_stage{stage.number}.png"
                    tune_lr(stage, trainer, curve, steps=wb.cfg.train.lr_find_steps)
                trainer.run_stage(stage)
            return wb, trainer, retries
        except torch.cuda.OutOfMemoryError:
            old = wb.cfg.data.batch_size
            if old <= 1 or wb.dist.enabled:  # one rank alone cannot change the batch size of all
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            wb = wb.with_config(with_batch_size(wb.cfg, old // 2))
            if wb.dist.is_main:
                atomic_write_text(trainer.run.config, wb.cfg.to_yaml())  # what the run really trains with
            log.warning("out of memory with batch size %d: restarting the stage with batch size %d", old, old // 2)
            wb.model.load_state_dict(weights)
            trainer = make_trainer(wb, trainer.run, trainer.progress, trainer.tracker.sinks, trainer.stop,
                                   trainer.deadline)  # fmt: skip
            trainer.load_state_dict(snapshot[0])
            trainer.stepper.load_state_dict(snapshot[1])
            retries += 1


@contextlib.contextmanager
def _trackers(wb: Workbench, run: RunFolder, resuming: bool) -> Iterator[list[Sink]]:
    """The run's trackers (rank 0): the curves plot with the report, TensorBoard and MLflow when asked for;
    closed when training ends (MLflow's run marked FAILED after an error, KILLED when stopped)."""
    tcfg = wb.cfg.train
    sinks: list[Sink] = []
    status = "FAILED"
    try:  # a tracker that cannot start (MLflow's server unreachable) still closes the ones started before it
        if wb.dist.is_main:
            if tcfg.report:
                sinks.append(CurvesSink(run.path))
            if tcfg.tensorboard:
                sinks.append(TensorBoardSink(run.path, wb.cfg.to_plain()))
            if tcfg.mlflow:
                sinks.append(MlflowSink(run.path, wb.cfg.to_plain(), resume=resuming))
        yield sinks
        status = "FINISHED"
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        for sink in sinks:
            sink.close(status)


def _log_distributed(wb: Workbench) -> None:
    d, dcfg, tcfg = wb.dist, wb.cfg.data, wb.cfg.train
    if not d.enabled:
        return
    global_batch = dcfg.batch_size * d.world * tcfg.accumulate
    log.info(
        "distributed: %d processes (%s, %s); global batch %d = %d per process x %d processes x %d accumulated; "
        "LR scaling rule '%s': configured LRs x %.3g%s",
        d.world, d.backend, wb.device.type, global_batch, dcfg.batch_size, d.world, tcfg.accumulate,
        tcfg.lr_scaling, wb.lr_factor,
        " (set train.lr_scaling=linear or sqrt to scale with the number of processes)"
        if tcfg.lr_scaling == "none" else "",
    )  # fmt: skip


def _start_run_folder(wb: Workbench, held: contextlib.ExitStack) -> Path:
    cfg = wb.cfg
    run = new_run_folder(cfg.out, cfg.data.path)
    if cfg.out is None:  # a runs/<name>-N just made; with --out, the lock is held since the start
        held.enter_context(RunLock(run.path))
    copies = wb.curation.write(run.path)  # the run re-applies its own copies on resume
    data = cfg.data.model_copy(update=copies)
    atomic_write_text(run.config, cfg.model_copy(update={"out": run.path, "data": data}).to_yaml())
    run.write_json(run.classes, wb.split.classes)
    if wb.display_names != wb.split.classes:
        run.write_json(run.path / "class_names.json", wb.display_names)
    if wb.split.made_split:
        wb.split.write_csv(run.split)
    return run.path


def _finish(
    wb: Workbench, run: RunFolder, trainer: Trainer, started: float, retries: int
) -> tuple[EvalResult | None, dict[str, Any]]:
    """Test the best checkpoint and write summary.json and the report (rank 0 alone: the test set is evaluated
    once). With --calibrate the temperature is fitted on the validation images first and stored in best.pt."""
    tcfg = wb.cfg.train
    wb.model.load_state_dict(load_checkpoint(run.best).state_dict)
    predictor = TorchPredictor(wb.model, wb.prep, wb.split.classes, wb.device, wb.display_names, tcfg.precision)
    calibration: dict[str, float] = {}
    if tcfg.calibrate:
        fit = calibrate_checkpoint(run.best, predictor, wb.valid_pairs(), wb.eval_batch, wb.workers)
        log.info("calibration: temperature %.3f; valid ECE %.4f -> %.4f", fit.temperature, fit.ece_before,
                 fit.ece_after)  # fmt: skip
        calibration = fit.to_summary()
    test = None
    if wb.split.test_labelled:
        pairs = [(x.path, wb.split.classes[x.label]) for x in wb.split.test]
        test = predictor.evaluate(pairs, "test", wb.eval_batch, wb.workers)
        log.info("test accuracy of the best checkpoint: %.4f (%d images)", test.accuracy, test.n)
    summary = {**_summary(wb, trainer, started, retries), **calibration}
    if test is not None:
        summary.update(test_acc=test.accuracy, test_top5=test.top5, test_loss=test.loss, test_images=test.n,
                       test_ece=test.ece)  # fmt: skip
    run.write_json(run.summary, summary)
    if tcfg.report:
        from imgtune.report import write_report

        # no labelled test split: the report shows the validation split; with neither, there is nothing to show
        pairs = wb.valid_pairs()
        shown = test or (predictor.evaluate(pairs, "valid", wb.eval_batch, wb.workers) if pairs else None)
        if shown is None:
            log.warning("no report: there is neither a labelled test split nor a validation split to evaluate")
        else:
            log.info("report: %s", write_report(run.path, shown, wb.train_plain, wb.augment))
    trainer.tracker.finish(summary)
    return test, summary


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _summary(wb: Workbench, trainer: Trainer, started: float, retries: int) -> dict[str, Any]:
    st, tracker = trainer.state, trainer.tracker
    summary: dict[str, Any] = {
        "best_epoch": tracker.best_epoch,
        "best_valid_acc": _finite(tracker.best_acc),  # null without a validation split
        "monitor": tracker.monitor.name,
        "best_score": _finite(tracker.best_score),
        "epochs_run": st.epoch,
        "stopped_early": st.stopped_early,
        "skipped_steps": st.skipped_steps,
        "batch_size": wb.cfg.data.batch_size,
        "oom_retries": retries,
        "processes": wb.dist.world,
        "classes": wb.num_classes,
        "train_images": len(wb.train_samples),
        "valid_images": len(wb.valid_samples),
        "skipped_files": [vars(x) for x in wb.skipped],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "device": str(wb.device),
        "torch": torch.__version__,
        "versions": versions(),
        "platform": platform.platform(),
    }
    if wb.split.notes:
        summary["data_warnings"] = list(wb.split.notes)
    if wb.curation.record:
        summary["curation"] = wb.curation.record
    return summary
