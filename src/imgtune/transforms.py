"""Preprocessing: the deterministic path from a decoded image to model input, stored in every checkpoint.

Pipeline: decode -> `prepare` (resize shorter side to the input size, centre crop: uint8, cacheable) ->
batches -> (training only: augment.BatchAugment on the whole batch, on the device) -> the model normalises
inside its forward pass.
Eval, predict, the feature cache and the server all use `prepare`, so they see exactly the same pixels.
Normalisation lives in the model so an exported model needs nothing but RGB pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # torchvision is imported where it is used: importing it costs seconds (torch._dynamo)
    from torchvision.transforms.v2 import InterpolationMode

_INTERPOLATION = ("bilinear", "bicubic")
RESIZE = {
    "crop": "the shorter side resized to S, then the centre S x S",
    "squash": "resized to S x S, the aspect ratio not kept (torchvision's Resize((S, S)))",
    "pad": "the longer side resized to S, then padded with black to S x S (letterbox)",
}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image into model input; travels in every checkpoint."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "crop"  # how an image becomes S x S: one of RESIZE

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_INTERPOLATION)}")
        if self.resize not in RESIZE:
            raise ValueError(f"resize {self.resize!r} is not one of {', '.join(RESIZE)}")

    @property
    def description(self) -> str:
        """The pixel rule in words (the ONNX export's metadata says it to its consumers)."""
        return RESIZE[self.resize].replace("S", str(self.img_size))

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
            resize={"shorter-side": "crop"}.get(str(d.get("resize", "crop")), str(d.get("resize", "crop"))),
        )  # checkpoints before resize policies said "shorter-side" (+ crop "center"): that is "crop"

    @property
    def mode(self) -> InterpolationMode:
        from torchvision.transforms.v2 import InterpolationMode

        return InterpolationMode(self.interpolation)


def prepare(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 CHW of any size -> uint8 3 x S x S by the resize policy (antialiased): crop (shorter side to S,
    centre crop), squash (S x S) or pad (longer side to S, centred on black)."""
    from torchvision.transforms.v2 import functional as F

    s = prep.img_size
    h, w = image.shape[-2:]
    if prep.resize == "squash":
        return image if (h, w) == (s, s) else F.resize(image, [s, s], interpolation=prep.mode, antialias=True)
    if prep.resize == "pad":
        nh, nw = max(1, round(h * s / max(h, w))), max(1, round(w * s / max(h, w)))
        if (nh, nw) != (h, w):
            image = F.resize(image, [nh, nw], interpolation=prep.mode, antialias=True)
        top, left = (s - nh) // 2, (s - nw) // 2
        return F.pad(image, [left, top, s - nw - left, s - nh - top], fill=0)
    if min(h, w) != s:
        image = F.resize(image, [s], interpolation=prep.mode, antialias=True)
    if image.shape[-2:] != (s, s):
        image = F.center_crop(image, [s, s])
    return image


@dataclass(frozen=True)
class ViewGeometry:
    """Where the model's S x S input sits in the original image: original x = (u - offset_x) * scale_x for an
    input coordinate u (pixel edges at integers; likewise y), and `region` (x0, y0, x1, y1) is the part of the
    input that holds image pixels (all of it but a letterbox's padding). A heatmap's peak goes back to the
    photo's own pixels through it, and an overlay on the photo samples the heatmap through its inverse."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    region: tuple[int, int, int, int]

    def to_original(self, u: float, v: float, width: int, height: int) -> tuple[int, int]:
        """The original pixel (column, row) that input position (u, v) shows, kept inside the image."""
        x = int((u - self.offset_x) * self.scale_x)
        y = int((v - self.offset_y) * self.scale_y)
        return min(max(x, 0), width - 1), min(max(y, 0), height - 1)


def view_geometry(prep: Preprocessing, height: int, width: int) -> ViewGeometry:
    """`prepare`'s placement of an image of height x width, computed as torchvision computes it (the shorter
    side's resize truncates the longer side; the centre crop rounds its offsets)."""
    s = prep.img_size
    if prep.resize == "squash":
        return ViewGeometry(width / s, height / s, 0.0, 0.0, (0, 0, s, s))
    if prep.resize == "pad":
        nh, nw = max(1, round(height * s / max(height, width))), max(1, round(width * s / max(height, width)))
        top, left = (s - nh) // 2, (s - nw) // 2
        return ViewGeometry(width / nw, height / nh, float(left), float(top), (left, top, left + nw, top + nh))
    if width <= height:
        rw, rh = s, int(s * height / width)
    else:
        rw, rh = int(s * width / height), s
    if min(height, width) == s:
        rw, rh = width, height  # prepare skips the resize
    top, left = round((rh - s) / 2.0), round((rw - s) / 2.0)
    return ViewGeometry(width / rw, height / rh, -float(left), -float(top), (0, 0, s, s))


# ------------------------------------------------------------------------------- the wider training view

WIDE_MARK, TURNED_MARK = 255, 128  # channel 3 of a wide view: the image's pixels (128: a turned portrait)


def wide_width(img_size: int, aspect: float) -> int:
    return max(img_size, round(img_size * aspect))


def prepare_wide(image: torch.Tensor, prep: Preprocessing, aspect: float) -> torch.Tensor:
    """The training view for crops that may reach past the centre square (data.train_aspect): uint8
    4 x S x W, W = aspect x S. The shorter side is resized to S as `prepare` does; a portrait is turned on its
    side so its long axis runs along W; the image is placed so that columns (W - S) // 2 .. + S hold exactly
    the centre square `prepare` gives, and as much of the long side as fits around it. Channel 3 marks the
    image's pixels (255, or 128 for a turned portrait) against the black padding of a narrower image, so the
    batch augmentation knows each image's extent and orientation without another tensor."""
    from torchvision.transforms.v2 import functional as F

    s, wide = prep.img_size, wide_width(prep.img_size, aspect)
    if min(image.shape[-2:]) != s:
        image = F.resize(image, [s], interpolation=prep.mode, antialias=True)
    turned = image.shape[-2] > image.shape[-1]
    if turned:  # after the resize: its pixels must be `prepare`'s
        image = image.transpose(-1, -2)
    width = image.shape[-1]
    start = (wide - s) // 2 - round((width - s) / 2.0)  # where `prepare`'s centre crop puts its left edge
    lo, hi = max(0, start), min(wide, start + width)
    out = torch.zeros((4, s, wide), dtype=torch.uint8)
    out[:3, :, lo:hi] = image[:, :, lo - start : hi - start]
    out[3, :, lo:hi] = TURNED_MARK if turned else WIDE_MARK
    return out
