"""`imgtune data issues` on real image folders with known wrong labels, a planted duplicate and an outlier;
confident learning checked against cleanlab; `train --exclude / --relabel` and what the run folder keeps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import CHROMIUM, open_offline_page, train_small, write_class_folders
from imgtune.cli import app
from imgtune.confident import find_label_issues, out_of_fold_probabilities
from imgtune.layouts import DataError

runner = CliRunner()


def _noisy_probabilities(n: int, k: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with `noise` of them flipped, and the probabilities of an imperfect model of the true labels."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    given = true.copy()
    flip = rng.random(n) < noise
    given[flip] = (true[flip] + rng.integers(1, k, int(flip.sum()))) % k
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), true] += rng.uniform(0.5, 4.0, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return given, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confident_learning_flags_what_cleanlab_flags(seed: int) -> None:
    filter_ = pytest.importorskip("cleanlab.filter")
    given, probs = _noisy_probabilities(3000, 5 + seed, 0.1 + 0.05 * seed, seed)
    ours = find_label_issues(given, probs)
    theirs = filter_.find_label_issues(given, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    assert len(ours) > 100
    assert len(set(ours.tolist()) ^ set(theirs.tolist())) <= 0.01 * len(theirs)  # ties in the margin sort aside
    assert (ours[:50] == theirs[:50]).mean() >= 0.9  # and in the same order


def test_out_of_fold_heads_never_see_the_label_they_predict() -> None:
    """Features that hold only the (noisy) label itself: a head that saw an example's label would give it
    back; out-of-fold heads can only give chance."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    noise = rng.normal(0, 1, (400, 8)).astype(np.float32)
    import torch

    features = torch.from_numpy(noise)  # no signal: every label is as likely
    probs, _ = out_of_fold_probabilities(features, labels, 4, folds=5)
    assert probs.shape == (400, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() < 0.4  # chance is 0.25; memorising would be 1.0


def _plant(root: Path) -> dict[str, object]:
    """The three colour classes with 4 training images moved to a wrong class folder, one training image
    copied (re-encoded, resized) under another name, and a grey checkerboard among the reds."""
    write_class_folders(root / "train", 30, seed=1)
    write_class_folders(root / "valid", 8, seed=2)
    moves = {"red/0.png": "green", "red/1.png": "blue", "green/2.png": "red", "blue/3.png": "green"}
    flipped = {}
    for name, wrong in moves.items():
        source = root / "train" / name
        target = root / "train" / wrong / f"moved_{source.parent.name}_{source.name}"
        shutil.move(source, target)
        flipped[str(target)] = source.parent.name
    with Image.open(root / "train" / "blue" / "10.png") as im:
        im.resize((44, 44)).save(root / "train" / "blue" / "copy_of_10.jpg", quality=95)
    checker = (np.add.outer(np.arange(40) // 5, np.arange(40) // 5) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checker] * 3, -1)).save(root / "train" / "red" / "odd_one.png")
    train = root / "train"
    return {"flipped": flipped, "copy": str(train / "blue" / "copy_of_10.jpg"),
            "original": str(train / "blue" / "10.png"), "outlier": str(train / "red" / "odd_one.png")}  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], Path]:
    root = tmp_path_factory.mktemp("issues") / "ds"
    truth = _plant(root)
    out = root.parent / "report" / "issues.csv"
    res = runner.invoke(app, ["data", "issues", str(root), "--img-size", "64", "--out", str(out), "--html"])
    assert res.exit_code == 0, res.output
    assert f"imgtune train {root} --exclude {out}" in res.output
    return root, truth, out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_data_issues_finds_the_flipped_labels_the_copy_and_the_outlier(
    planted: tuple[Path, dict[str, object], Path],
) -> None:
    _, truth, out = planted
    flipped: dict[str, str] = truth["flipped"]  # type: ignore[assignment]
    rows = _rows(out)
    assert list(rows[0]) == ["path", "given", "suggested", "score", "p_suggested", "split"]
    found = {r["path"]: r for r in rows}
    caught = [p for p in flipped if p in found]
    assert len(caught) >= 3  # of the 4 flipped
    assert all(found[p]["suggested"] == flipped[p] for p in caught)  # and it says what they are
    assert len(rows) <= 10  # from 98 images: mostly the flipped ones, not every other one
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspicious first
    dups = _rows(out.parent / "near_duplicates.csv")
    assert {dups[0]["path"], dups[0]["duplicate_of"]} == {truth["copy"], truth["original"]}
    assert len(dups) == 1 and float(dups[0]["mean_abs_diff"]) <= 3
    outliers = _rows(out.parent / "outliers.csv")
    assert outliers and outliers[0]["path"] == truth["outlier"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_review_page_shows_every_thumbnail_offline(planted: tuple[Path, dict[str, object], Path]) -> None:
    _, _, out = planted
    seen = open_offline_page(out.with_suffix(".html"))
    assert seen.images >= 3 * len(_rows(out)) and seen.broken == [] and seen.external == []
    assert "labelled" in seen.text and "a typical" in seen.text


def test_train_with_exclude_and_relabel_keeps_what_it_did(
    planted: tuple[Path, dict[str, object], Path], tmp_path: Path
) -> None:
    root, truth, out = planted
    flipped: dict[str, str] = truth["flipped"]  # type: ignore[assignment]
    rows = _rows(out)
    fix = tmp_path / "fix.csv"
    first = rows[0]
    fix.write_text(f"\ufeffpath,label\n{first['path']},{first['suggested']}\n")  # as a spreadsheet saves it
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("".join(f"{r['path']}\n" for r in rows[1:]) + f"{root}/train/no/such.png\n")
    result = train_small(root, tmp_path / "run", **{"data.exclude": exclude, "data.relabel": fix,
                                                     "train.epochs_frozen": 2, "train.epochs": 0})  # fmt: skip
    run = result.run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert summary["curation"]["excluded"] == len(rows) - 1 and summary["curation"]["exclude_unmatched"] == 1
    assert summary["curation"]["relabelled"] == 1
    assert summary["train_images"] + summary["valid_images"] == 30 * 3 + 8 * 3 + 2 - (len(rows) - 1)
    kept = (run / "exclude.txt").read_text().split()
    assert sorted(kept) == sorted(str(Path(r["path"]).resolve()) for r in rows[1:])
    assert _rows(run / "relabel.csv") == [{"path": str(Path(first["path"]).resolve()), "label": first["suggested"]}]
    from imgtune.files import UMASK

    assert (run / "summary.json").stat().st_mode & 0o777 == 0o666 & ~UMASK  # as open() makes files, not 0600
    config = (run / "config.yaml").read_text()
    assert str(run / "exclude.txt") in config and str(run / "relabel.csv") in config
    if first["path"] in flipped:  # the relabelled image trains with its true class
        assert first["suggested"] == flipped[first["path"]]
    # the run's own backbone and preprocessing (32 px) for the features, still out of fold
    again = tmp_path / "again.csv"
    res = runner.invoke(
        app, ["data", "issues", str(root), "--run", str(run), "--out", str(again), "--max-score", "0.2"]
    )
    assert res.exit_code == 0, res.output
    assert f"features: the backbone of {run}" in res.output
    assert all(float(r["score"]) <= 0.2 for r in _rows(again))


def test_bad_curation_files_say_what_is_wrong(planted: tuple[Path, dict[str, object], Path], tmp_path: Path) -> None:
    root, _, out = planted
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{_rows(out)[0]['path']},purple\n")
    with pytest.raises(DataError, match=r"bad.csv, line 2: 'purple' is not a class \(blue, green, red\)"):
        train_small(root, tmp_path / "run", **{"data.relabel": bad, "train.epochs_frozen": 1, "train.epochs": 0})
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        train_small(root, tmp_path / "run2", **{"data.exclude": tmp_path / "missing.txt"})
    res = runner.invoke(app, ["data", "issues", str(root), "--folds", "40", "--out", str(tmp_path / "i.csv")])
    assert res.exit_code != 0 and "at least 40 labelled images" in str(res.exception)
