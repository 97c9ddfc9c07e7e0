"""Training options run for real on a small image folder; the LR actually follows each schedule."""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import imgtune
from conftest import small_dataset, train_small, write_class_folders
from imgtune.optim import OPTIMIZERS, SCHEDULES, LRSchedule, OptimSettings


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "recipes", train=8, valid=3)


def _train(data: Path, out: Path, **overrides: object) -> imgtune.TrainResult:
    result: imgtune.TrainResult = train_small(data, out, **{**overrides})
    return result


def _lrs(run: Path, stage: int = 2) -> list[float]:
    return [float(r["lr"]) for r in csv.DictReader((run / "lr.csv").open()) if r["stage"] == str(stage)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_follows_the_schedule(data: Path, tmp_path: Path, schedule: str) -> None:
    result = _train(
        data, tmp_path / "run", **{
            "train.epochs_frozen": 0, "train.epochs": 4, "train.schedule": schedule, "train.warmup_fraction": 0.0,
            "train.step_size": 2, "train.milestones": [1, 3], "train.gamma": 0.5,
        },
    )  # fmt: skip
    lrs = _lrs(result.run_dir)
    base = 1e-3 * 0.5  # stage-2 head LR from a pretrained start
    assert len(lrs) == 12  # 4 epochs x 3 optimizer steps
    epochs = [k // 3 for k in range(12)]
    expected = {
        "constant": [base] * 12,
        "cosine": [base * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)],
        "step": [base * 0.5 ** (e // 2) for e in epochs],
        "multistep": [base * 0.5 ** sum(e >= m for m in (1, 3)) for e in epochs],
        "exponential": [base * 0.5**e for e in epochs],
        # triangular: 0.1 x base -> base -> 0.1 x base over cycle_epochs (4) x 3 steps, starting low
        "cyclic": [base * (0.1 + 0.9 * (1 - abs(2 * (k % 12) / 12 - 1))) for k in range(12)],
    }
    if schedule in expected:
        assert lrs == pytest.approx(expected[schedule], rel=1e-5)
    elif schedule == "onecycle":
        assert lrs[0] == pytest.approx(base / 25, rel=1e-3)
        assert max(lrs) == pytest.approx(base, rel=0.1) and lrs.index(max(lrs)) in (2, 3, 4)
        assert lrs[-1] < base / 20
    else:  # plateau: only ever the base LR times powers of gamma, never increasing
        assert all(any(abs(lr - base * 0.5**k) < 1e-12 for k in range(5)) for lr in lrs)
        assert all(b <= a for a, b in itertools.pairwise(lrs))


def test_warmup_ramps_linearly_then_schedule(data: Path, tmp_path: Path) -> None:
    result = _train(
        data, tmp_path / "run", **{"train.epochs_frozen": 0, "train.epochs": 4, "train.warmup_fraction": 0.25}
    )
    lrs, base = _lrs(result.run_dir), 5e-4
    assert lrs[:3] == pytest.approx([base * k / 4 for k in (1, 2, 3)], rel=1e-5)  # 3 warmup steps
    assert lrs[3] == pytest.approx(base, rel=1e-5) and lrs[-1] < lrs[4]


def test_plateau_decays_after_patience_without_improvement() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, OptimSettings(schedule="plateau", plateau_patience=2, gamma=0.1, warmup_fraction=0), 1, 10)
    for metric, lr in [(0.5, 1.0), (0.6, 1.0), (0.6, 1.0), (0.55, 0.1), (0.7, 0.1), (0.7, 0.1), (0.7, 0.01)]:
        sched.epoch_end(metric)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    state = sched.state_dict()
    other = LRSchedule(opt, OptimSettings(schedule="plateau"), 1, 10)
    other.load_state_dict(state)
    assert other.plateau_factor == pytest.approx(0.01)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_each_optimizer_trains_and_skips_decay_on_norms_and_biases(data: Path, tmp_path: Path, optimizer: str) -> None:
    result = _train(
        data, tmp_path / "run", **{"train.epochs_frozen": 2, "train.epochs": 1, "train.optimizer": optimizer}
    )
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    groups = last["train_state"]["optimizer"]["param_groups"]
    marker = {"sgd": "nesterov", "rmsprop": "alpha", "adam": "amsgrad", "adamw": "amsgrad"}[optimizer]
    assert all(marker in g for g in groups)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}  # 1-D tensors (biases, norms) get no decay
    assert math.isfinite(result.best_valid_acc)


def test_stage_overrides_give_each_stage_its_own_optimizer_and_schedule(data: Path, tmp_path: Path) -> None:
    result = _train(
        data, tmp_path / "run", **{
            "train.epochs_frozen": 2, "train.epochs": 2, "train.stage1.schedule": "constant",
            "train.head_solver": "sgd", "train.head_min_steps": 0,
            "train.stage2.optimizer": "sgd", "train.stage2.lr": 0.01, "train.stage2.schedule": "step",
            "train.stage2.step_size": 1, "train.stage2.gamma": 0.5, "train.warmup_fraction": 0.0,
        },
    )  # fmt: skip
    assert set(_lrs(result.run_dir, 1)) == {1e-3}
    assert _lrs(result.run_dir, 2) == pytest.approx([0.01] * 3 + [0.005] * 3)
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all("nesterov" in g for g in last["train_state"]["optimizer"]["param_groups"])


@pytest.mark.parametrize("head", [[], [16], [24, 12]])
def test_heads(data: Path, tmp_path: Path, head: list[int]) -> None:
    result = _train(data, tmp_path / "run", **{"model.head": head, "train.epochs_frozen": 3, "train.epochs": 0})
    predictor = imgtune.load(result.run_dir)
    linears = [m for m in predictor.model.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [*head, 3]
    assert linears[0].in_features == 1280
    rows, _ = predictor.predict([data / "valid" / "red" / "0.png"])
    assert rows[0].label in {"red", "green", "blue"}


@pytest.mark.parametrize("balance", ["none", "sampler", "weights"])
def test_balance_options(tmp_path: Path, balance: str) -> None:
    root = tmp_path / "imb"
    write_class_folders(root / "train", 3, seed=1, classes={"a": (200, 0, 0)})
    write_class_folders(root / "train", 15, seed=2, classes={"b": (0, 0, 200)})
    write_class_folders(root / "valid", 3, seed=3, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    result = _train(root, tmp_path / "run", **{"train.balance": balance, "train.epochs_frozen": 2, "train.epochs": 1})
    assert result.best_valid_acc > 0


def test_class_balanced_sampler_draws_classes_equally() -> None:
    from imgtune.data import balanced_sampler

    labels = [0] * 10 + [1] * 90
    sampler = balanced_sampler(labels, torch.Generator().manual_seed(0))
    drawn = Counter(labels[i] for _ in range(20) for i in sampler)
    assert 0.45 < drawn[0] / sum(drawn.values()) < 0.55


def test_unfreeze_top_blocks_and_layerwise_decay() -> None:
    from imgtune.models import backbone_groups, param_groups, unfreeze_top

    model = imgtune.create_model("tf_efficientnet_lite0", num_classes=3, pretrained=False)
    blocks = backbone_groups(model.backbone)
    unfreeze_top(model, 2)
    trainable = [any(p.requires_grad for p in b) for b in blocks]
    assert trainable == [False] * (len(blocks) - 2) + [True, True]
    groups = param_groups(model, head_lr=1.0, backbone_lr=0.1, weight_decay=0.01, lr_decay=0.5)
    assert sorted({g["lr"] for g in groups}) == [0.25, 0.5, 1.0]  # top block 0.5, the next 0.25, head 1.0
    unfreeze_top(model, None)
    groups = param_groups(model, head_lr=1.0, backbone_lr=0.1, weight_decay=0.01, lr_decay=0.5)
    assert min(g["lr"] for g in groups) == pytest.approx(0.5 ** len(blocks))  # the stem


def test_regularisers_ema_mixup_accumulation_clipping(data: Path, tmp_path: Path) -> None:
    result = _train(
        data, tmp_path / "run", **{
            "train.epochs_frozen": 2, "train.epochs": 2, "train.ema": 0.9, "train.mixup": 0.5, "train.cutmix": 0.5,
            "train.random_erasing": 0.5, "train.accumulate": 2, "train.grad_clip": 0.1, "train.grad_clip_mode": "value",
            "train.unfreeze": 3, "train.lr_decay": 0.7, "train.monitor": "macro_f1",
        },
    )  # fmt: skip
    rows = [r for r in csv.DictReader((result.run_dir / "metrics.csv").open()) if r["stage"] == "2"]
    # the raw weights are evaluated beside the EMA at the stage's last epoch only (each epoch costs too much)
    assert [r["raw_valid_acc"] != "" for r in rows] == [False, True]
    assert len(_lrs(result.run_dir)) == 4  # 3 batches per epoch, 2 accumulated per step -> 2 steps per epoch
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    ema_w, raw_w = last["state_dict"]["head.1.weight"], last["train_state"]["raw_state_dict"]["head.1.weight"]
    assert not torch.equal(ema_w, raw_w)


def test_batch_mix_returns_soft_targets() -> None:
    from imgtune.augment import BatchMix

    x = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0)):
        xm, ym = BatchMix(3, mixup, cutmix)(x, y)
        assert xm.dtype == torch.float32 and float(xm.min()) >= 0 and float(xm.max()) <= 1
        assert ym.shape == (6, 3) and torch.allclose(ym.sum(1), torch.ones(6))


def test_non_finite_loss_under_autocast_falls_back_to_fp32(tmp_path: Path) -> None:
    from conftest import blank_checkpoint
    from imgtune.engine import Trainer
    from imgtune.runs import RunFolder
    from imgtune.stage import ON_FEATURES, Stage
    from imgtune.step import StepSettings

    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.lin(x)
            return out * float("nan") if self.calls == 1 else out

    module = Flaky()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    batches = [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))] * 3
    stage = Stage(1, "t", module, lambda: batches, lambda: batches, 3, 1, opt, LRSchedule(opt, OptimSettings(), 3, 1),
                  policy=ON_FEATURES, patience=None)  # fmt: skip
    trainer = Trainer(module, RunFolder(tmp_path), blank_checkpoint(), device=torch.device("cpu"), num_classes=2,
                      step=StepSettings(amp_dtype=torch.bfloat16))  # fmt: skip
    trainer.train_epoch(stage)
    assert trainer.stepper.amp_dtype is None and trainer.state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_on_cpu(data: Path, tmp_path: Path, precision: str) -> None:
    from imgtune.runtime import training_dtype

    result = _train(
        data, tmp_path / "run", **{"train.precision": precision, "train.epochs_frozen": 2, "train.epochs": 1}
    )
    assert math.isfinite(result.best_valid_acc) and result.summary["skipped_steps"] == 0
    assert training_dtype(precision, torch.device("cpu")) == (torch.bfloat16 if precision == "bf16" else None)
    assert training_dtype("auto", torch.device("cpu")) is None  # measured: bf16 training is slower on this CPU


def test_weight_ema_warms_up_then_keeps_its_horizon() -> None:
    """timm's warm-up: update t uses min(decay, (1 + t) / (10 + t)); BatchNorm's counter is copied, not mixed."""
    from imgtune.optim import weight_ema

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = weight_ema(model, decay=0.5)
    expected = None
    for t in range(30):
        with torch.no_grad():
            model[0].weight.fill_(float(t))
        model.train()(torch.randn(4, 2))
        ema.update_parameters(model)
        d = min(0.5, (1 + t) / (10 + t))  # t = the updates before this one
        expected = float(t) if expected is None else d * expected + (1 - d) * t
        assert ema.module[0].weight[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert int(ema.module[1].num_batches_tracked) == 30
    assert ema.module[0].weight[0, 0].item() == pytest.approx(29 - 1, abs=0.01)  # at decay 0.5 a ramp lags 1 step


def test_training_without_a_validation_split_keeps_the_last_epoch_and_still_tests(tmp_path: Path) -> None:
    """CIFAR's protocol: every training image trains (--valid-fraction 0), the official test set is evaluated."""
    root = tmp_path / "ds"
    write_class_folders(root / "train", 8, seed=1)
    write_class_folders(root / "test", 3, seed=3)
    result = _train(root, tmp_path / "run", **{"data.valid_fraction": 0.0, "train.epochs_frozen": 2,
                                               "train.epochs": 2})  # fmt: skip
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert [r["valid_acc"] for r in rows] == [""] * 3 and result.summary["valid_images"] == 0  # solved head + 2
    assert result.best_epoch == 3 and result.summary["best_valid_acc"] is None  # the last epoch is kept
    assert result.test is not None and result.test.n == 9 and result.summary["test_images"] == 9
    # a training metric as the monitor: the best epoch is the one with the lowest training loss
    by_loss = _train(root, tmp_path / "loss", **{"data.valid_fraction": 0.0, "train.epochs_frozen": 3,
                                                 "train.epochs": 0, "train.monitor": "train_loss",
                                                 "train.head_solver": "sgd", "train.head_min_steps": 0})  # fmt: skip
    losses = [float(r["train_loss"]) for r in csv.DictReader((by_loss.run_dir / "metrics.csv").open())]
    assert by_loss.best_epoch == losses.index(min(losses)) + 1 and by_loss.summary["monitor"] == "train_loss"


def test_plateau_can_follow_the_training_loss() -> None:
    """ReduceLROnPlateau on the training loss, as the CIFAR tutorial steps it: lower is better."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    settings = OptimSettings(schedule="plateau", plateau_patience=2, gamma=0.1, warmup_fraction=0)
    sched = LRSchedule(opt, settings, 1, 10, maximize=False)
    for loss, lr in [(2.0, 1.0), (1.5, 1.0), (1.6, 1.0), (1.5, 0.1), (1.0, 0.1)]:
        sched.epoch_end(loss)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)


def test_head_stage_on_augmented_image_batches_and_the_feature_batch(data: Path, tmp_path: Path) -> None:
    """The tutorials' frozen stage: the head trains on augmented batches of data.batch_size through the frozen
    backbone (8 steps of 3 here: 24 images / batch 8), or on cached features in batches of feature_batch."""
    images = _train(data, tmp_path / "img", **{"train.head_input": "images", "train.epochs_frozen": 2,
                                               "train.epochs": 0, "data.augment": "standard"})  # fmt: skip
    assert _lrs(images.run_dir, 1) and len(_lrs(images.run_dir, 1)) == 2 * 3
    feats = _train(data, tmp_path / "feat", **{"train.feature_batch": 5, "train.epochs_frozen": 2, "train.epochs": 0,
                                               "train.head_solver": "sgd", "train.head_min_steps": 0})  # fmt: skip
    assert len(_lrs(feats.run_dir, 1)) == 2 * 5  # ceil(24 / 5) steps per epoch
    trained = torch.load(images.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    pretrained = imgtune.create_model("tf_efficientnet_lite0", 3).state_dict()
    backbone = [k for k in pretrained if k.startswith("backbone.")]
    assert backbone and all(torch.equal(trained[k], pretrained[k]) for k in backbone)  # frozen, BN statistics too
