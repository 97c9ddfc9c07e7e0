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
from imgtune.transforms import TURNED_MARK

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


@dataclass
class Wide:
    """Where each image of a wide training view (transforms.prepare_wide) lies in its buffer, read from the
    marks in channel 3: its first and last image column, and whether it is a portrait turned on its side."""

    first: torch.Tensor  # n: first buffer column holding the image
    width: torch.Tensor  # n: image columns in the buffer (its long side, up to the buffer's width)
    turned: torch.Tensor  # n booleans
    height: int  # S
    buffer_width: int  # W

    @classmethod
    def of(cls, x: torch.Tensor) -> Wide:
        marks = x[:, 3, 0]  # one row is enough: a mark fills whole columns
        cols = torch.arange(marks.shape[-1], device=x.device)
        inside = marks > 0
        first = torch.where(inside, cols, marks.shape[-1]).amin(1).float()
        last = torch.where(inside, cols, -1).amax(1).float()
        return cls(first, last - first + 1, marks.amax(1) == TURNED_MARK, x.shape[-2], x.shape[-1])

    def source_size(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(height, width) of each photo as it was, before a portrait was turned."""
        s = torch.full_like(self.width, float(self.height))
        return torch.where(self.turned, self.width, s), torch.where(self.turned, s, self.width)

    def centre_square(self) -> torch.Tensor:
        """n x 4 (top, left, height, width) in the photo's own orientation: the S x S that evaluation sees,
        at buffer columns (W - S) // 2 onwards (transforms.prepare_wide puts it there)."""
        s = float(self.height)
        along = (self.buffer_width - self.height) // 2 - self.first
        zero, side = torch.zeros_like(along), torch.full_like(along, s)
        return torch.stack(
            [torch.where(self.turned, along, zero), torch.where(self.turned, zero, along), side, side], 1
        )

    @property
    def offset(self) -> torch.Tensor:
        """The image centre's place relative to the buffer's centre, in pixels along the buffer's width."""
        return self.first + self.width / 2 - self.buffer_width / 2


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
        wide = Wide.of(x) if x.shape[1] == 4 else None  # transforms.prepare_wide's training view
        if wide is not None:
            x = x[:, :3]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if len(x) == 0 or (not self and wide is None):
            return x
        size = x.shape[-2]  # the output is S x S either way
        d = self.draw(len(x), size, size, x.device, wide.source_size() if wide is not None else None)
        if wide is not None and self.aug.scale is None:  # no crop: exactly the square `plain` cuts out
            d.crop = wide.centre_square()
        return self.apply(x, d, wide)

    @staticmethod
    def plain(x: torch.Tensor) -> torch.Tensor:
        """The view evaluation sees: a wide training view's centre square, turned back (pixel for pixel what
        transforms.prepare gives); anything else as it is."""
        if x.shape[1] != 4:
            return x
        s, wide = x.shape[-2:]
        c0 = (wide - s) // 2
        square = x[:, :3, :, c0 : c0 + s]
        turned = (x[:, 3].amax((1, 2)) == TURNED_MARK).view(-1, 1, 1, 1)
        return torch.where(turned, square.transpose(-1, -2), square)

    # --------------------------------------------------------------------------------------------- draws

    def draw(
        self,
        n: int,
        height: int,
        width: int,
        device: torch.device | str = "cpu",
        source: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Draws:
        """Every random choice for n output images of height x width; crops are drawn from each image's own
        `source` (heights, widths) when given (a wide view's photo), else from height x width."""
        a, dev = self.aug, torch.device(device)
        full = torch.full((n,), float(height), device=dev), torch.full((n,), float(width), device=dev)
        crop = self._crop(n, *(source if source is not None else full), dev)
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

    def _crop(self, n: int, height: torch.Tensor, width: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """RandomResizedCrop.get_params for n images at once (each its own height and width): up to 10 tries of
        an area share and a log-uniform aspect ratio; the first that fits wins, else the largest centred crop
        within the ratios. Without a crop: the centre square (a square image's whole)."""
        if self.aug.scale is None:
            side = torch.minimum(height, width)
            return torch.stack([((height - side) / 2).round(), ((width - side) / 2).round(), side, side], 1)
        (s0, s1), (r0, r1) = self.aug.scale, self.aug.ratio
        area = (height * width)[:, None] * _uniform(s0, s1, (n, ATTEMPTS), dev)
        aspect = torch.exp(_uniform(math.log(r0), math.log(r1), (n, ATTEMPTS), dev))
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        pick, found = _first_fitting((w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None]))
        rows = torch.arange(n, device=dev)
        w, h = w[rows, pick], h[rows, pick]
        in_ratio = width / height  # the fallback: torchvision's centre crop
        fw = torch.where(in_ratio < r0, width, torch.where(in_ratio > r1, (height * r1).round(), width))
        fh = torch.where(in_ratio < r0, (width / r0).round(), height)
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

    def apply(self, x: torch.Tensor, d: Draws, wide: Wide | None = None) -> torch.Tensor:
        if self.geometric or bool(d.hflip.any()) or bool(d.vflip.any()) or wide is not None:
            x = self._geometry(x, d, wide)
        if self.jitter:
            x = self._jitter(x, d.factors, d.order)
        if bool(d.gray.any()):
            gray = (x * torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = torch.where(d.gray.view(-1, 1, 1, 1), gray.expand_as(x), x)
        if self.aug.erase > 0:
            x = self._erase_rectangles(x, d.erase)
        return x

    def _geometry(self, x: torch.Tensor, d: Draws, wide: Wide | None = None) -> torch.Tensor:
        """Rotate the image about its centre, crop the window, shift, mirror: one affine map from output to input
        coordinates, sampled once for the batch (align_corners=False). Worked out in pixels about the image's
        centre, so a wide view's non-square buffer and turned portraits need nothing but their own offset."""
        n, size = len(x), x.shape[-2]
        top, left, h, w = d.crop.unbind(1)
        if wide is None:
            src_h = src_w = torch.full((n,), float(size), device=x.device)
        else:
            src_h, src_w = wide.source_size()
        # the window's centre relative to the image's, in pixels, with a pad-crop shift (output pixels, scaled)
        ox = left + w / 2 - src_w / 2 + d.shift[:, 1] * w / size
        oy = top + h / 2 - src_h / 2 + d.shift[:, 0] * h / size
        mx = torch.where(d.hflip, -1.0, 1.0) * w / 2
        my = torch.where(d.vflip, -1.0, 1.0) * h / 2
        rad = d.angle * math.pi / 180
        cos, sin = rad.cos(), rad.sin()
        # source pixel = R(-angle) @ ((ox, oy) + diag(mx, my) @ output): rotate the image, then take the window
        rows = [
            torch.stack([cos * mx, sin * my, cos * ox + sin * oy], 1),
            torch.stack([-sin * mx, cos * my, -sin * ox + cos * oy], 1),
        ]
        width = x.shape[-1]
        if wide is not None:  # a turned portrait's source x is the buffer's y; then the image's place in it
            turned = wide.turned.view(-1, 1)
            rows = [torch.where(turned, rows[1], rows[0]), torch.where(turned, rows[0], rows[1])]
            rows[0] = rows[0] + torch.stack([torch.zeros_like(ox), torch.zeros_like(ox), wide.offset], 1)
        theta = torch.stack([rows[0] * 2 / width, rows[1] * 2 / size], 1)  # pixels -> normalised
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
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
