"""Frozen-backbone features, computed once, so the head can train for many epochs at almost no cost.

While the backbone is frozen (and its BatchNorm uses running statistics) its output for an image never
changes, so recomputing it every epoch - what the tutorials do - wastes nearly all of stage 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from imgtune.models import Classifier
from imgtune.runtime import autocast


@torch.inference_mode()
def extract_features(
    model: Classifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor] | None],
    device: torch.device,
    dtype: torch.dtype | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x F float32 on CPU, labels N), computed under autocast to dtype (None: fp32), of the
    images after transform (an augmentation, on the device). Skipped (None) batches are dropped."""
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            if batch is None:
                continue
            x, y = batch
            x = x.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            with autocast(device, dtype):
                feats.append(model.features(x).float().cpu())
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


class FeatureStore:
    """Stage-1 features of every training image under K views (view 0 plain, views 1.. augmented), in fp16:
    K x N x F, in RAM or memory-mapped from a .npy file in the run folder when RAM is short.

    Each epoch draws one view per image, so the head sees augmentation as it would on images, while the
    backbone ran only K times over the data in all (the tutorials run it once per epoch)."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, path: Path | None = None) -> None:
        self.views, self.labels, self.path = views, labels, path

    @classmethod
    def create(cls, k: int, shape: Sequence[int], labels: torch.Tensor, path: Path | None = None) -> FeatureStore:
        """An empty K x N x F store (shape = (N, F)) to fill view by view; path: memory-map it there."""
        n, f = shape
        if path is None:
            return cls(torch.empty((k, n, f), dtype=torch.float16), labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(k, n, f))
        return cls(torch.from_numpy(array), labels, path)

    @classmethod
    def build(cls, views: Sequence[torch.Tensor], labels: torch.Tensor, path: Path | None = None) -> FeatureStore:
        """A store holding these K views (N x F each)."""
        store = cls.create(len(views), views[0].shape, labels, path)
        for i, v in enumerate(views):
            store.views[i] = v
        return store

    @property
    def nbytes(self) -> int:
        return self.views.numel() * self.views.element_size()

    def batches(
        self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: a view per image drawn from generator (the same on every rank), then shuffled
        mini-batches of float32 features as `tensor_batches` makes them."""
        k, n = self.views.shape[:2]
        view = torch.randint(k, (n,), generator=generator) if k > 1 else torch.zeros(n, dtype=torch.long)
        index = torch.arange(n)
        for idx_batch, y in tensor_batches(index, self.labels, batch_size, shuffle=True, generator=generator,
                                           shard=shard):  # fmt: skip
            yield self.views[view[idx_batch], idx_batch].float(), y

    def close(self) -> None:
        """Drop the data; a memory-mapped file is deleted (it is rebuilt on resume)."""
        self.views = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # other ranks' files may still be there
                self.path.parent.rmdir()
