"""The recipe's stages, each built from a Workbench by one function: the head on cached backbone features
(stage 1, the default), the head on augmented images (stage 1 with `bn_frozen_stage: train`), and fine-tuning
(stage 2, also the whole of a from-scratch run). The builders decide what trains and at which LR; the
engine's Trainer runs what they return. Stage 1's are context managers: its cached features are freed (a
memory-mapped file deleted) when the stage is left, however it is left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from imgtune import prefix
from imgtune.augment import BatchMix
from imgtune.config import ConfigError
from imgtune.data import ImageDataset, available_memory, balanced_sampler, make_loader
from imgtune.distributed import convert_sync_batchnorm, wrap
from imgtune.features import FeatureStore, extract_features, tensor_batches
from imgtune.models import param_groups, set_requires_grad, unfreeze_top
from imgtune.optim import LRSchedule, OptimSettings, make_optimizer, weight_ema
from imgtune.probe import LinearFit, fits_in_memory, solve_linear_head, weight_decay_text
from imgtune.runtime import inference_dtype
from imgtune.stage import ON_FEATURES, ON_IMAGES, Stage
from imgtune.tracking import MONITORS
from imgtune.workbench import Workbench

log = logging.getLogger(__name__)


def image_loader(wb: Workbench, dataset: Any = None, workers: int | None = None) -> Any:
    """Training images in batches: shuffled; sharded under torchrun; class-balanced with --balance sampler.
    `dataset` stands in for the images with the same length and order (prefix.Indices)."""
    dcfg, d = wb.cfg.data, wb.dist
    data = wb.train_plain if dataset is None else dataset
    sampler: Any = None
    if d.enabled:  # a shard per rank, reshuffled per epoch (set_epoch), padded to equal lengths
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=wb.cfg.seed
        )
    elif wb.cfg.train.balance == "sampler":
        sampler = balanced_sampler([x.label for x in wb.train_samples], wb.generator)
    return make_loader(
        data, dcfg.batch_size, shuffle=sampler is None, workers=wb.workers if workers is None else workers,
        generator=wb.generator, sampler=sampler, pin_memory=wb.device.type == "cuda",
        drop_last=len(data) > dcfg.batch_size,
    )  # fmt: skip


def _train_batches(wb: Workbench, loader: Any, mixing: bool) -> Callable[[], Any]:
    """Stage 2's training batches: the image loader, or, with frozen blocks that see the same images every
    epoch, their outputs computed once on the first call (after a resume has loaded its weights)."""
    tcfg, model = wb.cfg.train, wb.model
    why = prefix.why_not(model, unfreeze=tcfg.unfreeze, augment=bool(wb.augment), mixing=mixing,
                         compiled=tcfg.compile, drop_path=wb.cfg.model.drop_path)  # fmt: skip
    if why is None and not tcfg.cache_frozen:
        why = "train.cache_frozen is off"
    if why is not None:
        if why:
            log.info("stage 2: the frozen blocks run every step (%s)", why)
        return lambda: loader
    start = prefix.frozen_blocks(model)
    assert start is not None
    chosen: list[Any] = []

    def batches() -> Any:
        if not chosen:
            t0 = time.perf_counter()
            plain = make_loader(wb.train_plain, wb.cfg.data.batch_size, shuffle=False, workers=wb.workers)
            got = prefix.compute_cache(model, plain, wb.device, start, len(wb.train_plain), available_memory())
            if isinstance(got, str):
                log.info("stage 2: the frozen blocks run every step (%s)", got)
                chosen.append(loader)
            else:
                log.info("stage 2: outputs of the stem and %d frozen blocks computed once for %d images in %.1f s "
                         "(%d MB); each step runs the top blocks only", start, len(got), time.perf_counter() - t0,
                         got.numel() * 4 // 2**20)  # fmt: skip
                labels = [x.label for x in wb.train_samples]
                chosen.append(prefix.MidwayBatches(image_loader(wb, prefix.Indices(labels), workers=0), got, start))
        return chosen[0]

    return batches


def _schedule(wb: Workbench, opt: torch.optim.Optimizer, s: OptimSettings, steps: int, epochs: int) -> LRSchedule:
    return LRSchedule(opt, s, steps, epochs, maximize=MONITORS[wb.cfg.train.monitor].maximize)


def finetune_stage(wb: Workbench) -> Stage:
    """Stage 2: the backbone (all of it, or its top blocks) trains too, by default at the head's stage-2 LR."""
    tcfg, model = wb.cfg.train, wb.model
    unfreeze_top(model, tcfg.unfreeze)
    frozen = tcfg.bn == "frozen" or (tcfg.bn == "auto" and wb.pretrained_start)
    model.bn_policy = "frozen" if frozen else "trainable"
    if tcfg.sync_bn and wb.dist.enabled:
        try:  # in place: timm replaces the BatchNorm children, the Classifier object stays the same
            convert_sync_batchnorm(model, wb.device)
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
    loader = image_loader(wb)
    batches = len(loader)
    mixing = tcfg.mixup > 0 or tcfg.cutmix > 0
    lr_text = f"layer-wise decay {tcfg.lr_decay}" if tcfg.lr_decay else f"backbone LR {backbone_lr:g}"
    what = f"top {tcfg.unfreeze} blocks" if tcfg.unfreeze else "all layers"
    return Stage(
        number=2,
        description=(
            f"stage 2: {what if wb.pretrained_start else 'all layers from random init'}, "
            f"{tcfg.epochs} epochs, {s.optimizer}, {s.schedule}, head LR {s.lr:g}, {lr_text}, "
            f"BatchNorm statistics {'frozen' if frozen else 'updated'}, "
            f"{len(wb.train_plain)} train images, batch {wb.cfg.data.batch_size}"
            + (f" x {tcfg.accumulate} accumulated" if tcfg.accumulate > 1 else "")
            + f", augmentation {wb.cfg.data.augment}"
            + (f", weight EMA {tcfg.ema:g}" if tcfg.ema is not None else "")
        ),
        module=wrap(model, wb.dist, wb.device),
        train_batches=_train_batches(wb, loader, mixing),
        valid_batches=lambda: wb.valid_loader,
        batches_per_epoch=batches,
        epochs=tcfg.epochs,
        optimizer=opt,
        scheduler=_schedule(wb, opt, s, math.ceil(batches / tcfg.accumulate), tcfg.epochs),
        policy=ON_IMAGES,
        patience=tcfg.patience,
        generator=wb.generator,
        augment=wb.augment if wb.augment else None,  # BatchAugment is falsy for --augment none
        batch_transform=BatchMix(wb.num_classes, tcfg.mixup, tcfg.cutmix) if mixing else None,
        ema=weight_ema(model, tcfg.ema) if tcfg.ema is not None else None,
    )


@contextlib.contextmanager
def head_stage(wb: Workbench, run_path: Path | None = None, solve: bool = True) -> Iterator[Stage]:
    """Stage 1: backbone frozen, head trained. With frozen BatchNorm statistics (the default) the backbone's
    output never changes, so its features are computed once and the head is solved (linear, probe.py) or
    trained on them; with `bn_frozen_stage: train` the statistics adapt, so the stage runs on augmented
    images, epoch by epoch. `solve=False` trains even a linear head in mini-batches (the LR finder's case)."""
    tcfg, model = wb.cfg.train, wb.model
    set_requires_grad(model.backbone, False)
    s = wb.optim_settings(1)
    opt = make_optimizer(param_groups(model, s.lr, s.lr, s.weight_decay), s)
    description = f"stage 1: head only, {tcfg.epochs_frozen} epochs, {s.optimizer}, {s.schedule}, LR {s.lr:g}"
    common: dict[str, Any] = {"number": 1, "optimizer": opt, "epochs": tcfg.epochs_frozen, "patience": None}
    if tcfg.bn_frozen_stage == "train" or tcfg.head_input == "images":
        # running statistics adapt (although the weights are frozen) only when asked to
        model.bn_policy = "update" if tcfg.bn_frozen_stage == "train" else "frozen"
        loader = image_loader(wb)
        updating = "updating" if tcfg.bn_frozen_stage == "train" else "frozen"
        yield Stage(
            description=description + f", on augmented images, batch {wb.cfg.data.batch_size} (BatchNorm {updating})",
            module=wrap(model, wb.dist, wb.device), train_batches=lambda: loader,
            valid_batches=lambda: wb.valid_loader, batches_per_epoch=len(loader),
            scheduler=_schedule(wb, opt, s, len(loader), tcfg.epochs_frozen), policy=ON_IMAGES,
            augment=wb.augment if wb.augment else None, **common,
        )  # fmt: skip
        return
    model.bn_policy = "frozen"
    store, f_valid, y_valid = _stage1_features(wb, run_path)
    try:
        valid_batches = lambda: tensor_batches(f_valid, y_valid, 4096, shuffle=False)  # noqa: E731
        k, n, width = store.views.shape
        linear = not wb.cfg.model.head
        if solve and linear and (tcfg.head_solver == "lbfgs" or (
                tcfg.head_solver == "auto" and fits_in_memory(k * n, width, available_memory()))):  # fmt: skip
            yield Stage(
                description=f"stage 1: linear head solved on cached features ({k * n} x {width}): full-batch "
                f"L-BFGS on the training loss, weight decay picked on held-out data from {weight_decay_text()}",
                module=model.head, train_batches=lambda: iter(()), valid_batches=valid_batches, batches_per_epoch=1,
                scheduler=_schedule(wb, opt, s, 1, 1), policy=ON_FEATURES,
                fit=_head_solver(wb, store, f_valid, y_valid), **{**common, "epochs": 1},
            )  # fmt: skip
            return
        batch = tcfg.feature_batch
        steps = math.ceil(math.ceil(n / wb.dist.world) / batch)
        epochs = max(tcfg.epochs_frozen, math.ceil(tcfg.head_min_steps / steps))
        generator = torch.Generator().manual_seed(wb.cfg.seed)
        shard = (wb.dist.rank, wb.dist.world)
        more = f" ({epochs} epochs: at least {tcfg.head_min_steps} steps)" if epochs > tcfg.epochs_frozen else ""
        if solve and linear and tcfg.head_solver == "auto":  # the features were too large for a full-batch solve
            more += "; trained, not solved: the features do not fit in memory twice"
        yield Stage(
            description=description + f" on cached features, batch {batch}{more}",
            module=wrap(model.head, wb.dist, wb.device),
            train_batches=lambda: store.batches(batch, generator, shard),
            valid_batches=valid_batches, batches_per_epoch=steps,
            scheduler=_schedule(wb, opt, s, steps, epochs), policy=ON_FEATURES, generator=generator,
            **{**common, "epochs": epochs},
        )  # fmt: skip
    finally:
        store.close()  # free the RAM, delete a memory-mapped file


def _head_solver(
    wb: Workbench, store: FeatureStore, f_valid: torch.Tensor, y_valid: torch.Tensor
) -> Callable[[], tuple[float, float, int]]:
    """The solved stage's fit: the linear head by probe.solve_linear_head on every view of every training
    image, on rank 0 (the training features are gathered on every rank already; the validation shards are
    gathered here), its weights handed to all ranks."""
    d, tcfg = wb.dist, wb.cfg.train
    x_valid, y_valid = d.gather_cat(f_valid), d.gather_cat(y_valid)
    weights = wb.class_weights.cpu() if wb.class_weights is not None else None

    def solve() -> tuple[LinearFit, float, float, int]:
        k, n, width = store.views.shape
        x, y = store.views.reshape(k * n, width).float(), store.labels.repeat(k)
        fit = solve_linear_head(x, y, wb.num_classes, x_valid, y_valid, label_smoothing=tcfg.label_smoothing,
                                class_weights=weights, seed=wb.cfg.seed)  # fmt: skip
        logits = torch.addmm(fit.bias, x, fit.weight.t())
        loss = F.cross_entropy(logits, y, weight=weights, label_smoothing=tcfg.label_smoothing)
        return fit, float(loss), float((logits.argmax(1) == y).float().mean()), len(y)

    def fit() -> tuple[float, float, int]:
        result, loss, acc, n = d.on_main(solve)
        layer = list(wb.model.head.children())[-1]  # make_head: [Dropout, Linear] for a linear head
        assert isinstance(layer, torch.nn.Linear)
        with torch.no_grad():
            layer.weight.copy_(result.weight)
            layer.bias.copy_(result.bias)
        log.info(
            "stage 1: linear head solved in %.1f s (%d L-BFGS iterations): weight decay %.0e, held-out (%s) loss %.4f",
            result.seconds, result.iterations, result.weight_decay, result.held_out, result.held_out_loss,
        )  # fmt: skip
        return loss, acc, n

    return fit


def _stage1_features(wb: Workbench, run_path: Path | None) -> tuple[FeatureStore, torch.Tensor, torch.Tensor]:
    """Backbone features of the training images under `feature_views` views (the plain one, then augmented
    ones) and of this rank's validation shard. Under torchrun each rank extracts every world-th image and the
    training features are gathered."""
    cfg, d = wb.cfg, wb.dist
    t0 = time.perf_counter()
    dtype = inference_dtype(cfg.train.precision, wb.device)
    batch = max(64, cfg.data.batch_size)
    cache = wb.train_plain.cache
    own = d.shard(wb.train_plain.samples)
    batches: Callable[[], Any]
    if cache is not None:
        own_cache, own_labels = cache[d.rank :: d.world], torch.tensor([x.label for x in own])
        batches = lambda: tensor_batches(own_cache, own_labels, batch, shuffle=False)  # noqa: E731
    else:
        loader = make_loader(
            ImageDataset(own, wb.prep, None, wb.train_plain.wide), batch, shuffle=False, workers=wb.workers
        )
        batches = lambda: loader  # noqa: E731
    k = cfg.train.feature_views
    store: FeatureStore | None = None
    path: Path | None = None
    for view in range(k):  # view 0 as evaluated, then augmented ones
        transform = wb.augment if view > 0 else wb.augment.plain  # plain: a wide view's centre square
        f, y = extract_features(wb.model, batches(), wb.device, dtype, transform=transform)
        f = d.gather_cat(f.half())
        if store is None:  # the size is known once view 0 is in (unreadable files are left out)
            where = cfg.train.feature_store
            on_disk = where == "disk" or (where == "auto" and k * f.numel() * 2 > 0.3 * available_memory())
            path = run_path / "cache" / f"features-rank{d.rank}.npy" if on_disk and run_path is not None else None
            store = FeatureStore.create(k, f.shape, d.gather_cat(y), path)
        store.views[view] = f  # written as it comes: a memory-mapped store never holds all views in RAM
    assert store is not None
    f_valid, y_valid = extract_features(wb.model, wb.valid_loader, wb.device, dtype)  # this rank's shard
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
