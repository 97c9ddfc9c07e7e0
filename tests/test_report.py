"""Evaluation and reports: report.html in a real browser, calibration, TTA, ensembles, submissions, compare."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import imgtune
from conftest import CHROMIUM, FASHION_DIR, open_offline_page, write_class_folders
from imgtune.checkpoint import load_checkpoint, save_checkpoint
from imgtune.cli import app
from imgtune.config import ConfigError
from imgtune.predict import InputError, TorchPredictor, tta_views
from imgtune.runs import RunLock, RunLocked

runner = CliRunner()
PLOTS = {"curves.png", "lr.png", "confusion_matrix.png", "reliability.png", "predictions.png", "top_losses.png",
         "top_losses_gradcam.png", "samples.png"}  # fmt: skip


def _train(data: Path, out: Path, **extra: object) -> imgtune.TrainResult:
    overrides = {"data.path": data, "out": out, "data.img_size": 48, "data.batch_size": 8, "train.epochs_frozen": 8,
                 "train.epochs": 1, **extra}  # fmt: skip
    return imgtune.train(imgtune.build_config(overrides=overrides))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rep") / "ds"
    write_class_folders(root / "train", 12, seed=1)
    write_class_folders(root / "valid", 6, seed=2)
    write_class_folders(root / "test", 6, seed=3, fmt="jpg")
    for i in range(2):  # wrong labels: a model that gets the easy shapes all right still has top losses to show
        shutil.copy(root / "test" / "red" / f"{i}.jpg", root / "test" / "blue" / f"red-{i}.jpg")
    run = root.parent / "run"
    _train(root, run)
    return root, run


def _page_numbers(page_file: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(data-metric values, images that failed to load, requests made elsewhere) of the page in Chromium."""
    seen = open_offline_page(page_file)
    assert seen.images >= 6
    return seen.metrics, seen.broken, seen.external


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST package")
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_fashion_mnist_report_opens_in_chromium_and_matches_eval_json(tmp_path: Path) -> None:
    """The demo's path in miniature: real IDX files -> PNG folders -> fine-tune -> official test set -> report."""
    data = tmp_path / "fm"
    res = runner.invoke(app, ["data", "fashion-mnist", str(data), "--per-class", "30", "--valid-per-class", "10"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    result = _train(data, run, **{"data.batch_size": 32, "train.epochs_frozen": 30})
    assert result.test is not None and result.test.n == 10_000
    assert result.test.accuracy > 0.6  # 10 classes, 300 training images: chance is 0.1
    assert {p.name for p in (run / "plots").iterdir()} >= PLOTS
    metrics, broken, external = _page_numbers(run / "report.html")
    assert broken == [] and external == []
    ev = runner.invoke(app, ["eval", str(run), str(data), "--json", "--no-report"])
    assert ev.exit_code == 0, ev.output
    js = json.loads(ev.stdout)
    assert int(metrics["n"]) == js["n"] == 10_000
    for key in ("accuracy", "top5", "loss", "macro_f1", "macro_precision", "weighted_f1", "balanced_accuracy", "ece"):
        assert metrics[key] == f"{js[key]:.4f}", key


def test_eval_writes_plots_and_a_self_contained_report(shapes: tuple[Path, Path]) -> None:
    root, run = shapes
    (run / "report.html").unlink()
    res = runner.invoke(app, ["eval", str(run), str(root), "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.stdout)
    assert {p.name for p in (run / "plots").iterdir()} >= PLOTS
    text = (run / "report.html").read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    assert "where the model looked: Grad-CAM" in text
    assert f'data-metric="accuracy">{js["accuracy"]:.4f}<' in text
    assert len(js["confusion_normalized"]) == 3 and all(abs(sum(r) - 1) < 1e-6 for r in js["confusion_normalized"])
    assert 0 <= js["ece"] <= 1 and len(js["reliability"]) == 15
    assert js["weighted_f1"] > 0 and js["macro_recall"] == pytest.approx(js["balanced_accuracy"])
    wrong = js["n"] - round(js["accuracy"] * js["n"])
    assert len(js["top_losses"]) == min(16, wrong)
    assert [m["loss"] for m in js["top_losses"]] == sorted((m["loss"] for m in js["top_losses"]), reverse=True)


def test_temperature_scaling_lowers_ece_of_an_over_confident_model(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = shapes
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    head = [k for k in ckpt.state_dict if k.startswith("head.") and k.endswith((".weight", ".bias"))]
    for k in head[-2:]:  # the classifier layer x 15: the same argmax, wildly over-confident probabilities
        ckpt.state_dict[k] = ckpt.state_dict[k] * 15
    hot = tmp_path / "run" / "checkpoints" / "best.pt"
    hot.parent.mkdir(parents=True)
    save_checkpoint(hot, ckpt)
    root = write_class_folders(tmp_path / "more" / "valid", 40, seed=7).parent  # 120 images: ECE means something
    for i in range(6):  # wrong labels, as real data has: confident mistakes are what temperature scaling softens
        (root / "valid" / "red" / f"{i}.png").rename(root / "valid" / "green" / f"red-{i}.png")
    before = imgtune.evaluate(hot, root, "valid")
    (hot.parent.parent / "config.yaml").write_text((run / "config.yaml").read_text())
    with RunLock(hot.parent.parent):  # a train writing this run: calibrate refuses to rewrite its best.pt
        refused = runner.invoke(app, ["calibrate", str(hot), str(root)])
    assert isinstance(refused.exception, RunLocked) and "another imgtune process" in str(refused.exception)
    assert load_checkpoint(hot).temperature == 1.0
    res = runner.invoke(app, ["calibrate", str(hot), str(root)])
    assert res.exit_code == 0, res.output
    fit_t = load_checkpoint(hot).temperature
    assert fit_t > 1.5  # softened
    after = imgtune.evaluate(hot, root, "valid")
    assert after.temperature == pytest.approx(fit_t)
    assert after.ece < before.ece
    assert after.accuracy == before.accuracy  # temperature never changes the argmax
    out = tmp_path / "p.csv"
    imgtune.predict(hot, [root / "valid"], out=out)
    conf = [float(r["confidence"]) for r in csv.DictReader(out.open())]
    assert max(conf) < 0.9999  # predict uses the stored temperature


def test_tta_views_and_gain(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = shapes
    run = tmp_path / "run"
    _train(root, run, **{"train.epochs": 2, "train.report": False})  # a model whose mistakes are borderline
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    views = tta_views(images)
    assert len(views) == 4 and all(v.shape == images.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], images) and torch.equal(views[1], images.flip(-1))
    predictor = TorchPredictor.load(run, "cpu")
    probs = predictor.probabilities(images, tta=True)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    plain = imgtune.evaluate(run, root, "test")
    tta = imgtune.evaluate(run, root, "test", tta=True)
    assert tta.tta and tta.accuracy_without_tta == pytest.approx(plain.accuracy)
    assert tta.to_dict()["tta_gain"] == pytest.approx(tta.accuracy - plain.accuracy)
    # whether TTA helps 18 images depends on the draw; what must hold is that the evaluation's TTA accuracy
    # is that of the averaged-view predictions, and that averaging changed the probabilities
    files = sorted((root / "test").rglob("*.jpg"))
    averaged = imgtune.predict(run, files, top_k=3, tta=True).rows
    single = imgtune.predict(run, files, top_k=3).rows
    right = sum(r.label == Path(r.path).parent.name for r in averaged)
    assert tta.accuracy == pytest.approx(right / len(files))
    assert any(a.confidence != pytest.approx(b.confidence, abs=1e-4) for a, b in zip(averaged, single, strict=True))


def test_ensemble_of_two_architectures_and_input_sizes(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = shapes
    other = tmp_path / "cnn"
    _train(root, other, **{"model.name": "cnn5", "model.pretrained": False, "data.img_size": 32,
                           "train.epochs": 4, "train.optimizer": "sgd", "train.lr": 0.05})  # fmt: skip
    single = [imgtune.evaluate(r, root, "test").accuracy for r in (run, other)]
    ens = runner.invoke(app, ["eval", str(run), str(other), str(root), "--ensemble", "--json"])
    assert ens.exit_code == 0, ens.output
    acc = json.loads(ens.stdout)["accuracy"]
    assert acc >= min(single)  # improves on or matches a single model
    # weights 1, 0: exactly the first model's predictions
    files = sorted((root / "test").rglob("*.jpg"))
    first = imgtune.predict(run, files, top_k=3)
    weighted = imgtune.predict([run, other], files, top_k=3, weights=[1.0, 0.0])
    for a, b in zip(first.rows, weighted.rows, strict=True):
        assert a.label == b.label and a.confidence == pytest.approx(b.confidence, abs=1e-5)
    res = runner.invoke(app, ["predict", str(run), str(other), str(files[0]), "--ensemble", "--weights", "1,2,3"])
    assert isinstance(res.exception, InputError) and "weights" in str(res.exception)


def test_submission_for_an_unlabelled_test_folder_with_display_names(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = shapes
    unlabelled = tmp_path / "test"
    unlabelled.mkdir()
    for i, f in enumerate(sorted((root / "test").rglob("*.jpg"))[:12]):
        (unlabelled / f"{i}.jpg").write_bytes(f.read_bytes())  # food-11's ids: 0 ... 11, unpadded
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"red": "Red square", "green": "Green square", "blue": "Blue square"}))
    out = tmp_path / "submission.csv"
    res = runner.invoke(app, ["predict", str(run), str(unlabelled), "--format", "submission", "--id-from", "stem",
                              "--class-names", str(names), "--columns", "Id,Category", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(12)]  # natural order: 2 before 10
    assert {r[1] for r in rows[1:]} <= {"Red square", "Green square", "Blue square"}
    res = runner.invoke(app, ["predict", str(run), str(unlabelled), "--format", "submission", "--columns", "Id"])
    assert isinstance(res.exception, ConfigError) and "two columns" in str(res.exception)


def test_compare_pretrained_vs_scratch_on_one_split(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "single", 10, seed=4)  # one folder: imgtune makes the split
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", str(data), "--models", "tf_efficientnet_lite0", "--pretrained-vs-scratch",
                              "--img-size", "48", "--epochs-frozen", "4", "--epochs", "1", "--batch-size", "8",
                              "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["tf_efficientnet_lite0 pretrained", "tf_efficientnet_lite0 scratch"]
    assert [r["pretrained"] for r in rows] == ["True", "False"]
    runs = [Path(r["run"]) for r in rows]
    valid = [
        {x["path"] for x in csv.DictReader((r / "split.csv").open()) if x["split"] == "valid"}
        if (r / "split.csv").is_file() else None
        for r in runs
    ]  # fmt: skip
    scratch_cfg = (runs[1] / "config.yaml").read_text()
    assert valid[0] and "split_file: " + str(runs[0] / "split.csv") in scratch_cfg  # the same validation images
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "tf_efficientnet_lite0 scratch" in page


def test_time_budget_stops_training(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = shapes
    r = _train(root, tmp_path / "b", **{"train.epochs": 50, "train.max_minutes": 0.0001, "train.report": False})
    assert r.summary["stopped_early"] and r.summary["epochs_run"] < 58


def test_per_class_scores_by_hand() -> None:
    """3 classes: class 2 is never predicted (precision 0 by convention), class 0 never present (recall 0)."""
    from imgtune.metrics import compute_metrics, confusion_matrix, per_class_scores

    predicted, labels = torch.tensor([1, 1, 0, 1]), torch.tensor([1, 2, 1, 1])
    cm = confusion_matrix(predicted, labels, 3)
    assert cm.tolist() == [[0, 0, 0], [1, 2, 0], [0, 1, 0]]
    p, r, f1 = per_class_scores(cm)
    assert p.tolist() == pytest.approx([0.0, 2 / 3, 0.0]) and r.tolist() == pytest.approx([0.0, 2 / 3, 0.0])
    assert f1.tolist() == pytest.approx([0.0, 2 / 3, 0.0])
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 4
    result = compute_metrics(logits, labels, ["a", "b", "c"])
    assert result.accuracy == 0.5 and result.macro_f1 == pytest.approx((2 / 3 + 0) / 2)  # over present classes
    assert result.top5 == 1.0 and result.balanced_accuracy == pytest.approx(1 / 3)


def test_prediction_grid_captions_fit_their_panel() -> None:
    """flowers-102's long names used to run into the next panel: every line now fits, the confidence stays."""
    from imgtune.report import CAPTION_WIDTH, caption

    for true, predicted in [("pink primrose", "hard-leaved pocket orchid"), ("x" * 70, "giant white arum lily " * 3)]:
        text = caption(true, predicted, 0.934)
        assert all(len(line) <= CAPTION_WIDTH for line in text.splitlines()) and text.endswith("0.93")
        assert text.count("\n") <= 4
    assert caption("1", "2", 0.5) == "true 1\npred 2 0.50"
