from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bomb_png
from imgtune.images import BACKGROUND, ImageError, load_rgb


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_supported_format_decodes(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"img.{fmt.lower()}"
    Image.new("RGB", (24, 16), (250, 250, 250)).save(p, format=fmt)
    t = load_rgb(p)
    assert t.shape == (3, 16, 24) and int(t.min()) > 200


def test_png_named_jpg_is_decoded_by_content(tmp_path: Path) -> None:
    p = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (20, 10), (10, 20, 30)).save(p, format="PNG")
    t = load_rgb(p)
    assert t.shape == (3, 10, 20) and t.dtype == torch.uint8
    assert t[:, 0, 0].tolist() == [10, 20, 30]


def test_text_file_named_jpg_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError) as e:
        load_rgb(p)
    assert e.value.path == str(p) and "not an image" in e.value.reason


def test_empty_file_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(p)


def test_truncated_jpeg_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        load_rgb(p)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK").save(p, quality=100)
    assert Image.open(p).mode == "CMYK"
    t = load_rgb(p)
    r, g, b = (int(v) for v in t[:, 8, 8])
    assert t.shape == (3, 16, 16) and r > 150 and g < 90 and b < 90


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    p = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    t = load_rgb(p)
    # clipping would make nearly everything 255; scaling keeps the ramp
    assert int(t[0, 0, 0]) == 0 and int(t[0, 15, 15]) == 255
    assert 120 <= int(t[0, 8, 0]) <= 135  # the middle of the ramp stays in the middle
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_rgba_png_is_composited_on_the_fixed_background(tmp_path: Path) -> None:
    p = tmp_path / "alpha.png"
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0, 255)  # opaque red on the left, fully transparent black on the right
    Image.fromarray(arr, "RGBA").save(p)
    t = load_rgb(p)
    assert t[:, 0, 0].tolist() == [255, 0, 0]
    assert t[:, 0, 7].tolist() == list(BACKGROUND)


def test_palette_gif_with_transparency_and_animation_uses_first_frame(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (10, 10), c).convert("P") for c in ((0, 0, 255), (255, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    t = load_rgb(p)
    assert t[:, 5, 5].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    p = tmp_path / "rotated.jpg"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape: left half white
    arr[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(p, exif=exif, quality=100)
    t = load_rgb(p)
    assert t.shape == (3, 40, 20)  # displayed as portrait
    assert t[:, :15].float().mean() > 200 and t[:, 25:].float().mean() < 50  # white ends up on top


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    p = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "nope.png")


def test_jpeg_draft_decoding_keeps_at_least_the_target_size(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (90, 90, 90)).save(p)
    t = load_rgb(p, draft_size=100)
    assert min(t.shape[1:]) >= 100 and t.shape[1] < 600  # decoded at a reduced DCT scale


@pytest.mark.parametrize(
    ("size", "expected_centre"), [((1, 1), (9, 9, 9)), ((400, 3), (200, 0, 0)), ((3, 400), (200, 0, 0))]
)
def test_tiny_and_extreme_aspect_images_follow_the_one_rule(
    tmp_path: Path, size: tuple[int, int], expected_centre: tuple[int, int, int]
) -> None:
    """Rule: shorter side resized to the input size, then the centre square cropped — for every shape."""
    from imgtune.transforms import Preprocessing, prepare

    p = tmp_path / "odd.png"
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[...] = (9, 9, 9) if size == (1, 1) else (0, 0, 0)
    if size != (1, 1):  # a red middle third along the long side: what the centre crop must keep
        if w > h:
            arr[:, w // 3 : 2 * w // 3] = (200, 0, 0)
        else:
            arr[h // 3 : 2 * h // 3, :] = (200, 0, 0)
    Image.fromarray(arr).save(p)
    out = prepare(load_rgb(p), Preprocessing(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert out.shape == (3, 32, 32)
    assert [int(v) for v in out[:, 16, 16]] == list(expected_centre)


def test_resize_policies_crop_squash_pad() -> None:
    """crop: the centre square; squash: torchvision's Resize((S, S)); pad: all of it, letterboxed on black."""
    from torchvision.transforms.v2 import functional as F

    from imgtune.transforms import Preprocessing, prepare

    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    wide[:, :, :10] = 255  # a white left quarter
    wide[:, :, 30:] = 128  # a grey right quarter
    base = {"img_size": 20, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    crop = prepare(wide, Preprocessing(**base, resize="crop"))
    assert crop.shape == (3, 20, 20) and int(crop.max()) == 0  # the black centre: both quarters cut away
    squash = prepare(wide, Preprocessing(**base, resize="squash"))
    assert torch.equal(squash, F.resize(wide, [20, 20], antialias=True, interpolation=F.InterpolationMode.BICUBIC))
    assert int(squash[0, 10, 2]) > 200 and 100 < int(squash[0, 10, 17]) < 160  # both quarters kept, squeezed
    pad = prepare(wide, Preprocessing(**base, resize="pad"))
    assert pad.shape == (3, 20, 20) and int(pad[:, :5].max()) == 0 and int(pad[:, 15:].max()) == 0  # black bands
    assert int(pad[0, 10, 1]) > 200 and 100 < int(pad[0, 10, 18]) < 160  # the whole width, at half the scale
    assert Preprocessing.from_dict({**base, "resize": "shorter-side", "crop": "center"}).resize == "crop"  # old files
    with pytest.raises(ValueError, match="resize 'zoom'"):
        Preprocessing(**base, resize="zoom")


@pytest.mark.parametrize("threshold", [0.0, float("inf")], ids=["threads", "in-thread"])
def test_predict_batches_keep_order_and_report_bad_files_either_way(
    tmp_path: Path, threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is decoded on a thread per core when images are costly, else in the caller's thread: both give
    the same tensors in the order of the paths, the unreadable files by index, and torch's threads back."""
    import importlib

    from imgtune.data import decode_prepared
    from imgtune.transforms import Preprocessing

    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        p = tmp_path / f"{i:02d}.jpg"
        if i in (3, 8):
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    predict = importlib.import_module("imgtune.predict")  # the module: imgtune.predict is also a function
    prep = Preprocessing(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    monkeypatch.setattr(predict, "PARALLEL_DECODE_S", threshold)
    threads = torch.get_num_threads()
    got = list(predict.decoded_batches(paths, prep, batch_size=4, workers=0))
    assert torch.get_num_threads() == threads
    kept = [i for _, idx, _ in got for i in idx]
    assert kept == [i for i in range(11) if i not in (3, 8)]
    assert [i for _, _, bad in got for i, _ in bad] == [3, 8]
    images = torch.cat([b for b, _, _ in got if b is not None])
    assert torch.equal(images, torch.stack([decode_prepared(paths[i], prep) for i in kept]))
