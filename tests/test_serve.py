"""The prediction server, for real: uvicorn on a free loopback port, httpx clients, headless Chromium."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

import imgtune
from conftest import CHROMIUM, bomb_png, launch_chromium, small_dataset
from imgtune.serve import create_app, is_loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn in a thread, started and stopped by the test."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = small_dataset(tmp_path_factory, "serve", train=10, valid=6)
    cfg = imgtune.build_config(overrides={"data.path": data, "out": data.parent / "run", "data.img_size": 64,
                                          "train.epochs_frozen": 30, "train.epochs": 0, "train.lr": 3e-3})  # fmt: skip
    return imgtune.train(cfg).run_dir


@pytest.fixture(scope="module")
def valid_images(run: Path) -> list[tuple[Path, str]]:
    """(image, the label the model gives it offline): what the server must answer."""
    predictor = imgtune.load(run)
    data = Path(predictor.checkpoint["config"]["data"]["path"]) / "valid"
    paths = sorted(data.glob("*/*.png"))
    rows, _ = predictor.predict(paths)
    assert sum(r.label == p.parent.name for r, p in zip(rows, paths, strict=True)) >= 0.8 * len(paths)
    return [(p, r.label) for p, r in zip(paths, rows, strict=True)]


@pytest.fixture(scope="module")
def url(run: Path) -> Iterator[str]:
    with Server(create_app(imgtune.load(run), max_upload_mb=0.2)) as base:
        yield base


def _post(url: str, *files: tuple[str, bytes], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=[("file", f) for f in files], headers=headers, timeout=30)


def test_health_classes_and_predict(url: str, valid_images: list[tuple[Path, str]]) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/classes").json() == ["blue", "green", "red"]
    path, label = valid_images[0]
    res = _post(url, (path.name, path.read_bytes()))
    assert res.status_code == 200, res.text
    (pred,) = res.json()
    assert pred["label"] == label and pred["filename"] == path.name
    assert pred["top_k"][0]["label"] == label and len(pred["top_k"]) == 3
    assert abs(sum(t["confidence"] for t in pred["top_k"]) - 1) < 1e-4


def test_several_files_in_one_request_keep_their_order(url: str, valid_images: list[tuple[Path, str]]) -> None:
    chosen = valid_images[::4]
    res = _post(url, *[(p.name, p.read_bytes()) for p, _ in chosen])
    assert [r["label"] for r in res.json()] == [label for _, label in chosen]


def test_bad_uploads_get_clear_json_errors(url: str, tmp_path: Path) -> None:
    res = _post(url, ("notes.png", b"plain text, not an image"))
    assert res.status_code == 415 and "notes.png" in res.json()["detail"]
    res = _post(url, ("bomb.png", bomb_png(tmp_path / "bomb.png").read_bytes()))
    assert res.status_code == 400 and "decompression bomb" in res.json()["detail"]
    res = _post(url, ("big.png", b"\0" * 300_000))  # over the 0.2 MB limit, refused from Content-Length
    assert res.status_code == 413 and "upload limit" in res.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the streamed bytes pass the limit
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * 8192

    headers = {"content-type": "multipart/form-data; boundary=x"}
    res = httpx.post(f"{url}/predict", content=chunks(), headers=headers, timeout=30)
    assert res.status_code == 413


def test_uploads_are_not_written_to_disk_under_their_names(url: str, valid_images: list[tuple[Path, str]]) -> None:
    name = "imgtune-upload-name-check-7f3a.png"
    path, _ = valid_images[0]
    assert _post(url, (name, path.read_bytes())).status_code == 200
    found = [p for p in Path(tempfile.gettempdir()).rglob(name)] + [p for p in Path.cwd().rglob(name)]
    assert not found


def test_token_is_required_and_compared(run: Path, valid_images: list[tuple[Path, str]]) -> None:
    with Server(create_app(imgtune.load(run), token="s3cret")) as base:
        assert httpx.get(f"{base}/health").status_code == 401
        assert httpx.get(f"{base}/classes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        path, label = valid_images[0]
        assert _post(base, (path.name, path.read_bytes())).status_code == 401
        ok = _post(base, (path.name, path.read_bytes()), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()[0]["label"] == label
        assert httpx.get(f"{base}/").status_code == 200  # the page itself loads, and asks for the token


def test_non_loopback_host_without_token_generates_one(run: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgtune", "serve", str(run), "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        token = lines[1].strip()
        assert "need this token" in lines[0] and len(token) >= 24
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health").status_code == 401:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_load_200_requests_from_16_concurrent_clients(url: str, valid_images: list[tuple[Path, str]]) -> None:
    payloads = [(p.name, p.read_bytes(), label) for p, label in valid_images]

    def one(i: int) -> bool:
        name, data, label = payloads[i % len(payloads)]
        with httpx.Client(timeout=60) as client:
            res = client.post(f"{url}/predict", files=[("file", (name, io.BytesIO(data)))])
        return res.status_code == 200 and res.json()[0]["label"] == label

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert sum(results) == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_web_page_in_headless_chromium(url: str, valid_images: list[tuple[Path, str]], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    path, label = next((p, lab) for p, lab in valid_images if lab == p.parent.name == "green")
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width screen
        external: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(url) else None)
        page.goto(url)
        page.set_input_files("#file", str(path))
        page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=30_000)
        text = page.text_content("#label") or ""
        bars = page.locator("#bars .row").count()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert text.startswith(label) and bars == 3
    assert [u for u in external if not u.startswith("blob:")] == []  # no CDN, no external resources


def test_exif_orientation_is_the_same_in_predict_and_the_server(url: str, run: Path, tmp_path: Path) -> None:
    """One decoding path: an EXIF-rotated JPEG gets the same probabilities from predict and from the server."""
    import numpy as np
    from PIL import Image

    arr = np.full((40, 64, 3), 170, dtype=np.uint8)
    arr[:, :20] = (30, 170, 60)  # a green band that the rotation moves to the top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    rows, _ = imgtune.load(run).predict([path], top_k=3)
    served = _post(url, (path.name, path.read_bytes())).json()[0]
    assert served["label"] == rows[0].label
    for (label, p), t in zip(rows[0].top, served["top_k"], strict=False):
        assert t["label"] == label and abs(t["confidence"] - p) < 1e-5


def test_no_endpoint_takes_a_path_or_a_model_from_the_client(run: Path) -> None:
    from fastapi.routing import APIRoute

    app = create_app(imgtune.load(run)).app  # type: ignore[attr-defined]  # BodyLimit wraps the FastAPI app
    routes = {(r.path, tuple(sorted(r.methods))) for r in app.routes if isinstance(r, APIRoute)}
    assert routes == {("/", ("GET",)), ("/health", ("GET",)), ("/classes", ("GET",)), ("/predict", ("POST",))}
    predict = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/predict")
    assert {p.name for p in predict.dependant.query_params} == {"k"}  # only top-k: no path, no model name
