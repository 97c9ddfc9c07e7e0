"""Built-in from-scratch architectures, the scratch recipe, and CIFAR batches -> image folders."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from archives import cifar_archive
from conftest import write_class_folders
from imgtune.augment import BatchAugment
from imgtune.checkpoint import Checkpoint
from imgtune.cli import app
from imgtune.config import RECIPES, build_config
from imgtune.distributed import convert_sync_batchnorm
from imgtune.models import create_model, has_pretrained_weights, model_from_checkpoint
from imgtune.scratch import BUILTIN
from imgtune.sources import SourceError, write_cifar

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_architectures_classify_small_images(name: str) -> None:
    model = create_model(name, 10).eval()
    assert not has_pretrained_weights(name)
    for size in (28, 32):  # Fashion-MNIST's own size and CIFAR's
        x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        assert model(x).shape == (2, 10)
    rebuilt = model_from_checkpoint(Checkpoint(model.arch, [], model.preprocessing(32), model.state_dict())).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), rebuilt(x))


def test_cnn5_is_the_classic_five_block_network() -> None:
    model = create_model("cnn5", 7)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.backbone.modules() if isinstance(m, torch.nn.MaxPool2d)]
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == len(pools) == len(bns) == 5
    assert len(linears) == 3 and linears[-1].out_features == 7  # Linear-ReLU-Linear-ReLU-Linear
    assert model.eval()(torch.zeros(1, 3, 128, 128, dtype=torch.uint8)).shape == (1, 7)


def test_resnet18_cifar_keeps_full_resolution_in_its_first_stage() -> None:
    net = create_model("resnet18_cifar", 10).backbone.features
    x = torch.zeros(1, 3, 32, 32)
    first_stage = net[:5](x)  # conv1, bn1, relu, maxpool (identity), layer1
    assert first_stage.shape[-2:] == (32, 32)


def test_user_head_replaces_the_builtin_head() -> None:
    model = create_model("vgg16_bn_cifar", 5, head=[64])
    assert model.arch["head"] == [64]
    assert [m.out_features for m in model.head.modules() if isinstance(m, torch.nn.Linear)] == [64, 5]


def test_padcrop_shifts_whole_pixels_and_keeps_size() -> None:
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 3, 32, 32)
    torch.manual_seed(0)
    outs = BatchAugment("padcrop")(img.repeat(8, 1, 1, 1))
    assert outs.shape == (8, 3, 32, 32)
    src = img[0].float() / 255
    moved = 0
    for o in outs:  # each is the image shifted by whole pixels (at most 4) and maybe mirrored: pixels exact
        found = [
            (dy, dx)
            for im in (src, src.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.allclose(o[:, 4:-4, 4:-4], im.roll((-dy, -dx), (1, 2))[:, 4:-4, 4:-4], atol=1e-5)
        ]
        assert found, "not a whole-pixel shift of the image"
        moved += found[0] != (0, 0)
    assert moved > 0


def test_scratch_recipe_sits_under_file_and_flags(tmp_path: Path) -> None:
    cfg = build_config(overrides={"data.path": tmp_path, "train.lr": 0.05}, base=RECIPES["scratch"])
    t = cfg.train
    assert (t.optimizer, t.momentum, t.weight_decay, t.schedule, t.epochs_frozen) == ("sgd", 0.9, 5e-4, "onecycle", 0)
    assert t.lr == 0.05 and cfg.data.augment == "padcrop" and not cfg.model.pretrained


def test_builtin_model_selects_the_scratch_recipe_on_the_cli(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "--model", "cnn5", "--epochs", "4", "--print-config"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "optimizer: sgd" in text and "schedule: onecycle" in text and "epochs: 4" in text
    result = runner.invoke(app, ["train", str(tmp_path), "--recipe", "bogus", "--print-config"])
    assert result.exit_code != 0


def test_sync_batchnorm_is_refused_on_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        convert_sync_batchnorm(create_model("cnn5", 3), torch.device("cpu"))


@pytest.mark.slow
def test_cnn5_learns_from_scratch(tmp_path: Path) -> None:
    """The whole scratch recipe on real PNGs: three colour classes are learnt in a few epochs."""
    root = tmp_path / "ds"
    write_class_folders(root / "train", 40, seed=1)
    write_class_folders(root / "valid", 10, seed=2)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(root), "--model", "cnn5", "--epochs", "6", "--batch-size", "16", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_valid_acc"] >= 0.9
    ckpt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["arch"]["name"] == "cnn5" and ckpt["preprocessing"]["img_size"] == 32


# ------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_archive_becomes_image_folders(tmp_path: Path, protocol: int) -> None:
    archive, first = cifar_archive(tmp_path, protocol=protocol)
    out = tmp_path / "out"
    counts = write_cifar("cifar10", out, valid_per_class=1, source=archive)
    assert counts == {"train": 5 * 30 - 10, "valid": 10, "test": 30}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(f"class{i}" for i in range(10))
    # index 0 of data_batch_1 is class 0; unless drawn for valid it is train/class0/0.png, pixel for pixel
    png = out / "train" / "class0" / "0.png"
    if not png.exists():
        png = out / "valid" / "class0" / "0.png"
    expected = first[0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(png)), expected)
    assert write_cifar("cifar10", out, valid_per_class=1, source=archive) == counts  # idempotent


def test_cifar100_from_an_extracted_folder_via_cli(tmp_path: Path) -> None:
    archive, _ = cifar_archive(tmp_path, "cifar100")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "cifar100", str(out), "--source", str(tmp_path / "extracted"), "--valid-per-class", "1"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "test").rglob("*.png"))) == 12
    assert len(list((out / "valid").rglob("*.png"))) == 4


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-cifar",))


def test_hostile_cifar_pickle_is_refused_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(SourceError, match="refused to load"):
        write_cifar("cifar10", tmp_path / "out", source=tmp_path / "src")
    assert not (tmp_path / "pwned-by-cifar").exists()


def test_damaged_cifar_archive_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SourceError, match=str(bad)):
        write_cifar("cifar10", tmp_path / "out", source=bad)
