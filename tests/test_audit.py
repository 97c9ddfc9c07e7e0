from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from conftest import bomb_png
from imgtune.cli import app

runner = CliRunner()


def test_check_reports_every_problem_as_json(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=4, valid=2, test=2)
    (root / "train" / "red" / "truncated.jpg").write_bytes((root / "test" / "red" / "0.jpg").read_bytes()[:200])
    (root / "train" / "blue" / "readme.jpg").write_text("hello")
    bomb_png(root / "train" / "green" / "bomb.png")
    (root / "train" / "grey").mkdir()
    Image.new("RGB", (5, 5)).save(root / "train" / "red" / "tiny.png")
    shutil.copy(root / "train" / "red" / "0.png", root / "valid" / "red" / "leak.png")
    res = runner.invoke(app, ["data", "check", str(root), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["classes"] == ["blue", "green", "red"]
    assert report["counts"]["train"] == {"blue": 4, "green": 4, "red": 5}
    assert report["counts"]["valid"]["red"] == 3 and report["counts"]["test"]["red"] == 2
    reasons = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    assert set(reasons) == {"truncated.jpg", "readme.jpg", "bomb.png"}
    assert "decompression bomb" in reasons["bomb.png"] and "not an image" in reasons["readme.jpg"]
    text = "\n".join(report["warnings"])
    assert "grey" in text and "empty class folder" in text
    assert "more than one split" in text and "leak.png" in text
    assert "smaller than 16 px" in text and "tiny.png" in text
    assert report["trainable"] is True


def test_check_fails_when_not_trainable(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    shutil.copytree(root / "valid" / "red", root / "valid" / "orange")
    res = runner.invoke(app, ["data", "check", str(root)])
    assert res.exit_code == 1
    assert "orange" in res.stdout and "trainable: NO" in res.stdout


def test_check_one_class_is_not_trainable(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / "only" / f"{i}.png")
    res = runner.invoke(app, ["data", "check", str(tmp_path), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["trainable"] is False


def test_near_duplicates_across_splits_and_fail_on_leak(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=4, valid=2, test=0)
    src = Image.open(root / "train" / "green" / "1.png").convert("RGB")
    src.save(root / "valid" / "green" / "reencoded.jpg", quality=90)  # same picture, other bytes
    src.resize((80, 80)).save(root / "valid" / "green" / "resized.png")
    res = runner.invoke(app, ["data", "check", str(root), "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and not report["duplicates"]
    pairs = {tuple(sorted(Path(f["path"]).name for f in d["files"])) for d in report["near_duplicates"]}
    assert ("1.png", "reencoded.jpg") in pairs and ("1.png", "resized.png") in pairs
    assert all(len(set(p)) == 2 for p in pairs) and len(pairs) == 2  # the other images are not flagged
    assert any("near-duplicate" in w for w in report["warnings"])
    res = runner.invoke(app, ["data", "check", str(root), "--fail-on-leak"])
    assert res.exit_code == 1 and "leakage: 0 exact and 2 near-duplicate" in res.stdout
