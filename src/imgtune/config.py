"""One configuration model for a training run: YAML file + CLI flags -> validated, frozen `Config`.

Sections follow what a user tunes together (data, model, train) instead of one flat bag of flags, so that
functions can take the section they need. Every default is written out in the run folder's `config.yaml`,
so a run can be repeated from that file alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgtune.errors import UserError
from imgtune.optim import OPTIMIZERS, SCHEDULES, OptimSettings, check_choice

Augment = Literal["none", "light", "padcrop", "standard", "strong"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["torch", "onnxruntime"]
CacheMode = Literal["auto", "ram", "none"]
Monitor = Literal["valid_acc", "valid_loss", "macro_f1", "balanced_acc"]
Balance = Literal["none", "sampler", "weights"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
FeatureStoreMode = Literal["auto", "ram", "disk"]
ClipMode = Literal["norm", "value"]
BnPolicy = Literal["auto", "frozen", "train"]
BnStage1 = Literal["frozen", "train"]
LrScaling = Literal["none", "linear", "sqrt"]


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key, repeats the value and lists choices."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _registered_optimizer(name: str | None) -> str | None:
    return None if name is None else check_choice(OPTIMIZERS, name, "optimizer")


def _registered_schedule(name: str | None) -> str | None:
    return None if name is None else check_choice(SCHEDULES, name, "schedule")


class _Registered(_Section):
    """Sections with optimizer/schedule keys: names from the registries (optim.register_optimizer/_schedule),
    checked when the config loads, so a name registered by the user's own code is valid too."""

    _optimizer = field_validator("optimizer", check_fields=False)(_registered_optimizer)
    _schedule = field_validator("schedule", check_fields=False)(_registered_schedule)


class DataConfig(_Section):
    path: Path = Field(description="dataset folder: train/ + valid/ [+ test/], or one folder of class folders")
    img_size: int = Field(224, ge=16, le=1024, description="square input size of the network, in pixels")
    batch_size: int = Field(32, ge=1, description="images per optimisation step")
    auto_batch: bool = Field(
        False, description="CUDA: the largest batch (power-of-two steps from batch_size, at most 1024) that fits"
    )
    augment: Augment = Field("standard", description="training augmentation preset")
    valid_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share held out when imgtune splits")
    split_file: Path | None = Field(None, description="reuse a split.csv written by an earlier run")
    class_names: Path | None = Field(None, description="JSON {folder name: display name}, e.g. cat_to_name.json")
    cache: CacheMode = Field("auto", description="keep decoded, resized images in RAM (auto: when they fit)")
    workers: int | None = Field(None, ge=0, description="DataLoader worker processes (None: chosen for you)")


class ModelConfig(_Section):
    name: str = Field("tf_efficientnet_lite0", description="timm model name or a built-in one")
    pretrained: bool = Field(True, description="start from ImageNet weights (offline ones when packaged)")
    weights: Path | None = Field(None, description="start from this state-dict or imgtune checkpoint file")
    head: list[int] = Field(default_factory=list, description="hidden sizes of an MLP head ([] = linear)")
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer of the head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier layer")

    @field_validator("head")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError(f"hidden sizes must be positive, got {value}")
        return value


class StageOverrides(_Registered):
    """Per-stage values; anything left unset falls back to the train section's value."""

    optimizer: str | None = None
    lr: float | None = Field(None, gt=0.0)
    schedule: str | None = None
    weight_decay: float | None = Field(None, ge=0.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    warmup_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    step_size: int | None = Field(None, ge=1)
    milestones: list[int] | None = None
    gamma: float | None = Field(None, gt=0.0, le=1.0)
    plateau_patience: int | None = Field(None, ge=1)


class TrainConfig(_Registered):
    epochs_frozen: int = Field(30, ge=0, description="head-only epochs (cheap: run on cached features)")
    epochs: int = Field(8, ge=0, description="fine-tuning epochs with the backbone trainable")
    feature_views: int = Field(
        1, ge=1, le=64, description="stage 1: cache features of K views per image (plain + K-1 augmented)"
    )
    feature_store: FeatureStoreMode = Field(
        "auto", description="stage-1 features in RAM (fp16) or memory-mapped in RUN/cache/ (auto: RAM if they fit)"
    )
    lr: float = Field(1e-3, gt=0.0, description="head learning rate in stage 1; stage 2 scales it down")
    lr_find: bool = Field(False, description="run the LR range test before each stage and use its suggestion")
    finetune_lr_scale: float = Field(0.5, gt=0.0, description="stage-2 head LR = lr * this (pretrained start)")
    backbone_lr_scale: float = Field(1.0, gt=0.0, description="stage-2 backbone LR = stage-2 head LR * this")
    lr_decay: float | None = Field(None, gt=0.0, le=1.0, description="layer-wise LR decay from head to stem")
    unfreeze: int | None = Field(None, ge=1, description="stage 2 trains only the top N backbone blocks")
    optimizer: str = Field("adamw", description="optimizer, both stages (optim.register_optimizer adds one)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD/RMSprop momentum")
    nesterov: bool = True
    weight_decay: float = Field(0.01, ge=0.0, description="not applied to biases and norm weights")
    schedule: str = Field("cosine", description="LR schedule, both stages (optim.register_schedule adds one)")
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of a stage's steps spent warming up")
    step_size: int = Field(10, ge=1, description="step schedule: epochs between decays")
    milestones: list[int] = Field(default_factory=list, description="multistep schedule: epochs of the decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="decay factor of step/multistep/exponential/plateau")
    plateau_patience: int = Field(2, ge=1, description="plateau schedule: epochs without improvement")
    stage1: StageOverrides = Field(default_factory=StageOverrides, description="head stage's own settings")
    stage2: StageOverrides = Field(default_factory=StageOverrides, description="fine-tuning stage's own settings")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0, le=1.0, description="probability of mixing a batch with mixup")
    cutmix: float = Field(0.0, ge=0.0, le=1.0, description="probability of mixing a batch with cutmix")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of erasing a random patch")
    grad_clip: float | None = Field(None, gt=0.0, description="clip gradients to this norm (or value)")
    grad_clip_mode: ClipMode = "norm"
    accumulate: int = Field(1, ge=1, description="batches per optimizer step")
    ema: float | None = Field(None, gt=0.0, lt=1.0, description="weight EMA decay in stage 2, e.g. 0.999")
    balance: Balance = "none"
    monitor: Monitor = Field("valid_acc", description="metric that picks the best checkpoint")
    patience: int | None = Field(3, ge=1, description="stop fine-tuning after N epochs without improvement")
    bn: BnPolicy = Field("auto", description="BatchNorm statistics while fine-tuning (auto: frozen if pretrained)")
    bn_frozen_stage: BnStage1 = Field("frozen", description="BatchNorm in the head stage: frozen or train")
    max_nonfinite: int = Field(20, ge=0, description="stop after this many steps with a non-finite loss")
    max_minutes: float | None = Field(None, gt=0, description="time budget: no new epoch starts after this")
    calibrate: bool = Field(False, description="fit temperature scaling on valid; stored in best.pt, used by predict")
    report: bool = Field(True, description="write RUN/plots/ and RUN/report.html at the end")
    lr_scaling: LrScaling = Field(
        "none", description="under torchrun: LRs x world size (linear) or x its square root (sqrt), or as given"
    )
    sync_bn: bool = Field(False, description="under torchrun on GPUs: BatchNorm statistics over the global batch")
    precision: Precision = Field(
        "auto",
        description="auto: bf16 on CUDA (fp16 if no bf16); on CPUs fp32 training, bf16 inference where native",
    )
    compile: bool = Field(False, description="torch.compile the model for fine-tuning and evaluation")
    deterministic: bool = Field(False, description="PyTorch deterministic algorithms")
    tensorboard: bool = Field(False, description="also log to RUN/tensorboard/")

    def optim_settings(self, stage: int, pretrained: bool) -> OptimSettings:
        """One stage's optimizer/schedule settings: stage overrides > train values > recipe defaults."""
        over = self.stage1 if stage == 1 else self.stage2
        lr = self.lr if stage == 1 or not pretrained else self.lr * self.finetune_lr_scale

        def pick(name: str) -> Any:
            value = getattr(over, name)
            return getattr(self, name) if value is None else value

        return OptimSettings(
            optimizer=pick("optimizer"),
            lr=over.lr if over.lr is not None else lr,
            momentum=pick("momentum"),
            nesterov=self.nesterov,
            weight_decay=pick("weight_decay"),
            schedule=pick("schedule"),
            warmup_fraction=pick("warmup_fraction"),
            step_size=pick("step_size"),
            milestones=tuple(pick("milestones")),
            gamma=pick("gamma"),
            plateau_patience=pick("plateau_patience"),
        )


class Config(_Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    out: Path | None = Field(None, description="run folder (default: runs/<dataset name>, numbered if taken)")
    seed: int = 0
    device: Device = "auto"

    @field_validator("out", mode="before")
    @classmethod
    def _empty_out_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _something_to_train(self) -> Config:
        if self.train.epochs_frozen == 0 and self.train.epochs == 0:
            raise ValueError("train.epochs_frozen and train.epochs are both 0: nothing would be trained")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False)

    def to_plain(self) -> dict[str, Any]:
        """JSON/YAML-safe dict (paths as strings): what goes into config.yaml and checkpoints."""
        return self.model_dump(mode="json")


# Bundles of defaults under the user's file and flags. "scratch" is the classic from-scratch recipe for small
# images (CIFAR-style ResNet/VGG training): SGD + Nesterov momentum, weight decay 5e-4, one-cycle to LR 0.1 at
# batch 128, pad-and-crop + flip, label smoothing, no early stop (a one-cycle schedule must run to its end).
RECIPES: dict[str, dict[str, Any]] = {
    "transfer": {},
    "scratch": {
        "model": {"pretrained": False},
        "data": {"img_size": 32, "batch_size": 128, "augment": "padcrop"},
        "train": {
            "epochs_frozen": 0,
            "epochs": 30,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "schedule": "onecycle",
            "label_smoothing": 0.1,
            "patience": None,
        },
    },
}


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = _section_at(e["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else ""
            msg = f"unknown key; valid keys here: {valid}" if valid else "unknown key"
            lines.append(f"{loc}: {msg}")
            continue
        lines.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[leaf] = value


def build_config(
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    explicit: Mapping[str, Any] | None = None,
) -> Config:
    """Merge base dict < YAML file < dotted overrides (e.g. {"train.lr": 3e-4}) < explicit settings.

    None in `overrides` means "flag not given" and is skipped; `explicit` (from --set) applies None too,
    so `--set train.patience=null` switches early stopping off.
    """
    tree: dict[str, Any] = {}
    if base:
        for k, v in base.items():
            tree[k] = dict(v) if isinstance(v, Mapping) else v
    if file is not None:
        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {file}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping at the top level, got {type(loaded).__name__}")
        for k, v in loaded.items():
            if isinstance(v, dict) and isinstance(tree.get(k), dict):
                tree[k].update(v)
            else:
                tree[k] = v
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for key, value in (explicit or {}).items():
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        where = f" (from {file})" if file else ""
        raise ConfigError(_format_error(e) + where) from None
