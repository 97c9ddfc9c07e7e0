"""Exact resume after SIGKILL, and same seed -> same metrics.csv, with real processes and real checkpoints."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import small_dataset

TIMING = {"seconds", "images_per_s"}  # wall-clock columns differ between runs by nature


def _args(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "imgtune", "train", str(data), "--out", str(out), "--img-size", "32",
        "--batch-size", "8", "--epochs-frozen", "3", "--epochs", "4", "--deterministic", "--patience", "10",
        "--augment", "standard", "--mixup", "0.3", "--ema", "0.9", "--seed", "7", "--no-report",
    ]  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader((run / "metrics.csv").open())]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_dataset(tmp_path_factory, "resume", train=16, valid=4)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_args(data, out), check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(data: Path, reference: Path, tmp_path: Path) -> None:
    subprocess.run(_args(data, tmp_path / "again"), check=True, capture_output=True, timeout=600)
    assert _rows(tmp_path / "again") == _rows(reference)
    for a, b in zip(_weights(reference / "checkpoints" / "last.pt").values(),
                    _weights(tmp_path / "again" / "checkpoints" / "last.pt").values(), strict=True):  # fmt: skip
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_rows", [1, 2])  # after the solved head: in stage 2's first and second epoch
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(
    data: Path, reference: Path, tmp_path: Path, kill_after_rows: int
) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(_args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            # the solved head's row is logged before its checkpoint is written: wait for both
            checkpointed = (out / "checkpoints" / "last.pt").is_file()
            if checkpointed and len((out / "metrics.csv").read_text().splitlines()) - 1 >= kill_after_rows:
                break
            if proc.poll() is not None:
                pytest.fail("training ended before it could be interrupted")
            time.sleep(0.02)
        time.sleep(random.Random(kill_after_rows).uniform(0.05, 0.3))  # somewhere inside the next epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    interrupted = len(_rows(out))
    assert interrupted < len(_rows(reference))  # it really stopped early
    res = subprocess.run(
        [sys.executable, "-m", "imgtune", "train", "--resume", str(out)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr, res.stderr
    assert _rows(out) == _rows(reference)  # no duplicated, missing or different rows
    for name in ("last.pt", "best.pt"):
        ref, got = _weights(reference / "checkpoints" / name), _weights(out / "checkpoints" / name)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert (out / "lr.csv").read_text() == (reference / "lr.csv").read_text()


def test_resume_before_any_checkpoint_starts_over_from_pretrained_weights(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    import imgtune

    cfg = imgtune.build_config(overrides={"data.path": data, "out": tmp_path / "run", "data.img_size": 32,
                                          "train.epochs_frozen": 2, "train.epochs": 0})  # fmt: skip
    first = imgtune.train(cfg)
    shutil.rmtree(first.run_dir / "checkpoints")  # as if killed before stage 1 ended
    caplog.set_level("INFO", logger="imgtune")
    again = imgtune.resume(first.run_dir)
    assert "starting it again from the beginning" in caplog.text
    assert "loaded offline ImageNet weights" in caplog.text
    assert again.best_valid_acc == pytest.approx(first.best_valid_acc)
    assert len(_rows(first.run_dir)) == 1  # the solved head


def _start_and_wait(data: Path, out: Path, rows: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(_args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) - 1 >= rows:
            return proc
        if proc.poll() is not None:
            pytest.fail("training ended before it could be interrupted")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("training did not get far enough")


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_last_pt_and_resume_is_exact(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    for attempt, delay in enumerate((0.1, 0.2, 0.05, 0.3)):  # aim inside stage 2's second epoch (~0.5 s)
        out = tmp_path / f"run{attempt}"
        proc = _start_and_wait(data, out, rows=4)
        last_pt = out / "checkpoints" / "last.pt"
        seen = last_pt.stat().st_mtime_ns
        while last_pt.stat().st_mtime_ns == seen and proc.poll() is None:  # epoch 4's last.pt is written ...
            time.sleep(0.005)
        time.sleep(delay)  # ... and epoch 5 is under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        assert "stopping after the current step" in err and f"imgtune train --resume {out}" in err
        in_epoch = torch.load(last_pt, weights_only=True)["train_state"]["in_epoch"]
        if in_epoch is not None:
            break
    assert in_epoch is not None and 0 < in_epoch["batches_done"] < 6, "never stopped mid-epoch"
    res = subprocess.run([sys.executable, "-m", "imgtune", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert _rows(out) == _rows(reference)
    for name in ("last.pt", "best.pt"):
        ref, got = _weights(reference / "checkpoints" / name), _weights(out / "checkpoints" / name)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert (out / "lr.csv").read_text() == (reference / "lr.csv").read_text()


@pytest.mark.slow
def test_second_interrupt_aborts_at_once(data: Path, tmp_path: Path) -> None:
    proc = _start_and_wait(data, tmp_path / "run", rows=4)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10 and proc.returncode != 0


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments_then_resume_is_exact(data: Path, reference: Path, tmp_path: Path) -> None:
    """Kill 4 times at random moments of stage 2 (checkpoint writes included: ~20 MB each, two per epoch), resuming
    after each kill; the run must end exactly like the uninterrupted one, with no temporary files left. Each kill
    waits until the process is training (a resumed one rewrites metrics.csv when it has restored last.pt): a kill
    while Python is still importing would test nothing."""
    out = tmp_path / "run"
    rng = random.Random(3)
    leftovers_seen = 0
    first = True
    for _ in range(4):
        cmd = _args(data, out) if first else [sys.executable, "-m", "imgtune", "train", "--resume", str(out)]
        before = (out / "metrics.csv").stat().st_mtime_ns if (out / "metrics.csv").is_file() else None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if first and (out / "checkpoints" / "last.pt").is_file():
                break  # stage 1 done: from here on checkpoints are written every epoch
            if not first and (out / "metrics.csv").stat().st_mtime_ns != before:
                break  # restored and training
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        first = False
        leftovers_seen += len(list((out / "checkpoints").glob(".*.tmp")))
    res = subprocess.run([sys.executable, "-m", "imgtune", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list((out / "checkpoints").glob(".*.tmp")) and not list(out.glob(".*.tmp"))
    assert _rows(out) == _rows(reference)
    ref, got = _weights(reference / "checkpoints" / "best.pt"), _weights(out / "checkpoints" / "best.pt")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    print(f"temporary checkpoint files left by kills: {leftovers_seen}")


@pytest.mark.slow
def test_a_run_folder_has_one_writer_at_a_time(data: Path, tmp_path: Path) -> None:
    """Two trains started together with one --out, and a --resume from a second terminal while it runs: one
    process writes the folder, the others exit 2 at once naming it, and the writer finishes untouched."""
    out = tmp_path / "run"
    args = _args(data, out)
    args[args.index("--epochs") + 1] = "30"  # long enough for the others to start while it trains
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 300
    while not (out / "run.lock").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    holder = None
    while holder is None and time.monotonic() < deadline:  # the record is written just after the lock is taken
        text = (out / "run.lock").read_text() if (out / "run.lock").is_file() else ""
        holder = int(json.loads(text)["pid"]) if text.strip() else None
    assert holder in {p.pid for p in procs}
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "imgtune", "train", "--resume", str(out)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    results = {p.pid: (p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs}
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {holder}" in second.stderr and "another imgtune process is writing" in second.stderr
    assert second.stderr.count("\n") <= 2 and "Traceback" not in second.stderr
    (loser,) = [pid for pid in results if pid != holder]
    # the loser may have looked in the instant between the holder's lock and its name being written
    named = f"pid {holder}" in results[loser][1] or "has not written its name yet" in results[loser][1]
    assert results[loser][0] == 2 and named, results[loser][1][-2000:]
    assert results[holder][0] == 0, results[holder][1][-2000:]
    assert time.monotonic() - started > 1  # the resume was refused while the writer still ran
    assert [int(r["epoch"]) for r in _rows(out)] == list(range(1, len(_rows(out)) + 1))  # one writer's rows
    assert (out / "summary.json").is_file() and not (out / "run.lock").exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_a_damaged_last_pt_falls_back_to_the_one_before(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL leaves run.lock behind with a dead PID, and last.pt is then cut short (a copy that failed, a
    disk that lied): the resume says both, takes over the lock, restarts from last.prev.pt and still ends
    exactly like the uninterrupted run."""
    out = tmp_path / "run"
    proc = _start_and_wait(data, out, rows=5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((out / "run.lock").read_text())["pid"] == proc.pid
    last = out / "checkpoints" / "last.pt"
    assert (out / "checkpoints" / "last.prev.pt").is_file()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    predict = subprocess.run([sys.executable, "-m", "imgtune", "predict", str(last), str(data / "valid")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert predict.returncode == 2 and "damaged or truncated" in predict.stderr and "last.prev.pt" in predict.stderr
    res = subprocess.run([sys.executable, "-m", "imgtune", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"taking over the lock left by pid {proc.pid}" in res.stderr
    assert "resuming from" in res.stderr and "last.prev.pt" in res.stderr
    assert _rows(out) == _rows(reference)
    ref, got = _weights(reference / "checkpoints" / "last.pt"), _weights(last)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_run_folder_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    from imgtune.runs import RunFolderError, RunLock

    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should go")
    with pytest.raises(RunFolderError, match="cannot take the run folder's lock"), RunLock(blocker / "run"):
        pass
