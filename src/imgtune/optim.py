"""Optimizers and learning-rate schedules by name: two registries (`register_optimizer`, `register_schedule`).

Every schedule is one `LRSchedule`: a factor on each param group's base LR, recomputed after every batch
(linear warmup first, then the named shape). A shape is a plain function of where the stage is (`Clock`):
epoch-shaped schedules (step, multistep, exponential) change at epoch boundaries, the batch-shaped ones
(cosine, one-cycle) every step, and plateau reads the factor that the monitored metric has decayed at epoch
ends. The state is plain numbers, so it checkpoints with weights_only. A new schedule is one function:

    @register_schedule("linear")
    def _linear(clock: Clock, s: OptimSettings) -> float:
        return 1.0 - clock.step / clock.total
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

OptimizerFactory = Callable[[list[dict[str, Any]], "OptimSettings"], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


@dataclass(frozen=True)
class OptimSettings:
    """What one stage's optimizer and schedule need; resolved from the config per stage."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_fraction: float = 0.1
    step_size: int = 10
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    plateau_patience: int = 2
    cycle_epochs: float = 4.0
    cycle_floor: float = 0.1


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Add an optimizer under `name` (train.optimizer, --optimizer): factory(param groups, settings)."""

    def add(factory: OptimizerFactory) -> OptimizerFactory:
        _check_new(OPTIMIZERS, name, "optimizer")
        OPTIMIZERS[name] = factory
        return factory

    return add


def _check_new(table: dict[str, Any], name: str, what: str) -> None:
    if name in table:
        raise ValueError(f"{what} {name!r} is registered twice")


def check_choice(table: dict[str, Any], name: str, what: str) -> str:
    """For config validation: `name` if it is registered, else an error that lists what is."""
    if name not in table:
        raise ValueError(f"{name!r} is not a registered {what}; choose one of {', '.join(map(repr, table))}")
    return name


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], s: OptimSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0)


@register_optimizer("adam")
def _adam(groups: list[dict[str, Any]], s: OptimSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=s.lr)


@register_optimizer("adamw")
def _adamw(groups: list[dict[str, Any]], s: OptimSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=s.lr)


@register_optimizer("rmsprop")
def _rmsprop(groups: list[dict[str, Any]], s: OptimSettings) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=s.lr, momentum=s.momentum, alpha=0.9, eps=1e-3)  # timm's TF-like eps


def make_optimizer(groups: list[dict[str, Any]], settings: OptimSettings) -> torch.optim.Optimizer:
    """groups carry their own lr and weight_decay (see models.param_groups)."""
    return OPTIMIZERS[check_choice(OPTIMIZERS, settings.optimizer, "optimizer")](groups, settings)


@dataclass(frozen=True)
class Clock:
    """Where a stage is when its LR factor is computed."""

    step: int  # optimizer steps taken in the stage
    epoch: int  # epochs completed (step // steps per epoch)
    steps_per_epoch: int
    total: int  # optimizer steps in the whole stage
    warmup: int  # linear warmup steps (0 for a schedule with its own warm-up phase)
    plateau_factor: float  # the product of the decays the monitored metric has triggered so far


ShapeFn = Callable[[Clock, OptimSettings], float]


@dataclass(frozen=True)
class Schedule:
    shape: ShapeFn  # the factor on the base LR, after warmup
    warmup: bool = True  # False: the shape warms up itself (one-cycle), the linear warmup is not applied
    follows_monitor: bool = False  # True: the monitored metric decays the LR at epoch ends (plateau)


SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str, *, warmup: bool = True, follows_monitor: bool = False) -> Callable[[ShapeFn], ShapeFn]:
    """Add an LR schedule under `name` (train.schedule, --schedule): shape(clock, settings) -> factor."""

    def add(shape: ShapeFn) -> ShapeFn:
        _check_new(SCHEDULES, name, "schedule")
        SCHEDULES[name] = Schedule(shape, warmup, follows_monitor)
        return shape

    return add


@register_schedule("constant")
def _constant(clock: Clock, s: OptimSettings) -> float:
    return 1.0


@register_schedule("cosine")
def _cosine(clock: Clock, s: OptimSettings) -> float:
    t = (clock.step - clock.warmup) / max(1, clock.total - clock.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, t))))


@register_schedule("onecycle", warmup=False)
def _onecycle(clock: Clock, s: OptimSettings) -> float:
    return _one_cycle(clock.step / clock.total)


@register_schedule("step")
def _step(clock: Clock, s: OptimSettings) -> float:
    return s.gamma ** (clock.epoch // max(1, s.step_size))


@register_schedule("multistep")
def _multistep(clock: Clock, s: OptimSettings) -> float:
    return s.gamma ** sum(clock.epoch >= m for m in s.milestones)


@register_schedule("exponential")
def _exponential(clock: Clock, s: OptimSettings) -> float:
    return s.gamma**clock.epoch


@register_schedule("cyclic", warmup=False)
def _cyclic(clock: Clock, s: OptimSettings) -> float:
    """Smith's triangular cyclic LR (CLR, torch's CyclicLR mode "triangular"): from cycle_floor x LR up to the LR
    and back down, linearly, once every cycle_epochs epochs; it starts at the low end, so it needs no warmup."""
    period = max(1.0, s.cycle_epochs * clock.steps_per_epoch)
    t = (clock.step % period) / period
    return s.cycle_floor + (1.0 - s.cycle_floor) * (1.0 - abs(2.0 * t - 1.0))


@register_schedule("plateau", follows_monitor=True)
def _plateau(clock: Clock, s: OptimSettings) -> float:
    return clock.plateau_factor


class LRSchedule:
    """LR of group i after `step` batches = base_i * warmup(step) * shape(step)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, settings: OptimSettings, steps_per_epoch: int, epochs: int, *,
        maximize: bool = True,
    ) -> None:  # fmt: skip
        self.kind = SCHEDULES[check_choice(SCHEDULES, settings.schedule, "schedule")]
        self.optimizer = optimizer
        self.s = settings
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = self.steps_per_epoch * max(1, epochs)
        # one-cycle has its own warm-up phase; for the others warmup is a linear ramp over this many steps
        self.warmup = int(self.total * settings.warmup_fraction) if self.kind.warmup else 0
        self.maximize = maximize
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            g["initial_lr"] = base
        self.step_count = 0
        self.plateau_factor = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0
        self._apply()

    def factor(self, step: int) -> float:
        warm = (step + 1) / (self.warmup + 1) if step < self.warmup else 1.0
        clock = Clock(step, step // self.steps_per_epoch, self.steps_per_epoch, self.total, self.warmup,
                      self.plateau_factor)  # fmt: skip
        return warm * self.kind.shape(clock, self.s)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def epoch_end(self, metric: float) -> None:
        """ReduceLROnPlateau's rule: after `plateau_patience` epochs without improvement, LR *= gamma."""
        if not self.kind.follows_monitor or math.isnan(metric):
            return
        better = self.plateau_best is None or (
            metric > self.plateau_best if self.maximize else metric < self.plateau_best
        )
        if better:
            self.plateau_best, self.plateau_bad = metric, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= self.s.plateau_patience:
                self.plateau_factor *= self.s.gamma
                self.plateau_bad = 0
        self._apply()

    def rescale(self, factor: float) -> None:
        """Multiply every group's base LR (the LR finder's suggestion replaces the configured LR)."""
        self.base_lrs = [b * factor for b in self.base_lrs]
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["initial_lr"] = base
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": list(self.base_lrs),
            "step_count": self.step_count,
            "plateau_factor": self.plateau_factor,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = [float(b) for b in state.get("base_lrs", self.base_lrs)]
        self.step_count = int(state["step_count"])
        self.plateau_factor = float(state["plateau_factor"])
        self.plateau_best = None if state["plateau_best"] is None else float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self._apply()


def _one_cycle(t: float, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e4) -> float:
    """Smith's one-cycle (as torch's OneCycleLR, cosine phases): base/div -> base -> base/(div*final_div)."""
    t = min(1.0, max(0.0, t))
    start, low = 1.0 / div, 1.0 / (div * final_div)
    if t < pct_start:
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * t / pct_start))
    u = (t - pct_start) / (1.0 - pct_start)
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * u))


def weight_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """Exponential moving average of the weights (and BatchNorm buffers), with timm's warm-up: update t uses
    min(decay, (1 + t) / (10 + t)). A fixed 0.99 over a stage of 50 steps (a few hundred images) would still
    carry 60% of the starting weights at its end; with the warm-up the average follows the early steps closely
    and reaches the set horizon only once there are enough steps for it. The count of updates is the
    AveragedModel's `n_averaged`, which checkpoints keep, so a resumed run averages exactly as before."""
    from torch.optim.swa_utils import AveragedModel

    Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]

    @torch.no_grad()
    def update(averaged: Tensors, current: Tensors, n: torch.Tensor | int) -> None:
        if not averaged[0].is_floating_point():  # counters (BatchNorm's num_batches_tracked): the latest
            torch._foreach_copy_(averaged, current)
            return
        t = torch.as_tensor(n, dtype=averaged[0].dtype, device=averaged[0].device)
        # a tensor weight (an overload the type stubs lack): no host-device synchronisation per step on a GPU
        weight = 1.0 - torch.clamp((1 + t) / (10 + t), max=decay)
        torch._foreach_lerp_(averaged, current, weight)  # type: ignore[call-overload]

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
