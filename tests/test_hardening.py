"""Injected faults and hostile input: disk full, non-finite losses, malicious checkpoints, fuzzed images."""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import blank_checkpoint
from imgtune.cli import app
from imgtune.engine import Trainer, TrainingError
from imgtune.files import DiskFullError, atomic_write_bytes
from imgtune.images import ImageError, load_rgb
from imgtune.optim import LRSchedule, OptimSettings
from imgtune.predict import Prediction, predictions_csv
from imgtune.runs import RunFolder
from imgtune.stage import ON_FEATURES, Stage
from imgtune.step import StepSettings

runner = CliRunner()


def test_disk_full_keeps_the_previous_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoints" / "last.pt"
    atomic_write_bytes(target, b"the good checkpoint")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=r"last.pt: no space left.*previous last.pt is intact"):
        atomic_write_bytes(target, b"x" * 10_000)
    monkeypatch.undo()
    assert target.read_bytes() == b"the good checkpoint"
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]  # no temporary leftovers


class _AlwaysNaN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


def _stage(module: torch.nn.Module, batches: int) -> Stage:
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))] * batches
    sched = LRSchedule(opt, OptimSettings(), batches, 1)
    return Stage(1, "t", module, lambda: data, lambda: data, batches, 1, opt, sched, policy=ON_FEATURES, patience=None)


def test_non_finite_losses_are_skipped_then_the_run_stops(tmp_path: Path) -> None:
    module = _AlwaysNaN()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = Trainer(module, RunFolder(tmp_path), blank_checkpoint(), device=torch.device("cpu"), num_classes=2,
                      step=StepSettings(max_nonfinite=5))  # fmt: skip
    with pytest.raises(TrainingError, match="6 steps had a non-finite loss"):
        trainer.train_epoch(_stage(module, 10))
    assert trainer.state.skipped_steps == 6
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # no step applied


def test_non_finite_weights_never_overwrite_a_checkpoint(tmp_path: Path) -> None:
    module = torch.nn.Linear(4, 2)
    run = RunFolder(tmp_path)
    trainer = Trainer(module, run, blank_checkpoint(), device=torch.device("cpu"), num_classes=2)
    stage = _stage(module, 1)
    trainer.save("last", stage)
    good = run.last.read_bytes()
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"last\.pt was not overwritten"):
        trainer.save("last", stage)
    assert run.last.read_bytes() == good


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("command", ["resume", "eval", "predict", "export", "serve"])
def test_malicious_pickle_is_refused_by_every_command(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "executed.txt"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {{path: {tmp_path}}}\n")
    evil = pickle.dumps({"format": "imgtune-checkpoint", "payload": _Evil(marker)})
    for name in ("best.pt", "last.pt"):
        (run / "checkpoints" / name).write_bytes(evil)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    args = {
        "resume": ["train", "--resume", str(run)],
        "eval": ["eval", str(run), str(tmp_path)],
        "predict": ["predict", str(run / "checkpoints" / "best.pt"), str(tmp_path / "x.png")],
        "export": ["export", str(run)],
        "serve": ["serve", str(run), "--port", "0"],
    }[command]
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert "refused" in str(res.exception) or "refused" in res.output
    assert not marker.exists()  # the payload never ran


def test_spreadsheet_formulas_are_escaped_in_predictions() -> None:
    rows = [Prediction("=HYPERLINK(evil).png", [("+cmd", 0.9), ("@sum", 0.1)]), Prediction("-x.png", [("ok", 1.0)])]
    text = predictions_csv(rows, 2)
    assert "'=HYPERLINK(evil).png" in text and "'+cmd" in text and "'@sum" in text and "'-x.png" in text


def _seed_images() -> list[bytes]:
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (200, 100, 50)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
    cut=st.integers(0, 10_000),
)
def test_fuzzed_image_bytes_give_a_tensor_or_a_clean_error(seed: int, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[: max(1, len(data) - cut % len(data))]
    try:
        t = load_rgb(io.BytesIO(bytes(data)))
    except ImageError as e:
        assert e.reason and e.kind in {"not_image", "bomb", "corrupt", "missing"}
    else:
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3


def test_sigkill_during_atomic_writes_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A child process rewrites a 30 MB file over and over (content A, B, A, ...); it is killed with SIGKILL
    at random moments, 12 times. The file is always exactly A or B; leftovers are only .tmp files, which
    RunFolder.clean_leftovers removes."""
    import random
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "checkpoints" / "last.pt"
    script = (
        "import sys; from pathlib import Path; from imgtune.files import atomic_write_bytes\n"
        "t = Path(sys.argv[1]); a, b = b'A' * 30_000_000, b'B' * 30_000_000\n"
        "while True:\n    atomic_write_bytes(t, a); atomic_write_bytes(t, b)\n"
    )
    rng = random.Random(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)])
        while not target.exists():
            time.sleep(0.005)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        data = target.read_bytes()
        assert data in (b"A" * 30_000_000, b"B" * 30_000_000)
    (target.parent / ".last.pt.k1ll3d.tmp").write_bytes(b"A" * 1000)  # what a kill inside a write leaves, for sure
    removed = RunFolder(tmp_path).clean_leftovers()
    assert removed and not list(target.parent.glob(".*.tmp"))
    assert target.read_bytes() in (b"A" * 30_000_000, b"B" * 30_000_000)
    print(f"temporary files removed after 12 kills: {len(removed)} (one planted)")


def test_out_of_memory_halves_the_batch_and_restarts_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CUDA OOM is simulated (no GPU here): the model raises torch's OutOfMemoryError for batches over 4."""
    import json

    import yaml

    import imgtune
    from conftest import write_class_folders
    from imgtune.models import Classifier

    root = tmp_path / "ds"
    write_class_folders(root / "train", 8, seed=1)
    write_class_folders(root / "valid", 2, seed=2)
    real_forward = Classifier.forward

    def forward(self: Classifier, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, x)

    monkeypatch.setattr(Classifier, "forward", forward)
    caplog.set_level("WARNING", logger="imgtune")
    overrides = {"data.path": root, "out": tmp_path / "run", "data.img_size": 32, "data.batch_size": 16}
    cfg = imgtune.build_config(overrides={**overrides, "train.epochs_frozen": 2, "train.epochs": 1})
    result = imgtune.train(cfg)
    assert "out of memory with batch size 16" in caplog.text and "with batch size 4" in caplog.text
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]["batch_size"] == 4
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["batch_size"] == 4 and summary["oom_retries"] == 2
    rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 1  # header, the solved head, 1 fine-tuning epoch: no rows from failed attempts
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["config"]["data"]["batch_size"] == 4


class _Saboteur:
    """A Progress that, as stage 2 starts, deletes one training image, cuts another short and makes a third
    unreadable: files that change after the scan, as a sync tool or a cleanup script would change them."""

    def __init__(self, victims: list[Path]) -> None:
        self.victims, self.done = victims, False

    def task(self, description: str, total: int) -> object:
        from imgtune.progress import SilentTask

        if description.startswith("stage 2") and not self.done:
            gone, cut, locked = self.victims
            gone.unlink()
            cut.write_bytes(cut.read_bytes()[:60])
            locked.chmod(0)
            self.done = True
        return SilentTask()


@pytest.mark.slow
def test_images_that_vanish_or_break_during_a_run_are_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import imgtune
    from conftest import SMALL_RUN, write_class_folders

    data = tmp_path / "ds"
    write_class_folders(data / "train", 8, seed=1)
    write_class_folders(data / "valid", 4, seed=2)
    victims = [data / "train" / "red" / "0.png", data / "train" / "green" / "1.png", data / "train" / "blue" / "2.png"]
    saboteur = _Saboteur(victims)
    cfg = imgtune.build_config(overrides={**SMALL_RUN, "data.path": data, "out": tmp_path / "run", "data.cache": "none",
                                          "data.workers": 0, "train.epochs_frozen": 1, "train.epochs": 2})  # fmt: skip
    caplog.set_level("WARNING", logger="imgtune")
    try:
        result = imgtune.train(cfg, progress=saboteur)  # type: ignore[arg-type]
    finally:
        victims[2].chmod(0o644)
    assert saboteur.done and result.summary["best_epoch"] >= 1
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert f"skipped unreadable image {victims[0]}: file not found" in caplog.text
    assert f"skipped unreadable image {victims[1]}" in caplog.text
    if os.geteuid() != 0:  # root reads a file whatever its mode; test_unreadable_file_... covers it as nobody
        assert f"skipped unreadable image {victims[2]}" in caplog.text


def _decode_as_nobody(path: str, queue: object) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        load_rgb(path)
        queue.put("decoded")  # type: ignore[attr-defined]
    except ImageError as e:
        queue.put(f"ImageError: {e.reason}")  # type: ignore[attr-defined]
    except BaseException as e:
        queue.put(f"crash: {type(e).__name__}: {e}")  # type: ignore[attr-defined]


def test_unreadable_file_is_an_image_error_not_a_crash(tmp_path: Path) -> None:
    """Permissions, really enforced: as root, the file is opened by a child process that has become nobody."""
    import multiprocessing
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = folder / "locked.png"
        Image.new("RGB", (8, 8)).save(path)
        path.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(ImageError, match="Permission denied"):
                load_rgb(path)
            return
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_decode_as_nobody, args=(str(path), queue))
        child.start()
        child.join(timeout=60)
        answer = queue.get(timeout=10)
        assert answer.startswith("ImageError") and "Permission denied" in answer, answer
    finally:
        shutil.rmtree(folder, ignore_errors=True)
