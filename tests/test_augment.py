"""data.aug's parameters mean what torchvision's transforms of the same name mean: the batched draws follow
torchvision's get_params distributions, and the colour operations give torchvision's pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from imgtune.augment import BatchAugment, shift_hue
from imgtune.config import AugConfig, build_config

N, S = 4000, 64


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).unique()
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


LIMIT = 0.06  # 4000 draws a side: two samples of one distribution are this far apart once in ~10^5 times


@pytest.mark.parametrize(
    ("scale", "ratio", "photo"),
    [((0.7, 1.0), (1.0, 1.0), (S, S)), ((0.08, 1.0), (3 / 4, 4 / 3), (S, S)), ((0.08, 1.0), (3 / 4, 4 / 3), (48, 64))],
)
def test_random_resized_crop_draws_like_torchvision(
    scale: tuple[float, float], ratio: tuple[float, float], photo: tuple[int, int]
) -> None:
    """Also from a 4:3 photo's whole area, as a wide training view (data.train_aspect) draws them."""
    torch.manual_seed(0)
    source = torch.full((N,), float(photo[0])), torch.full((N,), float(photo[1]))
    mine = BatchAugment(AugConfig(scale=scale, ratio=ratio)).draw(N, S, S, source=source).crop  # top, left, h, w
    img = torch.zeros(3, *photo)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(N)])
    for k, what in enumerate(("top", "left", "height", "width")):
        assert _ks(mine[:, k], theirs[:, k].float()) < LIMIT, what
        assert mine[:, k].min() >= theirs[:, k].min() - 1 and mine[:, k].max() <= theirs[:, k].max() + 1, what
    assert _ks(mine[:, 2] * mine[:, 3], (theirs[:, 2] * theirs[:, 3]).float()) < LIMIT  # the area


def test_rotation_jitter_and_erasing_draw_like_torchvision() -> None:
    aug = AugConfig(rotate=25, brightness=0.2, contrast=0.3, saturation=0.4, hue=0.05, erase=1.0)
    torch.manual_seed(0)
    d = BatchAugment(aug).draw(N, S, S)
    angles = torch.tensor([T.RandomRotation.get_params([-25.0, 25.0]) for _ in range(N)])
    assert _ks(d.angle, angles) < LIMIT and d.angle.abs().max() <= 25
    jitter = [T.ColorJitter.get_params((0.8, 1.2), (0.7, 1.3), (0.6, 1.4), (-0.05, 0.05)) for _ in range(N)]
    for k in range(4):  # brightness, contrast, saturation factors and the hue shift
        theirs = torch.tensor([float(j[k + 1]) for j in jitter])
        assert _ks(d.factors[:, k], theirs) < LIMIT, k
    img = torch.zeros(3, S, S)
    erased = torch.tensor([T.RandomErasing.get_params(img, (0.02, 0.33), (0.3, 3.3), [0])[:4] for _ in range(N)])
    for k, what in enumerate(("top", "left", "height", "width")):
        assert _ks(d.erase[:, k], erased[:, k].float()) < LIMIT, what


def test_colour_operations_give_torchvisions_pixels() -> None:
    """Hue (HSV, as adjust_hue), then the whole ColorJitter in one fixed order, image by image."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    shifts = torch.tensor([0.05, -0.05, 0.2, -0.45, 0.0, 0.5])
    ours = shift_hue(x, shifts)
    for i in range(len(x)):
        assert torch.allclose(ours[i], TF.adjust_hue(x[i], float(shifts[i])), atol=1e-5)
    aug = BatchAugment(AugConfig(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, hflip=0.0))
    d = aug.draw(len(x), 16, 16)
    out = aug.apply(x, d)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(len(x)):
        want = x[i]
        for op in d.order.tolist():
            want = ops[op](want, float(d.factors[i, op]))
        assert torch.allclose(out[i], want, atol=1e-5), i


def test_flips_grayscale_and_the_resolved_config() -> None:
    x = torch.rand(4, 3, 8, 8)
    flipped = BatchAugment(AugConfig(hflip=0.0, vflip=1.0))(x)
    assert torch.allclose(flipped, x.flip(-2), atol=1e-6)
    gray = BatchAugment(AugConfig(hflip=0.0, grayscale=1.0))(x)
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6)
    cfg = build_config(overrides={"data.path": "d", "data.augment": "standard"}, explicit={"data.aug.hue": 0.05})
    assert cfg.data.aug.hue == 0.05 and cfg.data.aug.scale == (0.6, 1.0) and cfg.data.aug.rotate == 10  # preset + key
    assert "hue: 0.05" in cfg.to_yaml() and "rotate: 10.0" in cfg.to_yaml()  # resolved values in config.yaml
    again = build_config(base=__import__("yaml").safe_load(cfg.to_yaml()), overrides={"data.augment": "light"})
    assert again.data.aug.rotate == 0 and again.data.aug.hue == 0  # a new preset on the command line replaces them
    with pytest.raises(Exception, match="scale"):
        AugConfig(scale=(0.9, 0.5))


def _striped(h: int, w: int) -> torch.Tensor:
    """A photo whose outer eighths along its long side are red and blue, the rest green."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[1] = 200
    edge = max(h, w) // 8
    first, last = (slice(None), slice(0, edge)), (slice(None), slice(-edge, None))
    if h > w:
        first, last = first[::-1], last[::-1]
    img[(0, *first)], img[(1, *first)] = 255, 0
    img[(2, *last)], img[(1, *last)] = 255, 0
    return img


def test_wide_training_views_reach_past_the_centre_square_and_keep_orientation() -> None:
    from imgtune.transforms import Preprocessing, prepare, prepare_wide

    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    photos = [
        _striped(48, 64),
        _striped(64, 48),
        _striped(40, 40),
        torch.randint(0, 256, (3, 37, 90), dtype=torch.uint8),
    ]
    wide = torch.stack([prepare_wide(p, prep, 4 / 3) for p in photos])
    square = torch.stack([prepare(p, prep) for p in photos])
    assert torch.equal(BatchAugment.plain(wide), square)  # view 0 / evaluation: exactly the centre square
    torch.testing.assert_close(BatchAugment(AugConfig(hflip=0))(wide), square.float() / 255)  # nothing drawn

    aug = BatchAugment(AugConfig(scale=(0.95, 1.0), hflip=0))  # ~the whole photo, either way up
    torch.manual_seed(0)
    out = aug(wide[:2].repeat(32, 1, 1, 1))
    red, blue = (out[:, 0] > 0.8) & (out[:, 1] < 0.2), (out[:, 2] > 0.8) & (out[:, 1] < 0.2)
    assert not (square[:2, 0] == 255).any()  # the square view never sees the red and blue strips
    landscape, portrait = slice(0, None, 2), slice(1, None, 2)
    assert red[landscape][:, :, :2].float().mean() > 0.9 and blue[landscape][:, :, -2:].float().mean() > 0.9
    assert red[portrait][:, :2].float().mean() > 0.9 and blue[portrait][:, -2:].float().mean() > 0.9  # upright
    assert red[landscape][:, :, -8:].float().mean() < 0.05 and red[portrait][:, -8:].float().mean() < 0.05


def test_training_with_wide_views_end_to_end(tmp_path: Path) -> None:
    """data.train_aspect through a real run on 4:3 and 3:4 photos: cached and decoded on the fly, the head on
    plain and augmented feature views, fine-tuning on wide crops; evaluation still sees the centre square."""
    import imgtune
    from conftest import PALETTE, shape_image

    for split, n in (("train", 6), ("valid", 2)):
        for k, (name, colour) in enumerate(PALETTE.items()):
            (tmp_path / "ds" / split / name).mkdir(parents=True)
            for i in range(n):
                box = (0, 6, 48, 42) if i % 2 else (6, 0, 42, 48)
                shape_image(colour, 100 * k + i, size=48).crop(box).save(tmp_path / "ds" / split / name / f"{i}.png")
    cfg = imgtune.build_config(overrides={
        "data.path": tmp_path / "ds", "out": tmp_path / "run", "data.img_size": 32, "data.cache": "ram",
        "data.batch_size": 6, "data.train_aspect": 1.33, "train.epochs_frozen": 1, "train.epochs": 1,
        "train.feature_views": 2,
    })  # fmt: skip
    result = imgtune.train(cfg)
    assert result.summary["epochs_run"] == 2 and result.summary["train_images"] == 18
    assert "train_aspect: 1.33" in (result.run_dir / "config.yaml").read_text()
    assert (result.run_dir / "plots" / "samples.png").is_file()
    ckpt = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["preprocessing"]["resize"] == "crop"  # what predict and serve do is unchanged
    # --cache none decodes the same wide views on the fly
    from imgtune.data import ImageDataset, decode_many
    from imgtune.layouts import load_split
    from imgtune.transforms import Preprocessing

    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    samples = load_split(tmp_path / "ds", 0.2, 0).train[:4]
    cached, _, _ = decode_many([x.path for x in samples], prep, wide=1.33)
    on_the_fly = torch.stack([ImageDataset(samples, prep, None, 1.33)[i][0] for i in range(4)])  # type: ignore[index]
    assert cached.shape == (4, 4, 32, 43) and torch.equal(cached, on_the_fly)
