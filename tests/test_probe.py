"""Stage 1's linear head is solved (probe.py): the solver's answer, and a run's head stage that ends at the
same head whatever --epochs-frozen says; MLP heads get their minimum number of steps."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import small_dataset, train_small
from imgtune.probe import WEIGHT_DECAYS, fit_linear, solve_linear_head


def _blobs(n: int, classes: int = 4, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes with an offset and a scale far from standardised, as raw backbone features are."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, dim, generator=g) * 2.5
    return x * 0.05 + 1.0, y


def test_solved_head_takes_raw_features_and_beats_the_grid_neighbours() -> None:
    x, y = _blobs(400)
    xv, yv = _blobs(200, seed=1)
    fit = solve_linear_head(x, y, 4, xv, yv, label_smoothing=0.1)
    assert fit.held_out == "valid" and fit.weight_decay in WEIGHT_DECAYS and fit.iterations > 0
    logits = torch.addmm(fit.bias, xv, fit.weight.t())  # the raw features, as the Linear layer gets them
    assert float(F.cross_entropy(logits, yv)) == pytest.approx(fit.held_out_loss, rel=1e-4)
    assert float((logits.argmax(1) == yv).float().mean()) > 0.9
    # each other weight decay of the grid does no better on the held-out features
    mean = x.mean(0)
    scale = (x - mean).pow(2).mean().sqrt()
    for wd in WEIGHT_DECAYS:
        w, b, _ = fit_linear((x - mean) / scale, y, 4, wd, label_smoothing=0.1)
        loss = float(F.cross_entropy(torch.addmm(b, (xv - mean) / scale, w.t()), yv))
        assert loss >= fit.held_out_loss - 1e-4, wd


def test_without_validation_a_fifth_of_train_picks_the_weight_decay() -> None:
    x, y = _blobs(300)
    fit = solve_linear_head(x, y, 4)
    assert fit.held_out == "a fifth of train"
    xt, yt = _blobs(200, seed=2)
    assert float((torch.addmm(fit.bias, xt, fit.weight.t()).argmax(1) == yt).float().mean()) > 0.9


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "probe", train=10, valid=5)


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_head_stage_ends_at_the_same_head_for_any_epochs_frozen(data: Path, tmp_path: Path) -> None:
    one = train_small(data, tmp_path / "one", **{"train.epochs_frozen": 1, "train.epochs": 0})
    many = train_small(data, tmp_path / "many", **{"train.epochs_frozen": 30, "train.epochs": 0})
    heads = [torch.load(r.run_dir / "checkpoints" / "best.pt", weights_only=True)["state_dict"] for r in (one, many)]
    assert torch.equal(heads[0]["head.1.weight"], heads[1]["head.1.weight"])
    rows = _rows(many.run_dir)
    assert [r["stage"] for r in rows] == ["1"]  # one solved "epoch", not 30
    assert float(rows[0]["valid_acc"]) == 1.0  # three colour classes: a solved linear head separates them
    assert float(rows[0]["train_acc"]) == 1.0


def test_an_mlp_head_trains_at_least_head_min_steps(data: Path, tmp_path: Path) -> None:
    # 30 training images in features batches of 8: 4 steps an epoch, so 20 steps take 5 epochs
    run = train_small(data, tmp_path / "mlp", **{"model.head": [16], "train.epochs_frozen": 2, "train.epochs": 0,
                                                 "train.feature_batch": 8, "train.head_min_steps": 20})  # fmt: skip
    assert len(_rows(run.run_dir)) == 5
    exact = train_small(data, tmp_path / "exact", **{"model.head": [16], "train.epochs_frozen": 2, "train.epochs": 0,
                                                     "train.feature_batch": 8, "train.head_min_steps": 0})  # fmt: skip
    assert len(_rows(exact.run_dir)) == 2


def test_sgd_solver_trains_a_linear_head_for_its_epochs(data: Path, tmp_path: Path) -> None:
    run = train_small(data, tmp_path / "sgd", **{"train.head_solver": "sgd", "train.epochs_frozen": 3,
                                                 "train.epochs": 0, "train.head_min_steps": 0})  # fmt: skip
    assert [r["stage"] for r in _rows(run.run_dir)] == ["1", "1", "1"]


def test_progress_lines_say_the_eta() -> None:
    import io

    from imgtune.progress import LineProgress, duration

    out = io.StringIO()
    task = LineProgress(every_s=0.0, stream=out).task("stage 2 epoch 3", 4)
    task.advance(1, loss=0.5)
    task.advance(3)
    task.close()
    first = out.getvalue().splitlines()[0]
    assert first.startswith("stage 2 epoch 3: 1/4 (") and ", eta " in first and "loss 0.5" in first
    assert "4/4" in out.getvalue().splitlines()[-1] and "eta" not in out.getvalue().splitlines()[-1]
    assert (duration(9), duration(245), duration(3720)) == ("9 s", "4 min 05 s", "1 h 02 min")


def test_lbfgs_is_for_linear_heads() -> None:
    import imgtune
    from imgtune.config import ConfigError

    with pytest.raises(ConfigError, match="lbfgs solves a linear head"):
        imgtune.build_config(overrides={"data.path": "x", "train.head_solver": "lbfgs", "model.head": [500]})
