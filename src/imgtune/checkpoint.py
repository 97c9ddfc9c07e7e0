"""The checkpoint format: one typed record of what a checkpoint holds, and the only code that writes or reads
its payload.

A payload is a dict of tensors and plain Python values only, so `torch.load(weights_only=True)` reads it and
nothing in it can execute code. Its keys are the record's fields (`train_state` nested, for last.pt), plus
`format` and `version`. Version history:
  1  train_state["trainer"]: the loop counters and the tracking state in one dict
  2  train_state["loop"] (epoch, stage, ...) and train_state["tracker"] (rows, best, patience) apart
A version-1 file still loads (its train_state is split on reading) and resumes; a file from a newer imgtune
is refused with a message that says to upgrade.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgtune.distributed import Dist
from imgtune.errors import TrainingError, UserError
from imgtune.files import atomic_write_bytes
from imgtune.runs import RunFolder
from imgtune.transforms import Preprocessing

log = logging.getLogger(__name__)
FORMAT = "imgtune-checkpoint"
VERSION = 2
_LOOP_KEYS = ("epoch", "stage", "stage_epochs_done", "stopped_early", "skipped_steps")  # version 1's split


class CheckpointError(UserError, ValueError):
    """A file is not a usable imgtune checkpoint; the message names the file."""


@dataclass
class TrainState:
    """What last.pt adds to the weights for an exact resume: the state of everything that changes while
    training, this rank's random streams and, when stopped mid-epoch, where in the epoch it was."""

    loop: dict[str, Any]  # engine.LoopState: epoch, stage, epochs done in the stage, ...
    tracker: dict[str, Any]  # tracking.Tracker.state_dict(): metrics rows, best epoch, patience
    raw_state_dict: dict[str, torch.Tensor]  # the trained weights (state_dict holds the EMA's, if any)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]  # rank 0's, as rng.rng_state() captures it
    in_epoch: dict[str, Any] | None = None  # set when stopped mid-epoch: batches done, the epoch's RNG, sums
    world_size: int = 1
    amp: str | None = None  # the autocast dtype still in use (None: fp32, e.g. after a non-finite fallback)
    ema_n_averaged: torch.Tensor | None = None
    ranks: list[dict[str, Any]] | None = None  # under torchrun: every rank's {rng, in_epoch}

    def for_rank(self, rank: int, world: int, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(random streams, in-epoch position) for `rank` of `world` processes. Another number of processes
        cannot continue inside an epoch (the shards differ); at an epoch boundary it can, with fresh per-rank
        random streams (then not bit for bit)."""
        if self.world_size == world:
            own: dict[str, Any] = self.ranks[rank] if self.ranks else {"rng": self.rng, "in_epoch": self.in_epoch}
            return own["rng"], own["in_epoch"]
        if self.in_epoch is not None:
            raise TrainingError(
                f"{path} was written mid-epoch by {self.world_size} process(es); resume it with the same number "
                f"(torchrun --nproc-per-node ...), not {world}"
            )
        log.warning("resuming a %d-process run with %d processes: it continues, but not bit for bit",
                    self.world_size, world)  # fmt: skip
        return self.rng, None

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> TrainState:
        data = dict(data)
        if "trainer" in data:  # version 1: one dict for the loop and the tracking state
            old = data.pop("trainer")
            data["loop"] = {k: old[k] for k in _LOOP_KEYS}
            data["tracker"] = {k: v for k, v in old.items() if k not in _LOOP_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Checkpoint:
    """Everything a checkpoint file holds. Predict, eval, export and serve need nothing else."""

    arch: dict[str, Any]  # models.create_model's record: name, num_classes, head, mean/std, ...
    classes: list[str]  # class folder names in index order (what data is matched by)
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]  # the weights to predict with (the EMA's when weight EMA is on)
    class_names: list[str] | None = None  # display names, when they differ from the folder names
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config (config.yaml)
    epoch: int = 0  # epochs trained when written (global, over both stages)
    stage: int = 0
    best_valid_acc: float = 0.0
    best_epoch: int = 0
    temperature: float = 1.0  # temperature scaling fitted by --calibrate / imgtune calibrate (1: none)
    train_state: TrainState | None = None  # last.pt only
    versions: dict[str, str] = field(default_factory=dict)  # packages.versions() of the run that wrote it

    @property
    def display_names(self) -> list[str]:
        return list(self.class_names or self.classes)

    def describe(self) -> dict[str, Any]:
        """The plain values (no weights, no training state): what a Predictor shows as `checkpoint`."""
        return {
            "arch": self.arch, "classes": self.classes, "class_names": self.display_names,
            "preprocessing": self.preprocessing.to_dict(), "config": self.config, "epoch": self.epoch,
            "stage": self.stage, "best_valid_acc": self.best_valid_acc, "best_epoch": self.best_epoch,
            "temperature": self.temperature, "versions": self.versions,
        }  # fmt: skip

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, **self.describe()}
        payload["state_dict"] = self.state_dict
        if self.train_state is not None:  # not dataclasses.asdict: it would deep-copy every tensor
            payload["train_state"] = {f.name: getattr(self.train_state, f.name) for f in dataclasses.fields(TrainState)}
        return payload

    @classmethod
    def from_payload(cls, data: dict[str, Any], path: Path) -> Checkpoint:
        for key in ("arch", "state_dict", "classes", "preprocessing"):
            if key not in data:
                raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
        try:
            prep = Preprocessing.from_dict(data["preprocessing"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable preprocessing record ({e})") from None
        train_state = data.get("train_state")
        return cls(
            arch=dict(data["arch"]),
            classes=list(data["classes"]),
            preprocessing=prep,
            state_dict=data["state_dict"],
            class_names=list(data["class_names"]) if data.get("class_names") else None,
            config=dict(data.get("config") or {}),
            epoch=int(data.get("epoch", 0)),
            stage=int(data.get("stage", 0)),
            best_valid_acc=float(data.get("best_valid_acc", 0.0)),
            best_epoch=int(data.get("best_epoch", 0)),
            temperature=float(data.get("temperature", 1.0)),
            train_state=TrainState.from_payload(train_state) if train_state else None,
            versions={str(k): str(v) for k, v in (data.get("versions") or {}).items()},
        )


class CheckpointSaver:
    """The one writer of a run's checkpoints/best.pt and last.pt (timm's CheckpointSaver plays this part).
    Each is the run's template (what every checkpoint of the run says: arch, classes, preprocessing, config)
    filled with weights and progress; last.pt adds the training state. Under torchrun every rank calls `save`
    together: last.pt keeps each rank's random streams and place in its shard, and rank 0 writes."""

    def __init__(self, run: RunFolder, template: Checkpoint, dist: Dist) -> None:
        self.run, self.template, self.dist = run, template, dist

    def save(self, kind: str, weights: dict[str, torch.Tensor], train_state: TrainState, **progress: Any) -> None:
        """kind: best or last; progress: epoch, stage, best_valid_acc, best_epoch. Non-finite weights never
        replace a good file."""
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingError(
                f"weights became non-finite ({bad[:3]}...); {kind}.pt was not overwritten and keeps the last "
                "finite weights. Lower the LR or add --grad-clip."
            )
        ranks = self.dist.gather_objects({"rng": train_state.rng, "in_epoch": train_state.in_epoch})
        if not self.dist.is_main:
            return
        state = dataclasses.replace(train_state, ranks=ranks if self.dist.enabled else None)
        checkpoint = dataclasses.replace(
            self.template, state_dict=weights, train_state=state if kind == "last" else None, **progress
        )
        if kind == "best":
            save_checkpoint(self.run.best, checkpoint)
            return
        # last.prev.pt := the old last.pt only once the new one is complete: a hard link shares the file, so
        # linking first left both names on one inode for the whole write (a kill then, and damage to last.pt
        # in place, took the fallback with it - found by test_resume's kill-at-a-random-moment test)
        save_checkpoint(self.run.last, checkpoint, lambda: keep_previous(self.run.last, self.run.last_prev))


def keep_previous(path: Path, previous: Path) -> None:
    """previous := path, without a moment where path is missing: a hard link renamed into place (a copy where
    the file system has no links). Called by the writer of the new path just before it replaces the old one."""
    if not path.is_file() or not zipfile.is_zipfile(path):  # only a whole file is worth falling back to
        return
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def save_checkpoint(path: Path, checkpoint: Checkpoint, before_replace: Callable[[], None] | None = None) -> None:
    buf = io.BytesIO()
    torch.save(checkpoint.to_payload(), buf)
    atomic_write_bytes(path, buf.getvalue(), before_replace)


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True and a clear error; never falls back to unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        with path.open("rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):  # torch's zip format, cut short: its directory is gone
            raise CheckpointError(
                f"{path}: damaged or truncated (not a whole checkpoint file, {path.stat().st_size:,} bytes); "
                + _damage_hint(path)
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: not a plain-tensor checkpoint, or damaged ({first[:300]})"
        ) from None


def _damage_hint(path: Path) -> str:
    """What to do instead, from where the file sits in a run folder."""
    folder = path.parent.parent
    if path.name == "best.pt" and path.parent.name == "checkpoints":
        return (f"use {path.with_name('last.pt')} (the latest epoch) where it is whole, copy best.pt again if "
                f"it came from elsewhere, or train again")  # fmt: skip
    if path.name == "last.pt" and path.parent.name == "checkpoints":
        return (f"`imgtune train --resume {folder}` falls back to last.prev.pt (one save earlier) where it is "
                f"whole; else start the run again")  # fmt: skip
    return "copy it again or train again"


def is_checkpoint_payload(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_checkpoint(path: Path) -> Checkpoint:
    data = safe_torch_load(path)
    if not is_checkpoint_payload(data):
        raise CheckpointError(f"{path}: not an imgtune checkpoint (no '{FORMAT}' marker)")
    if int(data.get("version", 1)) > VERSION:
        raise CheckpointError(
            f"{path}: written by a newer imgtune (checkpoint format {data['version']}, this one reads up to "
            f"{VERSION}); upgrade imgtune (pip install -U imgtune) to use it"
        )
    return Checkpoint.from_payload(data, Path(path))


def set_temperature(path: Path, temperature: float) -> None:
    """Store a fitted temperature in a checkpoint file (predict, eval, export and serve read it from there)."""
    save_checkpoint(path, dataclasses.replace(load_checkpoint(path), temperature=temperature))


def resolve_checkpoint(run: Path) -> Path:
    """RUN may be a run folder (-> checkpoints/best.pt, else last.pt) or a checkpoint file."""
    run = Path(run)
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = run / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{run}: no checkpoints/best.pt or checkpoints/last.pt in this run folder")
    if run.is_file():
        return run
    raise CheckpointError(f"{run}: no such run folder or checkpoint file")
