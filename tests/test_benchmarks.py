"""The benchmark scripts that no test run exercises otherwise: the GPU script (no GPU here) must at least parse,
plan the runs it promises and refuse clearly without a GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GPU_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def test_gpu_script_plans_the_workloads_and_ddp() -> None:
    res = subprocess.run([sys.executable, str(GPU_SCRIPT), "--dry-run", "--bench", "B", "--demo", "D"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    assert " train B " in lines[0] and "--batch-size auto" in lines[0]
    assert " train D " in lines[1] and "--epochs 2" in lines[1]
    assert "torchrun" in lines[2] and "--nproc-per-node 2" in lines[2] and "--out runs/gpu-bench-ddp" in lines[2]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the script would run")
def test_gpu_script_says_it_needs_a_gpu() -> None:
    res = subprocess.run([sys.executable, str(GPU_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no CUDA GPU here" in res.stderr
