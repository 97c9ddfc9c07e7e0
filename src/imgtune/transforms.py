"""Preprocessing (deterministic, stored in checkpoints) and augmentation presets (training only).

Pipeline: decode -> `prepare` (resize shorter side to the input size, centre crop: uint8, cacheable) ->
augmentation on uint8 tensors (train only) -> the model normalises inside its forward pass.
Eval, predict, the feature cache and the server all use `prepare`, so they see exactly the same pixels.
Normalisation lives in the model so an exported model needs nothing but RGB pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from imgtune.config import Augment

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image into model input; travels in every checkpoint."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "shorter-side"  # resize the shorter side to img_size ...
    crop: str = "center"  # ... then crop the centre img_size x img_size

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_INTERPOLATION)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            img_size=int(d["img_size"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
        )

    @property
    def mode(self) -> InterpolationMode:
        return _INTERPOLATION[self.interpolation]


def prepare(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 CHW of any size -> uint8 3 x S x S: shorter side to S (antialiased), centre crop."""
    s = prep.img_size
    h, w = image.shape[-2:]
    if min(h, w) != s:
        image = F.resize(image, [s], interpolation=prep.mode, antialias=True)
    if image.shape[-2:] != (s, s):
        image = F.center_crop(image, [s, s])
    return image


def augmentation(preset: Augment, prep: Preprocessing, random_erasing: float = 0.0) -> v2.Transform:
    """Random transforms on the prepared uint8 image. Hue is kept small: colour often is the label."""
    s = prep.img_size
    crop = lambda lo: v2.RandomResizedCrop(  # noqa: E731
        s, scale=(lo, 1.0), ratio=(3 / 4, 4 / 3), interpolation=prep.mode, antialias=True
    )
    presets: dict[str, list[v2.Transform]] = {
        "none": [],
        "light": [v2.RandomHorizontalFlip()],
        # the from-scratch classic for small images: shift by up to 1/8 of the size, mirror
        "padcrop": [v2.RandomCrop(s, padding=max(1, s // 8), padding_mode="reflect"), v2.RandomHorizontalFlip()],
        "standard": [
            crop(0.6),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10, interpolation=InterpolationMode.BILINEAR),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ],
        "strong": [
            crop(0.3),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15, interpolation=InterpolationMode.BILINEAR),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05),
            v2.RandomErasing(p=0.25, value=0),
        ],
    }
    steps = presets[preset]
    if random_erasing > 0:  # cutout: one random rectangle per image set to zero
        steps = [t for t in steps if not isinstance(t, v2.RandomErasing)] + [
            v2.RandomErasing(p=random_erasing, value=0)
        ]
    return v2.Compose(steps)


class BatchMix:
    """Mixup / cutmix on a batch, each with its own probability; always returns soft targets.

    Works on [0, 1] float images (uint8 batches are converted), which the model accepts as well.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        self.num_classes, self.p_mixup, self.p_cutmix = num_classes, mixup, cutmix
        self.mixup = v2.MixUp(alpha=0.2, num_classes=num_classes)
        self.cutmix = v2.CutMix(alpha=1.0, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        r = float(torch.rand(()))
        if r < self.p_mixup:
            out: tuple[torch.Tensor, torch.Tensor] = self.mixup(x, y)
            return out
        if r < self.p_mixup + self.p_cutmix:
            out = self.cutmix(x, y)
            return out
        return x, torch.nn.functional.one_hot(y, self.num_classes).float()
