"""Preprocessing (deterministic, stored in checkpoints) and augmentation presets (training only).

Pipeline: decode -> `prepare` (resize shorter side to the input size, centre crop: uint8, cacheable) ->
batches -> `BatchAugment` on the whole batch on the device (train only) -> the model normalises inside its
forward pass.
Eval, predict, the feature cache and the server all use `prepare`, so they see exactly the same pixels.
Normalisation lives in the model so an exported model needs nothing but RGB pixels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # torchvision is imported where it is used: importing it costs seconds (torch._dynamo)
    from torchvision.transforms.v2 import InterpolationMode

_INTERPOLATION = ("bilinear", "bicubic")


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
        from torchvision.transforms.v2 import InterpolationMode

        return InterpolationMode(self.interpolation)


def prepare(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 CHW of any size -> uint8 3 x S x S: shorter side to S (antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as F

    s = prep.img_size
    h, w = image.shape[-2:]
    if min(h, w) != s:
        image = F.resize(image, [s], interpolation=prep.mode, antialias=True)
    if image.shape[-2:] != (s, s):
        image = F.center_crop(image, [s, s])
    return image


@dataclass(frozen=True)
class _Preset:
    flip: bool = True
    scale: tuple[float, float] | None = None  # random resized crop: area share of the image
    rotate: float = 0.0  # degrees, either way
    shift: float = 0.0  # pad-and-crop: largest shift as a share of the size (reflected border)
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    erase: float = 0.0  # probability of erasing one random rectangle


PRESETS: dict[str, _Preset | None] = {
    "none": None,
    "light": _Preset(),
    # the from-scratch classic for small images: shift by up to 1/8 of the size, mirror
    "padcrop": _Preset(shift=1 / 8),
    # hue is kept small: colour often is the label (fruit, flowers)
    "standard": _Preset(scale=(0.6, 1.0), rotate=10, jitter=(0.2, 0.2, 0.2, 0.02)),
    "strong": _Preset(scale=(0.3, 1.0), rotate=15, jitter=(0.4, 0.4, 0.4, 0.05), erase=0.25),
}

# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = torch.linalg.inv(_YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


class BatchAugment:
    """Random augmentation of a whole batch at once, on the device the batch is on (the GPU when there is one).

    Crop, scale, aspect, rotation, shift and mirror are one affine map per image, applied by a single
    `grid_sample` over the batch; colour jitter is per-image broadcasting (hue: a rotation in YIQ space);
    erasing is a mask. Per-image torchvision transforms cost ~2 ms an image at 112 px here, a sixth of a
    fine-tuning step on 2 CPU cores; this costs a few ms per batch. Draws come from torch's global RNG, whose
    state the checkpoints keep, so a resumed run augments as the uninterrupted one would.

    uint8 or [0, 1] float B x 3 x S x S in, [0, 1] float out (the model accepts both)."""

    def __init__(self, preset: str, random_erasing: float = 0.0) -> None:
        base = PRESETS[preset]
        if random_erasing > 0:  # cutout: one random rectangle per image set to zero, on any preset
            base = dataclasses.replace(base or _Preset(flip=False), erase=random_erasing)
        self.preset = base
        self.name = preset

    def __bool__(self) -> bool:
        return self.preset is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        p = self.preset
        if p is None or len(x) == 0:
            return x
        if p.scale is not None or p.rotate or p.shift:
            x = self._geometry(x, p)
        elif p.flip:
            x = torch.where(self._rand(x, len(x)).view(-1, 1, 1, 1) < 0.5, x.flip(-1), x)
        if p.jitter is not None:
            x = self._colour(x, p.jitter)
        if p.erase > 0:
            x = self._erase(x, p.erase)
        return x

    @staticmethod
    def _rand(x: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=x.device)

    def _geometry(self, x: torch.Tensor, p: _Preset) -> torch.Tensor:
        n, size = len(x), x.shape[-1]
        w = h = torch.ones(n, device=x.device)
        if p.scale is not None:  # RandomResizedCrop's area and aspect ratio (3/4 .. 4/3, log-uniform)
            area = p.scale[0] + (p.scale[1] - p.scale[0]) * self._rand(x, n)
            ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * self._rand(x, n))
            w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        if p.shift:  # whole-pixel shifts, so the result is the padded-and-cropped image exactly
            most = max(1, round(size * p.shift))
            cx, cy = ((torch.randint(-most, most + 1, (2, n), device=x.device)) * 2 / size).unbind(0)
        else:  # the crop's centre anywhere that keeps it inside the image
            cx, cy = (1 - w) * (2 * self._rand(x, n) - 1), (1 - h) * (2 * self._rand(x, n) - 1)
        angle = math.radians(p.rotate) * (2 * self._rand(x, n) - 1)
        mirror = torch.where(self._rand(x, n) < 0.5, -1.0, 1.0) if p.flip else torch.ones(n, device=x.device)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack(
            [torch.stack([cos * w * mirror, -sin * h, cx], 1), torch.stack([sin * w * mirror, cos * h, cy], 1)], 1
        )
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        padding = "reflection" if p.shift else "zeros"
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    def _colour(self, x: torch.Tensor, jitter: tuple[float, float, float, float]) -> torch.Tensor:
        n = len(x)
        b, c, s, hue = jitter

        def factor(amount: float) -> torch.Tensor:
            return (1 - amount + 2 * amount * self._rand(x, n)).view(n, 1, 1, 1)

        gray_w = _GRAY.to(x.device).view(1, 3, 1, 1)
        x = x * factor(b)
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - mean) * factor(c) + mean
        gray = (x * gray_w).sum(1, keepdim=True)
        x = (x - gray) * factor(s) + gray
        if hue > 0:
            turn = (2 * self._rand(x, n) - 1) * hue * 2 * math.pi
            rot = torch.zeros(n, 3, 3, device=x.device)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = turn.cos(), -turn.sin(), turn.sin(), turn.cos()
            m = _YIQ_INV.to(x.device) @ rot @ _YIQ.to(x.device)
            x = torch.einsum("nij,njhw->nihw", m, x)
        return x.clamp_(0, 1)

    def _erase(self, x: torch.Tensor, prob: float) -> torch.Tensor:
        """RandomErasing's rule: 2-33% of the area, aspect 0.3-3.3, value 0, with probability prob."""
        n, size = len(x), x.shape[-1]
        area = 0.02 + 0.31 * self._rand(x, n)
        ratio = torch.exp(math.log(0.3) + math.log(3.3 / 0.3) * self._rand(x, n))
        eh = ((area * ratio).sqrt() * size).clamp(1, size).floor()
        ew = ((area / ratio).sqrt() * size).clamp(1, size).floor()
        top = ((size - eh + 1) * self._rand(x, n)).floor()
        left = ((size - ew + 1) * self._rand(x, n)).floor()
        idx = torch.arange(size, device=x.device)
        rows = (idx.view(1, -1) >= top.view(-1, 1)) & (idx.view(1, -1) < (top + eh).view(-1, 1))
        cols = (idx.view(1, -1) >= left.view(-1, 1)) & (idx.view(1, -1) < (left + ew).view(-1, 1))
        hit = (self._rand(x, n) < prob).view(-1, 1, 1)
        mask = (rows.unsqueeze(2) & cols.unsqueeze(1) & hit).unsqueeze(1)
        return x.masked_fill(mask, 0.0)


class BatchMix:
    """Mixup / cutmix on a batch, each with its own probability; always returns soft targets.

    Works on [0, 1] float images (uint8 batches are converted), which the model accepts as well.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        self.num_classes, self.p_mixup, self.p_cutmix = num_classes, mixup, cutmix
        from torchvision.transforms import v2

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
