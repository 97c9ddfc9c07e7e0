"""The library API: train, evaluate, predict, load. The CLI is a thin layer over these functions."""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgtune.checkpoint import load_checkpoint, resolve_checkpoint
from imgtune.config import Config
from imgtune.data import (
    DataError,
    ImageDataset,
    Sample,
    Skipped,
    Split,
    decode_many,
    default_workers,
    find_split_folders,
    load_split,
    make_loader,
    read_split_csv,
    scan_folder,
    should_cache,
)
from imgtune.engine import Stage, Trainer, make_optimizer, seed_everything, warmup_cosine
from imgtune.features import extract_features, tensor_batches
from imgtune.metrics import EvalResult, compute_metrics
from imgtune.models import Classifier, create_model, param_groups, set_requires_grad
from imgtune.predict import Prediction, Predictor, expand_inputs, pick_device, write_predictions
from imgtune.progress import Progress
from imgtune.runs import new_run_folder
from imgtune.transforms import augmentation

log = logging.getLogger(__name__)

FEATURE_BATCH = 256  # head-only steps on cached features: bigger batches, same result, less overhead


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_valid_acc: float
    test: EvalResult | None
    summary: dict[str, Any] = field(default_factory=dict)


def load(run: Path | str, device: str = "auto") -> Predictor:
    """A ready-to-use Predictor from a run folder or checkpoint file."""
    return Predictor.load(run, device)


def _check_trainable(split: Split) -> None:
    if len(split.classes) < 2:
        raise DataError(f"{split.root}: found {len(split.classes)} class(es) {split.classes}; need at least 2")
    if not split.valid:
        raise DataError(f"{split.root}: the validation split is empty; add valid/ images or use --valid-fraction")


def _drop_skipped(samples: list[Sample], ok: list[int]) -> list[Sample]:
    return [samples[i] for i in ok]


def train(config: Config, progress: Progress | None = None) -> TrainResult:
    """Two-stage transfer learning (or from-scratch training) as configured; returns the run's outcome."""
    started = time.perf_counter()
    cfg, dcfg, tcfg = config, config.data, config.train
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    split = load_split(dcfg.path, dcfg.valid_fraction, cfg.seed, dcfg.split_file)
    _check_trainable(split)
    for note in split.notes:
        log.warning("%s", note)
    pretrained_start = cfg.model.pretrained or cfg.model.weights is not None
    model = create_model(
        cfg.model.name,
        len(split.classes),
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
        dropout=cfg.model.dropout,
    )
    prep = model.preprocessing(dcfg.img_size)
    run = new_run_folder(cfg.out, dcfg.path)
    log.info("run folder: %s", run.path)
    config = cfg.model_copy(update={"out": run.path})
    run.config.write_text(config.to_yaml())
    run.write_json(run.classes, split.classes)
    if split.made_split:
        split.write_csv(run.split)
    model.to(device).use_channels_last()

    # Data: decode + resize once into RAM when it fits; unreadable files are reported and left out here.
    train_samples, valid_samples = split.train, split.valid
    skipped: list[Skipped] = []
    train_cache = valid_cache = None
    if should_cache(dcfg.cache, len(train_samples) + len(valid_samples), dcfg.img_size):
        t0 = time.perf_counter()
        train_cache, ok, sk = decode_many([s.path for s in train_samples], prep)
        train_samples, skipped = _drop_skipped(train_samples, ok), skipped + sk
        valid_cache, ok, sk = decode_many([s.path for s in valid_samples], prep)
        valid_samples, skipped = _drop_skipped(valid_samples, ok), skipped + sk
        log.info(
            "cached %d images at %dx%d in RAM (%.0f MB) in %.1f s",
            len(train_samples) + len(valid_samples), dcfg.img_size, dcfg.img_size,
            (train_cache.numel() + valid_cache.numel()) / 1e6, time.perf_counter() - t0,
        )  # fmt: skip
    workers = dcfg.workers if dcfg.workers is not None else default_workers(train_cache is not None, device)
    pin = device.type == "cuda"
    train_plain = ImageDataset(train_samples, prep, None, train_cache)
    valid_ds = ImageDataset(valid_samples, prep, None, valid_cache)
    eval_batch = max(64, dcfg.batch_size)
    valid_loader = make_loader(valid_ds, eval_batch, shuffle=False, workers=workers, pin_memory=pin)

    checkpoint_base = {
        "arch": dict(model.arch),
        "classes": list(split.classes),
        "preprocessing": prep.to_dict(),
        "config": config.to_plain(),
    }
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    trainer = Trainer(
        model,
        run,
        checkpoint_base,
        device=device,
        label_smoothing=tcfg.label_smoothing,
        grad_clip=tcfg.grad_clip,
        amp_dtype=amp_dtype,
        progress=progress,
    )

    if tcfg.epochs_frozen > 0 and pretrained_start:
        _stage_head_on_features(trainer, model, train_plain, valid_loader, cfg, workers, device)
    elif tcfg.epochs_frozen > 0:
        log.info("training from scratch: no frozen-backbone stage (a random backbone has nothing to keep)")

    if tcfg.epochs > 0:
        set_requires_grad(model, True)
        model.bn_frozen = tcfg.bn == "frozen" or (tcfg.bn == "auto" and pretrained_start)
        head_lr = tcfg.lr * tcfg.finetune_lr_scale if pretrained_start else tcfg.lr
        backbone_lr = head_lr * tcfg.backbone_lr_scale if pretrained_start else tcfg.lr
        train_ds = ImageDataset(train_samples, prep, augmentation(dcfg.augment, prep), train_cache)
        train_loader = make_loader(
            train_ds, dcfg.batch_size, shuffle=True, workers=workers, seed=cfg.seed, pin_memory=pin,
            drop_last=len(train_ds) > dcfg.batch_size,
        )  # fmt: skip
        opt = make_optimizer(
            tcfg.optimizer, param_groups(model, head_lr, backbone_lr, tcfg.weight_decay), tcfg.momentum
        )
        steps = len(train_loader)
        trainer.run_stage(
            Stage(
                number=2,
                description=(
                    f"stage 2: all layers, {tcfg.epochs} epochs, head LR {head_lr:g}, backbone LR {backbone_lr:g}, "
                    f"BatchNorm statistics {'frozen' if model.bn_frozen else 'updated'}, "
                    f"{len(train_ds)} train images, batch {dcfg.batch_size}"
                ),
                module=model,
                train_batches=lambda: train_loader,
                valid_batches=lambda: valid_loader,
                steps_per_epoch=steps,
                epochs=tcfg.epochs,
                optimizer=opt,
                scheduler=warmup_cosine(opt, steps * tcfg.epochs, tcfg.warmup_fraction),
                cheap_epochs=False,
                patience=tcfg.patience,
            )
        )

    best = load_checkpoint(run.best)
    model.load_state_dict(best["state_dict"])
    test = None
    if split.test_labelled:
        predictor = Predictor(model, prep, split.classes, device)
        test = _evaluate_samples(predictor, split.test, split.classes, "test", eval_batch, workers)
        log.info("test accuracy of the best checkpoint: %.4f (%d images)", test.accuracy, test.n)
    summary = {
        "best_epoch": trainer.best_epoch,
        "best_valid_acc": trainer.best_acc,
        "epochs_run": trainer.epoch,
        "stopped_early": trainer.stopped_early,
        "classes": len(split.classes),
        "train_images": len(train_samples),
        "valid_images": len(valid_samples),
        "skipped_files": [vars(s) for s in skipped],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if test is not None:
        summary.update(
            {"test_acc": test.accuracy, "test_top5": test.top5, "test_loss": test.loss, "test_images": test.n}
        )
    run.write_json(run.summary, summary)
    return TrainResult(run.path, trainer.best_epoch, trainer.best_acc, test, summary)


def _stage_head_on_features(
    trainer: Trainer,
    model: Classifier,
    train_plain: ImageDataset,
    valid_loader: Any,
    cfg: Config,
    workers: int,
    device: torch.device,
) -> None:
    """Stage 1: backbone frozen (BatchNorm statistics too), its features computed once, head trained on them."""
    tcfg = cfg.train
    set_requires_grad(model.backbone, False)
    model.bn_frozen = True
    t0 = time.perf_counter()
    batch = max(64, cfg.data.batch_size)
    if train_plain.cache is not None:
        labels = torch.tensor([s.label for s in train_plain.samples])
        train_batches: Any = tensor_batches(train_plain.cache, labels, batch, shuffle=False)
    else:
        train_batches = make_loader(train_plain, batch, shuffle=False, workers=workers)
    f_train, y_train = extract_features(model, train_batches, device)
    f_valid, y_valid = extract_features(model, valid_loader, device)
    seconds = time.perf_counter() - t0
    log.info(
        "stage 1: backbone features for %d images in %.1f s (%.0f images/s)",
        len(f_train) + len(f_valid), seconds, (len(f_train) + len(f_valid)) / max(seconds, 1e-9),
    )  # fmt: skip
    opt = make_optimizer(tcfg.optimizer, param_groups(model, tcfg.lr, tcfg.lr, tcfg.weight_decay), tcfg.momentum)
    steps = math.ceil(len(f_train) / FEATURE_BATCH)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer.run_stage(
        Stage(
            number=1,
            description=f"stage 1: head only, {tcfg.epochs_frozen} epochs on cached features, LR {tcfg.lr:g}",
            module=model.head,
            train_batches=lambda: tensor_batches(f_train, y_train, FEATURE_BATCH, shuffle=True, generator=generator),
            valid_batches=lambda: tensor_batches(f_valid, y_valid, 4096, shuffle=False),
            steps_per_epoch=steps,
            epochs=tcfg.epochs_frozen,
            optimizer=opt,
            scheduler=warmup_cosine(opt, steps * tcfg.epochs_frozen, tcfg.warmup_fraction),
            cheap_epochs=True,
            patience=None,
        )
    )


# ------------------------------------------------------------------------------------------------ evaluate


def eval_samples(data: Path, split: str, run_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(file, class name) pairs of one labelled split of DATA.

    DATA/<split>/<class>/... when it exists; for the valid split of a run that made its own split, the
    run's split.csv; a folder of class folders with no split folders is evaluated whole.
    """
    data = Path(data)
    folders = find_split_folders(data)
    if split in folders:
        scan = scan_folder(folders[split])
        pairs = [(p, c) for c, files in scan.classes.items() for p in files]
        if not pairs:
            raise DataError(f"{folders[split]}: no labelled images (class folders) to evaluate on")
        return pairs
    if split == "valid" and run_dir is not None and (run_dir / "split.csv").is_file():
        s = read_split_csv(data, run_dir / "split.csv")
        return [(x.path, s.classes[x.label]) for x in s.valid]
    if not folders:
        scan = scan_folder(data)
        return [(p, c) for c, files in scan.classes.items() for p in files]
    raise DataError(f"{data}: no {split}/ folder with class folders (found: {', '.join(folders)})")


def _evaluate_samples(
    predictor: Predictor,
    samples: Sequence[Sample],
    sample_classes: list[str],
    split: str,
    batch_size: int,
    workers: int | None,
) -> EvalResult:
    pairs = [(s.path, sample_classes[s.label]) for s in samples]
    return _evaluate_pairs(predictor, pairs, split, batch_size, workers)


def _evaluate_pairs(
    predictor: Predictor, pairs: Sequence[tuple[Path, str]], split: str, batch_size: int, workers: int | None
) -> EvalResult:
    index = {c: i for i, c in enumerate(predictor.classes)}
    unknown = sorted({c for _, c in pairs if c not in index})
    if unknown:
        raise DataError(f"class(es) {unknown} in the {split} data are not classes of this model ({predictor.classes})")
    paths = [p for p, _ in pairs]
    logits, kept, skipped = predictor.logits_for_paths(paths, batch_size, workers)
    labels = torch.tensor([index[pairs[i][1]] for i in kept], dtype=torch.long)
    return compute_metrics(logits, labels, predictor.classes, split, skipped)


def evaluate(
    run: Path | str,
    data: Path | str,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
) -> EvalResult:
    """Metrics of a trained run (its best checkpoint) on one labelled split of a dataset folder."""
    predictor = load(run, device)
    run_path = Path(run)
    run_dir = run_path if run_path.is_dir() else resolve_checkpoint(run_path).parent.parent
    pairs = eval_samples(Path(data), split, run_dir)
    return _evaluate_pairs(predictor, pairs, split, batch_size, workers)


@dataclass
class PredictResult:
    rows: list[Prediction]
    skipped: list[dict[str, str]]
    out: Path | None


def predict(
    run: Path | str,
    inputs: Sequence[str | Path],
    *,
    out: Path | str | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
) -> PredictResult:
    """Classify files, folders (recursively) and globs; optionally write the CSV `out`."""
    predictor = load(run, device)
    paths = expand_inputs(inputs)
    rows, skipped = predictor.predict(paths, top_k=top_k, batch_size=batch_size, workers=workers)
    if out is not None:
        write_predictions(Path(out), rows, max(1, min(top_k, len(predictor.classes))))
    return PredictResult(rows, skipped, Path(out) if out is not None else None)


__all__ = [
    "PredictResult",
    "TrainResult",
    "eval_samples",
    "evaluate",
    "load",
    "predict",
    "train",
]
