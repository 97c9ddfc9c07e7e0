"""From a Split (layouts.py) to pixels: the class-name map, decoding into the RAM cache, the Dataset, the
DataLoaders and their samplers. Layout and label discovery live in layouts.py (re-exported here).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.images import ImageError, Source, load_rgb
from imgtune.layouts import DataError, Sample
from imgtune.transforms import Preprocessing, prepare, prepare_wide, wide_width

log = logging.getLogger(__name__)


def load_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Display names from a JSON object {folder name: display name} (e.g. flowers-102's cat_to_name.json);
    folders it does not name keep their folder name."""
    import json

    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"class-name map not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"{path}: expected a JSON object mapping folder names to display names")
    missing = [c for c in classes if c not in mapping]
    if missing:
        log.warning("%s names no display name for %d class(es), e.g. %s", path, len(missing), missing[:3])
    return [str(mapping.get(c, c)) for c in classes]


# ----------------------------------------------------------------------------------------------- loading


def decode_prepared(path: Source, prep: Preprocessing, wide: float | None = None) -> torch.Tensor:
    """The one deterministic path from a file to model-ready uint8 pixels (train, eval, predict, serve); with
    `wide`, the training view around them (transforms.prepare_wide)."""
    image = load_rgb(path, draft_size=prep.img_size)
    return prepare(image, prep) if wide is None else prepare_wide(image, prep, wide)


@dataclass
class Skipped:
    path: str
    reason: str


def decode_many(
    paths: Sequence[Path], prep: Preprocessing, threads: int | None = None, wide: float | None = None
) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Decode and prepare all paths into one N x 3 x S x S uint8 tensor (RAM cache); with `wide`, N x 4 x S x W
    training views (transforms.prepare_wide).

    Returns (images, indices of the paths that decoded, skipped files with reasons).
    Threads overlap well here: Pillow and torchvision resize release the GIL.
    """
    s = prep.img_size
    shape = (3, s, s) if wide is None else (4, s, wide_width(s, wide))
    images = torch.empty((len(paths), *shape), dtype=torch.uint8)
    ok: list[int] = []
    skipped: list[Skipped] = []

    def work(i: int) -> tuple[int, ImageError | None]:
        try:
            images[i] = decode_prepared(paths[i], prep, wide)
            return i, None
        except ImageError as e:
            return i, e

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        for i, err in pool.map(work, range(len(paths))):
            if err is None:
                ok.append(i)
            else:
                skipped.append(Skipped(err.path, err.reason))
                log.warning("skipped unreadable image %s: %s", err.path, err.reason)
    if len(ok) < len(paths):
        images = images[torch.tensor(ok, dtype=torch.long)] if ok else images[:0]
    return images, ok, skipped


class ImageDataset(Dataset[tuple[torch.Tensor, int] | None]):
    """Images (from a RAM cache when given one) -> (uint8 CHW, label); augmentation runs later, on whole
    batches (transforms.BatchAugment).

    An undecodable file yields None, which `collate_skip` drops: one bad file never stops an epoch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: Preprocessing,
        cache: torch.Tensor | None = None,
        wide: float | None = None,
    ) -> None:
        if cache is not None and len(cache) != len(samples):
            raise ValueError("cache and samples differ in length")
        self.samples = list(samples)
        self.prep = prep
        self.cache = cache
        self.wide = wide  # training views wider than the centre square (data.train_aspect)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        s = self.samples[i]
        if self.cache is not None:
            img = self.cache[i]
        else:
            try:
                img = decode_prepared(s.path, self.prep, self.wide)
            except ImageError as e:
                log.warning("skipped unreadable image %s: %s", e.path, e.reason)
                return None
        return img, s.label


def collate_skip(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    items = [b for b in batch if b is not None]
    if not items:
        return None
    return torch.stack([b[0] for b in items]), torch.tensor([b[1] for b in items], dtype=torch.long)


def balanced_sampler(labels: Sequence[int], generator: torch.Generator) -> torch.utils.data.WeightedRandomSampler:
    """Draws every class equally often (with replacement): each sample weighted by 1 / its class count."""
    t = torch.tensor(list(labels), dtype=torch.long)
    weights = (1.0 / torch.bincount(t).clamp(min=1).double())[t]
    return torch.utils.data.WeightedRandomSampler(weights.tolist(), len(t), replacement=True, generator=generator)


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def should_cache(
    mode: str, n_images: int, img_size: int, budget_fraction: float = 0.3, bytes_per_image: int | None = None
) -> bool:
    """auto: cache when the uint8 tensors take under 30% of the memory available now."""
    if mode == "ram":
        return True
    if mode == "none":
        return False
    return n_images * (bytes_per_image or 3 * img_size * img_size) < budget_fraction * available_memory()


def default_workers(cached: bool, device: torch.device) -> int:
    """From RAM-cached tensors, in-process loading wins on small CPU machines (no IPC, no core stolen
    from the model); decoding from disk, or feeding a GPU, wants worker processes."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and (cached or cpus <= 2):
        return 0
    return max(1, min(8, cpus - 1))


def make_loader(
    dataset: Dataset[tuple[torch.Tensor, int] | None],
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    generator: torch.Generator | None = None,
    sampler: torch.utils.data.Sampler[int] | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[tuple[torch.Tensor, int] | None]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
