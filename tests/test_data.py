from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import write_class_folders
from imgtune.layouts import DataError, load_split, natural_key
from imgtune.layouts import read_labels_csv as read_split_csv


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


def _food11(root: Path) -> Path:
    """food-11's layout: labels in file names (class_index.jpg), an unlabelled evaluation/ folder."""
    from conftest import shape_image

    colours = [(200, 30, 30), (30, 170, 60), (40, 60, 210)]
    for folder, n in (("training", 6), ("validation", 2)):
        (root / folder).mkdir(parents=True)
        for c, colour in enumerate(colours):
            for i in range(n):
                shape_image(colour, c * 100 + i).save(root / folder / f"{c}_{i}.jpg")
    (root / "evaluation").mkdir()
    for i in range(4):
        shape_image(colours[i % 3], 900 + i).save(root / "evaluation" / f"{i:04d}.jpg")
    return root


def test_labels_in_file_names_with_food11_folder_names(tmp_path: Path) -> None:
    from imgtune.layouts import LabelRule

    root = _food11(tmp_path / "food")
    split = load_split(root, rule=LabelRule("filename"))
    assert split.classes == ["0", "1", "2"] and not split.made_split
    assert len(split.train) == 18 and len(split.valid) == 6
    assert [s.path.name for s in split.test] == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"]
    assert not split.test_labelled and {s.label for s in split.test} == {-1}
    named = load_split(root, rule=LabelRule("filename", pattern=r"^\d+_(\d+)\."))  # the other number, to show it
    assert named.classes[:3] == ["0", "1", "2"] and len(named.classes) == 6


def test_an_unrecognised_layout_names_every_layout_and_its_flag(tmp_path: Path) -> None:
    root = _food11(tmp_path / "food")
    with pytest.raises(DataError) as e:
        load_split(root)  # class folders expected: there are none
    msg = str(e.value)
    assert "training" in msg and "no class folders" in msg
    for flag in ("--labels folder", "--labels filename", "--label-pattern", "--labels FILE.csv", "--label-columns"):
        assert flag in msg


def test_imagewoof_csv_as_shipped_and_csv_columns(tmp_path: Path) -> None:
    from conftest import shape_image
    from imgtune.layouts import LabelRule

    root = tmp_path / "woof"
    lines = ["path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid"]
    for split, valid in (("train", "False"), ("val", "True")):
        for c, wnid in enumerate(("n02086240", "n02087394")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(3):
                shape_image((200, 30 + 100 * c, 30), c * 10 + i).save(root / split / wnid / f"ILSVRC_{i}.JPEG")
                rel = f"{split}/{wnid}/ILSVRC_{i}.JPEG"
                lines.append(f"{rel},{wnid},{wnid},{wnid},{wnid},{wnid},{valid}")
    (root / "noisy_imagewoof.csv").write_text("\n".join(lines) + "\n")
    split = load_split(root, rule=LabelRule.parse(str(root / "noisy_imagewoof.csv")))
    assert split.classes == ["n02086240", "n02087394"] and len(split.train) == 6 and len(split.valid) == 6
    assert all("/val/" in s.path.as_posix() for s in split.valid) and not split.made_split
    # named columns, and no split column: imgtune splits the rows itself
    (root / "mine.csv").write_text("img,breed\n" + "\n".join(f"{line.split(',')[0]},{line.split(',')[5]}"
                                                             for line in lines[1:]) + "\n")  # fmt: skip
    own = load_split(root, rule=LabelRule.parse(str(root / "mine.csv"), columns=["img", "breed"]))
    assert own.made_split and len(own.train) == 10 and len(own.valid) == 2  # round(6 x 0.2) per class
    with pytest.raises(DataError, match=r"no column 'picture'.*img, breed"):
        load_split(root, rule=LabelRule.parse(str(root / "mine.csv"), columns=["picture", "breed"]))
    (root / "odd.csv").write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match="--label-columns"):
        load_split(root, rule=LabelRule.parse(str(root / "odd.csv")))
