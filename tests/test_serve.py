"""The prediction server, for real: uvicorn on a free loopback port, httpx clients, headless Chromium."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

import imgtune
from conftest import CHROMIUM, bomb_png, launch_chromium, small_dataset
from imgtune.serve import create_app, is_loopback, server_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_soak import soak, start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn in a thread with `imgtune serve`'s settings, started and stopped by the test."""

    def __init__(self, app: object, read_timeout_s: float = 30.0) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(server_config(app, port=self.port, read_timeout_s=read_timeout_s))  # type: ignore[arg-type]
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
def test_soak_16_clients_no_errors_and_flat_memory(run: Path, valid_images: list[tuple[Path, str]]) -> None:
    """benchmarks/serve_soak.py for 12 s against a real `imgtune serve` process (the benchmark runs 60 s)."""
    payloads = [(p.name, p.read_bytes(), label) for p, label in valid_images]
    proc, base = start_server(run)
    try:
        result = soak(base, proc.pid, payloads, clients=16, seconds=12)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"soak: {result}, growth {result.growth:+.1%}")
    assert result.requests > 100 and result.errors == 0 and result.wrong == 0
    assert result.growth < 0.10


def _multipart(name: str, data: bytes, boundary: str = "imgtune-test-boundary") -> tuple[bytes, str]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _exchange(base: str, request: bytes, wait_s: float = 10) -> bytes:
    """Send raw bytes, then read the answer until the server closes or wait_s passes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before taking it all
            sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_an_over_limit_upload_gets_a_413_that_every_client_reads(
    url: str, valid_images: list[tuple[Path, str]]
) -> None:
    """8 MB against the 0.2 MB limit, far more than the sockets buffer: urllib and requests send the whole
    body before they read; the server drains it, so they read the 413 instead of a reset connection."""
    import urllib.error
    import urllib.request

    import requests

    data = os.urandom(8 * 2**20)
    body, ctype = _multipart("big.png", data)
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": ctype})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413 and "upload limit" in json.loads(err.value.read())["detail"]
    res = requests.post(f"{url}/predict", files={"file": ("big.png", data)}, timeout=60)
    assert res.status_code == 413 and "upload limit" in res.json()["detail"]
    res = httpx.post(f"{url}/predict", files=[("file", ("big.png", data))], timeout=60)
    assert res.status_code == 413 and "upload limit" in res.json()["detail"]
    # curl's way: Expect: 100-continue, and no body until the server says so; it gets the 413 at once instead
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()  # fmt: skip
    answer = _exchange(url, head)
    assert _status(answer) == 413 and b"100 Continue" not in answer
    path, label = valid_images[0]
    assert _post(url, (path.name, path.read_bytes())).json()[0]["label"] == label


def test_slow_lying_and_malformed_requests_get_clear_answers(run: Path, valid_images: list[tuple[Path, str]]) -> None:
    path, label = valid_images[0]
    with Server(create_app(imgtune.load(run), read_timeout_s=1.0), read_timeout_s=1.0) as base:
        host, port = base.removeprefix("http://").split(":")
        # headers sent a byte at a time (slowloris): other clients are answered meanwhile, and it gets a 408
        slow = socket.create_connection((host, int(port)), timeout=10)
        started, answer = time.monotonic(), b""
        for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200:
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - started < 0.3:
                assert httpx.get(f"{base}/health", timeout=2).status_code == 200
            slow.settimeout(0.05)
            try:
                answer = slow.recv(65536)
                break
            except TimeoutError:
                pass
        slow.close()
        assert _status(answer) == 408 and b"headers not received" in answer
        assert 0.9 < time.monotonic() - started < 5
        # a body that stops short of its Content-Length
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        answer = _exchange(base, (head + "Content-Length: 5000\r\n\r\n").encode() + b"--b\r\n" + b"x" * 100)
        assert _status(answer) == 408 and b"body not received" in answer
        # a Content-Length shorter than the body, and a body that is not multipart at all
        body, ctype = _multipart(path.name, path.read_bytes())
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        answer = _exchange(base, (head + "Content-Length: 40\r\n\r\n").encode() + body)
        assert 400 <= _status(answer) < 500 and b"detail" in answer
        answer = _exchange(base, (head + "Content-Length: 26\r\n\r\n").encode() + b"this is not multipart data")
        assert 400 <= _status(answer) < 500 and b"detail" in answer
        # 64 KB of headers, sent at once (the server's h11 refuses them with a 400 when they trickle in)
        answer = _exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 65536 + b"\r\n\r\n")
        assert _status(answer) == 431 and b"headers over" in answer
        # a connection that sends nothing is closed after the read timeout, without an answer
        started = time.monotonic()
        assert _exchange(base, b"") == b"" and time.monotonic() - started < 5
        assert _post(base, (path.name, path.read_bytes())).json()[0]["label"] == label


@pytest.mark.slow
def test_500_simultaneous_requests_get_answers_and_the_server_keeps_serving(
    run: Path, valid_images: list[tuple[Path, str]]
) -> None:
    import asyncio
    from collections import Counter

    path, label = valid_images[0]
    data = path.read_bytes()
    with Server(create_app(imgtune.load(run), max_active=32)) as base:

        async def burst() -> list[httpx.Response | BaseException]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=500), timeout=120) as client:
                posts = [client.post(f"{base}/predict", files=[("file", (path.name, data))]) for _ in range(500)]
                return await asyncio.gather(*posts, return_exceptions=True)

        answers = asyncio.run(burst())
        statuses = Counter(a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[200] >= 32 and statuses[503] > 0, statuses
        busy = next(a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503)
        assert "server busy" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
        assert all(
            a.json()[0]["label"] == label for a in answers if isinstance(a, httpx.Response) and a.status_code == 200
        )
        assert _post(base, (path.name, data)).json()[0]["label"] == label


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
        page.click("#heat")  # the Grad-CAM toggle
        shown = page.get_attribute("#preview", "src") or ""
        loaded = page.evaluate("new Promise(r => { const i = document.getElementById('preview');"
                               " i.complete ? r(i.naturalWidth) : i.onload = () => r(i.naturalWidth); })")  # fmt: skip
        page.click("#heat")
        back = page.get_attribute("#preview", "src") or ""
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert text.startswith(label) and bars == 3
    assert shown.startswith("data:image/png;base64,") and loaded > 0 and back.startswith("blob:")
    assert [u for u in external if not u.startswith(("blob:", "data:"))] == []  # no CDN, no external resources


def test_predict_with_explain_returns_a_heatmap_per_image(url: str, valid_images: list[tuple[Path, str]]) -> None:
    import base64

    from PIL import Image

    files = [(p.name, p.read_bytes()) for p, _ in valid_images[:2]]
    res = httpx.post(f"{url}/predict?explain=true", files=[("file", f) for f in files], timeout=60)
    assert res.status_code == 200, res.text
    for answer, (path, label) in zip(res.json(), valid_images[:2], strict=True):
        assert answer["label"] == label
        head, _, data = answer["heatmap"].partition(",")
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im, Image.open(path) as original:
            assert (
                im.format == "PNG"
                and max(im.size) == 320
                and im.size[0] / im.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)
            )
    assert "heatmap" not in _post(url, files[0]).json()[0]  # only when asked


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
    params = {p.name: p.field_info.annotation for p in predict.dependant.query_params}
    assert params == {"k": int, "explain": bool}  # top-k and the heatmap switch: no path, no model name
