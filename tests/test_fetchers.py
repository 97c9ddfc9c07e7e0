"""`imgtune data imagenette|imagewoof|flowers102`: real downloads from a real HTTP server on 127.0.0.1 (Range
requests, a transfer cut short, checksums), archives in the official formats, and offline failure."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from archives import WOOF, file_server, flowers_files, imagewoof_tgz, md5, write_files
from imgtune.cli import app
from imgtune.download import DownloadError, download
from imgtune.fetchers import CHECKSUMS, fetch_fastai, fetch_flowers102
from imgtune.matfile import MatError, load_mat
from imgtune.sources import SourceError


def test_a_cut_download_resumes_with_a_range_request_and_a_bad_checksum_is_never_kept(tmp_path: Path) -> None:
    payload = np.random.default_rng(0).bytes(3 << 20)  # three chunks of the downloader's 1 MiB
    dest = tmp_path / "archive.tgz"
    with file_server() as server:
        server.files["/archive.tgz"] = payload
        server.cut["/archive.tgz"] = (1 << 20) + 12345
        with pytest.raises(DownloadError, match="run the command again to resume"):
            download(server.url + "archive.tgz", dest, {md5(payload)})
        part = tmp_path / "archive.tgz.part"
        assert part.stat().st_size == (1 << 20) + 12345 and not dest.exists()

        assert download(server.url + "archive.tgz", dest, {md5(payload)}) == dest
        assert server.ranges == [None, f"bytes={(1 << 20) + 12345}-"]
        assert dest.read_bytes() == payload and not part.exists()
        download(server.url + "archive.tgz", dest, {md5(payload)})  # already there: no request
        assert len(server.ranges) == 2

        with pytest.raises(DownloadError, match="checksum mismatch") as err:
            download(server.url + "archive.tgz", tmp_path / "other.tgz", {"0" * 32})
        assert "archive.tgz" in str(err.value) and not list(tmp_path.glob("other.tgz*"))
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(server.url + "missing.tgz", tmp_path / "missing.tgz")


def test_offline_the_fetchers_fail_at_once_and_say_how_to_go_on(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: what no network looks like to the client
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    res = CliRunner().invoke(app, ["data", "imagewoof", str(tmp_path / "woof"), "--mirror", closed])
    assert res.exit_code != 0
    message = str(res.exception) + res.output
    assert "imagewoof2-160.tgz" in message and "--source" in message and "needs internet" in message
    assert not (tmp_path / "woof").exists() and not (tmp_path / "woof.partial").exists()


def test_imagewoof_downloads_verifies_and_converts_with_breed_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = imagewoof_tgz()
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    with file_server() as server:
        server.files["/imagewoof2-160.tgz"] = archive
        # the published checksum is checked: this small archive is not fastai's
        res = CliRunner().invoke(app, ["data", "imagewoof", str(tmp_path / "bad"), "--mirror", server.url])
        assert res.exit_code != 0 and "checksum mismatch" in str(res.exception)
        assert not (tmp_path / "cache" / "downloads" / "imagewoof2-160.tgz").exists()

        monkeypatch.setitem(CHECKSUMS, "imagewoof2-160.tgz", (md5(archive),))  # as if it were the published file
        out = tmp_path / "woof"
        res = CliRunner().invoke(app, ["data", "imagewoof", str(out), "--mirror", server.url])
        assert res.exit_code == 0, res.output
        assert "train 18" in res.output and "val 9" in res.output
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(WOOF)
    assert len(list((out / "val" / "n02086240").glob("*.JPEG"))) == 3
    names = json.loads((out / "class_names.json").read_text())
    assert names == {"n02086240": "Shih-Tzu", "n02087394": "Rhodesian ridgeback", "n02088364": "beagle"}
    assert (out / "noisy_imagewoof.csv").read_text().startswith("path,noisy_labels_0,")
    assert not (tmp_path / "escaped.txt").exists() and not (out / "link").exists()  # hostile members left out
    again = fetch_fastai("imagewoof", out, source=tmp_path / "nowhere")  # already converted: nothing read
    assert again.counts == {"train": 18, "val": 9}
    with pytest.raises(SourceError, match="different conversion"):
        fetch_fastai("imagewoof", out, size="320")


def test_imagenette_from_a_local_archive_needs_no_network(tmp_path: Path) -> None:
    local = tmp_path / "imagenette2-160.tgz"
    local.write_bytes(imagewoof_tgz(top="imagenette2-160"))
    got = fetch_fastai("imagenette", tmp_path / "nette", source=tmp_path)  # --source: the folder holding it
    assert got.counts == {"train": 18, "val": 9}
    with pytest.raises(SourceError, match=r"not a readable \.tgz"):
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "imagenette2-160.tgz").write_bytes(b"not a tar")
        fetch_fastai("imagenette", tmp_path / "nette2", source=tmp_path / "broken")
    assert not (tmp_path / "nette2").exists() and not (tmp_path / "nette2.partial").exists()


def test_flowers102_converts_oxfords_mat_files_to_named_class_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = flowers_files()
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    for name, data in files.items():
        monkeypatch.setitem(CHECKSUMS, name, (md5(data),))
    with file_server() as server:
        server.files |= {f"/{k}": v for k, v in files.items()}
        res = CliRunner().invoke(app, ["data", "flowers102", str(tmp_path / "flowers"), "--mirror", server.url])
        assert res.exit_code == 0, res.output
    out = tmp_path / "flowers"
    assert {d.name: sorted(p.name for p in d.iterdir()) for d in (out / "train").iterdir()} == {
        "1": ["image_00001.jpg", "image_00004.jpg"],
        "2": ["image_00007.jpg", "image_00010.jpg"],
        "3": ["image_00013.jpg", "image_00016.jpg"],
    }
    assert len(list((out / "test").rglob("*.jpg"))) == 6 and len(list((out / "valid").rglob("*.jpg"))) == 6
    names = json.loads((out / "class_names.json").read_text())
    assert len(names) == 102 and names["1"] == "pink primrose" and names["102"] == "blackberry lily"

    large = fetch_flowers102(tmp_path / "large", split="large", source=write_files(tmp_path / "src", files))
    assert sorted(p.name for p in (large.out / "test" / "1").iterdir()) == ["image_00001.jpg", "image_00004.jpg"]


def test_mat_reader_agrees_with_scipy_and_names_a_bad_file(tmp_path: Path) -> None:
    import scipy.io

    arrays = {"labels": np.arange(1, 9, dtype=np.uint8).reshape(1, -1), "m": np.random.rand(3, 5), "i": -np.eye(2)}
    for compress in (False, True):
        scipy.io.savemat(tmp_path / "a.mat", {**arrays, "text": "skipped"}, do_compression=compress)
        got = load_mat(tmp_path / "a.mat")
        assert sorted(got) == ["i", "labels", "m"]
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
    (tmp_path / "b.mat").write_bytes(b"x" * 200)
    with pytest.raises(MatError, match=r"b\.mat: not a MATLAB level-5"):
        load_mat(tmp_path / "b.mat")
