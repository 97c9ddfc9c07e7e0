"""Each tutorial's config (examples/seed00*.yaml) on a small folder in that tutorial's own layout: built the
way its users get it (file-name labels, the fetchers' output, CIFAR's pickles), trained for real steps through
the CLI, then used to predict. Sizes are cut to 32 px and one epoch a stage; everything else is the tutorial's."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from archives import cifar_archive, flowers_files, imagewoof_tgz, write_files
from conftest import PALETTE, shape_image
from imgtune.cli import app
from imgtune.fetchers import fetch_fastai, fetch_flowers102
from imgtune.layouts import LabelRule, load_split

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def train(data: Path, example: str, out: Path, *flags: str) -> dict[str, object]:
    res = runner.invoke(app, ["train", str(data), "--config", str(EXAMPLES / example), "--img-size", "32",
                              "--out", str(out), "--no-report", *flags])  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


def predict(run: Path, *args: str) -> list[dict[str, str]]:
    res = runner.invoke(app, ["predict", str(run), *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return list(csv.DictReader(io.StringIO(res.stdout)))


def test_food11_file_name_labels_cnn_and_a_submission(tmp_path: Path) -> None:
    data = tmp_path / "food-11"
    colours = list(PALETTE.values())
    for split, n in (("training", 8), ("validation", 2)):
        (data / split).mkdir(parents=True)
        for c, colour in enumerate(colours):
            for i in range(n):
                shape_image(colour, 100 * c + i + len(split)).save(data / split / f"{c}_{i}.jpg")
    (data / "evaluation").mkdir()
    for i in range(11):
        shape_image(colours[i % 3], 900 + i).save(data / "evaluation" / f"{i}.jpg")
    summary = train(data, "seed002_food11_cnn.yaml", tmp_path / "run", "--epochs", "1")
    assert summary["train_images"] == 24 and summary["valid_images"] == 6 and summary["epochs_run"] == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["arch"]["body"]["pool"] == "flatten" and ckpt["arch"]["head"] == [1024, 512]
    assert ckpt["arch"]["mean"] == [0.0, 0.0, 0.0] and ckpt["preprocessing"]["resize"] == "squash"
    rows = predict(tmp_path / "run", str(data / "evaluation"), "--format", "submission", "--columns", "Id,Category")
    assert [r["Id"] for r in rows] == [str(i) for i in range(11)]  # natural order: 2 before 10
    assert {r["Category"] for r in rows} <= {"0", "1", "2"}


def test_dli_fruit_recipe_trains_its_head_on_augmented_batches_then_everything_at_1e4(tmp_path: Path) -> None:
    """VGG16's hub weights need internet (the VGG cut itself: test_models, test_examples): the offline
    EfficientNet-Lite0 stands in, with the tutorial's head, augmentation, stages and LRs."""
    data = tmp_path / "fruits"
    for split, n in (("train", 4), ("valid", 2)):
        for name, colour in PALETTE.items():
            (data / split / f"fresh{name}").mkdir(parents=True)
            for i in range(n):
                shape_image(colour, i + 10 * n).save(data / split / f"fresh{name}" / f"{i}.png")
    summary = train(data, "seed000_fruit_vgg16.yaml", tmp_path / "run", "--model", "tf_efficientnet_lite0",
                    "--set", "model.keep_fc=null", "--epochs-frozen", "1", "--epochs", "1")  # fmt: skip
    assert summary["epochs_run"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["state_dict"]["head.0.weight"].shape == (500, 1280)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "hue: 0.05" in config and "head_input: images" in config and "batch_size: 32" in config
    with open(tmp_path / "run" / "metrics.csv") as f:
        lrs = {r["stage"]: float(r["lr"]) for r in csv.DictReader(f)}
    assert lrs == {"1": pytest.approx(1e-3), "2": pytest.approx(1e-4)}
    assert len(predict(tmp_path / "run", str(data / "valid"))) == 6


def test_flowers102_from_the_fetcher_shows_flower_names(tmp_path: Path) -> None:
    got = fetch_flowers102(tmp_path / "flowers", source=write_files(tmp_path / "oxford", flowers_files()))
    summary = train(got.out, "seed001_flowers_resnet18.yaml", tmp_path / "run", "--scratch",
                    "--epochs-frozen", "0", "--epochs", "1")  # fmt: skip
    assert summary["classes"] == 3
    rows = predict(tmp_path / "run", str(got.out / "test"))
    assert {r["label"] for r in rows} <= {"pink primrose", "hard-leaved pocket orchid", "canterbury bells"}


def test_imagewoof_noisy_csv_and_pretrained_vs_scratch_offline(tmp_path: Path) -> None:
    """The fetcher's folder, labels from the shipped noisy_imagewoof.csv, and the tutorial's comparison with
    "weights downloaded elsewhere" (torchvision's resnet50 .pth format): the scratch variant must not use them."""
    import torchvision

    (tmp_path / "imagewoof2-160.tgz").write_bytes(imagewoof_tgz())
    woof = fetch_fastai("imagewoof", tmp_path / "woof", source=tmp_path / "imagewoof2-160.tgz").out
    noisy_csv = woof / "noisy_imagewoof.csv"
    for column, changed in (("noisy_labels_0", 0), ("noisy_labels_1", 3)):  # 0% and 1% label noise, as shipped
        split = load_split(woof, 0.2, 0, rule=LabelRule.parse(str(noisy_csv), None, ["path", column, "is_valid"]))
        relabelled = [s for s in split.train if split.classes[s.label] != s.path.parent.name]
        assert len(relabelled) == changed and all(s.path.stem.endswith("0000") for s in relabelled)
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    res = runner.invoke(app, ["compare", str(woof), "--config", str(EXAMPLES / "seed003_imagewoof_resnet50.yaml"),
                              "--models", "resnet50.tv_in1k", "--pretrained-vs-scratch", "--weights", str(weights),
                              "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "cmp"),
                              "--set", "train.report=false", "--set", f"data.labels={noisy_csv}"])  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    runs = {p.parent.name: p.parent for p in (tmp_path / "cmp").glob("*/config.yaml")}
    pretrained, scratch = runs["resnet50.tv_in1k-pretrained"], runs["resnet50.tv_in1k-scratch"]
    assert str(weights) in (pretrained / "config.yaml").read_text()
    assert str(weights) not in (scratch / "config.yaml").read_text()
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["train_images"] == 18 and summary["valid_images"] == 9  # is_valid: val/ is validation
    rows = predict(pretrained, str(woof / "val" / "n02086240"))
    assert {r["label"] for r in rows} <= {"Shih-Tzu", "Rhodesian ridgeback", "beagle"}


def test_cifar10_pickles_no_validation_split_plateau_on_the_training_loss(tmp_path: Path) -> None:
    archive, _ = cifar_archive(tmp_path)
    res = runner.invoke(app, ["data", "cifar10", str(tmp_path / "cifar"), "--source", str(archive),
                              "--valid-per-class", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "cifar" / "valid").exists()
    summary = train(tmp_path / "cifar", "seed004_cifar10_vgg16bn.yaml", tmp_path / "run", "--epochs", "1")
    assert summary["valid_images"] == 0 and summary["train_images"] == 150 and summary["monitor"] == "train_loss"
    assert summary["test_images"] == 30 and summary["test_acc"] is not None
    with open(tmp_path / "run" / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == [pytest.approx(0.1)]  # SGD at 0.1: the plateau schedule cuts only after 5 stale epochs
    rows = predict(tmp_path / "run", str(tmp_path / "cifar" / "test" / "class3"))
    assert len(rows) == 3 and {r["label"] for r in rows} <= {f"class{i}" for i in range(10)}
