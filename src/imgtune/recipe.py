"""The transfer-learning recipe: data -> model -> stage 1 (head) -> stage 2 (fine-tune) -> test -> summary.

`train(config)` builds the pieces from the config and hands Stages to the engine's Trainer; `resume(run)`
rebuilds the same pieces from the run folder and continues from checkpoints/last.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from imgtune.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from imgtune.config import Config, ConfigError
from imgtune.data import (
    DataError,
    ImageDataset,
    Sample,
    Skipped,
    Split,
    available_memory,
    balanced_sampler,
    decode_many,
    default_workers,
    load_class_names,
    load_split,
    make_loader,
    should_cache,
)
from imgtune.distributed import Dist, convert_sync_batchnorm, current, setup, wrap
from imgtune.engine import STOP, Stage, Trainer, seed_everything
from imgtune.features import FeatureStore, extract_features, tensor_batches
from imgtune.lrfind import LRFindResult, plot, range_test, tune_lr
from imgtune.metrics import EvalResult
from imgtune.models import (
    Classifier,
    create_model,
    has_pretrained_weights,
    param_groups,
    set_requires_grad,
    unfreeze_top,
)
from imgtune.optim import LRSchedule, OptimSettings, make_optimizer, weight_ema
from imgtune.predict import TorchPredictor
from imgtune.progress import Progress, SilentProgress
from imgtune.runs import RunFolder, ensure_free, new_run_folder
from imgtune.runtime import inference_dtype, pick_device, probe_batch_size, training_dtype, tune_allocator
from imgtune.transforms import BatchAugment, BatchMix, Preprocessing

log = logging.getLogger(__name__)

FEATURE_BATCH = 256  # head-only steps on cached features: bigger batches, same result, less overhead


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_valid_acc: float
    test: EvalResult | None
    summary: dict[str, Any] = field(default_factory=dict)


def _check_trainable(split: Split) -> None:
    if len(split.classes) < 2:
        raise DataError(f"{split.root}: found {len(split.classes)} class(es) {split.classes}; need at least 2")
    if not split.valid:
        raise DataError(f"{split.root}: the validation split is empty; add valid/ images or use --valid-fraction")


def _class_counts(samples: list[Sample], num_classes: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([s.label for s in samples], dtype=torch.long), minlength=num_classes)


def train(config: Config, progress: Progress | None = None) -> TrainResult:
    """Two-stage transfer learning (or from-scratch training) as configured; returns the run's outcome."""
    return _run(config, progress, resume_from=None)


def resume(run: Path | str, progress: Progress | None = None) -> TrainResult:
    """Continue an interrupted run from RUN/checkpoints/last.pt: same epoch, optimizer, schedule, RNG."""
    folder = RunFolder(Path(run))
    if not folder.config.is_file():
        raise CheckpointError(f"{run}: no config.yaml: not an imgtune run folder")
    config = Config.model_validate(yaml.safe_load(folder.config.read_text()))
    return _run(config, progress, resume_from=folder)


@dataclass
class Workbench:
    """Everything a run trains with, built once from the config: data, caches, loaders, model, stages."""

    cfg: Config
    device: torch.device
    split: Split
    model: Classifier
    prep: Preprocessing
    pretrained_start: bool
    train_samples: list[Sample]
    valid_samples: list[Sample]
    skipped: list[Skipped]
    train_plain: ImageDataset  # unaugmented uint8 images (from the RAM cache when there is one)
    augment: BatchAugment  # applied to whole batches on the device, in the training loop
    valid_loader: Any
    workers: int
    generator: torch.Generator
    class_weights: torch.Tensor | None
    eval_batch: int
    display_names: list[str]
    dist: Dist
    lr_factor: float  # the LR scaling rule's factor under torchrun (1 in one process)
    feature_store: FeatureStore | None = None  # stage 1's cached features, while it runs

    def image_loader(self) -> Any:
        dcfg = self.cfg.data
        sampler: Any = None
        if self.dist.enabled:  # a shard per rank, reshuffled per epoch (set_epoch), padded to equal lengths
            sampler = torch.utils.data.DistributedSampler(
                self.train_plain, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=self.cfg.seed
            )
        elif self.cfg.train.balance == "sampler":
            sampler = balanced_sampler([x.label for x in self.train_samples], self.generator)
        return make_loader(
            self.train_plain, dcfg.batch_size, shuffle=sampler is None, workers=self.workers, generator=self.generator,
            sampler=sampler, pin_memory=self.device.type == "cuda", drop_last=len(self.train_plain) > dcfg.batch_size,
        )  # fmt: skip

    def trainer(self, run: RunFolder, progress: Progress | None = None, tensorboard: Any = None) -> Trainer:
        tcfg = self.cfg.train
        checkpoint_base = {
            "arch": dict(self.model.arch),
            "classes": list(self.split.classes),
            "class_names": self.display_names,
            "preprocessing": self.prep.to_dict(),
            "config": self.cfg.to_plain(),
        }
        if not self.dist.is_main:
            progress = SilentProgress()
        return Trainer(
            self.model, run, checkpoint_base, device=self.device, num_classes=len(self.split.classes),
            label_smoothing=tcfg.label_smoothing, class_weights=self.class_weights, grad_clip=tcfg.grad_clip,
            grad_clip_mode=tcfg.grad_clip_mode, accumulate=tcfg.accumulate,
            amp_dtype=training_dtype(tcfg.precision, self.device),
            eval_dtype=inference_dtype(tcfg.precision, self.device), monitor=tcfg.monitor, progress=progress,
            tensorboard=tensorboard, max_nonfinite=tcfg.max_nonfinite, dist=self.dist,
        )  # fmt: skip

    def optim_settings(self, stage: int) -> OptimSettings:
        s = self.cfg.train.optim_settings(stage, self.pretrained_start or stage == 1)
        return dataclasses.replace(s, lr=s.lr * self.lr_factor) if self.lr_factor != 1 else s

    def head_stage(self, run_path: Path | None = None) -> Stage:
        return _head_stage(self, run_path)

    def finetune_stage(self) -> Stage:
        return _finetune_stage(self)


def prepare(cfg: Config, *, load_pretrained: bool = True, split_file: Path | None = None) -> Workbench:
    """Split, model and data, ready to train. load_pretrained=False when weights come from a checkpoint."""
    dcfg, tcfg = cfg.data, cfg.train
    d = current()
    _check_distributed(cfg, d)
    seed_everything(cfg.seed + d.rank, tcfg.deterministic)  # per rank: different augmentation draws
    device = d.device(pick_device(cfg.device))
    split = load_split(dcfg.path, dcfg.valid_fraction, cfg.seed, split_file or dcfg.split_file)
    _check_trainable(split)
    for note in split.notes:
        log.warning("%s", note)
    num_classes = len(split.classes)
    model = create_model(
        cfg.model.name,
        num_classes,
        pretrained=cfg.model.pretrained and load_pretrained,
        weights=cfg.model.weights if load_pretrained else None,
        dropout=cfg.model.dropout,
        head=cfg.model.head,
        head_dropout=cfg.model.head_dropout,
    )
    prep = model.preprocessing(dcfg.img_size)
    model.to(device).use_channels_last()
    if dcfg.auto_batch:
        cfg = _auto_batch(cfg, model, device, d, len(split.train))
        dcfg = cfg.data

    # Data: decode + resize once into RAM when it fits; unreadable files are reported and left out here.
    train_samples, valid_samples = split.train, split.valid
    skipped: list[Skipped] = []
    train_cache = valid_cache = None
    budget = 0.3 / d.local_world  # each process on a machine holds its own copy
    if should_cache(dcfg.cache, len(train_samples) + len(valid_samples), dcfg.img_size, budget):
        t0 = time.perf_counter()
        train_cache, ok, sk = decode_many([s.path for s in train_samples], prep)
        train_samples, skipped = [train_samples[i] for i in ok], skipped + sk
        valid_cache, ok, sk = decode_many([s.path for s in valid_samples], prep)
        valid_samples, skipped = [valid_samples[i] for i in ok], skipped + sk
        log.info(
            "cached %d images at %dx%d in RAM (%.0f MB) in %.1f s",
            len(train_samples) + len(valid_samples), dcfg.img_size, dcfg.img_size,
            (train_cache.numel() + valid_cache.numel()) / 1e6, time.perf_counter() - t0,
        )  # fmt: skip
    workers = dcfg.workers if dcfg.workers is not None else default_workers(train_cache is not None, device)
    # validation: disjoint, unpadded shards per rank; the engine sums their counts (exact metrics)
    valid_ds = ImageDataset(
        d.shard(valid_samples), prep, valid_cache[d.rank :: d.world] if valid_cache is not None else None
    )
    eval_batch = max(64, dcfg.batch_size)
    counts = _class_counts(train_samples, num_classes)
    class_weights = None
    if tcfg.balance == "weights":  # inverse frequency, mean weight 1 over the samples
        class_weights = counts.sum() / (num_classes * counts.clamp(min=1).float())
    return Workbench(
        cfg=cfg,
        device=device,
        split=split,
        model=model,
        prep=prep,
        pretrained_start=(cfg.model.pretrained and has_pretrained_weights(cfg.model.name))
        or cfg.model.weights is not None,
        train_samples=train_samples,
        valid_samples=valid_samples,
        skipped=skipped,
        train_plain=ImageDataset(train_samples, prep, train_cache),
        augment=BatchAugment(dcfg.augment, tcfg.random_erasing),
        valid_loader=make_loader(
            valid_ds, eval_batch, shuffle=False, workers=workers, pin_memory=device.type == "cuda"
        ),
        workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed + d.rank),
        class_weights=class_weights,
        eval_batch=eval_batch,
        display_names=load_class_names(dcfg.class_names, split.classes) if dcfg.class_names else list(split.classes),
        dist=d,
        lr_factor={"none": 1.0, "linear": float(d.world), "sqrt": math.sqrt(d.world)}[tcfg.lr_scaling],
    )


def _check_distributed(cfg: Config, d: Dist) -> None:
    if not d.enabled:
        return
    if cfg.train.balance == "sampler":
        raise ConfigError("--balance sampler is not available under torchrun; use --balance weights")
    if cfg.train.lr_find:
        raise ConfigError("--lr auto runs in one process: run `imgtune lr-find` first, then pass its --lr to torchrun")


def _auto_batch(cfg: Config, model: Classifier, device: torch.device, d: Dist, n_train: int) -> Config:
    """data.auto_batch: the largest batch that fits on the GPU (`runtime.probe_batch_size`), the same on every
    rank (the smallest rank's). The run's config records the size with auto_batch off, so a resume trains
    with the same batch; a later out-of-memory error still halves it (run_stage)."""
    dcfg = cfg.data
    chosen = dcfg.batch_size
    if device.type != "cuda":
        log.info("auto batch size is for CUDA GPUs; on the CPU the batch stays %d", chosen)
    else:
        limit = min(1024, max(1, n_train // d.world))
        amp = training_dtype(cfg.train.precision, device)
        chosen = min(d.gather_objects(probe_batch_size(model, device, dcfg.img_size, dcfg.batch_size, limit, amp)))
        log.info("auto batch size: %d per process (the largest that fit in GPU memory, probed from %d)",
                 chosen, dcfg.batch_size)  # fmt: skip
    return cfg.model_copy(update={"data": dcfg.model_copy(update={"batch_size": chosen, "auto_batch": False})})


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


def _run(cfg: Config, progress: Progress | None, resume_from: RunFolder | None) -> TrainResult:
    started = time.perf_counter()
    tune_allocator()
    STOP.requested = False  # a stop asked of an earlier run in this process is not one for this run
    tcfg = cfg.train
    d = setup(pick_device(cfg.device))  # joins torchrun's process group; a no-op in one process
    split_file = resume_from.split if resume_from is not None and resume_from.split.is_file() else None
    # resuming from last.pt: its weights replace the pretrained ones, so don't load (or download) those
    from_checkpoint = resume_from is not None and resume_from.last.is_file()
    if resume_from is None and cfg.out is not None:
        out = cfg.out
        d.on_main(lambda: ensure_free(out))  # before minutes of caching, not after
    if resume_from is not None:
        folder = resume_from
        for leftover in d.on_main(folder.clean_leftovers):
            log.info("removed %s, left by an interrupted write", leftover)
    # a damaged or hostile last.pt is refused before any data is prepared
    last = load_checkpoint(resume_from.last) if resume_from is not None and from_checkpoint else None
    wb = prepare(cfg, load_pretrained=not from_checkpoint, split_file=split_file)
    _log_distributed(wb)
    if resume_from is not None:
        run = resume_from
        if last is not None:
            log.info("resuming %s from epoch %d (stage %d)", run.path, last["epoch"], last["stage"])
        else:
            log.info("%s has no last.pt yet: starting it again from the beginning", run.path)
    else:
        run = RunFolder(d.on_main(lambda: _start_run_folder(wb)))  # rank 0 creates it; all ranks use it
        wb.cfg = wb.cfg.model_copy(update={"out": run.path})  # wb.cfg: with what prepare() resolved
    log.info("run folder: %s", run.path)

    tensorboard = None
    if tcfg.tensorboard and d.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        tensorboard = SummaryWriter(str(run.path / "tensorboard"))
    trainer = wb.trainer(run, progress, tensorboard)
    if tcfg.max_minutes is not None:
        trainer.deadline = time.monotonic() + tcfg.max_minutes * 60 - (time.perf_counter() - started)
    resume_stage = int(last["stage"]) if last is not None else 0

    def run_stage(make_stage: Callable[[], Stage]) -> None:
        """Build and run a stage; on out-of-memory, restart it from its beginning with half the batch."""
        weights = {k: v.detach().clone() for k, v in wb.model.state_dict().items()}
        state = copy.deepcopy(trainer.state)
        while True:
            try:
                stage = make_stage()  # feature extraction runs here: it can run out of memory too
                if last is not None and resume_stage == stage.number:
                    trainer.restore(last["train_state"], stage, last["state_dict"])
                elif tcfg.lr_find:
                    tune_lr(stage, trainer, run.path / f"lr_find_stage{stage.number}.png")
                trainer.run_stage(stage)
                return
            except torch.cuda.OutOfMemoryError:
                old = wb.cfg.data.batch_size
                if old <= 1 or d.enabled:  # one rank alone cannot change the batch size of all
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                wb.cfg = wb.cfg.model_copy(update={"data": wb.cfg.data.model_copy(update={"batch_size": old // 2})})
                if d.is_main:
                    run.config.write_text(wb.cfg.to_yaml())  # the run's config says what it really trained with
                trainer.checkpoint_base["config"] = wb.cfg.to_plain()
                log.warning("out of memory with batch size %d: restarting the stage with batch size %d", old, old // 2)
                wb.model.load_state_dict(weights)
                trainer.state = copy.deepcopy(state)
                trainer.oom_retries += 1

    if tcfg.epochs_frozen > 0 and wb.pretrained_start and resume_stage <= 1:
        run_stage(lambda: wb.head_stage(run.path))
        if wb.feature_store is not None:
            wb.feature_store.close()  # free the RAM, delete a memory-mapped file
            wb.feature_store = None
    elif tcfg.epochs_frozen > 0 and not wb.pretrained_start:
        log.info("training from scratch: no frozen-backbone stage (a random backbone has nothing to keep)")
    if tcfg.epochs > 0:
        run_stage(wb.finetune_stage)
    if tensorboard is not None:
        tensorboard.close()

    st = trainer.state
    test, summary = d.on_main(lambda: _finish(wb, run, trainer, started))
    return TrainResult(run.path, st.best_epoch, st.best_acc, test, summary)


def _start_run_folder(wb: Workbench) -> Path:
    cfg = wb.cfg
    run = new_run_folder(cfg.out, cfg.data.path)
    run.config.write_text(cfg.model_copy(update={"out": run.path}).to_yaml())
    run.write_json(run.classes, wb.split.classes)
    if wb.display_names != wb.split.classes:
        run.write_json(run.path / "class_names.json", wb.display_names)
    if wb.split.made_split:
        wb.split.write_csv(run.split)
    return run.path


def _finish(
    wb: Workbench, run: RunFolder, trainer: Trainer, started: float
) -> tuple[EvalResult | None, dict[str, Any]]:
    """Test the best checkpoint and write summary.json (rank 0 alone: the test set is evaluated once)."""
    tcfg = wb.cfg.train
    best = load_checkpoint(run.best)
    wb.model.load_state_dict(best["state_dict"])
    predictor = TorchPredictor(wb.model, wb.prep, wb.split.classes, wb.device, wb.display_names, tcfg.precision)
    calibration: dict[str, float] = {}
    if tcfg.calibrate:
        calibration = _calibrate(wb, run, best, predictor)
    test = None
    if wb.split.test_labelled:
        pairs = [(x.path, wb.split.classes[x.label]) for x in wb.split.test]
        test = predictor.evaluate(pairs, "test", wb.eval_batch, wb.workers)
        log.info("test accuracy of the best checkpoint: %.4f (%d images)", test.accuracy, test.n)
    st = trainer.state
    summary: dict[str, Any] = {
        "best_epoch": st.best_epoch,
        "best_valid_acc": st.best_acc,
        "monitor": tcfg.monitor,
        "best_score": st.best_score,
        "epochs_run": st.epoch,
        "stopped_early": st.stopped_early,
        "skipped_steps": st.skipped_steps,
        "batch_size": wb.cfg.data.batch_size,
        "oom_retries": trainer.oom_retries,
        "processes": wb.dist.world,
        "classes": len(wb.split.classes),
        "train_images": len(wb.train_samples),
        "valid_images": len(wb.valid_samples),
        "skipped_files": [vars(x) for x in wb.skipped],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "device": str(wb.device),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    summary.update(calibration)
    if wb.split.notes:
        summary["data_warnings"] = list(wb.split.notes)
    if test is not None:
        summary.update(test_acc=test.accuracy, test_top5=test.top5, test_loss=test.loss, test_images=test.n,
                       test_ece=test.ece)  # fmt: skip
    run.write_json(run.summary, summary)
    if tcfg.report:
        from imgtune.report import write_report

        shown = test
        if shown is None:  # no labelled test split: the report shows the validation split
            pairs = [(x.path, wb.split.classes[x.label]) for x in wb.valid_samples]
            shown = predictor.evaluate(pairs, "valid", wb.eval_batch, wb.workers)
        log.info("report: %s", write_report(run.path, shown, wb.train_plain, wb.augment))
    return test, summary


def _calibrate(wb: Workbench, run: RunFolder, best: dict[str, Any], predictor: TorchPredictor) -> dict[str, float]:
    """Temperature scaling fitted on the validation images; written into best.pt, which predict, eval, export
    and serve read. Accuracy is unchanged; confidence comes closer to it."""
    from imgtune.calibration import calibrate_predictor

    pairs = [(x.path, wb.split.classes[x.label]) for x in wb.valid_samples]
    fit = calibrate_predictor(predictor, pairs, wb.eval_batch, wb.workers)
    best["temperature"] = fit.temperature
    save_checkpoint(run.best, best)
    log.info("calibration: temperature %.3f; valid ECE %.4f -> %.4f", fit.temperature, fit.ece_before, fit.ece_after)
    return fit.to_summary()


def _finetune_stage(wb: Workbench) -> Stage:
    """Stage 2: the backbone (all of it, or its top blocks) trains too, by default at the head's stage-2 LR."""
    tcfg, model = wb.cfg.train, wb.model
    unfreeze_top(model, tcfg.unfreeze)
    frozen = tcfg.bn == "frozen" or (tcfg.bn == "auto" and wb.pretrained_start)
    model.bn_policy = "frozen" if frozen else "trainable"
    if tcfg.sync_bn and wb.dist.enabled:
        try:
            wb.model = model = convert_sync_batchnorm(model, wb.device)  # type: ignore[assignment]
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if tcfg.compile:
        # in place: the state_dict keys and the checkpoints stay those of the plain model. Compiling costs
        # 20-60 s on a CPU and the first steps of each mode (train, eval) wait for it (docs/speed.md)
        model.compile()
        log.info("stage 2: model compiled with torch.compile (the first steps include the compilation)")
    s = wb.optim_settings(2)
    backbone_lr = s.lr * tcfg.backbone_lr_scale if wb.pretrained_start else s.lr
    opt = make_optimizer(param_groups(model, s.lr, backbone_lr, s.weight_decay, tcfg.lr_decay), s)
    loader = wb.image_loader()
    batches = len(loader)
    ema = weight_ema(model, tcfg.ema) if tcfg.ema is not None else None
    mixing = tcfg.mixup > 0 or tcfg.cutmix > 0
    lr_text = f"layer-wise decay {tcfg.lr_decay}" if tcfg.lr_decay else f"backbone LR {backbone_lr:g}"
    what = "top " + str(tcfg.unfreeze) + " blocks" if tcfg.unfreeze else "all layers"
    return Stage(
        number=2,
        description=(
            f"stage 2: {what if wb.pretrained_start else 'all layers from random init'}, "
            f"{tcfg.epochs} epochs, {s.optimizer}, {s.schedule}, head LR {s.lr:g}, {lr_text}, "
            f"BatchNorm statistics {'frozen' if frozen else 'updated'}, "
            f"{len(wb.train_plain)} train images, batch {wb.cfg.data.batch_size}"
            + (f" x {tcfg.accumulate} accumulated" if tcfg.accumulate > 1 else "")
        ),
        module=wrap(model, wb.dist, wb.device),
        train_batches=lambda: loader,
        valid_batches=lambda: wb.valid_loader,
        batches_per_epoch=batches,
        epochs=tcfg.epochs,
        optimizer=opt,
        scheduler=LRSchedule(opt, s, math.ceil(batches / tcfg.accumulate), tcfg.epochs, maximize=_maximize(wb.cfg)),
        cheap_epochs=False,
        patience=tcfg.patience,
        generator=wb.generator,
        augment=wb.augment if wb.augment else None,
        batch_transform=BatchMix(len(wb.split.classes), tcfg.mixup, tcfg.cutmix) if mixing else None,
        ema=ema,
    )


def _maximize(cfg: Config) -> bool:
    return cfg.train.monitor != "valid_loss"


def _extract_stage1_features(wb: Workbench, run_path: Path | None) -> tuple[FeatureStore, torch.Tensor, torch.Tensor]:
    """Backbone features of the training images under `feature_views` views (the plain one, then augmented
    ones) and of this rank's validation shard. Under torchrun each rank extracts every world-th image and the
    training features are gathered."""
    cfg, model, device, d = wb.cfg, wb.model, wb.device, wb.dist
    t0 = time.perf_counter()
    dtype = inference_dtype(cfg.train.precision, device)
    batch = max(64, cfg.data.batch_size)
    cache = wb.train_plain.cache
    own_cache = cache[d.rank :: d.world] if cache is not None else None
    own = d.shard(wb.train_plain.samples)
    if own_cache is not None:
        own_labels = torch.tensor([x.label for x in own])
        batches: Callable[[], Any] = lambda: tensor_batches(own_cache, own_labels, batch, shuffle=False)  # noqa: E731
    else:
        loader = make_loader(ImageDataset(own, wb.prep), batch, shuffle=False, workers=wb.workers)
        batches = lambda: loader  # noqa: E731
    k = cfg.train.feature_views
    store: FeatureStore | None = None
    path: Path | None = None
    for view in range(k):  # view 0 as evaluated, then augmented ones
        f, y = extract_features(model, batches(), device, dtype, transform=wb.augment if view > 0 else None)
        f = d.gather_cat(f.half())
        if store is None:  # the size is known once view 0 is in (unreadable files are left out)
            where = cfg.train.feature_store
            on_disk = where == "disk" or (where == "auto" and k * f.numel() * 2 > 0.3 * available_memory())
            path = run_path / "cache" / f"features-rank{d.rank}.npy" if on_disk and run_path is not None else None
            store = FeatureStore.create(k, f.shape, d.gather_cat(y), path)
        store.views[view] = f  # written as it comes: a memory-mapped store never holds all views in RAM
    assert store is not None
    f_valid, y_valid = extract_features(model, wb.valid_loader, device, dtype)  # this rank's validation shard
    seconds = time.perf_counter() - t0
    extracted = k * len(store.labels) + int(d.sum(torch.tensor(len(f_valid))))
    log.info(
        "stage 1: backbone features for %d images (%d view%s of each training image) in %.1f s (%.0f images/s, "
        "%s); %.0f MB of fp16 features %s",
        extracted, k, "s" if k > 1 else "", seconds, extracted / max(seconds, 1e-9),
        "fp32" if dtype is None else str(dtype).removeprefix("torch."), store.nbytes / 1e6,
        f"memory-mapped from {path}" if path else "in RAM",
    )  # fmt: skip
    return store, f_valid, y_valid


def _head_stage(wb: Workbench, run_path: Path | None = None) -> Stage:
    """Stage 1: backbone frozen, head trained. With frozen BatchNorm statistics (the default) the backbone's
    output never changes, so its features are computed once and the head trains on them; with
    `bn_frozen_stage: train` the statistics adapt, so the stage runs on augmented images, epoch by epoch."""
    cfg, tcfg, model, device = wb.cfg, wb.cfg.train, wb.model, wb.device
    set_requires_grad(model.backbone, False)
    d = wb.dist
    s = wb.optim_settings(1)
    opt = make_optimizer(param_groups(model, s.lr, s.lr, s.weight_decay), s)
    description = f"stage 1: head only, {tcfg.epochs_frozen} epochs, {s.optimizer}, {s.schedule}, LR {s.lr:g}"
    common: dict[str, Any] = {"number": 1, "optimizer": opt, "epochs": tcfg.epochs_frozen, "patience": None}
    if tcfg.bn_frozen_stage == "train":
        model.bn_policy = "update"  # running statistics adapt although the weights are frozen
        loader = wb.image_loader()
        batches = len(loader)
        return Stage(
            description=description + ", on images (BatchNorm statistics updating)",
            module=wrap(model, d, device),
            train_batches=lambda: loader,
            valid_batches=lambda: wb.valid_loader,
            batches_per_epoch=batches,
            scheduler=LRSchedule(opt, s, batches, tcfg.epochs_frozen, maximize=_maximize(cfg)),
            cheap_epochs=False,
            augment=wb.augment if wb.augment else None,
            **common,
        )
    model.bn_policy = "frozen"
    store, f_valid, y_valid = _extract_stage1_features(wb, run_path)
    wb.feature_store = store
    steps = math.ceil(math.ceil(store.labels.numel() / d.world) / FEATURE_BATCH)
    generator = torch.Generator().manual_seed(cfg.seed)
    shard = (d.rank, d.world)
    return Stage(
        description=description + " on cached features",
        module=wrap(model.head, d, device),
        train_batches=lambda: store.batches(FEATURE_BATCH, generator, shard),
        valid_batches=lambda: tensor_batches(f_valid, y_valid, 4096, shuffle=False),
        batches_per_epoch=steps,
        scheduler=LRSchedule(opt, s, steps, tcfg.epochs_frozen, maximize=_maximize(cfg)),
        cheap_epochs=True,
        generator=generator,
        **common,
    )


def find_lr(config: Config, stage: int = 1, steps: int = 200, out: Path = Path("lr_find.png")) -> LRFindResult:
    """`imgtune lr-find`: the range test for stage 1 (head on frozen features) or stage 2 (all layers,
    after training the head as configured, since fine-tuning starts from a trained head)."""
    wb = prepare(config)
    with tempfile.TemporaryDirectory(prefix="imgtune-lrfind-") as tmp:
        trainer = wb.trainer(RunFolder(Path(tmp)))
        head = wb.head_stage()
        if stage == 2:
            trainer.run_stage(head)
        target = head if stage == 1 else wb.finetune_stage()
        result = range_test(target, trainer, steps=steps)
    plot(result, out, f"{config.model.name}, stage {stage}")
    atomic_write_text(out.with_suffix(".csv"), result.csv())
    return result
