"""Every examples/*.yaml loads and takes real optimisation steps (random init: hub weights are not needed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import imgtune
from conftest import small_dataset, write_class_folders
from imgtune.recipe import make_trainer
from imgtune.runs import RunFolder
from imgtune.scratch import is_builtin
from imgtune.stages import finetune_stage
from imgtune.workbench import prepare

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "ex", train=4, valid=2)


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "seed000_fruit_vgg16", "seed001_flowers_resnet18", "seed002_food11_cnn", "seed003_imagewoof_resnet50",
        "seed004_cifar10_vgg16bn", "cifar10_resnet18_scratch",
    }  # fmt: skip


# seed001..seed004 train in their tutorials' own layouts in test_tutorials.py; seed000 there runs on the offline
# backbone, so its VGG16 cut after fc6 takes its step here
STEPPED = [p for p in EXAMPLES if not p.stem.startswith(("seed001", "seed002", "seed003", "seed004"))]


@pytest.mark.parametrize("example", STEPPED, ids=lambda p: p.stem)
def test_example_config_takes_a_step(example: Path, data: Path, tmp_path: Path) -> None:
    overrides = {
        "data.path": data,
        "data.img_size": 32,
        "data.batch_size": 4,
        "model.pretrained": False,
        "data.labels": "folder",
        "data.valid_fraction": 0.2,
    }  # class folders here: test_tutorials has the tutorials' own layouts
    cfg = imgtune.build_config(example, overrides)
    assert cfg.model.name.endswith("tv_in1k") or is_builtin(cfg.model.name)
    wb = prepare(cfg)
    if cfg.model.head:  # the tutorial's MLP: its hidden sizes, then the 3 classes
        linears = [m for m in wb.model.head if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linears] == [*cfg.model.head, 3]
    if cfg.model.keep_fc == 1:  # VGG cut after fc6: the head reads fc6's 4096 features
        assert wb.model.head[0].in_features == 4096 if isinstance(wb.model.head[0], torch.nn.Linear) else True
    stage = finetune_stage(wb)
    batch = next(iter(stage.train_batches()))
    one_step = dataclasses.replace(stage, train_batches=lambda: [batch], batches_per_epoch=1)
    before = [p.detach().clone() for p in wb.model.parameters()]
    result = make_trainer(wb, RunFolder(tmp_path)).train_epoch(one_step)
    assert torch.isfinite(torch.tensor(result.loss))
    changed = sum(not torch.equal(a, b) for a, b in zip(before, wb.model.parameters(), strict=True))
    assert changed > 0
    expected_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[cfg.train.optim_settings(2, False).optimizer]
    assert type(stage.optimizer) is expected_opt


def test_class_name_map_is_used_for_display(tmp_path: Path) -> None:
    colours = {"1": (200, 30, 30), "2": (30, 170, 60), "10": (40, 60, 210)}
    write_class_folders(tmp_path / "ds" / "train", 6, seed=1, classes=colours)
    write_class_folders(tmp_path / "ds" / "valid", 2, seed=2, classes=colours)
    names = tmp_path / "cat_to_name.json"
    names.write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid", "10": "globe thistle"}))
    cfg = imgtune.build_config(overrides={
        "data.path": tmp_path / "ds", "out": tmp_path / "run", "data.img_size": 32, "data.class_names": names,
        "train.epochs_frozen": 3, "train.epochs": 0,
    })  # fmt: skip
    result = imgtune.train(cfg)
    assert json.loads((result.run_dir / "classes.json").read_text()) == ["1", "2", "10"]
    assert json.loads((result.run_dir / "class_names.json").read_text())[2] == "globe thistle"
    pred = imgtune.predict(result.run_dir, [tmp_path / "ds" / "valid" / "10"])
    assert {r.label for r in pred.rows} <= {"pink primrose", "hard-leaved pocket orchid", "globe thistle"}
    ev = imgtune.evaluate(result.run_dir, tmp_path / "ds", "valid")
    assert [c.label for c in ev.per_class] == ["pink primrose", "hard-leaved pocket orchid", "globe thistle"]
