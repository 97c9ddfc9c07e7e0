"""Serving latency and throughput, torch vs onnxruntime backends, side by side in one run.

    python benchmarks/serve_latency.py RUN IMAGES_DIR [--requests 200] [--clients 16]

For each backend: a real uvicorn server on a free loopback port; (1) sequential requests with one image each
-> p50/p95 latency; (2) `--clients` concurrent clients sending `--requests` requests in all -> requests/s.
RUN needs model.onnx (imgtune export RUN). Results go to benchmarks/results/serve_latency.md.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from machine import cpu_description

import imgtune

OUT = Path(__file__).parent / "results" / "serve_latency.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(run: Path, backend: str, images: list[bytes], requests: int, clients: int) -> dict[str, float]:
    """The server runs as `imgtune serve` in its own process, so clients and server don't share one GIL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "imgtune", "serve", str(run), "--backend", backend, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/predict"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(timeout=120) as client:
            for i in range(10):  # warm-up
                client.post(url, files=[("file", ("w.png", images[i % len(images)]))])
            latencies = []
            for i in range(requests):
                t0 = time.perf_counter()
                r = client.post(url, files=[("file", ("x.png", images[i % len(images)]))])
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

        def worker(k: int) -> None:  # one keep-alive connection per client
            with httpx.Client(timeout=120) as c:
                for i in range(k, requests, clients):
                    assert c.post(url, files=[("file", ("y.png", images[i % len(images)]))]).status_code == 200

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    q = statistics.quantiles(latencies, n=20)
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * q[18],
        "sequential_rps": requests / sum(latencies),
        "concurrent_rps": requests / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*.png"))[:100]]
    targets = {"torch": (args.run, "torch"), "onnxruntime": (args.run, "onnxruntime")}
    if (args.run / "model.int8.onnx").is_file():  # imgtune export RUN --int8
        targets["onnxruntime int8"] = (args.run / "model.int8.onnx", "onnxruntime")
    rows = {name: measure(target, b, images, args.requests, args.clients) for name, (target, b) in targets.items()}
    size = imgtune.load(args.run).prep.img_size
    lines = [
        "# Serving latency: torch vs onnxruntime (fp32, and int8 where RUN/model.int8.onnx exists)",
        "",
        f"`python benchmarks/serve_latency.py {args.run} {args.images} "
        f"--requests {args.requests} --clients {args.clients}`",
        "",
        f"Machine: {cpu_description()}, {torch.get_num_threads()} torch threads; model input {size}x{size};",
        f"one PNG per request; {args.requests} sequential requests (latency), then {args.requests} requests from",
        f"{args.clients} concurrent clients with keep-alive connections (throughput, server-side batching).",
        "Server (`imgtune serve`) and clients share the machine's cores.",
        "",
        "| backend | p50 latency (ms) | p95 latency (ms) | sequential requests/s | concurrent requests/s |",
        "|---|---|---|---|---|",
    ]
    for b, r in rows.items():
        lines.append(
            f"| {b} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['sequential_rps']:.1f} | {r['concurrent_rps']:.1f} |"
        )
    t = rows["torch"]
    lines += [""]
    for name, o in rows.items():
        if name != "torch":
            lines.append(f"{name} / torch: p50 {o['p50_ms'] / t['p50_ms']:.2f}x, concurrent throughput "
                         f"{o['concurrent_rps'] / t['concurrent_rps']:.2f}x")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
