"""Class activation maps: where in an image the model found the evidence for a class.

Two methods, each checked by the tests on images whose class is decided by one small object beside an equally
striking distractor (the pointing game) and against the same model with random weights (the randomisation
check of Adebayo et al., 2018); docs/results.md has the figures:
- gradcam (Selvaraju et al., 2017): each channel of a late convolutional map weighted by the mean gradient of
  the class's log-probability over it (the log-probability rather than the logit: what all classes share
  cancels, so the map shows what tells this class from the others). One backward pass.
- occlusion (Zeiler and Fergus, 2014): the fall in the class's log-probability when a square of the image is
  hidden. It asks the model itself at every place, no gradient and no layer: the cross-check, at 49 forward
  passes an image.
Grad-CAM++ was tried and is not offered: after a global average pool every gradient is constant over the map,
and its weights reduce to about 1 / (sum of the channel's activations) for every channel with a positive
gradient - a map of what stands out in the image more than of what the model learnt (its maps correlated
0.74 with those of the randomised model; Grad-CAM's 0.31).
The `grad-cam` package was not used: it pulls OpenCV and scikit-learn for what is a few tensor formulas, needs
its target layer by hand, and expects normalised float input where our Classifier takes uint8 pixels. Maps are
computed in fp32 whatever the inference precision (bf16 gradients are too coarse for a map).

The target layer is found by running the backbone once: the last module with no children that outputs a
spatial map and is not a pooling layer - the last convolutional block's output for timm's backbones
(EfficientNet's `bn2.act`, ResNet's last block) and the built-in CNNs (cnn5's last ReLU, before its max-pool).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgtune.errors import UserError
from imgtune.images import ImageError, load_rgb
from imgtune.models import Classifier
from imgtune.transforms import Preprocessing, ViewGeometry, prepare, view_geometry

log = logging.getLogger(__name__)
METHODS = ("gradcam", "occlusion")
_NOT_A_MAP = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
              nn.Identity)  # fmt: skip
OVERLAY_SIDE = (224, 768)  # the overlay's longer side: small images are enlarged to be seen, photos shrunk
OVERLAY_ALPHA = 0.5


class ExplainError(UserError, ValueError):
    """A method, class or layer name that does not exist, or a model that cannot give gradients."""


@dataclass
class Explanation:
    path: str
    label: str  # the predicted class (display name)
    confidence: float
    explained: str  # the class the map is for (the prediction unless one was asked for)
    explained_p: float
    heatmap: np.ndarray  # float32 S x S in [0, 1], at the model's input size
    peak: tuple[int, int] | None  # (x, y): the heatmap's maximum in the original's pixels; None: no evidence
    size: tuple[int, int]  # the original image's (width, height)
    geometry: ViewGeometry


def _spatial_leaves(model: Classifier, img_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of the backbone's childless modules that output a 4-D map, in the order they
    finish on a dry run (a module called twice, like torchvision's shared ReLU, counts where it last ran)."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.backbone.named_modules():
        if next(module.children(), None) is None and not isinstance(module, _NOT_A_MAP):

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = f"backbone.{name}") -> None:
                if isinstance(out, torch.Tensor) and out.dim() == 4:
                    order.append((name, tuple(out.shape)))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.features(torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8, device=model.mean.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    last: dict[str, tuple[int, ...]] = {}
    for name, shape in order:
        last.pop(name, None)
        last[name] = shape
    return list(last.items())


def target_layer(model: Classifier, img_size: int, name: str | None = None) -> str:
    """The layer whose map is explained: `name` when given (checked), else the last spatial one."""
    leaves = _spatial_leaves(model, img_size)
    if name is None:
        if not leaves:
            raise ExplainError(f"{model.arch['name']}: found no convolutional map to explain")
        return leaves[-1][0]
    modules = dict(model.named_modules())
    if name not in modules:
        import difflib

        close = difflib.get_close_matches(name, list(modules), n=3) or [n for n, _ in leaves[-5:]]
        raise ExplainError(f"--layer {name!r}: no such module in {model.arch['name']}; e.g. {', '.join(close)}")
    return name


class CamExplainer:
    """Grad-CAM maps of a Classifier at one layer."""

    def __init__(self, model: Classifier, img_size: int, layer: str | None = None) -> None:
        self.model, self.img_size = model, img_size
        self.layer = target_layer(model, img_size, layer)
        self.module = dict(model.named_modules())[self.layer]

    def maps(self, images: torch.Tensor, targets: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps N x S x S in [0, 1] on the CPU, logits N x classes) for uint8 N x 3 x S x S images; targets:
        the class per image (None: each image's predicted class)."""
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
            # a fresh leaf: the gradient stops here, so nothing upstream needs a graph (and the backbone's own
            # parameters need no requires_grad); the clone keeps later in-place ops off the captured map
            leaf = out.detach().float().clone().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = self.module.register_forward_hook(hook)
        was_training = self.model.training
        device = self.model.mean.device
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in params:  # no graph for the weights: only the layer's map needs a gradient
                p.requires_grad_(False)
            self.model.eval()
            with torch.enable_grad():
                logits = self.model(images.to(device)).float()
                chosen = logits.argmax(1) if targets is None else torch.as_tensor(list(targets), device=device)
                score = logits.log_softmax(1).gather(1, chosen.view(-1, 1)).sum()
                acts = captured[-1]
                (grads,) = torch.autograd.grad(score, acts)
        finally:
            handle.remove()
            self.model.train(was_training)
            for p in params:
                p.requires_grad_(True)
        with torch.no_grad():
            acts = acts.detach()
            cam = (grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True).clamp_min(0)
            cam = nn.functional.interpolate(cam, size=(self.img_size, self.img_size), mode="bicubic",
                                            align_corners=False)[:, 0].clamp_min(0)  # fmt: skip
        return cam.cpu(), logits.detach().cpu()


class OcclusionExplainer:
    """Occlusion sensitivity (Zeiler and Fergus, 2014): how much the class's probability falls when a square
    of the image is hidden under its mean colour, for squares of S/4 placed every S/8 (7 x 7 places: squares
    of S/3, S/5 and S/7 pointed worse in the pointing game; S/5 and S/7 cost 1.9x and 3.3x the time)."""

    layer = "the input (occlusion)"
    GRID = 4  # the square's side is S / GRID; it moves by half of that
    SLICE = 32  # occluded copies per forward pass: bounds the activations' memory

    def __init__(self, model: Classifier, img_size: int) -> None:
        self.model, self.img_size = model, img_size

    @torch.no_grad()
    def maps(self, images: torch.Tensor, targets: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.img_size
        side, step = max(1, s // self.GRID), max(1, s // (2 * self.GRID))
        starts = list(range(0, s - side + 1, step))
        device = self.model.mean.device
        was_training = self.model.training
        self.model.eval()
        try:
            x = images.to(device)
            logits = self.model(x).float()
            chosen = logits.argmax(1) if targets is None else torch.as_tensor(list(targets), device=device)
            base = logits.log_softmax(1).gather(1, chosen.view(-1, 1))[:, 0]
            fill = x.float().mean((2, 3), keepdim=True).round().to(x.dtype)
            drops = torch.zeros(len(x), len(starts), len(starts), device=device)
            for i, top in enumerate(starts):
                hidden = x.unsqueeze(1).repeat(1, len(starts), 1, 1, 1)  # N x row x 3 x S x S
                for j, left in enumerate(starts):
                    hidden[:, j, :, top : top + side, left : left + side] = fill
                flat = hidden.flatten(0, 1)  # in slices: a batch of 16 photos is 112 occluded copies a row
                logp = torch.cat([self.model(flat[k : k + self.SLICE]).float().log_softmax(1)
                                  for k in range(0, len(flat), self.SLICE)])  # fmt: skip
                p = logp.view(len(x), len(starts), -1)
                drops[:, i] = base[:, None] - p.gather(2, chosen.view(-1, 1, 1).expand(-1, len(starts), 1))[..., 0]
        finally:
            self.model.train(was_training)
        # each square's drop belongs to its centre: the grid is resampled between the first and the last centre
        # (corners aligned) and held constant out to the borders
        first = starts[0] + side // 2
        inner = nn.functional.interpolate(drops.clamp_min(0)[:, None], size=(starts[-1] - starts[0] + 1,) * 2,
                                          mode="bicubic", align_corners=True)  # fmt: skip
        after = s - first - inner.shape[-1]
        cam = nn.functional.pad(inner, (first, after, first, after), mode="replicate")
        return cam[:, 0].clamp_min(0).cpu(), logits.cpu()


Explainer = CamExplainer | OcclusionExplainer


def make_explainer(model: Classifier, img_size: int, method: str = "gradcam", layer: str | None = None) -> Explainer:
    if method == "gradcam":
        return CamExplainer(model, img_size, layer)
    if method == "occlusion":
        if layer is not None:
            raise ExplainError("--layer names Grad-CAM's layer; occlusion hides parts of the input and has none")
        return OcclusionExplainer(model, img_size)
    raise ExplainError(f"method {method!r} is not one of {', '.join(METHODS)}")


def normalised(cam: torch.Tensor, geometry: ViewGeometry) -> np.ndarray:
    """The map inside the image's region (a letterbox's padding is not the image), scaled to [0, 1]."""
    x0, y0, x1, y1 = geometry.region
    out = torch.zeros_like(cam)
    out[y0:y1, x0:x1] = cam[y0:y1, x0:x1]
    top = float(out.max())
    return (out / top if top > 0 else out).numpy().astype(np.float32)


def peak(heatmap: np.ndarray, geometry: ViewGeometry, width: int, height: int) -> tuple[int, int] | None:
    """The map's maximum in the original's pixels; None for a map that is zero everywhere (nothing in the
    image speaks for the class: its argmax would be the top-left corner, which means nothing)."""
    if not heatmap.any():
        return None
    v, u = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return geometry.to_original(u + 0.5, v + 0.5, width, height)


def explain_images(
    cam: Explainer,
    prep: Preprocessing,
    chunk: Sequence[tuple[str, torch.Tensor]],
    display_names: Sequence[str],
    target: int | None = None,
    temperature: float = 1.0,
) -> list[Explanation]:
    """Explanations of decoded images ((path, uint8 CHW at its own size)) in one batch, in order."""
    out: list[Explanation] = []
    if chunk:
        batch = torch.stack([prepare(img, prep) for _, img in chunk])
        maps, logits = cam.maps(batch, None if target is None else [target] * len(chunk))
        probs = (logits / temperature).softmax(1)
        for (path, img), m, p in zip(chunk, maps, probs, strict=True):
            h, w = int(img.shape[1]), int(img.shape[2])
            geo = view_geometry(prep, h, w)
            heat = normalised(m, geo)
            best = int(p.argmax())
            t = best if target is None else target
            out.append(Explanation(path, display_names[best], float(p[best]), display_names[t], float(p[t]), heat,
                                   peak(heat, geo, w, h), (w, h), geo))  # fmt: skip
    return out


def iter_explanations(
    cam: Explainer,
    prep: Preprocessing,
    paths: Sequence[Path],
    display_names: Sequence[str],
    *,
    target: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 16,
    skipped: list[dict[str, str]] | None = None,
) -> Iterator[tuple[Explanation, torch.Tensor]]:
    """(explanation, the decoded original image) per readable path, a batch at a time (so a folder of photos
    never sits in memory at once); unreadable files are logged and appended to `skipped`. The full image is
    decoded (the overlay shows it and the peak is in its pixels), not a JPEG draft as predict decodes."""
    for start in range(0, len(paths), batch_size):
        chunk: list[tuple[str, torch.Tensor]] = []
        for path in paths[start : start + batch_size]:
            try:
                chunk.append((str(path), load_rgb(path)))
            except ImageError as e:
                log.warning("skipped unreadable image %s: %s", path, e.reason)
                if skipped is not None:
                    skipped.append({"path": str(path), "reason": e.reason})
        explained = explain_images(cam, prep, chunk, display_names, target, temperature)
        yield from zip(explained, (img for _, img in chunk), strict=True)


_LUT: np.ndarray | None = None


def _colours(heat: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' (blue = cold, red = hot), the colouring Grad-CAM figures use."""
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    return _LUT[np.clip(heat * 255, 0, 255).astype(np.uint8)]


def overlay(image: torch.Tensor, explanation: Explanation, side: int | None = None) -> Image.Image:
    """The original image with the heatmap laid over the part the model saw (outside it, dimmed), its longer
    side `side` or clamped to OVERLAY_SIDE."""
    w, h = explanation.size
    lo, hi = OVERLAY_SIDE
    longer = side or min(max(max(w, h), lo), hi)
    dw, dh = max(1, round(w * longer / max(w, h))), max(1, round(h * longer / max(w, h)))
    base = np.asarray(
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((dw, dh), Image.Resampling.BICUBIC), dtype=np.float32
    )
    geo = explanation.geometry
    # display pixel -> original coordinate -> input coordinate u = x / scale + offset
    xs = (np.arange(dw) + 0.5) * w / dw / geo.scale_x + geo.offset_x
    ys = (np.arange(dh) + 0.5) * h / dh / geo.scale_y + geo.offset_y
    s = explanation.heatmap.shape[0]
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1) * 2 / s - 1).float()[None]
    heat = nn.functional.grid_sample(torch.from_numpy(explanation.heatmap)[None, None], grid, mode="bilinear",
                                     align_corners=False)[0, 0].numpy()  # fmt: skip
    x0, y0, x1, y1 = geo.region
    seen = ((xs >= x0) & (xs < x1))[None, :] & ((ys >= y0) & (ys < y1))[:, None]
    mixed = base * (1 - OVERLAY_ALPHA) + _colours(heat) * OVERLAY_ALPHA
    out = np.where(seen[..., None], mixed, base * 0.35)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def class_index(name: str, classes: Sequence[str], display_names: Sequence[str]) -> int:
    """A class given by folder name or display name."""
    for names in (classes, display_names):
        if name in names:
            return list(names).index(name)
    raise ExplainError(f"--class {name!r} is not a class of this model: {', '.join(classes)}")


CSV_COLUMNS = ("path", "label", "confidence", "explained", "explained_p", "peak_x", "peak_y", "width", "height",
               "overlay")  # fmt: skip


class NpzWriter:
    """heatmaps.npz written one array at a time (np.savez needs them all in memory), to a temp file that is
    renamed into place once complete and synced, like every file imgtune writes."""

    def __init__(self, path: Path) -> None:
        import tempfile
        import zipfile

        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self.file = open(fd, "wb")  # noqa: SIM115 - closed in close()/abort()
        self.zip = zipfile.ZipFile(self.file, "w", zipfile.ZIP_DEFLATED)

    def add(self, key: str, array: np.ndarray) -> None:
        with self.zip.open(f"{key}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)

    def close(self) -> None:
        import os

        self.zip.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.zip.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close() if kind is None else self.abort()


def overlay_name(path: str, taken: set[str]) -> str:
    """<stem>.png, numbered when two inputs share a stem (class folders' 0.png, 1.png ...)."""
    stem = Path(path).stem or "image"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return name
