from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from conftest import blank_checkpoint
from imgtune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imgtune.files import atomic_write_text

SRC = Path(__file__).resolve().parents[1] / "src"


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (Path(self.target), "pwned"))  # type: ignore[attr-defined]


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    evil = _Evil()
    evil.target = str(marker)  # type: ignore[attr-defined]
    bad = tmp_path / "best.pt"
    bad.write_bytes(pickle.dumps({"format": "imgtune-checkpoint", "x": evil}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_not_a_checkpoint_and_damaged_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an imgtune checkpoint"):
        load_checkpoint(plain)
    cut = tmp_path / "cut.pt"
    save_checkpoint(cut, dataclasses.replace(blank_checkpoint(), state_dict={"w": torch.ones(1000)}))
    cut.write_bytes(cut.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=str(cut.name)):
        load_checkpoint(cut)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_every_torch_load_in_the_source_passes_weights_only_true() -> None:
    calls = []
    for py in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                base = node.func.value  # type: ignore[attr-defined]
                if isinstance(base, ast.Name) and base.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    calls.append(py.name)
                    assert isinstance(kw.get("weights_only"), ast.Constant), f"{py}: torch.load without weights_only"
                    assert kw["weights_only"].value is True, f"{py}: torch.load with weights_only != True"
    assert calls, "expected at least one torch.load in the source"


def _as_version_1(path: Path) -> None:
    """Rewrite a checkpoint as imgtune's format 1 wrote it: one train_state["trainer"] dict for the loop and
    the tracking state, no temperature unless calibrated."""
    data = torch.load(path, weights_only=True)
    data["version"] = 1
    data.pop("temperature")
    state = data.get("train_state")
    if state:
        state["trainer"] = {**state.pop("loop"), **state.pop("tracker")}
    torch.save(data, path)


def test_a_version_1_run_loads_and_resumes_and_a_newer_file_says_upgrade(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import yaml

    import imgtune
    from conftest import small_dataset, train_small

    data = small_dataset(tmp_path_factory, "v1", 6, 2)
    run = train_small(data, tmp_path / "run", **{"train.epochs_frozen": 2, "train.epochs": 1}).run_dir
    for name in ("best.pt", "last.pt"):
        _as_version_1(run / "checkpoints" / name)
    old = load_checkpoint(run / "checkpoints" / "last.pt")
    assert old.temperature == 1.0 and old.train_state is not None and old.train_state.loop["epoch"] == 2
    assert len(old.train_state.tracker["rows"]) == 2  # the solved head, one fine-tuning epoch
    rows = imgtune.predict(run, [data / "valid"]).rows
    assert len(rows) == 6  # predict, eval, export and serve read format 1 as they always did
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["epochs"] = 2  # one more fine-tuning epoch, continued from the format-1 last.pt
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = imgtune.resume(run)
    assert result.summary["epochs_run"] == 3 and len((run / "metrics.csv").read_text().splitlines()) == 1 + 3
    newer = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    newer["version"] = 99
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=r"newer imgtune .*upgrade imgtune"):
        load_checkpoint(tmp_path / "newer.pt")


WRITER = """
import dataclasses, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import blank_checkpoint
from imgtune.checkpoint import save_checkpoint
for i in range(int(sys.argv[3])):
    save_checkpoint(sys.argv[1], dataclasses.replace(blank_checkpoint(), epoch=i,
                    state_dict={"w": torch.full((500_000,), float(i))}))
"""


def test_readers_always_get_a_whole_best_pt_while_training_replaces_it(tmp_path: Path) -> None:
    """Another process rewrites best.pt 150 times (2 MB each) while this one loads it, as predict and eval do
    beside a running train: every load sees one whole checkpoint, old or new, never a mix or a cut file."""
    import subprocess
    import sys

    best = tmp_path / "checkpoints" / "best.pt"
    save_checkpoint(best, dataclasses.replace(blank_checkpoint(), state_dict={"w": torch.full((500_000,), -1.0)}))
    tests = str(Path(__file__).parent)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(best), tests, "150"])
    loads, epochs = 0, set()
    try:
        while writer.poll() is None and loads < 5000:
            ckpt = load_checkpoint(best)
            w = ckpt.state_dict["w"]
            assert bool((w == w[0]).all()) and (float(w[0]) == ckpt.epoch or ckpt.epoch == 0)
            epochs.add(ckpt.epoch)
            loads += 1
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert len(epochs) > 5, "the reader never saw the file change: nothing was raced"
    assert load_checkpoint(best).epoch == 149


def test_damaged_checkpoints_name_the_file_and_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    for name, hint in (("best.pt", "last.pt"), ("last.pt", "--resume")):
        path = folder / name
        save_checkpoint(path, dataclasses.replace(blank_checkpoint(), state_dict={"w": torch.ones(10_000)}))
        path.write_bytes(path.read_bytes()[:20_000])
        with pytest.raises(CheckpointError, match="damaged or truncated") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and hint in str(err.value)
