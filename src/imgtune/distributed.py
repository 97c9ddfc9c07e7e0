"""torchrun / DistributedDataParallel: the process group and every cross-rank operation, in one place.

A single-process run gets `Dist()` (world 1), whose collectives return their input, so the recipe and the
loop read the same either way. Rules that keep ranks in step:
- every decision (skip a step, stop, best epoch, early stop) comes from values that are identical on all ranks
  by construction: results of an all-reduce, or of DDP-synchronised weights;
- only rank 0 writes files; a step that fails on rank 0 (e.g. the run folder exists) is re-raised on all ranks;
- validation shards are disjoint and unpadded and their sums are all-reduced, so metrics are exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from imgtune.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(UserError, RuntimeError):
    """Raised on every rank when an operation done by rank 0 for all of them failed there."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun): for choices made before set-up."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda:LOCAL_RANK."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.enabled else device

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's disjoint share (every world-th item): no padding, so sums over shards are exact."""
        return list(items[self.rank :: self.world])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a CPU tensor in, a CPU tensor out; NCCL reduces on the GPU)."""
        if not self.enabled:
            return t
        on_device = t.to(self._comm_device())
        tdist.all_reduce(on_device, tdist.ReduceOp.SUM)
        return on_device.cpu()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over all ranks, in one collective."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self._comm_device())
        tdist.all_reduce(t, tdist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_objects(self, obj: T) -> list[T]:
        """One picklable value from each rank (in-memory between our own processes), on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def gather_cat(self, local: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """All ranks' tensors concatenated along dim 0 in rank order, on every rank (sizes may differ).
        Gathered `chunk` rows at a time, so the communication buffers stay small on a GPU."""
        if not self.enabled:
            return local
        dev = self._comm_device()
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(self.world)]
        tdist.all_gather(sizes, torch.tensor([len(local)], device=dev))
        counts = [int(n) for n in sizes]
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for start in range(0, max(counts), chunk):
            rows = min(chunk, max(counts) - start)
            block = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=dev)
            mine = local[start : start + rows]
            block[: len(mine)] = mine.to(dev)
            parts = [torch.empty_like(block) for _ in range(self.world)]
            tdist.all_gather(parts, block)
            for r, part in enumerate(parts):
                pieces[r].append(part[: max(0, min(rows, counts[r] - start))].cpu())
        empty = local.new_empty((0, *local.shape[1:]), device="cpu")
        return torch.cat([empty] + [piece for rank_pieces in pieces for piece in rank_pieces])

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only and hand its result to all ranks; if it raised there, raise on all ranks
        (rank 0 re-raises the original exception), so no rank waits for a partner that has failed."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:
                error = e
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        tdist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        value, message = box[0]
        if message is not None:
            raise DistributedError(f"rank 0 failed: {message}")
        return value

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_current = Dist()


def current() -> Dist:
    return _current


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (env://), once: NCCL for GPUs, gloo for CPUs."""
    global _current
    if not launched_by_torchrun():
        return _current
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend, timeout=timedelta(minutes=30))
    _current = Dist(
        rank=tdist.get_rank(),
        world=tdist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=str(tdist.get_backend()),
    )
    return _current


def teardown() -> None:
    """Leave the process group together: a gloo rank that destroys the group and exits while a peer still
    talks to it can abort at exit ("terminate called without an active exception", seen once in CI on the
    stop-probe). The barrier is bounded, so a rank whose peer has died still exits."""
    global _current
    if tdist.is_available() and tdist.is_initialized():
        if tdist.get_backend() == "gloo":
            with contextlib.suppress(Exception):
                tdist.monitored_barrier(timeout=timedelta(seconds=30))
        tdist.destroy_process_group()
    _current = Dist()


def wrap(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP around the module that trains (the head in stage 1, the Classifier in stage 2); as is otherwise."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=device if ids else None)


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    inner: nn.Module = module.module if isinstance(module, DistributedDataParallel) else module
    return inner


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch (timm's converter also handles its BatchNormAct layers)."""
    if device.type != "cuda":
        raise ValueError("sync_bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on CPUs")
    from timm.layers import convert_sync_batchnorm as timm_convert

    converted: nn.Module = timm_convert(model)
    return converted
