"""`imgtune serve`: a prediction service (FastAPI + uvicorn) and a self-contained web page.

Requests are decoded in worker threads and batched for the model: one thread runs the model, taking every
image that arrived within a few milliseconds as one batch (on a CPU a batch of 8 costs far less than 8
single images). Uploads stay in memory (Starlette spools large ones to anonymous temp files, never under
the client's file name); bodies over the limit are refused from their Content-Length, or as soon as the
streamed bytes pass it, before they are read whole.
"""

from __future__ import annotations

import asyncio
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
from imgtune.images import ImageError
from imgtune.predict import Predictor

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


class _TooLarge(BaseException):
    """Raised from `receive` once the body passes the limit. A BaseException on purpose: the framework turns
    any Exception raised while it parses a form into a 400, and this must reach BodyLimit as a 413."""


class BodyLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, judged before the body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body over the {self.max_bytes / 2**20:g} MB upload limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


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
    predictor: Predictor, *, token: str | None = None, max_upload_mb: float = 20.0, top_k: int = 5, max_batch: int = 16
) -> ASGIApp:
    """The ASGI app: FastAPI routes wrapped in the body-size limit."""
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

    config = {"requiresToken": token is not None, "topK": top_k, "maxUploadMb": max_upload_mb}
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

    @app.post("/predict", dependencies=[Depends(authorize)])
    async def predict(file: list[UploadFile] = File(...), k: int = top_k) -> list[dict[str, Any]]:
        images, names = [], []
        for upload in file:
            data = await upload.read()
            name = upload.filename or "upload"
            try:
                images.append(await run_in_threadpool(decode_prepared, io.BytesIO(data), predictor.prep))
            except ImageError as e:
                status = {"not_image": 415, "bomb": 400}.get(e.kind, 400)
                raise HTTPException(status, f"{name}: {e.reason}") from None
            names.append(name)
        probs = torch.stack(await batcher.submit(images))
        results = []
        for name, top in zip(names, predictor.top_k(probs, k), strict=True):
            results.append({
                "filename": name, "label": top[0][0], "confidence": top[0][1],
                "top_k": [{"label": label, "confidence": p} for label, p in top],
            })  # fmt: skip
        return results

    return BodyLimit(app, int(max_upload_mb * 2**20))


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
) -> None:
    import uvicorn

    from imgtune.predict import load_predictor

    if not is_loopback(host) and token is None:
        token = secrets.token_urlsafe(24)
        print(f"--host {host} is reachable from other machines: API calls need this token:\n  {token}", flush=True)
    predictor = load_predictor(run, device, backend, precision)
    app = create_app(predictor, token=token, max_upload_mb=max_upload_mb)
    print(f"imgtune serving {predictor.checkpoint.get('path', run)} ({backend}) on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
