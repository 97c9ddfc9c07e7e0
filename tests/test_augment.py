"""data.aug's parameters mean what torchvision's transforms of the same name mean: the batched draws follow
torchvision's get_params distributions, and the colour operations give torchvision's pixels."""

from __future__ import annotations

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


@pytest.mark.parametrize(("scale", "ratio"), [((0.7, 1.0), (1.0, 1.0)), ((0.08, 1.0), (3 / 4, 4 / 3))])
def test_random_resized_crop_draws_like_torchvision(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    torch.manual_seed(0)
    mine = BatchAugment(AugConfig(scale=scale, ratio=ratio)).draw(N, S, S).crop  # top, left, h, w
    img = torch.zeros(3, S, S)
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
