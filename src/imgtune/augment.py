"""Training augmentation applied to whole batches on the device (the GPU when there is one), with the meaning of
the torchvision transforms it is named after (config.AugConfig): RandomRotation, RandomResizedCrop,
RandomCrop(padding, reflect), RandomHorizontalFlip, RandomVerticalFlip, ColorJitter, RandomGrayscale,
RandomErasing. Also mixup/cutmix (BatchMix).

Per-image torchvision transforms cost ~2 ms an image at 112 px on the reference CPU, a sixth of a fine-tuning
step on 2 cores; here rotation, crop, shift and flips are one affine map per image and one `grid_sample` for
the batch, colour is broadcasting, erasing a mask: a few ms per batch. `BatchAugment.draw` makes every random
choice (from torch's global RNG, which checkpoints keep: a resumed run augments as the uninterrupted one) and
`apply` uses them, so a test can compare the draws with torchvision's `get_params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgtune.config import PRESETS, AugConfig

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
ATTEMPTS = 10  # RandomResizedCrop's and RandomErasing's tries before their fallback, as torchvision


@dataclass
class Draws:
    """Every random choice for a batch of n images of size S x S."""

    crop: torch.Tensor  # n x 4: top, left, height, width of the crop in pixels (RandomResizedCrop)
    angle: torch.Tensor  # n: degrees (RandomRotation)
    shift: torch.Tensor  # n x 2: whole-pixel shift (dy, dx) of a pad-and-crop
    hflip: torch.Tensor  # n booleans
    vflip: torch.Tensor
    factors: torch.Tensor  # n x 4: brightness, contrast, saturation factors, hue shift (ColorJitter)
    order: torch.Tensor  # 4: the order of the jitter operations (ColorJitter's fn_idx), one per batch
    gray: torch.Tensor  # n booleans
    erase: torch.Tensor  # n x 4: top, left, height, width of the erased rectangle (0 x 0: none)


def _uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


def _first_fitting(fits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the index of the first True and whether there is one (torchvision's `for _ in range(10)`)."""
    found = fits.any(1)
    return fits.float().argmax(1), found


class BatchAugment:
    """Random augmentation of a whole batch. uint8 or [0, 1] float B x 3 x S x S in, [0, 1] float out (the
    model accepts both). `aug` is an AugConfig or a preset's name; random_erasing overrides its erase."""

    def __init__(self, aug: AugConfig | str, random_erasing: float = 0.0) -> None:
        self.aug = AugConfig(**PRESETS[aug]) if isinstance(aug, str) else aug
        if random_erasing > 0:
            self.aug = self.aug.model_copy(update={"erase": random_erasing})
        a = self.aug
        self.geometric = a.scale is not None or a.rotate > 0 or a.pad > 0
        self.jitter = any(v > 0 for v in (a.brightness, a.contrast, a.saturation, a.hue))

    def __bool__(self) -> bool:
        a = self.aug
        return self.geometric or self.jitter or any(p > 0 for p in (a.hflip, a.vflip, a.grayscale, a.erase))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if len(x) == 0 or not self:
            return x
        return self.apply(x, self.draw(len(x), x.shape[-2], x.shape[-1], x.device))

    # --------------------------------------------------------------------------------------------- draws

    def draw(self, n: int, height: int, width: int, device: torch.device | str = "cpu") -> Draws:
        a, dev = self.aug, torch.device(device)
        crop = self._crop(n, height, width, dev)
        angle = _uniform(-a.rotate, a.rotate, (n,), dev) if a.rotate > 0 else torch.zeros(n, device=dev)
        shift = torch.randint(-a.pad, a.pad + 1, (n, 2), device=dev) if a.pad > 0 else torch.zeros(n, 2, device=dev)
        hflip = torch.rand(n, device=dev) < a.hflip
        vflip = torch.rand(n, device=dev) < a.vflip
        factors = torch.stack([
            _uniform(max(0.0, 1 - a.brightness), 1 + a.brightness, (n,), dev),
            _uniform(max(0.0, 1 - a.contrast), 1 + a.contrast, (n,), dev),
            _uniform(max(0.0, 1 - a.saturation), 1 + a.saturation, (n,), dev),
            _uniform(-a.hue, a.hue, (n,), dev),
        ], 1)  # fmt: skip
        order = torch.randperm(4, device=dev)
        gray = torch.rand(n, device=dev) < a.grayscale
        return Draws(crop, angle, shift, hflip, vflip, factors, order, gray, self._erase(n, height, width, dev))

    def _crop(self, n: int, height: int, width: int, dev: torch.device) -> torch.Tensor:
        """RandomResizedCrop.get_params for n images at once: up to 10 tries of an area share and a log-uniform
        aspect ratio; the first that fits the image wins, else the largest centred crop within the ratios."""
        if self.aug.scale is None:
            return torch.tensor([0, 0, height, width], device=dev, dtype=torch.float32).repeat(n, 1)
        (s0, s1), (r0, r1) = self.aug.scale, self.aug.ratio
        area = height * width * _uniform(s0, s1, (n, ATTEMPTS), dev)
        aspect = torch.exp(_uniform(math.log(r0), math.log(r1), (n, ATTEMPTS), dev))
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        pick, found = _first_fitting((w > 0) & (w <= width) & (h > 0) & (h <= height))
        rows = torch.arange(n, device=dev)
        w, h = w[rows, pick], h[rows, pick]
        in_ratio = width / height  # the fallback: torchvision's centre crop
        if in_ratio < r0:
            fw, fh = float(width), float(round(width / r0))
        elif in_ratio > r1:
            fw, fh = float(round(height * r1)), float(height)
        else:
            fw, fh = float(width), float(height)
        w, h = torch.where(found, w, fw), torch.where(found, h, fh)
        top = torch.where(found, (torch.rand(n, device=dev) * (height - h + 1)).floor(), ((height - h) / 2).round())
        left = torch.where(found, (torch.rand(n, device=dev) * (width - w + 1)).floor(), ((width - w) / 2).round())
        return torch.stack([top, left, h, w], 1)

    def _erase(self, n: int, height: int, width: int, dev: torch.device) -> torch.Tensor:
        """RandomErasing.get_params (scale 0.02-0.33, ratio 0.3-3.3) for the images whose coin came up: up to 10
        tries of a rectangle smaller than the image; none fits: nothing is erased."""
        if self.aug.erase <= 0:
            return torch.zeros(n, 4, device=dev)
        hit = torch.rand(n, device=dev) < self.aug.erase
        area = height * width * _uniform(0.02, 0.33, (n, ATTEMPTS), dev)
        aspect = torch.exp(_uniform(math.log(0.3), math.log(3.3), (n, ATTEMPTS), dev))
        h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        pick, found = _first_fitting((h < height) & (w < width))
        rows = torch.arange(n, device=dev)
        h, w = h[rows, pick], w[rows, pick]
        top = (torch.rand(n, device=dev) * (height - h + 1)).floor()
        left = (torch.rand(n, device=dev) * (width - w + 1)).floor()
        keep = (hit & found).float()
        return torch.stack([top, left, h * keep, w * keep], 1)

    # --------------------------------------------------------------------------------------------- apply

    def apply(self, x: torch.Tensor, d: Draws) -> torch.Tensor:
        if self.geometric or bool(d.hflip.any()) or bool(d.vflip.any()):
            x = self._geometry(x, d)
        if self.jitter:
            x = self._jitter(x, d.factors, d.order)
        if bool(d.gray.any()):
            gray = (x * torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = torch.where(d.gray.view(-1, 1, 1, 1), gray.expand_as(x), x)
        if self.aug.erase > 0:
            x = self._erase_rectangles(x, d.erase)
        return x

    def _geometry(self, x: torch.Tensor, d: Draws) -> torch.Tensor:
        """Rotate the image about its centre, crop the window, shift, mirror: one affine map from output to input
        coordinates (normalised, align_corners=False), sampled once for the batch."""
        height, width = x.shape[-2:]
        top, left, h, w = d.crop.unbind(1)
        sx, sy = w / width, h / height  # the window's half-size in normalised units
        cx = (left + w / 2) / width * 2 - 1
        cy = (top + h / 2) / height * 2 - 1
        tx, ty = d.shift[:, 1] * 2 / width * sx, d.shift[:, 0] * 2 / height * sy  # a pad-crop shift, in the window
        ox, oy = cx + tx, cy + ty  # output (0, 0) looks here, before the rotation
        mx = torch.where(d.hflip, -1.0, 1.0) * sx
        my = torch.where(d.vflip, -1.0, 1.0) * sy
        rad = d.angle * math.pi / 180
        cos, sin = rad.cos(), rad.sin()
        # input = R(-angle) @ ((ox, oy) + diag(mx, my) @ output): rotate the image, then take the window
        theta = torch.stack([
            torch.stack([cos * mx, sin * my, cos * ox + sin * oy], 1),
            torch.stack([-sin * mx, cos * my, -sin * ox + cos * oy], 1),
        ], 1)  # fmt: skip
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        padding = "reflection" if self.aug.pad > 0 else "zeros"
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    def _jitter(self, x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """ColorJitter: brightness, contrast, saturation and hue in a random order (one per batch), each clamped
        to [0, 1], as torchvision's functional adjust_* do."""
        weights = torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)
        for op in order.tolist():
            f = factors[:, op].view(-1, 1, 1, 1)
            if op == 0 and self.aug.brightness > 0:
                x = (x * f).clamp_(0, 1)
            elif op == 1 and self.aug.contrast > 0:
                mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
                x = (f * x + (1 - f) * mean).clamp_(0, 1)
            elif op == 2 and self.aug.saturation > 0:
                gray = (x * weights).sum(1, keepdim=True)
                x = (f * x + (1 - f) * gray).clamp_(0, 1)
            elif op == 3 and self.aug.hue > 0:
                x = shift_hue(x, factors[:, 3])
        return x

    @staticmethod
    def _erase_rectangles(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        top, left, h, w = (v.view(-1, 1) for v in boxes.unbind(1))
        rows = torch.arange(height, device=x.device).view(1, -1)
        cols = torch.arange(width, device=x.device).view(1, -1)
        inside_r = (rows >= top) & (rows < top + h)
        inside_c = (cols >= left) & (cols < left + w)
        mask = (inside_r.unsqueeze(2) & inside_c.unsqueeze(1)).unsqueeze(1)
        return x.masked_fill(mask, 0.0)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by `shift` of the colour circle (-0.5..0.5) in HSV, keeping saturation and value:
    torchvision's adjust_hue, with one shift per image."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    v, delta = maxc, maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), 0.0)
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = (h * 6.0).floor()
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, (rr, gg, bb) in enumerate(rgb):
        sel = i == k
        out = [torch.where(sel, c, o) for c, o in zip((rr, gg, bb), out, strict=True)]
    return torch.stack(out, 1).clamp_(0, 1)


class BatchMix:
    """Mixup / cutmix on a batch, each with its own probability; always returns soft targets.

    Works on [0, 1] float images (uint8 batches are converted), which the model accepts as well.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        from torchvision.transforms import v2

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
