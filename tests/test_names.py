"""Names are user input: any folder and file names are scanned, sorted and trained on, and classes are matched
by name. Hypothesis makes the names; real folders on disk hold them."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import write_class_folders
from imgtune.layouts import IGNORED_NAMES, list_files, load_split, natural_key, readable

# letters of several scripts and cases, digits, spaces and punctuation that file names carry
ALPHABET = st.sampled_from([*"aAbBzZ09123 _-()+,;'&", "é", "É", "ß", "ü", "猫", "ж", "٣", "🙂"])
NAMES = st.text(ALPHABET, min_size=1, max_size=24)


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _tiny_png()


def _usable(name: str) -> bool:
    return (
        not name.startswith(".") and name.strip() == name and name.lower() not in IGNORED_NAMES
        and name.lower() not in {"train", "training", "valid", "val", "validation", "test", "testing", "evaluation"}
    )  # fmt: skip


@given(st.lists(NAMES, min_size=1, max_size=12), st.data())
def test_natural_order_compares_any_names(names: list[str], data: st.DataObject) -> None:
    # prefixes of each other are the case that used to raise ('cat' against 'cat2')
    names = names + [n[: data.draw(st.integers(0, len(n)))] for n in names]
    ordered = sorted(names, key=natural_key)
    assert sorted(reversed(names), key=natural_key) == ordered  # a total order: input order does not matter
    assert sorted(["cat2", "cat", "cat10", "notes2.txt", "notes"], key=natural_key) == [
        "cat", "cat2", "cat10", "notes", "notes2.txt"
    ]  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(NAMES.filter(_usable), min_size=2, max_size=8, unique=True))
def test_any_class_folder_names_are_scanned_and_matched_by_name(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = 0
        for split in ("train", "valid"):
            for name in names:
                folder = root / split / name
                folder.mkdir(parents=True)
                for file in {f"{name}.png", f"{name}2.png", "1.png", "10.png"}:
                    (folder / file).write_bytes(PNG)
                    files += 1
        split = load_split(root)
        assert split.classes == sorted(names, key=natural_key)
        for sample in split.train + split.valid:  # matched by name in both splits
            assert split.classes[sample.label] == sample.path.parent.name
            assert sample.path.is_file()
        assert len(split.train) == len(split.valid) == files // 2


def _nasty_dataset(root: Path) -> list[str]:
    """Class folders whose names are prefixes of each other, differ in case, hold spaces, unicode, bytes that
    are not UTF-8 and very long names; beside images, files such as `notes` and `notes2.txt`."""
    classes = {"cat": (200, 30, 30), "cat2": (30, 170, 60), "Cat 10": (40, 60, 210)}
    write_class_folders(root / "train", 8, seed=1, classes=classes)
    write_class_folders(root / "valid", 4, seed=2, classes=classes)
    odd = os.fsdecode(b"caf\xe9-\xff")  # Latin-1 bytes: not UTF-8
    long = "ü" * 120  # 240 bytes, near the 255-byte limit of a name
    for split in ("train", "valid"):
        os.rename(root / split / "cat2", root / split / odd)
        deep = root / split / long / ("d" * 250) / ("e" * 250) / ("f" * 250)
        deep.mkdir(parents=True)
        for i, src in enumerate(sorted((root / split / "Cat 10").glob("*.png"))):
            shutil.copy(src, deep / f"{'g' * 200}{i}.png")
        (root / split / "cat" / "notes").write_text("not an image")
        (root / split / "cat" / "notes2.txt").write_text("not an image either")
    return sorted(["cat", odd, "Cat 10", long], key=natural_key)


def test_links_loops_odd_bytes_and_long_paths_are_scanned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ds"
    classes = _nasty_dataset(root)
    elsewhere = write_class_folders(tmp_path / "elsewhere", 3, seed=5, classes={"dog": (90, 90, 90)})
    (root / "train" / "dog").symlink_to(elsewhere / "dog")  # a linked class folder is followed
    (root / "train" / "cat" / "up").symlink_to("../..")  # a loop: not followed
    (root / "train" / "cat" / "gone").symlink_to("nowhere")  # dangling: a file that cannot be read
    split = load_split(root)
    assert split.classes == sorted([*classes, "dog"], key=natural_key)
    dog = split.classes.index("dog")
    assert sum(s.label == dog for s in split.train) == 3
    cat = [s.path.name for s in split.train if split.classes[s.label] == "cat"]
    assert len(cat) == 11 and {"notes", "notes2.txt", "gone"} <= set(cat)  # listed; decoding skips them
    assert "links back to" in caplog.text
    assert max(len(str(s.path)) for s in split.train) > 1000
    assert readable(os.fsdecode(b"caf\xe9")) == "caf\ufffd" and readable("café") == "café"
    assert [p.name for p in list_files(root / "valid" / "cat")] == [*(f"{i}.png" for i in range(4)), "notes",
                                                                     "notes2.txt"]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


@pytest.mark.slow
def test_train_predict_eval_on_nasty_names_in_a_read_only_folder(tmp_path: Path) -> None:
    """The whole path, report included (its fonts once crashed on a name that was not UTF-8): nothing is
    written into the dataset folder, which is read-only."""
    from typer.testing import CliRunner

    from conftest import train_small
    from imgtune.cli import app

    root = tmp_path / "ds"
    classes = _nasty_dataset(root)
    before = _tree(root)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        result = train_small(root, tmp_path / "run", **{"train.epochs_frozen": 2, "train.epochs": 1,
                                                        "train.report": True})  # fmt: skip
        assert result.summary["classes"] == len(classes)
        assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "plots" / "samples.png").is_file()
        runner = CliRunner()
        res = runner.invoke(app, ["eval", str(tmp_path / "run"), str(root / "valid")])
        assert res.exit_code == 0, res.output
        out = tmp_path / "pred.csv"
        res = runner.invoke(app, ["predict", str(tmp_path / "run"), str(root / "valid"), "--out", str(out)])
        assert res.exit_code == 0, res.output
        rows = out.read_bytes().splitlines()[1:]
        assert len(rows) == 4 * len(classes)  # notes and notes2.txt are not images: left out, not a crash
        assert any(b"caf\xe9-\xff" in r for r in rows)  # the path as it is on disk, byte for byte
    finally:
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o200)
    assert _tree(root) == before
