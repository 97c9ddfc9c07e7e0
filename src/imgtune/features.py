"""Frozen-backbone features, computed once, so the head can train for many epochs at almost no cost.

While the backbone is frozen (and its BatchNorm uses running statistics) its output for an image never
changes, so recomputing it every epoch - what the tutorials do - wastes nearly all of stage 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from imgtune.models import Classifier


@torch.inference_mode()
def extract_features(
    model: Classifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor] | None], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x F float32 on CPU, labels N). Skipped (None) batches from unreadable files are dropped."""
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            if batch is None:
                continue
            x, y = batch
            feats.append(model.features(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    if not feats:
        return torch.empty(0, int(model.arch["num_features"])), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def tensor_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches straight from in-memory tensors: far cheaper than a DataLoader for tiny items.

    shard=(rank, world): like DistributedSampler, one permutation (same generator state on every rank) padded
    by wrapping to a multiple of world, every world-th index, so all ranks run the same number of steps."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    rank, world = shard
    if world > 1 and len(order):
        per_rank = math.ceil(len(order) / world)
        order = order.repeat(math.ceil(per_rank * world / len(order)))[: per_rank * world][rank::world]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
