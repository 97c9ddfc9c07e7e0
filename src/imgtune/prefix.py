"""The frozen blocks' outputs, computed once. With `--unfreeze N`, no augmentation and no mixing, the stem and
the lower blocks see the same image every epoch, take no gradient, and their BatchNorm uses running statistics,
so their output for an image never changes: stage 2 then feeds the top blocks from that cache instead of
running the whole network forward every step (measured 1.3x the images/s of `--unfreeze 12` alone, 1.5x of
`--unfreeze 6`: benchmarks/finetune_speed.py, docs/speed.md). The same idea as stage 1's feature cache, one
cut lower.

The model object stays whole: a cached batch travels as a `Midway`, which `Classifier.forward` recognises and
sends through the top only. Validation, the EMA, checkpoints and resume see the usual model and images.
Only timm's EfficientNet/MobileNet layout (conv_stem, bn1, blocks, conv_head, bn2) is split; the split is
checked against the whole model on the first batch before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_LAYOUT = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")


@dataclass(frozen=True)
class Midway:
    """A batch of the frozen blocks' outputs standing in for images: the backbone continues at block `start`."""

    x: torch.Tensor
    start: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Midway:
        return Midway(self.x.to(device, non_blocking=non_blocking), self.start)

    def __len__(self) -> int:
        return len(self.x)

    def finish(self, backbone: Any, channels_last: bool) -> torch.Tensor:
        """The backbone's pooled features from here on (what `backbone(image)` would have returned)."""
        z = self.x.contiguous(memory_format=torch.channels_last) if channels_last else self.x
        for block in _blocks(backbone)[self.start :]:
            z = block(z)
        out: torch.Tensor = backbone.forward_head(backbone.bn2(backbone.conv_head(z)), pre_logits=True)
        return out


def _blocks(backbone: Any) -> list[nn.Module]:
    return [block for stage in backbone.blocks for block in stage]


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def frozen_blocks(model: Any) -> int | None:  # model: a models.Classifier (which imports this module)
    """How many blocks (after the stem) are frozen below the first trainable one, or None when the model
    cannot be cut there: another layout, a trainable stem, or nothing trainable in the backbone."""
    bb: Any = model.backbone
    if not all(hasattr(bb, name) for name in _LAYOUT) or not (_frozen(bb.conv_stem) and _frozen(bb.bn1)):
        return None
    blocks = _blocks(bb)
    start = next((i for i, block in enumerate(blocks) if not _frozen(block)), None)
    return start


def why_not(
    model: Any, *, unfreeze: int | None, augment: bool, mixing: bool, compiled: bool, drop_path: float
) -> str | None:
    """None when stage 2 can train from cached frozen-block outputs, else the reason it cannot (for the log;
    '' when there is nothing frozen to cache, which needs no explanation)."""
    if unfreeze is None:
        return ""
    reasons = [
        (augment, "augmentation changes each epoch's images"),
        (mixing, "mixup/cutmix mixes images"),
        (compiled, "the model is compiled"),
        (model.bn_policy == "update", "BatchNorm statistics update in the frozen blocks"),
        (drop_path > 0, "stochastic depth drops frozen blocks at random"),
        (frozen_blocks(model) is None, f"{model.arch.get('name')} is not cut at a block boundary here"),
    ]
    return next((why for hit, why in reasons if hit), None)


@torch.inference_mode()
def bottom(model: Any, images: torch.Tensor, start: int) -> torch.Tensor:
    """The frozen stem and blocks' output for a batch of images (the model in eval mode)."""
    bb: Any = model.backbone
    z = bb.bn1(bb.conv_stem(model.normalize(images)))
    for block in _blocks(bb)[:start]:
        z = block(z)
    return z


class MidwayBatches:
    """The training batches as Midways, drawn by `loader` over indices into the cache: the same sampler and
    generator as the image loader, so the same order, the same DistributedSampler shard per epoch."""

    def __init__(self, loader: Any, cache: torch.Tensor, start: int) -> None:
        self.loader, self.cache, self.start = loader, cache, start

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Midway, torch.Tensor] | None]:
        for batch in self.loader:
            yield None if batch is None else (Midway(self.cache[batch[0]], self.start), batch[1])


class Indices(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """(index, label) pairs: what the index loader draws, the cache supplies the rest."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(i), self.labels[i]  # a tensor, as the loader's collate stacks images


def compute_cache(
    model: Any, batches: Any, device: torch.device, start: int, expected: int, memory: int
) -> torch.Tensor | str:
    """The frozen part's output for every training image, in dataset order, on the CPU (float32: the top sees
    what it would have computed itself); or why not: it would take more than 30% of `memory` bytes, an
    unreadable image would break the index alignment, or the cut model does not reproduce the whole."""
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    try:
        for i, batch in enumerate(batches):
            if batch is None:
                return "an image could not be read"
            x = batch[0].to(device)
            mid = bottom(model, x, start)
            if i == 0:
                size = expected * mid[0].numel() * 4
                if size > 0.3 * memory:
                    return f"{size / 2**30:.1f} GB of block outputs would not fit in memory"
                with torch.inference_mode():
                    whole = model(x)
                    split = model.head(Midway(mid, start).finish(model.backbone, model.channels_last))
                if not torch.allclose(whole, split, atol=1e-4, rtol=1e-4):
                    return "the cut model does not reproduce the whole one"
            parts.append(mid.cpu())
    finally:
        model.train(was_training)
    cache = torch.cat(parts) if parts else torch.empty(0)
    if len(cache) != expected:
        return f"{expected - len(cache)} images could not be read"
    return cache
