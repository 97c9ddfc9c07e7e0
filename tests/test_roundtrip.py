"""train -> eval -> predict on small real image folders, through the library and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import imgtune
from imgtune.cli import app
from imgtune.tracking import METRIC_COLUMNS

runner = CliRunner()
FAST = {"data.img_size": 48, "data.batch_size": 8, "train.epochs_frozen": 8, "train.epochs": 1}


def _config(data: Path, out: Path, **extra: object) -> imgtune.Config:
    return imgtune.build_config(overrides={"data.path": data, "out": out, **FAST, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, imgtune.TrainResult]:
    from conftest import write_class_folders

    root = tmp_path_factory.mktemp("rt") / "ds"
    write_class_folders(root / "train", 12, seed=1)
    write_class_folders(root / "valid", 4, seed=2)
    write_class_folders(root / "test", 5, seed=3, fmt="jpg")
    (root / "train" / "red" / "broken.jpg").write_text("not an image")  # skipped and reported, no crash
    result = imgtune.train(_config(root, root.parent / "run"))
    return root, root.parent / "run", result


def test_run_folder_contents(trained: tuple[Path, Path, imgtune.TrainResult]) -> None:
    root, run, result = trained
    for name in (
        "config.yaml",
        "classes.json",
        "metrics.csv",
        "summary.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    assert not (run / "split.csv").exists()  # the data came split already
    assert json.loads((run / "classes.json").read_text()) == ["blue", "green", "red"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["img_size"] == 48 and cfg["train"]["label_smoothing"] == 0.1 and cfg["out"] == str(run)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == METRIC_COLUMNS
    assert [r["stage"] for r in rows] == ["1", "2"]  # the solved head (whatever epochs_frozen says), fine-tuning
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == result.best_epoch
    assert summary["best_valid_acc"] == pytest.approx(max(float(r["valid_acc"]) for r in rows), abs=1e-6)
    assert summary["test_acc"] == pytest.approx(result.test.accuracy)  # type: ignore[union-attr]
    assert summary["skipped_files"] == [
        {"path": str(root / "train/red/broken.jpg"), "reason": "not an image Pillow can read"}
    ]
    assert result.best_valid_acc >= 0.9  # three colours: a pretrained backbone separates them at once


def test_checkpoints_load_with_weights_only(trained: tuple[Path, Path, imgtune.TrainResult]) -> None:
    _, run, _ = trained
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["classes"] == ["blue", "green", "red"]
        assert ckpt["arch"]["name"] == "tf_efficientnet_lite0" and ckpt["preprocessing"]["img_size"] == 48
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert "optimizer" in last["train_state"] and isinstance(last["train_state"]["rng"]["torch"], torch.Tensor)


def test_eval_and_predict_agree(trained: tuple[Path, Path, imgtune.TrainResult], tmp_path: Path) -> None:
    root, run, result = trained
    ev = imgtune.evaluate(run, root, "test")
    assert ev.n == 15 and ev.accuracy == pytest.approx(result.test.accuracy)  # type: ignore[union-attr]
    assert sum(sum(r) for r in ev.confusion_matrix) == 15
    out = tmp_path / "pred.csv"
    pr = imgtune.predict(run, [root / "test"], out=out, top_k=2)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "confidence", "top2_label", "top2_confidence"]
    assert len(rows) == len(pr.rows) == 15
    agree = sum(Path(r["path"]).parent.name == r["label"] for r in rows) / len(rows)
    assert agree == pytest.approx(ev.accuracy)
    assert all(float(r["confidence"]) >= float(r["top2_confidence"]) for r in rows)


def test_cli_eval_json_and_predict_glob(trained: tuple[Path, Path, imgtune.TrainResult], tmp_path: Path) -> None:
    root, run, _ = trained
    res = runner.invoke(app, ["eval", str(run / "checkpoints" / "best.pt"), str(root), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for key in ("accuracy", "top5", "loss", "per_class", "confusion_matrix"):
        assert key in data
    assert [c["label"] for c in data["per_class"]] == ["blue", "green", "red"]
    bad = tmp_path / "junk.png"
    bad.write_bytes(b"")
    shutil.copy(root / "test" / "red" / "0.jpg", tmp_path / "a.jpg")
    res = runner.invoke(app, ["predict", str(run), str(tmp_path / "*.jpg"), str(bad), "--top-k", "1"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "path,label,confidence" and len(lines) == 2 and lines[1].startswith(str(tmp_path / "a.jpg"))
    assert "junk.png: empty file" in res.stderr


def test_single_folder_layout_without_ram_cache_writes_split_csv(
    make_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_dataset("single", train=8, valid=2)
    (root / "green" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run = tmp_path / "run2"
    res = runner.invoke(
        app,
        ["train", str(root), "--out", str(run), "--img-size", "40", "--epochs-frozen", "3", "--epochs", "1",
         "--batch-size", "8", "--cache", "none", "--workers", "0", "--augment", "light"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    split = list(csv.DictReader((run / "split.csv").open()))
    assert {r["split"] for r in split} == {"train", "valid"} and len(split) == 31
    ev = imgtune.evaluate(run, root, "valid")
    assert ev.n + len(ev.skipped) == sum(r["split"] == "valid" for r in split)


def test_scratch_training_skips_the_frozen_stage(make_dataset: Callable[..., Path], tmp_path: Path) -> None:
    root = make_dataset(train=6, valid=2, test=0)
    result = imgtune.train(_config(root, tmp_path / "s", **{"model.pretrained": False, "train.epochs": 1}))
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert [r["stage"] for r in rows] == ["2"] and result.test is None


def test_bad_inputs_give_clear_errors(make_dataset: Callable[..., Path], tmp_path: Path) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    res = runner.invoke(app, ["train", str(root), "--augment", "wild"])
    assert res.exit_code != 0 and "wild" in res.output
    with pytest.raises(imgtune.ConfigError):
        imgtune.build_config(overrides={"data.path": root, "data.img_size": 4})
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        imgtune.train(_config(root, out))


def test_predict_lists_every_input_once_and_every_unreadable_one(
    trained: tuple[Path, Path, imgtune.TrainResult], tmp_path: Path
) -> None:
    root, run, _ = trained
    one = root / "test" / "red" / "0.jpg"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = imgtune.predict(run, [one, root / "test" / "red", str(root / "test" / "red" / "*.jpg"), bad])
    paths = [r.path for r in result.rows]
    assert len(paths) == len(set(paths)) == 5  # the file given three ways appears once
    assert result.skipped == [{"path": str(bad), "reason": result.skipped[0]["reason"]}]
    assert "cannot" in result.skipped[0]["reason"] or "not an image" in result.skipped[0]["reason"]
