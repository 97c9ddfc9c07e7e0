"""LR finder, --lr auto, TensorBoard logging, --set / --print-config / config-file errors, through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import small_dataset
from imgtune.cli import app

runner = CliRunner()
SMALL = ["--img-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "lrf", train=8, valid=3)


@pytest.mark.parametrize("stage", [1, 2])
def test_lr_find_writes_plot_and_suggests_an_lr_inside_the_range(data: Path, tmp_path: Path, stage: int) -> None:
    out = tmp_path / "lr.png"
    res = runner.invoke(app, ["lr-find", str(data), "--stage", str(stage), "--steps", "60", "--out", str(out),
                              "--set", "train.epochs_frozen=3", *SMALL])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[0] > 100
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    lrs = [float(r["lr"]) for r in rows]
    assert 10 < len(rows) <= 60 and lrs == sorted(lrs)
    suggested = float(res.stdout.split("suggested LR for stage")[1].split(":")[1].split()[0])
    settled = max(5, len(lrs) // 10)
    assert lrs[settled] / 10 * 0.999 <= suggested <= lrs[-1] / 10
    assert "minimum of the smoothed loss" in res.stdout


def test_train_with_lr_auto_and_tensorboard(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # a solved head has no LR to find: --head-solver sgd trains it, so both stages run the finder
    args = ["--lr", "auto", "--epochs-frozen", "2", "--epochs", "1", "--tensorboard", "--warmup", "0",
            "--head-solver", "sgd", "--set", "train.lr_find_steps=60"]  # fmt: skip
    res = runner.invoke(app, ["train", str(data), "--out", str(run), *args, "--schedule", "constant", *SMALL])
    assert res.exit_code == 0, res.output
    assert (run / "lr_find_stage1.png").is_file() and (run / "lr_find_stage2.png").is_file()
    lrs = {r["stage"]: float(r["lr"]) for r in csv.DictReader((run / "lr.csv").open())}
    assert lrs["1"] != 1e-3 and lrs["2"] != 5e-4  # the suggestions replaced the configured LRs
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_set_and_print_config(data: Path, tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 9\n  stage2: {optimizer: sgd}\n")
    res = runner.invoke(app, ["train", str(data), "--config", str(f), "--epochs", "4", "--set", "train.stage2.lr=0.02",
                              "--set", "train.milestones=[2, 3]", "--head", "500", "--set", "train.patience=null",
                              "--print-config"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["epochs"] == 4  # flag beats file
    assert cfg["train"]["stage2"] == {**cfg["train"]["stage2"], "optimizer": "sgd", "lr": 0.02}
    assert cfg["train"]["milestones"] == [2, 3] and cfg["model"]["head"] == [500]
    assert cfg["data"]["path"] == str(data)
    assert cfg["train"]["patience"] is None


def test_bad_values_are_rejected_with_the_choices(data: Path) -> None:
    res = runner.invoke(app, ["train", str(data), "--set", "train.schedule=cosinus", "--print-config"])
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "train.schedule" in msg and "'cosinus'" in msg and "'onecycle'" in msg
    res = runner.invoke(app, ["train", str(data), "--set", "train.stage2.optimiser=sgd", "--print-config"])
    assert "unknown key" in str(res.exception) and "optimizer" in str(res.exception)
