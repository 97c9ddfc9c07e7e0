"""The ecosystem around a run: the keyword API and its TrainResult, the predictor on in-memory images, the
timm-format export loaded by plain timm, TensorBoard and MLflow tracking, versions in every model file,
timm's flag names, the extras' install hints, and NumPy 1.x support."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import imgtune
from conftest import small_dataset, write_class_folders
from imgtune.cli import app
from imgtune.config import ConfigError, resolve
from imgtune.images import ImageError
from imgtune.keywords import keyword_overrides

EPOCHS_FROZEN, EPOCHS = 4, 2
HEAD_ROWS = 1  # a solved linear head is one stage-1 row, whatever epochs_frozen says


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[imgtune.TrainResult]:
    """One run through the keyword API with TensorBoard and MLflow on; MLflow's default store (./mlruns) in
    the module's own folder."""
    data = small_dataset(tmp_path_factory, "ecosystem", train=10, valid=4)
    home = data.parent
    old = Path.cwd()
    os.chdir(home)
    try:
        yield imgtune.train(
            data, out=home / "run", img_size=32, batch_size=8, epochs_frozen=EPOCHS_FROZEN, epochs=EPOCHS,
            augment="light", patience=None, smoothing=0.05, layer_decay=0.9, tensorboard=True, mlflow=True,
            lr=3e-3,
        )  # fmt: skip
    finally:
        os.chdir(old)


def test_keywords_are_the_config_keys_and_the_flag_names() -> None:
    given = keyword_overrides(
        {"epochs": 5, "img_size": 224, "model": "resnet18", "smoothing": 0.1, "reprob": 0.25, "layer_decay": 0.8,
         "model_ema": True, "scratch": True, "train__stage2__lr": 1e-4, "batch_size": "auto", "aug": {"hue": 0.05},
         "head": "500,100", "drop_path": 0.1, "opt": "sgd"}
    )  # fmt: skip
    assert given == {
        "train.epochs": 5, "data.img_size": 224, "model.name": "resnet18", "train.label_smoothing": 0.1,
        "data.aug.erase": 0.25, "train.lr_decay": 0.8, "train.ema": 0.9998, "model.pretrained": False,
        "train.stage2.lr": 1e-4, "data.auto_batch": True, "data.aug.hue": 0.05, "model.head": [500, 100],
        "model.drop_path": 0.1, "train.optimizer": "sgd",
    }  # fmt: skip
    with pytest.raises(ConfigError, match="unknown keyword 'epoch'; did you mean epochs"):
        keyword_overrides({"epoch": 3})
    # the recipe follows the model, as on the command line; an explicit one wins
    assert resolve(overrides={"data.path": "d", "model.name": "cnn5"}).train.optimizer == "sgd"
    assert resolve(overrides={"data.path": "d", "model.name": "cnn5"}, recipe="transfer").train.optimizer == "adamw"


def test_keyword_train_returns_history_curves_and_report(tracked: imgtune.TrainResult) -> None:
    config = yaml.safe_load((tracked.run_dir / "config.yaml").read_text())
    assert config["train"]["label_smoothing"] == 0.05 and config["train"]["lr_decay"] == 0.9
    assert config["data"]["img_size"] == 32 and config["train"]["tensorboard"] and config["train"]["mlflow"]
    history = tracked.history
    assert [r["epoch"] for r in history] == list(range(1, HEAD_ROWS + EPOCHS + 1))
    assert [r["stage"] for r in history] == [1] * HEAD_ROWS + [2] * EPOCHS
    csv_rows = (tracked.run_dir / "metrics.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == len(history)
    assert tracked.report == tracked.run_dir / "report.html" and tracked.report.is_file()
    fig = tracked.plot()
    _, acc_axes = fig.axes
    assert [list(line.get_ydata()) for line in acc_axes.get_lines()[:2]] == [
        [r["train_acc"] for r in history],
        [r["valid_acc"] for r in history],
    ]
    assert fig._repr_png_().startswith(b"\x89PNG")  # how a notebook cell shows it


def test_the_predictor_takes_paths_pil_images_arrays_and_tensors(tracked: imgtune.TrainResult, tmp_path: Path) -> None:
    predictor = imgtune.load(tracked.run_dir, precision="fp32")
    files = sorted((tracked.run_dir.parent / "ds" / "valid").rglob("*.png"))[:3]
    by_path = predictor(files[0], top_k=3)
    assert [d["label"] for d in by_path] and sorted(d["label"] for d in by_path) == ["blue", "green", "red"]
    assert by_path == sorted(by_path, key=lambda d: -d["score"]) and abs(sum(d["score"] for d in by_path) - 1) < 1e-4
    pil = Image.open(files[0])
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    for same in (pil, array, tensor, tensor.float() / 255, str(files[0])):
        got = predictor(same, top_k=2)
        assert [d["label"] for d in got] == [d["label"] for d in by_path[:2]]
        assert np.allclose([d["score"] for d in got], [d["score"] for d in by_path[:2]], atol=1e-5)
    many = predictor(files, top_k=1)
    batch = predictor(np.stack([np.asarray(Image.open(f)) for f in files]), top_k=1)
    assert len(many) == 3 and [m[0]["label"] for m in many] == [b[0]["label"] for b in batch]
    turned = tmp_path / "turned.jpg"  # EXIF orientation 6: a PIL image in memory is turned upright like the file
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(files[1]).convert("RGB").resize((48, 32)).save(turned, exif=exif)
    from_file, from_pil = predictor(turned, top_k=3), predictor(Image.open(turned), top_k=3)
    assert np.allclose([d["score"] for d in from_file], [d["score"] for d in from_pil], atol=1e-6)
    grey = predictor(np.asarray(pil.convert("L")), top_k=1)  # one channel: as a greyscale file would be
    assert grey[0]["label"] in {"blue", "green", "red"}
    with pytest.raises(ImageError, match=r"float pixels must be in \[0, 1\]"):
        predictor(tensor.float())
    with pytest.raises(ImageError, match="shape"):
        predictor(np.zeros((5, 5, 7), dtype=np.uint8))


def test_checkpoints_summaries_and_exports_record_the_versions(tracked: imgtune.TrainResult) -> None:
    from imgtune.checkpoint import load_checkpoint

    stack = load_checkpoint(tracked.run_dir / "checkpoints" / "best.pt").versions
    assert stack["imgtune"] == imgtune.__version__ and stack["torch"] == torch.__version__
    assert stack["timm"] == __import__("timm").__version__
    assert json.loads((tracked.run_dir / "summary.json").read_text())["versions"] == stack


TIMM_ONLY = r"""
import json, sys
import timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
rows = []
with torch.no_grad():
    for path in sys.argv[2:]:
        probs = model(transform(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(1)[0]
        rows.append(probs.tolist())
print(json.dumps({"labels": model.pretrained_cfg["label_names"], "probs": rows,
                  "imgtune_loaded": [m for m in sys.modules if m.startswith("imgtune")]}))
"""


def test_timm_export_loads_in_plain_timm_and_predicts_the_same(tracked: imgtune.TrainResult, tmp_path: Path) -> None:
    out = tmp_path / "timm"
    res = CliRunner().invoke(app, ["export", str(tracked.run_dir), "--format", "timm", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    files = sorted((tracked.run_dir.parent / "ds" / "valid").rglob("*.png"))
    proc = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), *map(str, files)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["imgtune_loaded"] == [] and seen["labels"] == ["blue", "green", "red"]
    predictor = imgtune.load(tracked.run_dir, precision="fp32")
    mine = [[d["score"] for d in sorted(predictor(f, top_k=3), key=lambda d: d["label"])] for f in files]
    timm_probs = np.array(seen["probs"])
    assert (timm_probs.argmax(1) == np.array(mine).argmax(1)).all()
    assert np.abs(timm_probs - np.array(mine)).max() < 0.02  # PIL's resize (timm) against torch's (imgtune)


def test_timm_export_refuses_what_timm_cannot_rebuild(tracked: imgtune.TrainResult) -> None:
    from imgtune.checkpoint import load_checkpoint
    from imgtune.timm_export import why_not_timm

    ckpt = load_checkpoint(tracked.run_dir / "checkpoints" / "best.pt")
    assert why_not_timm(ckpt) is None
    assert "MLP" in str(why_not_timm(dataclasses.replace(ckpt, arch={**ckpt.arch, "head": [64]})))
    assert "built-in" in str(why_not_timm(dataclasses.replace(ckpt, arch={**ckpt.arch, "name": "cnn5"})))


def test_tensorboard_has_steps_images_and_hparams(tracked: imgtune.TrainResult) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    steps = len((tracked.run_dir / "lr.csv").read_text().splitlines()) - 1
    assert len(events.Scalars("train/loss_step")) == steps == len(events.Scalars("train/lr")) > EPOCHS
    assert len(events.Scalars("valid_acc")) == HEAD_ROWS + EPOCHS
    assert {"samples", "confusion_matrix"} <= set(tags["images"])
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.label_smoothing"].number_value == pytest.approx(0.05)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "hparam/best_valid_acc" in {m.name.tag for m in experiment.metric_infos}
    assert events.Scalars("hparam/best_valid_acc")[0].value == pytest.approx(tracked.best_valid_acc)


def test_mlflow_run_holds_params_metrics_and_artifacts(tracked: imgtune.TrainResult) -> None:
    from mlflow.tracking import MlflowClient

    from imgtune.trackers import local_store

    record = json.loads((tracked.run_dir / "mlflow.json").read_text())
    assert record["tracking_uri"] == local_store(tracked.run_dir.parent)  # the default: ./mlruns
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.label_smoothing"] == "0.05"
    assert len(client.get_metric_history(record["run_id"], "valid_acc")) == HEAD_ROWS + EPOCHS
    assert run.data.metrics["best_valid_acc"] == pytest.approx(tracked.best_valid_acc)
    top = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"report.html", "summary.json", "checkpoints", "plots"} <= top
    assert [a.path for a in client.list_artifacts(record["run_id"], "checkpoints")] == ["checkpoints/best.pt"]


def test_an_interrupted_run_has_its_curves_and_resumes_its_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The curves plot follows the checkpoints, so a run stopped in fine-tuning has its plot (and no report);
    its MLflow run is KILLED, and --resume finishes that same run (the store from MLFLOW_TRACKING_URI)."""
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    from imgtune.errors import Interrupted
    from imgtune.progress import SilentProgress, SilentTask
    from imgtune.runtime import StopRequest

    stop = StopRequest()

    class StopInSecondEpoch(SilentProgress):
        def task(self, description: str, total: int) -> SilentTask:
            if description.startswith("stage 2 epoch 3"):  # the second fine-tuning epoch
                stop.request()
            return SilentTask()

    data = tmp_path / "ds"
    write_class_folders(data / "train", 6, seed=1)
    write_class_folders(data / "valid", 2, seed=2)
    with pytest.raises(Interrupted):
        imgtune.train(data, out=tmp_path / "run", img_size=32, batch_size=8, epochs_frozen=1, epochs=3,
                      augment="light", patience=None, mlflow=True, progress=StopInSecondEpoch(), stop=stop)  # fmt: skip
    assert (tmp_path / "run" / "plots" / "curves.png").is_file()
    assert not (tmp_path / "run" / "report.html").exists()
    record = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=store)
    assert record["tracking_uri"] == store and client.get_run(record["run_id"]).info.status == "KILLED"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the resume finds the store in RUN/mlflow.json
    imgtune.resume(tmp_path / "run")
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(record["run_id"], "valid_acc")) == 4  # 1 + 3 epochs, one run


def test_timm_flag_names_set_the_same_keys(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, [
        "train", str(tmp_path), "--smoothing", "0.2", "--reprob", "0.3", "--model-ema", "--layer-decay", "0.8",
        "--drop-path", "0.1", "--opt", "sgd", "--sched", "step", "--clip-grad", "1", "--drop", "0.2",
        "--print-config",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["label_smoothing"] == 0.2 and cfg["data"]["aug"]["erase"] == 0.3
    assert cfg["train"]["ema"] == 0.9998 and cfg["train"]["lr_decay"] == 0.8 and cfg["model"]["drop_path"] == 0.1
    assert cfg["train"]["optimizer"] == "sgd" and cfg["train"]["schedule"] == "step"
    assert cfg["train"]["grad_clip"] == 1 and cfg["model"]["dropout"] == 0.2


def test_drop_path_and_timm_weight_decay_groups() -> None:
    from imgtune.models import Body, ModelError, create_model, param_groups

    model = create_model("vit_tiny_patch16_224", 3, pretrained=False, body=Body(drop_path=0.1))
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
    groups = param_groups(model, 1e-3, 1e-3, 0.05)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.backbone.named_parameters())
    assert decay_of[id(named["pos_embed"])] == 0 and decay_of[id(named["cls_token"])] == 0
    assert decay_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    with pytest.raises(ModelError, match="built-in CNN"):
        create_model("cnn5", 3, pretrained=False, body=Body(drop_path=0.1))


MISSING = r"""
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # what an environment without the extra looks like to import
from imgtune.cli import main
sys.argv = ["imgtune", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize(
    ("blocked", "command", "extra"),
    [("onnx,onnxruntime", ["export", "{run}"], "export"), ("fastapi", ["serve", "{run}"], "serve"),
     ("onnxruntime", ["predict", "{run}/none.onnx", "{run}"], "export")],
)  # fmt: skip
def test_a_missing_extra_says_what_to_install(
    tracked: imgtune.TrainResult, blocked: str, command: list[str], extra: str
) -> None:
    if extra == "export":
        (tracked.run_dir / "none.onnx").write_bytes(b"not used: onnxruntime is missing before it is read")
    args = [a.format(run=tracked.run_dir) for a in command]
    proc = subprocess.run([sys.executable, "-c", MISSING, blocked, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'imgtune[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr


def test_near_duplicate_hashes_count_bits_without_numpy_2() -> None:
    from imgtune.audit import popcount, popcount_table

    x = np.random.default_rng(0).integers(0, 2**63, (50, 7), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    want = np.array([[bin(int(v)).count("1") for v in row] for row in x])
    assert (popcount_table(x) == want).all() and (popcount(x) == want).all()
