from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from imgtune.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint

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
    save_checkpoint(cut, {"arch": {}, "state_dict": {"w": torch.ones(1000)}, "classes": [], "preprocessing": {}})
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
