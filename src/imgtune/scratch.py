"""Built-in architectures for training from scratch on small images (CIFAR-10, Fashion-MNIST, ...).

Each returns pooled features, like a timm backbone after `reset_classifier(0)`, so the same Classifier,
heads, recipes, export and serving code apply. VGG and ResNet reuse torchvision's layers and weight init;
only the parts that assume 224-px ImageNet input are changed. model.widths sets cnn5's and vgg16_bn_cifar's
channel widths, model.pool: flatten replaces the global pool by the flattened last map (models.Body).

| name            | what                                                                 | made for |
|-----------------|----------------------------------------------------------------------|----------|
| cnn5            | 5 x (Conv3x3-BN-ReLU-MaxPool), global pool, Linear-ReLU-Linear-ReLU-Linear | 128 px (any size) |
| vgg16_bn_cifar  | VGG16 with BatchNorm (13 conv layers), global pool, Linear-ReLU-Linear | 32 px |
| resnet18_cifar  | ResNet-18 with a 3x3 stride-1 stem and no max-pool                   | 32 px |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Inputs are normalised to about [-1, 1]; with BatchNorm after the first layer the exact values barely matter.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class ScratchNet(nn.Module):
    """features (conv stack) -> pooled to a flat vector of `num_features`: global average pooling, or the last
    feature map flattened (`flatten`, as the classic exercise CNNs do: it ties the network to one input size)."""

    def __init__(self, features: nn.Module, num_features: int) -> None:
        super().__init__()
        self.features = features
        self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = num_features

    def flatten_at(self, img_size: int) -> ScratchNet:
        """Flatten the C x k x k map an img_size input leaves (512 x 4 x 4 for cnn5 at 128 px)."""
        with torch.no_grad():
            shape = self.features(torch.zeros(1, 3, img_size, img_size)).shape
        self.pool = nn.Flatten()
        self.num_features = int(shape[1] * shape[2] * shape[3])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pool(self.features(x))
        return out


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def cnn5(widths: Sequence[int] | None = None) -> ScratchNet:
    """The classic 5-block exercise CNN (widths 32-64-128-256-512 unless given; food-11's is 64-128-256-512-512).
    The classic flattens the 4x4 map a 128-px input leaves (model.pool: flatten); the global pool instead keeps
    the input size free (28, 32, 64, 128 px ...) and the first Linear small."""
    widths = widths or (32, 64, 128, 256, 512)
    layers: list[nn.Module] = []
    cin = 3
    for cout in widths:
        # ceil_mode: odd sizes (28 -> 14 -> 7 -> 4 -> 2 -> 1) never shrink to zero
        layers += [*_conv_bn_relu(cin, cout), nn.MaxPool2d(2, ceil_mode=True)]
        cin = cout
    net = ScratchNet(nn.Sequential(*layers), cin)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def vgg16_bn_cifar(widths: Sequence[int] | None = None) -> ScratchNet:
    """torchvision's VGG16-BN convolutions (and their init); the 7x7 pool + 4096-wide classifier, sized for
    224 px, give way to a global pool and a small head. widths: the five stages' channels instead of
    64-128-256-512-512 (narrower for small data: 32-64-128-256-256)."""
    from torchvision.models import vgg16_bn
    from torchvision.models.vgg import make_layers

    if widths is None:
        features = vgg16_bn(weights=None).features
    else:
        if len(widths) != 5:
            raise ValueError(f"vgg16_bn_cifar has 5 stages: give 5 widths, not {list(widths)}")
        a, b, c, d, e = widths
        features = make_layers([a, a, "M", b, b, "M", c, c, c, "M", d, d, d, "M", e, e, e, "M"], batch_norm=True)
        for m in features.modules():  # torchvision VGG's own init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    for m in features.modules():
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = True  # same at 32 px; lets 28-px inputs through all five pools
    return ScratchNet(features, int(widths[-1]) if widths else 512)


def resnet18_cifar(widths: Sequence[int] | None = None) -> ScratchNet:
    """ResNet-18 for 32 px (He et al. 2016, CIFAR section): a 7x7/2 stem and max-pool would leave an 8x8 map
    after the stem; a 3x3/1 stem keeps all 32x32 positions for the first stage."""
    from torchvision.models import resnet18

    if widths is not None:
        raise ValueError("resnet18_cifar's widths are torchvision's ResNet-18 (64-128-256-512): not configurable")
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    features = nn.Sequential(*list(net.children())[:-2])  # up to layer4: pooling is ScratchNet's
    return ScratchNet(features, 512)


@dataclass(frozen=True)
class Builtin:
    make: Callable[[Sequence[int] | None], ScratchNet]  # widths (None: the architecture's own)
    head: tuple[int, ...]  # hidden sizes of the head when the user sets none
    head_dropout: float
    input_size: int


BUILTIN: dict[str, Builtin] = {
    "cnn5": Builtin(cnn5, head=(256, 128), head_dropout=0.3, input_size=128),
    "vgg16_bn_cifar": Builtin(vgg16_bn_cifar, head=(512,), head_dropout=0.5, input_size=32),
    "resnet18_cifar": Builtin(resnet18_cifar, head=(), head_dropout=0.0, input_size=32),
}


def is_builtin(name: str) -> bool:
    return name in BUILTIN
