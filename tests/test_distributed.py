"""Data-parallel training with real torchrun processes (gloo on CPU): run folder, exact metrics, stop, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_class_folders
from imgtune.features import tensor_batches

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_feature_batches_shard_like_distributed_sampler() -> None:
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    seen = []
    lengths = set()
    for rank in range(3):
        g = torch.Generator().manual_seed(5)  # the same state on every rank
        labels = torch.cat([b[1] for b in tensor_batches(x, y, 2, shuffle=True, generator=g, shard=(rank, 3))])
        lengths.add(len(labels))
        seen += labels.tolist()
    assert lengths == {4}  # ceil(10 / 3): equal step counts on all ranks
    assert set(seen) == set(range(10)) and len(seen) == 12  # every item, two repeated as padding


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train:2:5", "valid:3"])
def test_one_rank_asking_to_stop_stops_all_at_the_same_place(tmp_path: Path, where: str) -> None:
    """As when a signal reaches one process first: during a step, or in the middle of validation."""
    out = tmp_path / "probe"
    proc = subprocess.run(
        [*TORCHRUN, str(TESTS / "ddp_probe.py"), str(out), where], env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["gathered"] == [0, 1, 2, 3, 4, 100, 101, 102] for r in ranks)  # gather_cat, uneven sizes
    assert [r["asked"] for r in ranks] == [False, True]  # only rank 1 saw the request ...
    assert ranks[0]["stopped"] and ranks[0]["stopped"] == ranks[1]["stopped"]  # ... both stopped, at one place
    expected = "epoch 2, step 6" if where.startswith("train") else "the end of epoch 3"
    assert expected in ranks[0]["stopped"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    done = [r["in_epoch"]["batches_done"] if r["in_epoch"] else None for r in state["ranks"]]
    assert done == ([6, 6] if where.startswith("train") else [None, None])


def _dataset(root: Path) -> Path:
    write_class_folders(root / "train", 20, seed=1)
    write_class_folders(root / "valid", 7, seed=2)  # 21 images: shards of 11 and 10, nothing padded
    write_class_folders(root / "test", 5, seed=3, fmt="jpg")
    return root


def _train_args(data: Path, out: Path) -> list[str]:
    return ["-m", "imgtune", "train", str(data), "--img-size", "64", "--epochs-frozen", "2", "--epochs", "6",
            "--batch-size", "4", "--out", str(out), "--no-report"]  # fmt: skip


def _metrics(run: Path) -> list[str]:
    """epoch .. valid_acc (not the timings)."""
    return [",".join(line.split(",")[:7]) for line in (run / "metrics.csv").read_text().splitlines()]


def _eval(run: Path, data: Path, split: str, checkpoint: str) -> dict[str, float]:
    """`imgtune eval --json` in this one process (no torchrun): the reference for the 2-process metrics."""
    from typer.testing import CliRunner

    from imgtune.cli import app

    res = CliRunner().invoke(app, ["eval", str(run / "checkpoints" / checkpoint), str(data), "--split", split,
                                   "--json", "--no-report"])  # fmt: skip
    assert res.exit_code == 0, res.output
    result: dict[str, float] = json.loads(res.stdout)
    return result


def _rank1_worker(agent: subprocess.Popen[str]) -> int:
    """The pid of the torchrun worker with RANK=1 (a child of the agent)."""
    for _ in range(600):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == agent.pid and b"RANK=1" in env:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError("no rank-1 worker found")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_torchrun_trains_stops_and_resumes_exactly(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds")
    runs = tmp_path / "runs"
    runs.mkdir()
    # 1. uninterrupted: one run folder, written by rank 0; metrics equal a single-process evaluation
    straight = runs / "straight"
    proc = subprocess.run(
        [*TORCHRUN, *_train_args(data, straight)],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["straight"] and not (tmp_path / "runs" / "ds").exists()
    assert "global batch 8 = 4 per process x 2 processes" in proc.stderr
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["valid_images"] == 21
    last_row = (straight / "metrics.csv").read_text().splitlines()[-1].split(",")
    valid = _eval(straight, data, "valid", "last.pt")  # one process, all 21 images
    assert valid["n"] == 21
    assert float(last_row[6]) == pytest.approx(valid["accuracy"], abs=1e-6)  # valid_acc: exact, no padding
    assert float(last_row[5]) == pytest.approx(valid["loss"], rel=1e-4)
    test = _eval(straight, data, "test", "best.pt")
    assert summary["test_images"] == test["n"] == 15
    assert summary["test_acc"] == pytest.approx(test["accuracy"], abs=1e-6)

    # 2. SIGTERM to rank 1 alone in fine-tuning: both ranks stop at the same step, last.pt is written
    stopped = runs / "stopped"
    agent = subprocess.Popen(
        [*TORCHRUN, *_train_args(data, stopped)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=tmp_path,
    )  # fmt: skip
    worker = _rank1_worker(agent)
    deadline = time.time() + 300
    while time.time() < deadline and agent.poll() is None:
        rows = (stopped / "metrics.csv").read_text().splitlines() if (stopped / "metrics.csv").exists() else []
        if sum(1 for r in rows[1:] if r.split(",")[1] == "2") >= 2:
            break
        time.sleep(0.05)
    os.kill(worker, signal.SIGTERM)
    signalled = time.time()
    output, _ = agent.communicate(timeout=120)
    assert time.time() - signalled < 30, "ranks must stop within torchrun's 30-second grace period"
    assert agent.returncode != 0, output[-2000:]
    assert "torchrun <the same options, 2 processes> -m imgtune train --resume" in output
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    positions = [r["in_epoch"]["batches_done"] if r["in_epoch"] else None for r in state["ranks"]]
    assert positions[0] == positions[1]
    assert len(_metrics(stopped)) < len(_metrics(straight))

    # 3. resume under torchrun: the same metrics and the same weights as the uninterrupted run
    proc = subprocess.run(
        [*TORCHRUN, "-m", "imgtune", "train", "--resume", str(stopped)], env=_env(), capture_output=True, text=True,
        timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(stopped) == _metrics(straight)
    a = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
