"""The speed features: batched augmentation, the stage-1 feature store (K views, RAM or memory-mapped),
inference precision, the allocator setting, --compile, and CUDA batch-size search logic."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import imgtune
from conftest import small_dataset, train_small
from imgtune.augment import BatchAugment
from imgtune.features import FeatureStore
from imgtune.runtime import cpu_has_native_bf16, inference_dtype, largest_batch, probe_batch_size, tune_allocator


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "speed", train=8, valid=3)


def _train(data: Path, out: Path, **overrides: object) -> imgtune.TrainResult:
    result: imgtune.TrainResult = train_small(data, out, **{"data.augment": "standard", **overrides})
    return result


# ---------------------------------------------------------------------------------- batched augmentation


def _checker(n: int = 8, size: int = 48) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = (((yy // 6) + (xx // 6)) % 2 * 200 + 30).to(torch.uint8)
    return board.expand(n, 3, size, size).clone()


@pytest.mark.parametrize("preset", ["light", "padcrop", "standard", "strong"])
def test_batch_augment_changes_images_keeps_shape_range_and_is_seeded(preset: str) -> None:
    x = _checker()
    torch.manual_seed(1)
    a = BatchAugment(preset)(x)
    torch.manual_seed(1)
    b = BatchAugment(preset)(x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)  # the global RNG decides: a resumed run draws the same augmentations
    assert not torch.allclose(a, x.float() / 255)  # something happened to the batch
    per_image = [not torch.allclose(a[i], a[0]) for i in range(1, len(a))]
    assert any(per_image)  # each image draws its own parameters


def test_batch_augment_none_is_identity_and_erasing_zeroes_a_rectangle() -> None:
    x = _checker()
    assert torch.equal(BatchAugment("none")(x), x.float() / 255)
    assert not BatchAugment("none")
    erased = BatchAugment("none", random_erasing=1.0)(torch.full((4, 3, 32, 32), 255, dtype=torch.uint8))
    for img in erased:
        zero = img[0] == 0
        rows, cols = zero.any(1).nonzero().view(-1), zero.any(0).nonzero().view(-1)
        assert len(rows) and len(cols)
        assert bool(zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())  # one rectangle


def test_colour_jitter_keeps_colour_the_label() -> None:
    """standard: hue moves by at most 2% of the circle; a red image stays red, a green one green."""
    red = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    red[:, 0] = 200
    green = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    green[:, 1] = 200
    torch.manual_seed(0)
    aug = BatchAugment("standard")
    for img, channel in ((red, 0), (green, 1)):
        centre = aug(img)[:, :, 8, 8]
        assert bool((centre.argmax(1) == channel).all())


# ---------------------------------------------------------------------------------------- feature store


def test_feature_store_draws_one_view_per_image_each_epoch(tmp_path: Path) -> None:
    n, f = 40, 6
    views = [torch.full((n, f), float(k)) + torch.arange(n).view(-1, 1) * 10 for k in range(3)]
    labels = torch.arange(n) % 4
    ram = FeatureStore.build(views, labels)
    disk = FeatureStore.build(views, labels, tmp_path / "cache" / "features.npy")
    assert ram.views.dtype == torch.float16 and ram.nbytes == 3 * n * f * 2
    assert (tmp_path / "cache" / "features.npy").is_file()
    a = list(ram.batches(16, torch.Generator().manual_seed(3)))
    b = list(disk.batches(16, torch.Generator().manual_seed(3)))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    seen_views: set[int] = set()
    for _ in range(4):  # epochs
        batches = list(ram.batches(16, torch.Generator().manual_seed(len(seen_views) + 7)))
        feats = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        assert len(feats) == n and feats.dtype == torch.float32
        image = (feats[:, 0] // 10).long()  # which image each row came from ...
        view = feats[:, 0] - image * 10  # ... and which of its views
        assert sorted(image.tolist()) == list(range(n))  # every image once per epoch
        assert torch.equal(ys, labels[image])  # labels follow their features
        seen_views |= set(view.long().tolist())
    assert seen_views == {0, 1, 2}
    disk.close()
    assert not (tmp_path / "cache").exists()


def test_feature_views_and_disk_store_train_end_to_end(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="imgtune")
    result = _train(
        data, tmp_path / "run", **{"train.feature_views": 3, "train.feature_store": "disk", "train.epochs_frozen": 4,
                                   "train.epochs": 1},
    )  # fmt: skip
    assert math.isfinite(result.best_valid_acc)
    text = caplog.text
    assert "3 views of each training image" in text and "memory-mapped from" in text
    assert not (result.run_dir / "cache").exists()  # the memory-mapped features are deleted after stage 1
    stage1 = [r for r in csv.DictReader((result.run_dir / "metrics.csv").open()) if r["stage"] == "1"]
    assert len(stage1) == 1 and "linear head solved" in text  # on all 3 views of every image at once


# ------------------------------------------------------------------------------------ precision, runtime


def test_inference_precision_rules() -> None:
    cpu = torch.device("cpu")
    assert inference_dtype("fp32", cpu) is None
    assert inference_dtype("bf16", cpu) is torch.bfloat16
    assert inference_dtype("fp16", cpu) is torch.float16
    assert inference_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags.split() or "amx_bf16" in flags.split())


def test_allocator_setting_applies_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True


def test_bf16_and_fp32_predictions_agree(data: Path, tmp_path: Path) -> None:
    result = _train(data, tmp_path / "run", **{"train.epochs_frozen": 10, "train.epochs": 0})
    paths = sorted(data.rglob("*.png")) + sorted(data.rglob("*.jpg"))
    p32 = imgtune.load(result.run_dir, "cpu", precision="fp32")
    p16 = imgtune.load(result.run_dir, "cpu", precision="bf16")
    assert p32.backend == "torch" and "bfloat16" in p16.backend
    a, b = p32.scores_for_paths(paths), p16.scores_for_paths(paths)
    assert a.kept == b.kept and len(a.kept) == len(paths)
    pa, pb = a.logits.exp(), b.logits.exp()
    assert float((pa - pb).abs().max()) < 0.05  # probabilities within bf16's precision
    assert float((pa.argmax(1) == pb.argmax(1)).float().mean()) >= 0.9  # flips only on knife edges


@pytest.mark.slow
def test_compile_trains_and_checkpoints_the_plain_model(data: Path, tmp_path: Path) -> None:
    from imgtune.checkpoint import load_checkpoint

    result = _train(
        data, tmp_path / "run", **{"model.name": "cnn5", "model.pretrained": False, "train.epochs_frozen": 0,
                                   "train.epochs": 1, "train.compile": True, "data.augment": "light"},
    )  # fmt: skip
    assert math.isfinite(result.best_valid_acc)
    state = load_checkpoint(result.run_dir / "checkpoints" / "best.pt").state_dict
    assert not any("_orig_mod" in k for k in state)  # loads into an uncompiled model
    again = imgtune.evaluate(result.run_dir, data, "valid")  # a plain model from the checkpoint ...
    assert again.accuracy == pytest.approx(result.best_valid_acc)  # ... scores what the compiled one did


def test_largest_batch_doubles_until_out_of_memory_and_halves_when_the_start_does_not_fit() -> None:
    """The search that data.auto_batch runs on CUDA, driven here by a step that runs out of memory above a
    capacity, as torch raises it (no GPU on the test machines)."""
    tried: list[int] = []

    def step_with(capacity: int):  # type: ignore[no-untyped-def]
        def step(b: int) -> None:
            tried.append(b)
            if b > capacity:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return step

    assert largest_batch(step_with(300), 32, 1024) == 256 and tried == [32, 64, 128, 256, 512]
    tried.clear()
    assert largest_batch(step_with(20), 64, 1024) == 16 and tried == [64, 32, 16]
    assert largest_batch(step_with(10_000), 32, 100) == 64  # never above the limit (the training set)
    with pytest.raises(RuntimeError, match="does not fit"):
        largest_batch(step_with(0), 4, 1024)


def test_auto_batch_on_cpu_keeps_the_batch_and_records_it(data: Path, tmp_path: Path) -> None:
    import yaml

    result = _train(data, tmp_path / "run", **{"data.auto_batch": True, "train.epochs_frozen": 1, "train.epochs": 0})
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]
    assert saved["batch_size"] == 8 and saved["auto_batch"] is False  # resolved once; a resume keeps it


def test_resume_cleanup_removes_memory_mapped_features_of_an_interrupted_stage_1(tmp_path: Path) -> None:
    from imgtune.runs import RunFolder

    FeatureStore.build([torch.ones(4, 3)], torch.zeros(4, dtype=torch.long), tmp_path / "cache" / "features-rank0.npy")
    removed = RunFolder(tmp_path).clean_leftovers()
    assert [p.name for p in removed] == ["features-rank0.npy"] and not (tmp_path / "cache").exists()


def test_probe_batch_size_runs_real_steps_and_leaves_the_model_as_it_was() -> None:
    """On the CPU nothing runs out of memory, so the probe climbs to the limit; what it must not do is change
    the model it probed (weights, BatchNorm statistics, trainable flags, mode)."""
    model = imgtune.create_model("cnn5", 3, pretrained=False)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert probe_batch_size(model, torch.device("cpu"), 32, start=2, limit=8, amp=None) == 8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
