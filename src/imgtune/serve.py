"""`imgtune serve`: a prediction service (FastAPI + uvicorn) and a self-contained web page.

Requests are decoded in worker threads and batched for the model: one thread runs the model, taking every
image that arrived within a few milliseconds as one batch (on a CPU a batch of 8 costs far less than 8
single images). Uploads stay in memory (Starlette spools large ones to anonymous temp files, never under
the client's file name). What one client may cost is bounded (RequestGuard, guarded_protocol): body size,
time to send the headers and the body, requests in progress and open connections; every refusal is a JSON
answer that the client can read.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgtune.data import decode_prepared
from imgtune.explain import ExplainError, explain_images, overlay, png_bytes
from imgtune.images import ImageError, load_rgb
from imgtune.predict import Predictor

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
HEATMAP_SIDE = 320  # the page's overlay: its longer side in pixels


DRAIN_BYTES = 64 * 2**20  # the most of a refused body read and dropped so that the client sees the answer
DRAIN_S = 10.0
MAX_HEADER_BYTES = 16 * 1024  # uvicorn's limit on headers still arriving (h11_max_incomplete_event_size)


class _Refused(BaseException):
    """Raised from `receive` once the body passes the limit or its time. A BaseException on purpose: the
    framework turns any Exception raised while it parses a form into a 400, and this must reach the guard."""

    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


class RequestGuard:
    """ASGI middleware in front of the routes: bounds what one request may cost the server.

    - a body over `max_bytes` gets a 413, judged from its Content-Length or as the streamed bytes pass it;
    - a body that has not arrived `read_timeout_s` after the request began gets a 408 (a slow or stalled
      client, or a Content-Length larger than what it sends, never holds the request open);
    - beyond `max_active` requests at once, a 503 with Retry-After (the model is the bottleneck anyway);
    - headers over MAX_HEADER_BYTES, a 431.

    Before a refusal the rest of the body is read and dropped (up to DRAIN_BYTES / DRAIN_S): a client that
    sends its whole body before reading the answer, as urllib and requests do, would otherwise see the
    connection reset instead of the answer (nginx's lingering close does the same). A client that announced
    `Expect: 100-continue` (curl) has sent nothing yet, so nothing is drained and it sends nothing.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0, max_active: int = 64) -> None:
        self.app, self.max_bytes, self.read_timeout_s, self.max_active = app, max_bytes, read_timeout_s, max_active
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        early = headers.get(b"expect", b"").lower() == b"100-continue"
        size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or [])
        if size > MAX_HEADER_BYTES:  # h11 refuses more only while headers are incomplete; whole ones come here
            detail = f"request headers over {MAX_HEADER_BYTES // 1024} KB ({size:,} bytes)"
            await self._refuse(send, receive, 431, detail, drain=not early)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, receive, 413, self._too_large(), drain=not early)
            return
        if self.active >= self.max_active:
            detail = f"server busy: {self.active} requests in progress (limit {self.max_active}); retry shortly"
            await self._refuse(send, receive, 503, detail, drain=not early, extra=[(b"retry-after", b"1")])
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        seen, started = 0, False

        async def guarded_receive() -> Message:
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _Refused(408, f"request body not received within {self.read_timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _Refused(413, self._too_large())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.active += 1
        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _Refused as refusal:
            if not started:
                await self._refuse(send, receive, refusal.status, refusal.detail, drain=refusal.status == 413)
        finally:
            self.active -= 1

    def _too_large(self) -> str:
        return f"request body over the {self.max_bytes / 2**20:g} MB upload limit"

    async def _refuse(
        self, send: Send, receive: Receive, status: int, detail: str, drain: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:  # fmt: skip
        if drain:
            await _drain(receive)
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive) -> None:
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + DRAIN_S, 0
    while dropped <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


def guarded_protocol(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on the request line and headers, which uvicorn lacks: a client
    that sends them a byte at a time (slowloris) gets a 408 and the connection closes after read_timeout_s,
    on a new connection and between the requests of a kept-alive one; a connection that sends nothing at all
    is closed then too (uvicorn's keep-alive timer only starts after a first response)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": f"request headers not received within {read_timeout_s:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip

    class HeaderDeadline(H11Protocol):
        timer: asyncio.TimerHandle | None = None
        partial = False  # bytes of the next request have arrived, but not all its headers

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.partial = self.conn.their_state is h11.IDLE
            if self.timer is not None and not self.partial:  # the headers are in
                self.timer.cancel()
                self.timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self.timer is not None:
                self.timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self.partial = False
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(read_timeout_s, self._late)

        def _late(self) -> None:
            self.timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.partial:
                    self.transport.write(answer)
                self.transport.close()

    return HeaderDeadline


def server_config(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 8000, read_timeout_s: float = 30.0, max_connections: int = 1000
) -> Any:
    """The uvicorn settings imgtune serves with (the tests start servers with the same ones): the guarded h11
    protocol, and a cap on open connections beyond which uvicorn answers 503 before reading anything."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=guarded_protocol(read_timeout_s),
                          limit_concurrency=max_connections, timeout_keep_alive=5)  # fmt: skip


class Batcher:
    """Collects images from concurrent requests into batches for one model thread."""

    def __init__(self, predictor: Predictor, max_batch: int = 16, max_wait_s: float = 0.005) -> None:
        self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_s
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-model")
        self.task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.model_thread.shutdown(wait=False)

    async def submit(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            fut: asyncio.Future[torch.Tensor] = loop.create_future()
            await self.queue.put((image, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(items) < self.max_batch:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            batch = torch.stack([image for image, _ in items])
            try:
                probs = await loop.run_in_executor(self.model_thread, self.predictor.probabilities, batch)
            except Exception as e:  # the model failed: every waiting request gets the error, the server lives on
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            for (_, fut), p in zip(items, probs, strict=True):
                if not fut.done():
                    fut.set_result(p)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# long: FastAPI's idiom: the routes are closures over one predictor, batcher and token
def create_app(
    predictor: Predictor, *, token: str | None = None, max_upload_mb: float = 20.0, top_k: int = 5, max_batch: int = 16,
    read_timeout_s: float = 30.0, max_active: int = 64,
) -> ASGIApp:  # fmt: skip
    """The ASGI app: FastAPI routes behind the RequestGuard (size, time and concurrency limits)."""
    batcher = Batcher(predictor, max_batch=max_batch)

    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="imgtune", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    try:
        explainer: Any = predictor.explainer()  # Grad-CAM needs gradients: the PyTorch backend only
    except ExplainError:
        explainer = None
    config = {"requiresToken": token is not None, "topK": top_k, "maxUploadMb": max_upload_mb,
              "explain": explainer is not None}  # fmt: skip
    page_html = PAGE.read_text().replace("/*CONFIG*/{}", json.dumps(config))  # rendered once, not per request

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html

    @app.get("/health", dependencies=[Depends(authorize)])
    def health() -> dict[str, Any]:
        return {"status": "ok", "backend": predictor.backend, "classes": len(predictor.classes),
                "input_size": predictor.prep.img_size}  # fmt: skip

    @app.get("/classes", dependencies=[Depends(authorize)])
    def classes() -> list[str]:
        return list(predictor.display_names)

    def heatmaps(originals: list[tuple[str, torch.Tensor]]) -> list[str]:
        """Grad-CAM overlays of the predicted classes as PNG data URIs; run on the model's own thread, since
        its hook on the model must not meet a batch being predicted."""
        found = explain_images(explainer, predictor.prep, originals, predictor.display_names,
                               temperature=predictor.temperature)  # fmt: skip
        encoded = (base64.b64encode(png_bytes(overlay(img, e, HEATMAP_SIDE))).decode() for e, (_, img) in
                   zip(found, originals, strict=True))  # fmt: skip
        return [f"data:image/png;base64,{b}" for b in encoded]

    @app.post("/predict", dependencies=[Depends(authorize)])
    async def predict(
        file: list[UploadFile] = File(...), k: int = top_k, explain: bool = False
    ) -> list[dict[str, Any]]:
        if explain and explainer is None:
            raise HTTPException(400, f"explain: the {predictor.backend} backend gives no gradients; serve the run "
                                     "folder or best.pt for heatmaps")  # fmt: skip
        images, names, originals = [], [], []
        for upload in file:
            data = await upload.read()
            name = upload.filename or "upload"
            try:
                images.append(await run_in_threadpool(decode_prepared, io.BytesIO(data), predictor.prep))
                if explain:
                    originals.append((name, await run_in_threadpool(load_rgb, io.BytesIO(data))))
            except ImageError as e:
                status = {"not_image": 415, "bomb": 400}.get(e.kind, 400)
                raise HTTPException(status, f"{name}: {e.reason}") from None
            names.append(name)
        probs = torch.stack(await batcher.submit(images))
        maps: list[str | None] = [None] * len(names)
        if explain:
            maps = list(await asyncio.get_running_loop().run_in_executor(batcher.model_thread, heatmaps, originals))
        results = []
        for name, top, heat in zip(names, predictor.top_k(probs, k), maps, strict=True):
            results.append({
                "filename": name, "label": top[0][0], "confidence": top[0][1],
                "top_k": [{"label": label, "confidence": p} for label, p in top],
                **({"heatmap": heat} if heat is not None else {}),
            })  # fmt: skip
        return results

    return RequestGuard(app, int(max_upload_mb * 2**20), read_timeout_s, max_active)


def serve(
    run: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    max_upload_mb: float = 20.0,
    token: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    read_timeout_s: float = 30.0,
    max_active: int = 64,
) -> None:
    import uvicorn

    from imgtune.predict import load_predictor

    if not is_loopback(host) and token is None:
        token = secrets.token_urlsafe(24)
        print(f"--host {host} is reachable from other machines: API calls need this token:\n  {token}", flush=True)
    predictor = load_predictor(run, device, backend, precision)
    app = create_app(predictor, token=token, max_upload_mb=max_upload_mb, read_timeout_s=read_timeout_s,
                     max_active=max_active)  # fmt: skip
    source = predictor.checkpoint.get("path", run)
    print(f"imgtune serving {source} ({predictor.backend}) on http://{host}:{port}/", flush=True)
    uvicorn.Server(server_config(app, host, port, read_timeout_s)).run()
