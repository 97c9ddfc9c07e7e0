"""ONNX export: graph with preprocessing, dynamic batch, metadata, parity, and the onnxruntime backend."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import imgtune
from conftest import small_dataset
from imgtune.checkpoint import CheckpointError
from imgtune.cli import app
from imgtune.export import ExportError, check_parity, export_onnx, read_metadata
from imgtune.quantize import export_int8

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = small_dataset(tmp_path_factory, "export", train=8, valid=4)
    cfg = imgtune.build_config(overrides={"data.path": data, "out": data.parent / "run", "data.img_size": 48,
                                          "train.epochs_frozen": 30, "train.lr": 3e-3, "train.epochs": 1})  # fmt: skip
    return imgtune.train(cfg).run_dir


def test_export_cli_writes_a_checked_model_with_metadata(run: Path) -> None:
    res = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert res.exit_code == 0, res.output
    assert "parity with PyTorch on 12 real images" in res.stdout
    meta = read_metadata(run / "model.onnx")
    assert json.loads(meta["classes"]) == ["blue", "green", "red"]
    assert json.loads(meta["preprocessing"])["img_size"] == 48 and "uint8 RGB, NCHW" in meta["input"]
    made_with, trained_with = json.loads(meta["versions"]), json.loads(meta["trained_with"])
    assert made_with["onnxruntime"] == ort.__version__ and made_with["imgtune"] == imgtune.__version__
    assert trained_with["torch"] == torch.__version__ and "timm" in trained_with
    session = ort.InferenceSession(str(run / "model.onnx"))
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)" and inp.shape[1:] == [3, 48, 48]
    for batch in (1, 5):  # dynamic batch dimension
        x = np.random.default_rng(batch).integers(0, 255, (batch, 3, 48, 48), dtype=np.uint8)
        probs = session.run(None, {"image": x})[0]
        assert probs.shape == (batch, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_onnxruntime_backend_gives_the_same_csv(run: Path, tmp_path: Path) -> None:
    export_onnx(run, tmp_path / "m.onnx")
    data = Path(imgtune.load(run).checkpoint["config"]["data"]["path"])
    a, b = tmp_path / "torch.csv", tmp_path / "ort.csv"
    assert (
        runner.invoke(
            app, ["predict", str(run), str(data / "valid"), "--out", str(a), "--top-k", "3", "--precision", "fp32"]
        ).exit_code
        == 0
    )
    res = runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(data / "valid"), "--out", str(b),
                              "--top-k", "3", "--backend", "onnxruntime"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows_a, rows_b = list(csv.DictReader(a.open())), list(csv.DictReader(b.open()))
    assert [r["path"] for r in rows_a] == [r["path"] for r in rows_b] and len(rows_a) == 12
    assert [r["label"] for r in rows_a] == [r["label"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert abs(float(ra["confidence"]) - float(rb["confidence"])) <= 1e-4


def test_parity_check_fails_loudly_on_a_different_model(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.onnx"
    export_onnx(run, out)
    predictor = imgtune.load(run)
    model = predictor.model  # type: ignore[attr-defined]
    with torch.no_grad():
        model.head[-1].bias[0] += 3.0  # a different model than the one exported
    images = torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8)
    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    diff, _ = check_parity(wrapped, out.read_bytes(), images)
    assert diff > 1e-4
    monkeypatch.setattr("imgtune.export.PARITY_ATOL", -1.0)  # nothing can pass: the error path must trigger
    with pytest.raises(ExportError, match="does not match"):
        export_onnx(run, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


def test_onnx_backend_needs_an_export(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="imgtune export"):
        imgtune.load(tmp_path / "empty_run", backend="onnxruntime")


def test_an_onnx_path_works_wherever_a_run_does(run: Path, tmp_path: Path) -> None:
    """No --backend: predict, eval and the library (serve loads through it) see the .onnx and use onnxruntime."""
    model = export_onnx(run, run / "model.onnx").path
    data = Path(imgtune.load(run).checkpoint["config"]["data"]["path"])
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(model), str(data / "valid"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    onnx_rows = list(csv.DictReader(out.open()))
    torch_rows, _ = imgtune.load(run, precision="fp32").predict(sorted((data / "valid").glob("*/*.png")))
    assert sorted(r["label"] for r in onnx_rows) == sorted(r.label for r in torch_rows) and len(onnx_rows) == 12
    res = runner.invoke(app, ["eval", str(model), str(data), "--split", "valid", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{") :])["accuracy"] == pytest.approx(
        imgtune.evaluate(run, data, "valid").accuracy
    )
    assert imgtune.load(model).backend == "onnxruntime"


def test_the_graph_pads_by_constants_merged_into_its_convs(run: Path, tmp_path: Path) -> None:
    """timm's TF-style 'SAME' convs compute their padding at run time; exported, that was Shape/Gather/Pad
    arithmetic that ONNX Runtime did not fuse and that int8 quantization turned into shifted feature maps.
    Export succeeding means parity with PyTorch held (48 px: asymmetric pads on every stride-2 conv)."""
    ops = Counter(n.op_type for n in onnx.load(str(export_onnx(run, tmp_path / "m.onnx").path)).graph.node)
    assert ops["Conv"] == 49 and not {"Pad", "Shape", "Gather", "Ceil"} & set(ops), ops


def test_int8_export_passes_its_guard_and_works_wherever_an_onnx_does(run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", str(run), "--int8", "--calibration", "20"])
    assert res.exit_code == 0, res.output
    int8, fp32 = run / "model.int8.onnx", export_onnx(run, tmp_path / "fp32.onnx").path
    meta = read_metadata(int8)
    guard = json.loads(meta["int8"])
    assert meta["precision"] == "int8" and guard["method"] == "minmax" and guard["calibration_images"] == 16
    assert guard["images"] == 12 and guard["agreement"] >= 0.99 and guard["drop"] <= 0.005
    assert json.loads(meta["classes"]) == ["blue", "green", "red"] and "int8" in res.stdout
    graph = onnx.load(str(int8)).graph
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)  # the weights really are int8
    assert graph.node[-1].op_type == "Softmax"  # probabilities stay fp32
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size
    data = Path(imgtune.load(run).checkpoint["config"]["data"]["path"])
    out = tmp_path / "p.csv"
    assert runner.invoke(app, ["predict", str(int8), str(data / "valid"), "--out", str(out)]).exit_code == 0
    assert len(list(csv.DictReader(out.open()))) == 12
    assert imgtune.load(int8).backend == "onnxruntime (int8)"
    # eval puts the fp32 model beside it: the run's checkpoint on the same images, or else the guard's figures
    res = runner.invoke(app, ["eval", str(int8), str(data), "--split", "valid", "--json"])
    assert res.exit_code == 0, res.output
    ref = json.loads(res.stdout[res.stdout.index("{") :])["reference"]
    assert ref["accuracy"] == pytest.approx(imgtune.evaluate(run, data, "valid", precision="fp32").accuracy)
    assert ref["same_images"] and ref["agreement"] >= 0.99 and ref["model"].endswith("best.pt")
    alone = tmp_path / "copied.int8.onnx"
    alone.write_bytes(int8.read_bytes())
    res = runner.invoke(app, ["eval", str(alone), str(data), "--split", "valid"])
    assert res.exit_code == 0, res.output
    assert "fp32 reference (the export guard's 12 validation images)" in res.stdout


def test_int8_that_misses_the_guard_is_not_written(run: Path, tmp_path: Path) -> None:
    """Calibrated on black images, every activation range collapses: the guard must catch it."""
    black = tmp_path / "black"
    black.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 48)).save(black / f"{i}.png")
    with pytest.raises(ExportError, match="no int8 model written") as err:
        export_int8(run, tmp_path / "never.onnx", method="minmax", calibration_images=[black])
    assert not (tmp_path / "never.onnx").exists()
    assert "minmax: top-1 agreement" in str(err.value) and "missed by" in str(err.value)
    assert "try --calibration-method entropy" in str(err.value)
    with pytest.raises(ExportError, match="choose auto, minmax, entropy, percentile"):
        export_int8(run, method="kmeans")


def test_an_int8_model_is_served_like_any_onnx(run: Path) -> None:
    """`imgtune serve RUN/model.int8.onnx` in its own process answers what the int8 model gives offline."""
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_soak import start_server

    int8 = run / "model.int8.onnx"
    if not int8.is_file():
        export_int8(run, calibration=24)
    data = Path(imgtune.load(run).checkpoint["config"]["data"]["path"])
    paths = sorted((data / "valid").glob("*/*.png"))
    want = [r.label for r in imgtune.load(int8).predict(paths)[0]]
    proc, base = start_server(int8)
    try:
        assert httpx.get(f"{base}/health").json()["backend"] == "onnxruntime (int8)"
        res = httpx.post(f"{base}/predict", files=[("file", (p.name, p.read_bytes())) for p in paths], timeout=60)
        assert res.status_code == 200, res.text
        assert [r["label"] for r in res.json()] == want
        refused = httpx.post(f"{base}/predict?explain=true", files=[("file", (paths[0].name, paths[0].read_bytes()))])
        assert refused.status_code == 400 and "gives no gradients" in refused.json()["detail"]
        assert '"explain": false' in httpx.get(base).text  # the page offers no heatmap toggle
    finally:
        proc.terminate()
        proc.wait(timeout=30)
