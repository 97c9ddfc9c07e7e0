"""One configuration model for a training run: YAML file + CLI flags -> validated, frozen `Config`.

Sections follow what a user tunes together (data, model, train) instead of one flat bag of flags, so that
functions can take the section they need. Every default is written out in the run folder's `config.yaml`,
so a run can be repeated from that file alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imgtune.errors import UserError
from imgtune.layouts import LabelRule
from imgtune.optim import OPTIMIZERS, SCHEDULES, OptimSettings, check_choice
from imgtune.tracking import check_monitor

Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["torch", "onnxruntime"]
CacheMode = Literal["auto", "ram", "none"]
Balance = Literal["none", "sampler", "weights"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
FeatureStoreMode = Literal["auto", "ram", "disk"]
ClipMode = Literal["norm", "value"]
BnPolicy = Literal["auto", "frozen", "train"]
Resize = Literal["crop", "squash", "pad"]
Pool = Literal["avg", "flatten"]
HeadInput = Literal["features", "images"]
BnStage1 = Literal["frozen", "train"]
LrScaling = Literal["none", "linear", "sqrt"]
HeadSolver = Literal["auto", "lbfgs", "sgd"]


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


def setting(default: Any = ..., help: str = "", *, when: str = "", unset: str = "", **checks: Any) -> Any:
    """A config key's declaration: its default and checks, `help` (one line: the CLI's --help and the docs),
    `when` (when to change it: the docs' option tables) and `unset` (what None means, e.g. "off"). The CLI
    flags and docs/options.md are generated from these (options.py), so they cannot drift apart."""
    extra: dict[str, JsonValue] = {k: v for k, v in (("when", when), ("unset", unset)) if v}
    return Field(default, description=help, json_schema_extra=extra or None, **checks)


class AugConfig(_Section):
    """Training augmentation, each parameter with the meaning of the torchvision transform of that name, applied
    to whole batches on the device (transforms.BatchAugment). A preset (data.augment) fills the keys the
    config does not set; config.yaml records them all."""

    rotate: float = setting(0.0, "RandomRotation(degrees): an angle uniform in +-rotate degrees", ge=0.0, le=180.0)
    scale: tuple[float, float] | None = setting(
        None, "RandomResizedCrop(scale): the crop's share of the image's area, a range", unset="no crop",
        when="e.g. [0.7, 1.0]; none keeps the whole image (then pad can shift it)",
    )  # fmt: skip
    ratio: tuple[float, float] = setting(
        (3 / 4, 4 / 3), "RandomResizedCrop(ratio): the crop's aspect ratio range (log-uniform)",
        when="[1, 1] for square crops only (the DLI fruit tutorial)",
    )  # fmt: skip
    hflip: float = setting(0.5, "RandomHorizontalFlip(p): probability of a mirror image", ge=0.0, le=1.0)
    vflip: float = setting(0.0, "RandomVerticalFlip(p): probability of an upside-down image", ge=0.0, le=1.0)
    brightness: float = setting(0.0, "ColorJitter(brightness): a factor uniform in [1-b, 1+b]", ge=0.0)
    contrast: float = setting(0.0, "ColorJitter(contrast): a factor uniform in [1-c, 1+c]", ge=0.0)
    saturation: float = setting(0.0, "ColorJitter(saturation): a factor uniform in [1-s, 1+s]", ge=0.0)
    hue: float = setting(
        0.0, "ColorJitter(hue): a hue shift uniform in +-hue of the colour circle", ge=0.0, le=0.5,
        when="keep it small when colour is the label: 0.05 = +-18 degrees (fruit, flowers)",
    )  # fmt: skip
    grayscale: float = setting(0.0, "RandomGrayscale(p): probability of a grey image", ge=0.0, le=1.0)
    pad: int = setting(
        0, "RandomCrop(padding=pad, reflect): a shift of up to pad pixels each way, borders reflected", ge=0,
        when="4 is the classic for 32-px CIFAR training",
    )  # fmt: skip
    erase: float = setting(
        0.0, "RandomErasing(p): probability of erasing one rectangle (2-33% of the area)", ge=0.0, le=1.0
    )

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, value: tuple[float, float] | None, info: Any) -> tuple[float, float] | None:
        if value is None:
            return value
        if not 0 < value[0] <= value[1] or (info.field_name == "scale" and value[1] > 1):
            raise ValueError(f"{info.field_name} must be a range [low, high] with 0 < low <= high (<= 1 for scale)")
        return value


# Augmentation presets: bundles of data.aug values (keys left out keep AugConfig's off values). Hue is kept
# small everywhere: colour is often the label (fruit, flowers).
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"hflip": 0.0},
    "light": {},
    "padcrop": {"pad": 4},  # the from-scratch classic for 32-px images: RandomCrop(32, padding=4) + flip
    "standard": {"scale": (0.6, 1.0), "rotate": 10.0, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                 "hue": 0.02},
    "strong": {"scale": (0.3, 1.0), "rotate": 15.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.05,
               "erase": 0.25},
}  # fmt: skip


class DataConfig(_Section):
    path: Path = setting(help="dataset folder: train/ + valid/ [+ test/], or one folder of class folders")
    img_size: int = setting(
        224, "square input size of the network, in pixels", ge=16, le=1024,
        when="smaller is much faster on a CPU; 96-128 is plenty for small images like Fashion-MNIST",
    )  # fmt: skip
    resize: Resize = setting(
        "crop", "how an image becomes img_size x img_size: crop (centre square), squash or pad (letterbox)",
        when="squash = the tutorials' Resize((S, S)), for images whose edges matter; pad keeps every pixel and the "
        "aspect (black borders). Train, eval, predict, serve and the ONNX export all use the run's policy",
    )  # fmt: skip
    train_aspect: float = setting(
        1.0, "resize crop: training crops (data.aug.scale) are drawn from up to this aspect ratio of each photo",
        ge=1.0, le=2.0,
        when="1 = from the centre square evaluation sees; 1.33 lets a random resized crop reach the strips of a "
        "4:3 photo outside it, as torchvision's RandomResizedCrop on the whole photo does (a 4 x S x 1.33 S "
        "uint8 cache: 1.8x the memory)",
    )  # fmt: skip
    batch_size: int = setting(
        32, "images per optimisation step", ge=1,
        when="with little memory keep it small and use --accumulate; `--batch-size auto` on a CUDA GPU probes "
        "fine-tuning steps from this size upwards (doubling, at most 1024) and keeps the largest that fits",
    )  # fmt: skip
    auto_batch: bool = setting(
        False, "CUDA: the largest batch (power-of-two steps from batch_size, at most 1024) that fits",
        when="the chosen size goes into the run's config.yaml; on a CPU the batch stays as it is",
    )  # fmt: skip
    augment: str = setting(
        "none", "training augmentation preset: a bundle of data.aug values (config.PRESETS)",
        when="none by default for the few fine-tuning epochs of the transfer recipe: on Fashion-MNIST, "
        "scikit-learn's digits and a colour folder it tested as well as or better than `standard`, which "
        "slowed convergence (docs/results.md); `standard` or `strong` for longer runs; `light`: flips only; "
        "`padcrop`: shift by up to 4 pixels (reflect-padded random crop) + flip, the classic for 32-px "
        "from-scratch training; `standard`: random resized crop (60-100%), flip, +-10 degree rotation, mild "
        "colour jitter with tiny hue (colour is often the label); `strong`: wider crops, more jitter, random "
        "erasing. It runs on whole batches on the device (the GPU when there is one). Any "
        "data.aug key overrides its preset's value: --set data.aug.hue=0.05",
    )  # fmt: skip
    aug: AugConfig = setting(AugConfig(), "the augmentation's parameters (the preset's, and any set here)")
    labels: str = setting(
        "folder", "where the classes are: folder (class folders), filename, or a CSV file of paths and classes",
        when="`filename` when the class is in the file name (food-11's training/3_127.jpg: class 3); a CSV such as "
        "Imagewoof's noisy_imagewoof.csv, or any file of path,label[,split] rows (see label_columns)",
    )  # fmt: skip
    label_pattern: str | None = setting(
        None, "labels filename: a regular expression whose first group is the class", unset="text before the first _",
        when=r"e.g. '^(\w+)-\d+' for cat-12.jpg; file names it does not match are unlabelled (a test folder)",
    )  # fmt: skip
    label_columns: list[str] | None = setting(
        None, "labels CSV: the columns of the image path, the class and (optionally) the split", unset="detected",
        when="detected when named path/file/image, label/class/noisy_labels_0 and split/is_valid; a split column "
        "holds train/valid/test (or True/False, as is_valid); without one imgtune splits the rows",
    )  # fmt: skip
    valid_fraction: float = setting(
        0.2, "share held out for validation when imgtune makes the split; 0: train without validation", ge=0.0, lt=1.0,
        when="0 trains on every image (CIFAR's 50,000): the last epoch is kept as best unless --monitor is a "
        "training metric (train_loss, train_acc); a labelled test/ folder is still evaluated",
    )  # fmt: skip
    split_file: Path | None = setting(
        None, "reuse a split.csv written by an earlier run (a labels CSV with a split column)",
        when="so that runs compare on the same images",
    )  # fmt: skip
    exclude: Path | None = setting(
        None, "images to leave out of training and validation: one path a line, or a CSV with a path column",
        when="`imgtune data issues`' issues.csv: train without the images it flags. Paths are as written there, "
        "or relative to the dataset folder; the test split is never changed. The run keeps its own copy",
    )  # fmt: skip
    relabel: Path | None = setting(
        None, "a CSV of path,label rows (or issues.csv's path,suggested): those images train with that label",
        when="after checking `data issues`' suggestions; the run keeps its own copy (RUN/relabel.csv)",
    )  # fmt: skip
    class_names: Path | None = setting(
        None, "JSON {folder name: display name}, e.g. flowers-102's cat_to_name.json",
        when="predictions, eval tables and the report show the display names; a dataset's own "
        "class_names.json (as `imgtune data` writes it) is used when this is unset",
    )  # fmt: skip
    cache: CacheMode = setting(
        "auto", "keep decoded, resized images in RAM (auto: when they take under 30% of free memory)",
        when="then no image is decoded twice; `none` for folders far larger than RAM",
    )  # fmt: skip
    workers: int | None = setting(
        None, "DataLoader worker processes", ge=0, unset="auto",
        when="auto: 0 on CPUs from the RAM cache (in-process wins on 2 cores), more when decoding from disk or "
        "feeding a GPU",
    )  # fmt: skip

    @field_validator("augment")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        return check_choice(PRESETS, name, "augmentation preset")

    @model_validator(mode="before")
    @classmethod
    def _preset_under_aug(cls, data: Any) -> Any:
        """data.aug = the preset's values, then the keys the config sets itself."""
        if not isinstance(data, dict):
            return data
        preset = PRESETS.get(str(data.get("augment", "none")), {})
        given = data.get("aug") or {}
        if isinstance(given, AugConfig):
            return data
        return {**data, "aug": {**preset, **given}}

    def label_rule(self) -> LabelRule:
        """Where this data's classes are, as layouts.py reads them."""
        return LabelRule.parse(self.labels, self.label_pattern, self.label_columns)


class ModelConfig(_Section):
    name: str = setting(
        "tf_efficientnet_lite0", "a timm model name or a built-in CNN (cnn5, vgg16_bn_cifar, resnet18_cifar)",
        when="any timm name (resnet50, vgg16.tv_in1k, convnext_tiny, ...; pretrained hub weights need internet); "
        "the built-in CNNs train from scratch (the scratch recipe is chosen for them)",
    )  # fmt: skip
    pretrained: bool = setting(
        True, "start from ImageNet weights (offline ones when packaged)",
        when="--scratch trains from random init (small CNNs, CIFAR-like data): no frozen stage, all layers from "
        "the first epoch",
    )  # fmt: skip
    weights: Path | None = setting(
        None, "start from this state dict (.pth, .safetensors) or imgtune checkpoint",
        when="e.g. hub weights downloaded elsewhere, or another run's best.pt",
    )  # fmt: skip
    head: list[int] = setting(
        [], "hidden sizes of an MLP head, comma-separated (none: a linear head)",
        when="`500` is the classic Linear(features, 500) -> ReLU -> Linear(500, N); for small data a linear head "
        "usually wins",
    )  # fmt: skip
    head_dropout: float = setting(0.0, "dropout after each hidden layer of an MLP head", ge=0.0, lt=1.0)
    widths: list[int] | None = setting(
        None, "built-in CNNs: the channels of each block (cnn5: 5, vgg16_bn_cifar: 5 stages)", unset="the model's own",
        when="food-11's CNN is cnn5 with 64,128,256,512,512; narrower for small data: vgg16_bn_cifar 32,64,128,256,256",
    )  # fmt: skip
    pool: Pool = setting(
        "avg", "built-in CNNs: global average pooling, or flatten the last feature map (ties the model to img_size)",
        when="flatten = the classic exercise CNNs' view(N, -1) before the MLP (512 x 4 x 4 at 128 px)",
    )  # fmt: skip
    keep_fc: int | None = setting(
        None, "VGG: keep this many of its pretrained fully-connected layers (1: fc6, 2: fc6 + fc7) before the head",
        unset="as timm builds it (fc6 and fc7)", ge=0, le=2,
        when="1 with head 500 is the DLI fruit tutorial's vgg.classifier[0:3] + Linear(4096, 500) + ReLU + Linear",
    )  # fmt: skip
    fc_dropout: float = setting(
        0.5, "VGG with keep_fc: dropout after each kept fully-connected layer (torchvision's 0.5)", ge=0.0, lt=1.0
    )
    dropout: float = setting(
        0.0, "dropout right before the classifier layer", ge=0.0, lt=1.0, when="for small datasets"
    )
    drop_path: float = setting(
        0.0, "stochastic depth: the rate at which residual branches are dropped (timm's drop_path_rate)", ge=0.0,
        lt=1.0, when="0.1-0.2 for longer fine-tuning of ViT, ConvNeXt or EfficientNet; timm models whose blocks "
        "have residual branches only",
    )  # fmt: skip
    mean: list[float] | None = setting(
        None, "input normalisation: the per-channel (R,G,B) mean on the 0-1 scale, as torchvision's Normalize",
        unset="the weights' own",
        when="a tutorial's Normalize(mean, std) for a model trained from scratch (0.5,0.5,0.5); a pretrained "
        "model is best fed as its weights were trained, so leave it unset there",
    )  # fmt: skip
    std: list[float] | None = setting(
        None, "input normalisation: the per-channel (R,G,B) standard deviation on the 0-1 scale",
        unset="the weights' own", when="set together with model.mean",
    )  # fmt: skip

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",")] if isinstance(value, str) else value

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if value is not None and (len(value) != 3 or (info.field_name == "std" and min(value) <= 0)):
            raise ValueError(f"three values, one per R, G, B channel{' (all > 0)' if info.field_name == 'std' else ''}")
        return value

    @model_validator(mode="after")
    def _mean_with_std(self) -> ModelConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("model.mean and model.std go together: set both, or neither")
        return self

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
    cycle_epochs: float | None = Field(None, gt=0.0)
    cycle_floor: float | None = Field(None, ge=0.0, lt=1.0)


class TrainConfig(_Registered):
    epochs_frozen: int = setting(
        30, "the head stage (stage 1): 0 skips it; a linear head on cached features is solved whatever N",
        ge=0,
        when="a linear head on cached features (the default) is solved to convergence by L-BFGS, so any N >= 1 "
        "gives the same head and metrics.csv has one stage-1 row; MLP heads, head_solver sgd and head_input "
        "images train N epochs (on features at least head_min_steps steps in all)",
    )  # fmt: skip
    epochs: int = setting(
        5, "fine-tuning epochs with the backbone trainable (stage 2)", ge=0,
        when="most of the run's time; 0 trains only the head (a linear probe). 5 after a solved head tested "
        "0.910 on the speed benchmark, 3 gave 0.903-0.906 in 65% of the time (docs/results.md)",
    )  # fmt: skip
    head_input: HeadInput = setting(
        "features", "stage 1 trains the head on cached backbone features, or on augmented image batches",
        when="images = the tutorials' frozen-backbone epochs: every batch of data.batch_size augmented images goes "
        "through the frozen backbone (slow: the backbone runs every epoch); features: once, then seconds",
    )  # fmt: skip
    head_solver: HeadSolver = setting(
        "auto", "stage 1 on cached features: solve a linear head (lbfgs) or train it in mini-batches (sgd)",
        when="auto = lbfgs for a linear head whose features fit in memory: full-batch L-BFGS on the run's loss "
        "with the weight decay picked on valid (the lowest valid loss on a grid from 1e-6 to 3.2), as "
        "linear-probe evaluations do; sgd = epochs of the configured optimizer and schedule (what MLP heads "
        "always get)",
    )  # fmt: skip
    head_min_steps: int = setting(
        500, "stage 1 trained on cached features (sgd): at least this many optimizer steps in all", ge=0,
        when="an epoch on features is N / feature_batch steps (5 for 1,150 images): epochs are added until "
        "the stage has this many; 0 runs exactly epochs_frozen",
    )  # fmt: skip
    feature_batch: int = setting(
        256, "stage 1 on cached features: features per optimizer step", ge=1,
        when="the head's steps per epoch are N / feature_batch: 32 makes an epoch the tutorials' number of steps",
    )  # fmt: skip
    feature_views: int = setting(
        1, "stage 1: cache features of K views per image (1 plain + K-1 augmented)", ge=1, le=64,
        when="each head epoch draws one view per image: augmentation for the head at the cost of K backbone "
        "passes in all",
    )  # fmt: skip
    feature_store: FeatureStoreMode = setting(
        "auto", "stage-1 features (fp16) in RAM or memory-mapped in RUN/cache/ (auto: RAM when they fit)",
        when="the memory-mapped file is deleted when stage 1 ends; auto = RAM under 30% of free memory",
    )  # fmt: skip
    lr: float = setting(
        1e-3, "stage-1 (head) LR; stage 2: head x finetune_lr_scale, backbone x backbone_lr_scale of that", gt=0.0,
        when="lower it if fine-tuning makes valid accuracy drop; `--lr auto` runs the LR finder before each "
        "stage and uses its suggestion (plots in the run folder)",
    )  # fmt: skip
    lr_find: bool = setting(False, "run the LR range test before each stage and use its suggestion (--lr auto)")
    lr_find_steps: int = setting(
        200, "optimizer steps of each stage's LR range test under --lr auto", ge=10,
        when="fewer for a quick look (the test stops early once the loss diverges); imgtune lr-find has --steps",
    )  # fmt: skip
    finetune_lr_scale: float = setting(
        0.5, "stage-2 head LR = lr x this (pretrained start)", gt=0.0,
        when="chosen by a sweep with backbone_lr_scale (docs/results.md)",
    )  # fmt: skip
    backbone_lr_scale: float = setting(
        1.0, "stage-2 backbone LR = stage-2 head LR x this", gt=0.0,
        when="measured on Fashion-MNIST: 0.2 cost 2 points of test accuracy (docs/results.md)",
    )  # fmt: skip
    lr_decay: float | None = setting(
        None, "layer-wise LR decay from head to stem", gt=0.0, le=1.0, unset="off",
        when="backbone block i of n (stem = 0) trains at head LR x D^(n-i); 0.7-0.8 protects the generic early "
        "layers",
    )  # fmt: skip
    unfreeze: int | None = setting(
        None, "stage 2 trains only the top N backbone blocks", ge=1, unset="all",
        when="timm's block grouping; for very small datasets, or for speed: --unfreeze 12 trains lite0 at "
        "2x the images/s of all layers (docs/speed.md)",
    )  # fmt: skip
    cache_frozen: bool = setting(
        True, "with --unfreeze: compute the frozen blocks' outputs once and run only the top blocks each step",
        when="EfficientNet/MobileNet backbones, no augmentation, no mixup/cutmix, no stochastic depth; the log "
        "says when it is not used and why. Costs 4 bytes per number of the frozen part's output in RAM",
    )  # fmt: skip
    optimizer: str = setting(
        "adamw", "optimizer, both stages",
        when="SGD (momentum, Nesterov; train.nesterov: false for plain momentum) for from-scratch recipes; Adam "
        "applies weight decay as L2, AdamW decoupled. optim.register_optimizer adds one",
    )  # fmt: skip
    momentum: float = setting(0.9, "SGD/RMSprop momentum", ge=0.0, lt=1.0)
    nesterov: bool = setting(True, "SGD: Nesterov momentum")
    weight_decay: float = setting(
        0.01, "weight decay, never on biases, norm weights and what the model's no_weight_decay() names",
        ge=0.0, when="timm's grouping: ViT position embeddings and class tokens are not decayed either",
    )  # fmt: skip
    schedule: str = setting(
        "cosine", "LR schedule, both stages",
        when="`constant`; `cosine` (per step, to 0); `onecycle` (per step: LR/25 -> LR at 25% -> ~0; its own "
        "warm-up); `step` (x gamma every step_size epochs); `multistep` (x gamma at each milestone); "
        "`exponential` (x gamma every epoch); `plateau` (x gamma after plateau_patience epochs without a better "
        "monitored value, e.g. --monitor train_loss); `cyclic` (triangular between cycle_floor x LR and LR every "
        "cycle_epochs). optim.register_schedule adds one",
    )  # fmt: skip
    warmup_fraction: float = setting(
        0.1, "share of a stage's steps spent warming up linearly", ge=0.0, lt=1.0,
        when="before any schedule but one-cycle; 0 switches it off",
    )  # fmt: skip
    step_size: int = setting(10, "step schedule: epochs between decays", ge=1)
    milestones: list[int] = setting([], "multistep schedule: the epochs of the decays, comma-separated")
    gamma: float = setting(0.1, "decay factor of step/multistep/exponential/plateau", gt=0.0, le=1.0)
    plateau_patience: int = setting(2, "plateau schedule: epochs without improvement before a decay", ge=1)
    cycle_epochs: float = setting(
        4.0, "cyclic schedule: epochs per up-and-down cycle", gt=0.0,
        when="Smith's CLR: 2-10 epochs' worth of steps per half cycle in his experiments",
    )  # fmt: skip
    cycle_floor: float = setting(0.1, "cyclic schedule: the lowest LR, as a share of the LR", ge=0.0, lt=1.0)
    stage1: StageOverrides = setting(
        StageOverrides(), "the head stage's own optimizer, lr, schedule, ... (unset: the values above)",
        when="e.g. --set train.stage1.schedule=constant",
    )  # fmt: skip
    stage2: StageOverrides = setting(
        StageOverrides(), "the fine-tuning stage's own optimizer, lr, schedule, ... (unset: the values above)",
        when="e.g. --set train.stage2.optimizer=sgd --set train.stage2.lr=1e-3",
    )  # fmt: skip
    label_smoothing: float = setting(
        0.1, "label smoothing", ge=0.0, lt=1.0, when="0 when you need calibrated probabilities out of training"
    )
    mixup: float = setting(
        0.0, "probability of mixing a batch with mixup (alpha 0.2, soft targets)", ge=0.0, le=1.0,
        when="for long from-scratch runs, rarely for short fine-tuning",
    )  # fmt: skip
    cutmix: float = setting(0.0, "probability of mixing a batch with cutmix (alpha 1.0)", ge=0.0, le=1.0)
    grad_clip: float | None = setting(
        None, "clip gradients to this norm (or value)", gt=0.0, unset="off", when="when losses spike"
    )
    grad_clip_mode: ClipMode = setting("norm", "clip the gradients' norm or each value")
    accumulate: int = setting(
        1, "batches per optimizer step", ge=1, when="an effective batch of K x batch size when memory is short"
    )
    ema: float | None = setting(
        0.99, "weight EMA decay in stage 2 (null: off)", gt=0.0, lt=1.0, unset="off",
        when="timm's warm-up (update t uses min(D, (1+t)/(10+t))); the averaged weights are validated, "
        "checkpointed and used for prediction, metrics.csv's raw_valid_acc shows the raw ones at the stage's "
        "last epoch. It keeps the first fine-tuning epoch from undoing the solved head (docs/results.md); the "
        "scratch recipe switches it off",
    )  # fmt: skip
    balance: Balance = setting(
        "none", "imbalanced classes: a class-balanced sampler or inverse-frequency loss weights",
        when="`sampler` draws every class equally often, `weights` weights the loss by 1/frequency",
    )  # fmt: skip
    monitor: str = setting(
        "valid_acc", "the metric that picks best.pt, stops a stage early and drives the plateau schedule",
        when="macro_f1 / balanced_acc for imbalanced classes; tracking.register_monitor adds one",
    )  # fmt: skip
    patience: int | None = setting(
        3, "stop fine-tuning after N epochs without a better monitored value", ge=1, unset="off",
        when="--set train.patience=null switches early stopping off",
    )  # fmt: skip
    bn: BnPolicy = setting(
        "auto", "BatchNorm statistics while fine-tuning (auto: frozen after pretraining, updated from scratch)",
        when="`train` when your images are close to ImageNet and batches are large; on data far from ImageNet "
        "batch statistics wreck the head stage 1 trained (docs/results.md)",
    )  # fmt: skip
    bn_frozen_stage: BnStage1 = setting(
        "frozen", "BatchNorm statistics in the head stage",
        when="`train` adapts them to your data while the weights stay frozen; the stage then runs on augmented "
        "images epoch by epoch instead of cached features (slow; as head_input: images)",
    )  # fmt: skip
    max_nonfinite: int = setting(20, "stop after this many steps with a non-finite loss", ge=0)
    max_minutes: float | None = setting(
        None, "time budget: no epoch starts after this many minutes", gt=0, unset="none",
        when="what compare --budget-minutes sets; at least one epoch always runs",
    )  # fmt: skip
    calibrate: bool = setting(
        False, "fit temperature scaling on valid at the end; stored in best.pt, used by predict",
        when="when you use the probabilities, not just the labels",
    )  # fmt: skip
    report: bool = setting(True, "write RUN/plots/ and RUN/report.html at the end")
    lr_scaling: LrScaling = setting(
        "none", "under torchrun: LRs x number of processes (linear), x its square root (sqrt), or as given",
        when="`none` uses the LRs as given for the larger global batch",
    )  # fmt: skip
    sync_bn: bool = setting(
        False, "under torchrun on GPUs: BatchNorm statistics over the global batch",
        when="for small per-GPU batches from scratch",
    )  # fmt: skip
    precision: Precision = setting(
        "auto", "autocast: auto = bf16 on CUDA (fp16 without bf16); on CPUs fp32 training, bf16 inference where native",
        when="on CPUs bf16 training measured ~2x slower than fp32; bf16 inference (stage-1 features, validation, "
        "the test evaluation) 2.2-2.5x faster where the CPU has AVX-512 BF16 / AMX. fp32 means fp32 everywhere. "
        "A non-finite loss under autocast switches the run to fp32 with a warning",
    )  # fmt: skip
    compile: bool = setting(
        False, "compile the model with torch.compile for fine-tuning and evaluation",
        when="on a 2-core CPU it cost 20-50 s per mode and gained nothing under bf16: for long GPU runs",
    )  # fmt: skip
    deterministic: bool = setting(False, "PyTorch's deterministic algorithms (and no cuDNN autotuning)")
    tensorboard: bool = setting(
        False, "log to RUN/tensorboard/: per-step loss and LR, per-epoch metrics, images, hyperparameters",
        when="pip install 'imgtune[tensorboard]'; then tensorboard --logdir runs",
    )  # fmt: skip
    mlflow: bool = setting(
        False, "log the run to MLflow: parameters, per-epoch metrics, report and best.pt as artifacts",
        when="pip install 'imgtune[mlflow]'; the store is MLFLOW_TRACKING_URI, else ./mlruns (mlflow ui shows it)",
    )  # fmt: skip

    _monitor = field_validator("monitor")(check_monitor)

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
            cycle_epochs=pick("cycle_epochs"),
            cycle_floor=pick("cycle_floor"),
        )


class Config(_Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    out: Path | None = setting(None, "run folder; must be new or empty", unset="runs/<data name>, numbered if taken")
    seed: int = setting(
        0, "random seed: split, init, shuffling, augmentation, workers",
        when="the same seed on a CPU gives the same metrics.csv",
    )  # fmt: skip
    device: Device = setting("auto", "auto (a CUDA GPU when there is one), cpu or cuda")

    @field_validator("out", mode="before")
    @classmethod
    def _empty_out_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _erasing_moved(cls, data: Any) -> Any:
        """train.random_erasing (config.yaml of runs before data.aug) is data.aug.erase now."""
        train = data.get("train") if isinstance(data, dict) else None
        if not isinstance(train, dict) or "random_erasing" not in train:
            return data
        train = dict(train)
        erase = train.pop("random_erasing")
        section = dict(data.get("data") or {})
        section["aug"] = {"erase": erase, **(section.get("aug") or {})}
        return {**data, "train": train, "data": section}

    @model_validator(mode="after")
    def _something_to_train(self) -> Config:
        if self.train.epochs_frozen == 0 and self.train.epochs == 0:
            raise ValueError("train.epochs_frozen and train.epochs are both 0: nothing would be trained")
        return self

    @model_validator(mode="after")
    def _solver_fits_head(self) -> Config:
        if self.train.head_solver == "lbfgs" and self.model.head:
            raise ValueError(
                f"train.head_solver lbfgs solves a linear head, but model.head {self.model.head} is an MLP: "
                "use auto or sgd (MLP heads train in mini-batches)"
            )
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
            "ema": None,
        },
    },
}


def resolve(
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    explicit: Mapping[str, Any] | None = None,
    recipe: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """build_config with a recipe's defaults under everything else: `recipe`, or the one the model calls for
    (scratch for the built-in CNNs, else transfer). What `imgtune train` and `imgtune.train(...)` both do."""
    from imgtune.scratch import is_builtin

    cfg = build_config(file, overrides, base=base, explicit=explicit)
    chosen = recipe or ("scratch" if is_builtin(cfg.model.name) else "transfer")
    if chosen not in RECIPES:
        raise ConfigError(f"recipe {chosen!r}: choose one of {', '.join(RECIPES)}")
    if not RECIPES[chosen]:
        return cfg
    logging.getLogger(__name__).info("recipe: %s", chosen)
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in RECIPES[chosen].items()}
    for key, value in (base or {}).items():  # a base config (a Config's values) wins over the recipe
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, Mapping) else value
    return build_config(file, overrides, base=merged, explicit=explicit)


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
            loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {file}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not a text file (byte {e.start} is not UTF-8); give a YAML file") from None
        except OSError as e:
            raise ConfigError(f"{file}: cannot read the config file ({e.strerror})") from None
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
    given = {**{k: v for k, v in (overrides or {}).items() if v is not None}, **(explicit or {})}
    if "data.augment" in given and isinstance(tree.get("data"), dict):
        tree["data"].pop("aug", None)  # the file's data.aug came with the file's preset; --set data.aug.* still applies
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
