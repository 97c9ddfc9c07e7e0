from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import write_class_folders
from imgtune.data import DataError, load_split, natural_key, read_split_csv


@pytest.mark.parametrize("valid_name", ["valid", "val", "validation", "Val"])
def test_train_valid_test_layouts(make_dataset: Callable[..., Path], valid_name: str) -> None:
    root = make_dataset(train=5, valid=2, test=3)
    if valid_name != "valid":
        (root / "valid").rename(root / valid_name)
    split = load_split(root)
    assert split.classes == ["blue", "green", "red"]
    assert (len(split.train), len(split.valid), len(split.test)) == (15, 6, 9)
    assert split.test_labelled and not split.made_split
    assert {s.path.parent.name for s in split.valid if s.label == 0} == {"blue"}


def test_single_folder_is_split_stratified_seeded_and_written(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "ds", per_class=10)
    a, b = load_split(root, 0.2, seed=3), load_split(root, 0.2, seed=3)
    assert a.made_split
    assert Counter(s.label for s in a.valid) == {0: 2, 1: 2, 2: 2}
    assert [s.path for s in a.valid] == [s.path for s in b.valid]
    assert not {s.path for s in a.train} & {s.path for s in a.valid}
    other = load_split(root, 0.2, seed=4)
    assert [s.path for s in other.valid] != [s.path for s in a.valid]
    a.write_csv(tmp_path / "split.csv")
    again = read_split_csv(root, tmp_path / "split.csv")
    assert again.classes == a.classes
    assert [(s.path, s.label) for s in again.valid] == [(s.path, s.label) for s in a.valid]
    assert load_split(root, split_file=tmp_path / "split.csv").valid == again.valid


def test_classes_sort_naturally(tmp_path: Path) -> None:
    colours = {str(n): (n * 20, 0, 0) for n in (10, 2, 1)}
    root = write_class_folders(tmp_path / "ds", 3, classes=colours)
    assert load_split(root).classes == ["1", "2", "10"]
    assert sorted(["img10", "img2", "Img1"], key=natural_key) == ["Img1", "img2", "img10"]


def test_hidden_files_and_folders_are_ignored(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    (root / "train" / "red" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    (root / ".cache").mkdir()
    split = load_split(root)
    assert split.classes == ["blue", "green", "red"]
    assert not any(".DS_Store" in str(s.path) or "ipynb" in str(s.path) for s in split.train)


def test_empty_class_folder_is_reported_and_left_out(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    (root / "train" / "purple").mkdir()
    split = load_split(root)
    assert "purple" not in split.classes
    assert any("empty class folder" in n and "purple" in n for n in split.notes)


def test_class_only_in_valid_is_an_error_naming_it(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    shutil.copytree(root / "valid" / "red", root / "valid" / "orange")
    with pytest.raises(DataError, match=r"'orange'.*only in valid"):
        load_split(root)


def test_unlabelled_test_folder(make_dataset: Callable[..., Path]) -> None:
    root = make_dataset(train=3, valid=1, test=0)
    (root / "test").mkdir()
    shutil.copy(root / "train" / "red" / "0.png", root / "test" / "a.png")
    split = load_split(root)
    assert not split.test_labelled and [s.label for s in split.test] == [-1]


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        load_split(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        load_split(tmp_path / "flat")
