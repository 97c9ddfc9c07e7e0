"""Safe image decoding: one function turns any file into an RGB uint8 tensor, or raises `ImageError`.

Training, evaluation, prediction and the data audit all decode through `load_rgb`, so EXIF orientation,
transparency, 16-bit scaling and the decompression-bomb limit behave identically everywhere.
Files are judged by content (Pillow sniffs the header), never by extension.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgtune.errors import UserError

# Pillow warns at MAX_IMAGE_PIXELS and refuses at twice that; we refuse at our own limit, before decoding.
MAX_PIXELS = 64_000_000
# Transparent pixels are composited on this colour: a fixed rule so train and predict agree.
BACKGROUND = (255, 255, 255)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not grey pixels we train on


Source = Path | str | IO[bytes]  # a file path, or bytes in memory (uploads are never written to disk)


class ImageError(UserError):
    """A file could not be used as an image. `reason` is short and human-readable; `kind` is one of
    missing, not_image (no image at all), bomb (refused: too many pixels), corrupt (an image, but broken)."""

    def __init__(self, path: Path | str, reason: str, kind: str = "corrupt") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.kind = kind


def _name(source: Source) -> str:
    return str(getattr(source, "name", "<upload>")) if not isinstance(source, Path | str) else str(source)


def _is_empty(source: Source) -> bool:
    if isinstance(source, Path | str):
        return Path(source).is_file() and Path(source).stat().st_size == 0
    pos = source.seek(0, 2)
    source.seek(0)
    return pos == 0


def open_image(source: Source) -> Image.Image:
    """Open lazily (header only) and check the pixel count before anything is decoded."""
    path = _name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
    except FileNotFoundError:
        raise ImageError(path, "file not found", "missing") from None
    except UnidentifiedImageError:
        empty = _is_empty(source)
        raise ImageError(path, "empty file" if empty else "not an image Pillow can read", "not_image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(path, f"decompression bomb refused ({e})", "bomb") from None
    except Exception as e:
        raise ImageError(path, f"cannot open: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageError(path, f"decompression bomb refused: {w}x{h} pixels is over the {MAX_PIXELS:,} limit", "bomb")
    if w < 1 or h < 1:
        im.close()
        raise ImageError(path, f"image has no pixels ({w}x{h})")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) images: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(im, dtype=np.int64)
        top = 65535 if arr.max(initial=0) <= 65535 else int(arr.max())
        arr8 = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((np.nan_to_num(scaled) * 255).round().astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV
    return im


def load_rgb(path: Source, draft_size: int | None = None) -> torch.Tensor:
    """Decode `path` to a CHW uint8 RGB tensor, EXIF orientation applied, first frame of animations.

    draft_size: JPEGs much larger than this are decoded at a reduced scale (DCT scaling: several times
    faster). The result is still at least draft_size on its shorter side, so quality is unaffected.
    """
    im = open_image(path)
    try:
        with im:
            if draft_size is not None and im.format == "JPEG":
                w, h = im.size
                scale = min(w, h) / draft_size
                if scale >= 2:
                    im.draft("RGB", (max(1, round(w / scale)), max(1, round(h / scale))))
            im.load()
            arr = _upright_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(_name(path), f"decompression bomb refused ({e})", "bomb") from None
    except Exception as e:
        raise ImageError(_name(path), f"cannot decode: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(_name(path), f"unexpected decoded shape {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _upright_rgb(im: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 of a loaded image, EXIF orientation applied: files and PIL images passed in memory
    become the same pixels."""
    return np.asarray(_to_rgb(ImageOps.exif_transpose(im) or im), dtype=np.uint8)


def in_memory_rgb(image: Any, name: str = "<image>") -> torch.Tensor:
    """A picture already in memory -> CHW uint8 RGB: a PIL image (any mode, as files are converted), a NumPy
    array H x W x C or H x W (the PIL/OpenCV layout; RGB order), or a tensor C x H x W or H x W (torchvision's
    layout); uint8, or floats in [0, 1]. One or four channels become RGB as a file's would."""
    if isinstance(image, Image.Image):
        try:
            arr = _upright_rgb(image)
        except Exception as e:  # a lazily opened image whose file is cut short, ...
            raise ImageError(getattr(image, "filename", "") or name, f"cannot decode: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.array(image))  # a copy: arrays from PIL are read-only
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor
    else:
        raise ImageError(name, f"not an image: {type(image).__name__} (give a path, PIL image, array or tensor)")
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4) or min(tensor.shape[1:]) < 1:
        layout = "H x W x C" if isinstance(image, np.ndarray) else "C x H x W"
        raise ImageError(name, f"shape {tuple(image.shape)} is not an image ({layout}, with 1, 3 or 4 channels)")
    if tensor.is_floating_point():
        low, high = float(tensor.min()), float(tensor.max())
        if low < 0 or high > 1:
            raise ImageError(name, f"float pixels must be in [0, 1], these span [{low:.3g}, {high:.3g}]")
        tensor = (tensor * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ImageError(name, f"pixels of type {tensor.dtype} (give uint8, or floats in [0, 1])")
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1).contiguous()
    if tensor.shape[0] == 4:  # RGBA: on the background files with alpha get
        alpha = tensor[3:].float() / 255
        back = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1)
        return (tensor[:3].float() * alpha + back * (1 - alpha)).round().to(torch.uint8)
    return tensor.contiguous()
