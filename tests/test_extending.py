"""docs/design.md says a new schedule or a new monitor is one registration, from outside the package: here they
are registered by the test, chosen by name on the command line, and train end to end."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from conftest import small_dataset
from imgtune.cli import app
from imgtune.optim import SCHEDULES, Clock, OptimSettings, register_schedule
from imgtune.tracking import MONITORS, register_monitor


@pytest.fixture
def registered() -> Iterator[None]:
    @register_schedule("linear_decay")
    def _linear(clock: Clock, s: OptimSettings) -> float:
        return 1.0 - clock.step / clock.total

    register_monitor("valid_error", maximize=False, label="valid error rate", read=lambda r: 1.0 - r.accuracy)
    yield
    del SCHEDULES["linear_decay"], MONITORS["valid_error"]  # other tests' runs keep the built-in tables


def test_a_schedule_and_a_monitor_from_outside_train_end_to_end(
    registered: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = small_dataset(tmp_path_factory, "extending", train=8, valid=4)
    run = tmp_path_factory.mktemp("run") / "run"
    res = CliRunner().invoke(app, [
        "train", str(data), "--out", str(run), "--img-size", "32", "--batch-size", "8", "--augment", "light",
        "--epochs-frozen", "2", "--epochs", "3", "--warmup", "0",
        "--set", "train.patience=null", "--schedule", "linear_decay", "--monitor", "valid_error",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    lrs = [float(r["lr"]) for r in csv.DictReader((run / "lr.csv").open()) if r["stage"] == "2"]
    base = 1e-3 * 0.5  # stage-2 head LR from a pretrained start
    assert lrs == pytest.approx([base * (1 - k / len(lrs)) for k in range(len(lrs))], rel=1e-5)  # the new shape
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0])[-1] == "valid_error"  # the new monitor's column
    errors = [float(r["valid_error"]) for r in rows]
    assert errors == pytest.approx([1 - float(r["valid_acc"]) for r in rows], abs=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "valid_error"
    assert errors[summary["best_epoch"] - 1] == min(errors)  # lower is better: the best epoch has the least error
    page = (run / "report.html").read_text()
    assert 'data-metric="valid_error"' in page and "valid error rate" in page
