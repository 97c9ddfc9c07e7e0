"""Soak test of `imgtune serve`: many clients for a long time; errors, wrong answers and the server's memory.

    python benchmarks/serve_soak.py RUN IMAGES_DIR [--seconds 60] [--clients 16]

The server runs as `imgtune serve` in its own process; its resident memory (VmRSS) is read from /proc after
a warm-up (the first 10% of the time: allocator pools and caches fill) and at the end, so the growth is what
steady serving adds. Results go to benchmarks/results/serve_soak.md. tests/test_serve.py runs the same soak
for a few seconds.
"""

from __future__ import annotations

import argparse
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from machine import cpu_description

OUT = Path(__file__).parent / "results" / "serve_soak.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`imgtune serve RUN` on a free loopback port, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgtune", "serve", str(run), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("imgtune serve did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Soak:
    seconds: float
    clients: int
    requests: int
    errors: int
    wrong: int
    rss_after_warmup_mb: float
    rss_end_mb: float

    @property
    def growth(self) -> float:
        return self.rss_end_mb / self.rss_after_warmup_mb - 1


def soak(base: str, pid: int, payloads: list[tuple[str, bytes, str]], clients: int, seconds: float) -> Soak:
    """`clients` threads, each with its own keep-alive connection, post one image after another for `seconds`;
    an answer is wrong when its top label differs from the label the model gives that image offline."""
    stop_at = time.monotonic() + seconds
    warm_until = time.monotonic() + seconds * 0.1
    counts = {"requests": 0, "errors": 0, "wrong": 0}
    lock = threading.Lock()
    warm_rss: list[float] = []

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop_at:
                name, data, label = payloads[i % len(payloads)]
                i += clients
                try:
                    res = http.post(f"{base}/predict", files=[("file", (name, data))])
                    ok, right = res.status_code == 200, res.status_code == 200 and res.json()[0]["label"] == label
                except httpx.HTTPError:
                    ok = right = False
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += not ok
                    counts["wrong"] += ok and not right
                    if not warm_rss and time.monotonic() >= warm_until:
                        warm_rss.append(rss_mb(pid))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return Soak(seconds, clients, counts["requests"], counts["errors"], counts["wrong"],
                warm_rss[0] if warm_rss else rss_mb(pid), rss_mb(pid))  # fmt: skip


def main() -> None:
    import imgtune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:64]
    rows, _ = imgtune.load(args.run).predict(paths)
    payloads = [(p.name, p.read_bytes(), r.label) for p, r in zip(paths, rows, strict=True)]
    proc, base = start_server(args.run)
    try:
        result = soak(base, proc.pid, payloads, args.clients, args.seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = (
        f"# serve soak\n\n{cpu_description()}; {platform.platform()}; run {args.run}\n\n"
        f"| seconds | clients | requests | req/s | errors | wrong | RSS after warm-up | RSS at end | growth |\n"
        f"|---|---|---|---|---|---|---|---|---|\n"
        f"| {result.seconds:g} | {result.clients} | {result.requests} | {result.requests / result.seconds:.1f} | "
        f"{result.errors} | {result.wrong} | {result.rss_after_warmup_mb:.1f} MB | {result.rss_end_mb:.1f} MB | "
        f"{result.growth:+.1%} |\n"
    )
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
