"""Launched by test_distributed.py with torchrun (2 CPU processes, gloo). Exactly one rank asks to stop -
during a training step or during validation - as when a signal reaches one process of a job first.
Every rank must stop at the same place; each writes what it saw to OUT/rank<r>.json.

usage: python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_probe.py OUT train:EPOCH:STEP|valid:EPOCH
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from conftest import blank_checkpoint
from imgtune.distributed import setup, teardown, wrap
from imgtune.engine import Interrupted, Trainer
from imgtune.features import tensor_batches
from imgtune.optim import LRSchedule, OptimSettings, make_optimizer
from imgtune.runs import RunFolder
from imgtune.runtime import StopRequest
from imgtune.stage import ON_IMAGES, Stage


def main(out: Path, where: str) -> None:
    d = setup(torch.device("cpu"))
    # uneven shards, gathered a few rows at a time: rank 0 has 5 rows, rank 1 has 3
    mine = torch.arange(d.rank * 100, d.rank * 100 + (5 if d.rank == 0 else 3)).view(-1, 1)
    gathered = d.gather_cat(mine, chunk=2).view(-1).tolist()
    kind, *at = where.split(":")
    stop_epoch = int(at[0])
    stop_step = int(at[1]) if kind == "train" else -1
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(8, 2)
    run = RunFolder(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    stop = StopRequest()
    trainer = Trainer(model, run, blank_checkpoint(), device=torch.device("cpu"), num_classes=2, dist=d, stop=stop)
    generator = torch.Generator().manual_seed(0)
    batch = 4
    steps = len(range(0, 96 // d.world, batch))
    settings = OptimSettings(optimizer="sgd", lr=0.1)
    opt = make_optimizer([{"params": list(model.parameters())}], settings)

    def train_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, b in enumerate(tensor_batches(x, y, batch, shuffle=True, generator=generator, shard=(d.rank, d.world))):
            if kind == "train" and d.rank == 1 and trainer.state.epoch + 1 == stop_epoch and i == stop_step:
                stop.request()  # rank 1 alone
            yield b

    def valid_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = slice(d.rank, None, d.world)
        for i, b in enumerate(tensor_batches(x[shard], y[shard], 8, shuffle=False)):
            if kind == "valid" and d.rank == 1 and trainer.state.epoch + 1 == stop_epoch and i == 1:
                stop.request()  # in the middle of validation
            yield b

    stage = Stage(
        number=2, description="probe", module=wrap(model, d, torch.device("cpu")), train_batches=train_batches,
        valid_batches=valid_batches, batches_per_epoch=steps, epochs=6, optimizer=opt,
        scheduler=LRSchedule(opt, settings, steps, 6), policy=ON_IMAGES, patience=None, generator=generator,
    )  # fmt: skip
    stopped = ""
    try:
        trainer.run_stage(stage)
    except Interrupted as e:
        stopped = str(e)
    result = {"rank": d.rank, "epochs_done": trainer.state.epoch, "stopped": stopped, "asked": stop.requested,
              "gathered": gathered}  # fmt: skip
    (out / f"rank{d.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    finally:
        # a gloo group left alive at interpreter exit can abort ("terminate called without an active exception")
        teardown()
