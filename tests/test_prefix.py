"""Stage 2 from the frozen blocks' cached outputs (`--unfreeze N`, no augmentation): the same training as
running the whole network, when it applies, and the log says why when it does not."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import small_dataset
from imgtune import prefix
from imgtune.models import create_model, unfreeze_top

TIMING = {"seconds", "images_per_s"}


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_model("tf_efficientnet_lite0", 3, pretrained=True)


def test_the_cut_model_computes_what_the_whole_one_does(lite0: torch.nn.Module) -> None:
    unfreeze_top(lite0, 12)  # lite0 has 17 block groups: the stem and the first 4 blocks stay frozen
    assert prefix.frozen_blocks(lite0) == 4
    lite0.use_channels_last(True)
    lite0.eval()
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        whole = lite0(x)
        cut = lite0(prefix.Midway(prefix.bottom(lite0, x, 4), 4))
    torch.testing.assert_close(cut, whole, atol=1e-4, rtol=1e-4)
    unfreeze_top(lite0, 17)  # everything trains, the stem too: nothing to cut
    assert prefix.frozen_blocks(lite0) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"unfreeze": None}, ""),
        ({"augment": True}, "augmentation"),
        ({"mixing": True}, "mixup"),
        ({"compiled": True}, "compiled"),
        ({"drop_path": 0.1}, "stochastic depth"),
        ({}, None),
    ],
)
def test_when_the_cache_applies(lite0: torch.nn.Module, change: dict[str, object], reason: str | None) -> None:
    unfreeze_top(lite0, 6)
    kwargs: dict[str, object] = {"unfreeze": 6, "augment": False, "mixing": False, "compiled": False,
                                 "drop_path": 0.0, **change}  # fmt: skip
    why = prefix.why_not(lite0, **kwargs)  # type: ignore[arg-type]
    assert why == reason if reason in ("", None) else reason in str(why)


def _args(data: Path, out: Path, cache: bool) -> list[str]:
    return [sys.executable, "-m", "imgtune", "train", str(data), "--out", str(out), "--img-size", "32",
            "--batch-size", "8", "--epochs-frozen", "1", "--epochs", "3", "--unfreeze", "12", "--augment", "none",
            "--deterministic", "--seed", "3", "--no-report",
            "--set", f"train.cache_frozen={str(cache).lower()}"]  # fmt: skip


def _rows(run: Path) -> list[dict[str, float]]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [{k: float(v) for k, v in r.items() if k not in TIMING and v != ""} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    return state


@pytest.mark.slow
def test_cached_training_equals_whole_network_training_and_resumes_exactly(tmp_path_factory: pytest.TempPathFactory,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    data = small_dataset(tmp_path_factory, "prefix", train=24, valid=6)
    whole = subprocess.run(_args(data, tmp_path / "whole", False), capture_output=True, text=True, timeout=600)
    cached = subprocess.run(_args(data, tmp_path / "cached", True), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0 and cached.returncode == 0, cached.stderr[-2000:]
    assert "computed once for 72 images" in cached.stderr, cached.stderr
    assert "train.cache_frozen is off" in whole.stderr
    a, b = _rows(tmp_path / "whole"), _rows(tmp_path / "cached")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        assert all(rb[k] == pytest.approx(ra[k], abs=1e-4) for k in ra), (ra, rb)
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "cached")
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)

    # killed during stage 2, then resumed: the cache is rebuilt and the run ends as the uninterrupted one did
    out = tmp_path / "killed"
    proc = subprocess.Popen(_args(data, out, True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "last.pt").is_file() and len((out / "metrics.csv").read_text().splitlines()) > 2:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run ended before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(_rows(out)) < 4
    res = subprocess.run([sys.executable, "-m", "imgtune", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr and "computed once" in res.stderr
    assert _rows(out) == b
    assert all(torch.equal(v, _weights(out)[k]) for k, v in wb.items())
