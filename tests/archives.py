"""Small archives in the public datasets' own formats, and a real HTTP file server on 127.0.0.1 that honours
Range requests (as S3 and Oxford's server do) and can cut a transfer short, the way a flaky line does."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from conftest import PALETTE, shape_image

WOOF = {"n02086240": "red", "n02087394": "green", "n02088364": "blue"}  # Shih-Tzu, Rhodesian ridgeback, beagle


@dataclass
class FileServer:
    """Serves `files` (URL path -> bytes); `cut[path] = n` sends only n bytes of the next full response."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    url: str = ""


@contextmanager
def file_server() -> Iterator[FileServer]:
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.files.get(self.path)
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            if body is None:
                self.send_error(404)
                return
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start : start + state.cut.pop(self.path, len(body))])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _jpeg(colour: tuple[int, int, int], seed: int) -> bytes:
    buf = io.BytesIO()
    shape_image(colour, seed, size=48).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tgz(members: dict[str, bytes], hostile: bool = True) -> bytes:
    """A gzipped tar of `members`; with `hostile`, also a member that climbs out and a symlink to /etc."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if hostile:
            evil = tarfile.TarInfo("../escaped.txt")
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"evil"))
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return buf.getvalue()


def imagewoof_tgz(top: str = "imagewoof2-160", train: int = 6, val: int = 3) -> bytes:
    """fastai's layout: <top>/{train,val}/<wnid>/<name>.JPEG and <top>/noisy_imagewoof.csv (as shipped: path,
    noisy_labels_{0,1,5,25,50}, is_valid), the 1% noisy column wrong for one training image per class."""
    members: dict[str, bytes] = {}
    rows = ["path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid"]
    wnids = list(WOOF)
    for k, (wnid, colour) in enumerate(WOOF.items()):
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                path = f"{split}/{wnid}/ILSVRC2012_{split}_{k}{i:04d}.JPEG"
                members[f"{top}/{path}"] = _jpeg(PALETTE[colour], 100 * k + i + (50 if split == "val" else 0))
                noisy = wnids[(k + 1) % 3] if (split == "train" and i == 0) else wnid
                rows.append(f"{path},{wnid},{noisy},{wnid},{wnid},{wnid},{split == 'val'}")
    members[f"{top}/noisy_imagewoof.csv"] = ("\n".join(rows) + "\n").encode()
    return _tgz(members)


def flowers_files(per_class: int = 6) -> dict[str, bytes]:
    """Oxford's three files for labels 1..3: 102flowers.tgz (jpg/image_NNNNN.jpg), imagelabels.mat (`labels`,
    1 x N) and setid.mat (`trnid`, `valid`, `tstid`, 1 x n each), written with SciPy's MAT writer."""
    import scipy.io

    labels, members = [], {}
    for index in range(1, 3 * per_class + 1):
        label = (index - 1) // per_class + 1
        labels.append(label)
        members[f"jpg/image_{index:05d}.jpg"] = _jpeg(list(PALETTE.values())[label - 1], index)
    ids = np.arange(1, len(labels) + 1)
    sets = {"trnid": ids[0::3], "valid": ids[1::3], "tstid": ids[2::3]}

    def mat(arrays: dict[str, np.ndarray]) -> bytes:
        buf = io.BytesIO()
        scipy.io.savemat(buf, {k: v.reshape(1, -1) for k, v in arrays.items()}, do_compression=True)
        return buf.getvalue()

    return {
        "102flowers.tgz": _tgz(members, hostile=False),
        "imagelabels.mat": mat({"labels": np.array(labels, dtype=np.uint8)}),
        "setid.mat": mat({k: v.astype(np.uint16) for k, v in sets.items()}),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def cifar_archive(tmp_path: Path, which: str = "cifar10", protocol: int = 2) -> tuple[Path, np.ndarray]:
    """A small archive in the real format: pickled dicts with bytes keys, uint8 N x 3072 rows."""
    rng = np.random.default_rng(0)
    folder = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    label_key = b"labels" if which == "cifar10" else b"fine_labels"
    n_classes = 10 if which == "cifar10" else 4  # a tiny CIFAR-100 stand-in: the format, not the size
    files: dict[str, bytes] = {}
    first = None
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    for name in [*train_names, "test_batch" if which == "cifar10" else "test"]:
        n = 3 * n_classes
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"data": data, label_key: [i % n_classes for i in range(n)], b"batch_label": name.encode()}
        first = data if first is None else first
        files[name] = pickle.dumps(batch, protocol=protocol)
    names_key = b"label_names" if which == "cifar10" else b"fine_label_names"
    meta = {names_key: [f"class{i}".encode() for i in range(n_classes)]}
    files["batches.meta" if which == "cifar10" else "meta"] = pickle.dumps(meta, protocol=protocol)
    archive = tmp_path / f"{which}-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert first is not None
    return archive, first
