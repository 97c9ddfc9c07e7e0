"""The Workbench: everything a run trains with, built once from the config by `prepare` - the split, the model,
the decoded-image cache, the validation loader, the augmentation, the process group - and never changed
afterwards (a changed setting, such as a halved batch size, is a new Workbench: `with_config`). The stages are
built from it by the functions in stages.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgtune.augment import BatchAugment
from imgtune.checkpoint import Checkpoint
from imgtune.config import Config, ConfigError
from imgtune.curate import Curation, curate
from imgtune.data import (
    ImageDataset,
    Skipped,
    decode_many,
    default_workers,
    load_class_names,
    make_loader,
    should_cache,
)
from imgtune.distributed import Dist, current
from imgtune.layouts import DataError, Sample, Split, class_names_file, load_split, readable
from imgtune.models import Body, Classifier, create_model, has_pretrained_weights
from imgtune.optim import OptimSettings
from imgtune.packages import versions
from imgtune.rng import seed_everything
from imgtune.runtime import pick_device, probe_batch_size, training_dtype
from imgtune.tracking import MONITORS
from imgtune.transforms import Preprocessing, wide_width

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workbench:
    cfg: Config  # as resolved: the auto batch size filled in, `out` set once the run folder exists
    device: torch.device
    dist: Dist
    split: Split
    model: Classifier  # its weights train; the object stays the same
    prep: Preprocessing
    pretrained_start: bool  # ImageNet (or --weights) weights: the two-stage recipe; else from scratch
    train_samples: list[Sample]  # the readable ones
    valid_samples: list[Sample]
    skipped: list[Skipped]  # unreadable files, reported in summary.json
    train_plain: ImageDataset  # unaugmented uint8 images (from the RAM cache when there is one)
    augment: BatchAugment  # applied to whole batches on the device, in the training loop
    valid_loader: Any
    workers: int
    generator: torch.Generator  # the training sampler's
    class_weights: torch.Tensor | None
    eval_batch: int
    display_names: list[str]
    lr_factor: float  # the LR scaling rule's factor under torchrun (1 in one process)
    curation: Curation  # what --exclude / --relabel changed

    @property
    def num_classes(self) -> int:
        return len(self.split.classes)

    def with_config(self, cfg: Config) -> Workbench:
        return dataclasses.replace(self, cfg=cfg)

    def optim_settings(self, stage: int) -> OptimSettings:
        s = self.cfg.train.optim_settings(stage, self.pretrained_start or stage == 1)
        return dataclasses.replace(s, lr=s.lr * self.lr_factor) if self.lr_factor != 1 else s

    def template(self) -> Checkpoint:
        """What every checkpoint of this run says besides its weights and progress."""
        return Checkpoint(
            arch=dict(self.model.arch), classes=list(self.split.classes), preprocessing=self.prep, state_dict={},
            class_names=self.display_names, config=self.cfg.to_plain(), versions=versions(),
        )  # fmt: skip

    def valid_pairs(self) -> list[tuple[Path, str]]:
        return [(x.path, self.split.classes[x.label]) for x in self.valid_samples]


def prepare(cfg: Config, *, load_pretrained: bool = True, split_file: Path | None = None) -> Workbench:
    """Split, model and data, ready to train. load_pretrained=False when weights come from a checkpoint."""
    dcfg, tcfg = cfg.data, cfg.train
    d = current()
    _check_distributed(cfg, d)
    seed_everything(cfg.seed + d.rank, tcfg.deterministic)  # per rank: different augmentation draws
    device = d.device(pick_device(cfg.device))
    split = load_split(dcfg.path, dcfg.valid_fraction, cfg.seed, split_file or dcfg.split_file, dcfg.label_rule())
    curation = Curation()
    if split_file is None:  # a resumed run's split.csv holds the curated split already
        split, curation = curate(split, dcfg.exclude, dcfg.relabel)
    _check_trainable(split, dcfg.valid_fraction)
    if not split.valid:
        if tcfg.calibrate:
            raise ConfigError("--calibrate fits a temperature on the validation split, and there is none")
        log.warning("no validation split: every epoch counts as the best so far (best.pt = the last epoch), no "
                    "early stopping%s", "" if MONITORS[tcfg.monitor].read is None else
                    "; --monitor train_loss keeps the epoch with the lowest training loss instead")  # fmt: skip
    for note in split.notes:
        log.warning("%s", note)
    model = create_model(
        cfg.model.name, len(split.classes), pretrained=cfg.model.pretrained and load_pretrained,
        weights=cfg.model.weights if load_pretrained else None, dropout=cfg.model.dropout, head=cfg.model.head,
        head_dropout=cfg.model.head_dropout, body=body(cfg),
    )  # fmt: skip
    if cfg.model.mean is not None and cfg.model.std is not None:
        model.normalise_with(cfg.model.mean, cfg.model.std)
    prep = model.preprocessing(dcfg.img_size, dcfg.resize)
    model.to(device).use_channels_last()
    if dcfg.auto_batch:
        cfg = _auto_batch(cfg, model, device, d, len(split.train))
    train_samples, valid_samples, skipped, train_cache, valid_cache = _decode(cfg, split, prep, d)
    workers = cfg.data.workers if cfg.data.workers is not None else default_workers(train_cache is not None, device)
    # validation: disjoint, unpadded shards per rank; the engine gathers their logits (exact metrics)
    valid_ds = ImageDataset(
        d.shard(valid_samples), prep, valid_cache[d.rank :: d.world] if valid_cache is not None else None
    )
    eval_batch = max(64, cfg.data.batch_size)
    class_weights = None
    if tcfg.balance == "weights":  # inverse frequency, mean weight 1 over the samples
        counts = torch.bincount(torch.tensor([s.label for s in train_samples]), minlength=len(split.classes))
        class_weights = counts.sum() / (len(split.classes) * counts.clamp(min=1).float())
    names = class_names_file(dcfg.path, dcfg.class_names)
    return Workbench(
        cfg=cfg, device=device, dist=d, split=split, model=model, prep=prep,
        pretrained_start=(cfg.model.pretrained and has_pretrained_weights(cfg.model.name))
        or cfg.model.weights is not None,
        train_samples=train_samples, valid_samples=valid_samples, skipped=skipped,
        train_plain=ImageDataset(train_samples, prep, train_cache, train_view(cfg)),
        augment=BatchAugment(cfg.data.aug),
        valid_loader=make_loader(valid_ds, eval_batch, shuffle=False, workers=workers,
                                 pin_memory=device.type == "cuda"),
        workers=workers, generator=torch.Generator().manual_seed(cfg.seed + d.rank), class_weights=class_weights,
        eval_batch=eval_batch,
        display_names=load_class_names(names, split.classes) if names else [readable(c) for c in split.classes],
        lr_factor={"none": 1.0, "linear": float(d.world), "sqrt": math.sqrt(d.world)}[tcfg.lr_scaling],
        curation=curation,
    )  # fmt: skip


def train_view(cfg: Config) -> float | None:
    """data.train_aspect's wide training views, where they change anything: centre-cropped photos, random
    resized crops. None: the training images are cached as evaluation sees them."""
    dcfg = cfg.data
    use = dcfg.resize == "crop" and dcfg.aug.scale is not None and dcfg.train_aspect > 1
    return dcfg.train_aspect if use else None


def body(cfg: Config) -> Body:
    m = cfg.model
    return Body(tuple(m.widths) if m.widths else None, m.pool, cfg.data.img_size, m.keep_fc, m.fc_dropout, m.drop_path)


def _decode(cfg: Config, split: Split, prep: Preprocessing, d: Dist) -> tuple[Any, ...]:
    """Decode + resize every image once into RAM when it fits; unreadable files are reported and left out
    here. Returns (train samples, valid samples, skipped, train cache, valid cache); caches None without."""
    dcfg = cfg.data
    train_samples, valid_samples = split.train, split.valid
    budget = 0.3 / d.local_world  # each process on a machine holds its own copy
    wide = train_view(cfg)
    per_image = 3 * dcfg.img_size**2 if wide is None else 4 * dcfg.img_size * wide_width(dcfg.img_size, wide)
    if not should_cache(dcfg.cache, len(train_samples) + len(valid_samples), dcfg.img_size, budget, per_image):
        return train_samples, valid_samples, [], None, None
    t0 = time.perf_counter()
    train_cache, ok, skipped = decode_many([s.path for s in train_samples], prep, wide=wide)
    train_samples = [train_samples[i] for i in ok]
    valid_cache, ok, more = decode_many([s.path for s in valid_samples], prep)
    valid_samples = [valid_samples[i] for i in ok]
    log.info(
        "cached %d images at %dx%d in RAM (%.0f MB) in %.1f s%s",
        len(train_samples) + len(valid_samples), dcfg.img_size, dcfg.img_size,
        (train_cache.numel() + valid_cache.numel()) / 1e6, time.perf_counter() - t0,
        "" if wide is None else f"; training images as {train_cache.shape[-1]}-wide views (data.train_aspect)",
    )  # fmt: skip
    return train_samples, valid_samples, skipped + more, train_cache, valid_cache


def _check_trainable(split: Split, valid_fraction: float) -> None:
    if len(split.classes) < 2:
        raise DataError(f"{split.root}: found {len(split.classes)} class(es) {split.classes}; need at least 2")
    if not split.valid and valid_fraction > 0:
        raise DataError(
            f"{split.root}: the validation split is empty; add images to valid/, hold some out with --valid-fraction "
            "F (when imgtune makes the split), or train without validation with --valid-fraction 0"
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
    with the same batch; a later out-of-memory error still halves it (recipe.py)."""
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
    return with_batch_size(cfg, chosen, auto=False)


def with_batch_size(cfg: Config, batch_size: int, auto: bool | None = None) -> Config:
    update: dict[str, Any] = {"batch_size": batch_size}
    if auto is not None:
        update["auto_batch"] = auto
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})
