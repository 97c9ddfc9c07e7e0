"""imgtune on a CUDA GPU in a few minutes: the demo workload and the benchmark workload with `--batch-size
auto`, AMP (bf16 autocast, the CUDA default) and DataLoader workers, GPU utilisation sampled by nvidia-smi
while each runs, and a 2-process DDP run (NCCL) where there are two GPUs. Writes one results file.

The data: Fashion-MNIST image folders as `imgtune data fashion-mnist` writes them. A GPU machine without the
Debian package can be given them (data/fm-bench is 14,000 PNGs, ~20 MB): --bench DIR --demo DIR.

usage: python benchmarks/gpu.py [--bench data/fm-bench] [--demo data/fashion-mnist] [--out benchmarks/results/gpu.md]
       python benchmarks/gpu.py --dry-run      (prints the commands; runs anywhere)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@dataclass
class Job:
    name: str
    cmd: list[str]
    run: Path
    utilisation: list[float] = field(default_factory=list)


def jobs(bench: Path, demo: Path, gpus: int, runs: Path) -> list[Job]:
    """What the script runs: each workload once with the defaults plus `--batch-size auto`, and DDP on two GPUs."""
    imgtune = str(BIN / "imgtune")
    common = ["--batch-size", "auto", "--no-report"]
    out = [
        Job("benchmark (3,000 images, 112 px)", [imgtune, "train", str(bench), "--img-size", "112", *common],
            runs / "gpu-bench"),
        Job("demo (10,000 images, 112 px, 30 + 2 epochs)", [imgtune, "train", str(demo), "--img-size", "112",
            "--epochs-frozen", "30", "--epochs", "2", *common], runs / "gpu-demo"),
    ]  # fmt: skip
    if gpus >= 2:
        torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "imgtune"]
        out.append(Job("benchmark, DDP on 2 GPUs (NCCL)", [*torchrun, "train", str(bench), "--img-size", "112",
                                                           "--no-report"], runs / "gpu-bench-ddp"))  # fmt: skip
    for job in out:
        job.cmd += ["--out", str(job.run)]
    return out


def gpu_names() -> list[str]:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def sample_utilisation(job: Job, stop: threading.Event) -> None:
    """GPU utilisation (%, the busiest GPU) every half second while the job runs."""
    while not stop.wait(0.5):
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout  # fmt: skip
            job.utilisation.append(max(float(v) for v in text.split()))
        except (OSError, ValueError, subprocess.SubprocessError):
            continue


def run(job: Job) -> dict[str, object]:
    shutil.rmtree(job.run, ignore_errors=True)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_utilisation, args=(job, stop), daemon=True)
    sampler.start()
    t0 = time.monotonic()
    proc = subprocess.run(job.cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        return {"name": job.name, "failed": proc.stderr[-1500:]}
    summary = json.loads((job.run / "summary.json").read_text())
    rows = list(csv.DictReader((job.run / "metrics.csv").open()))
    stage2 = [r for r in rows if r["stage"] == "2"]
    config = (job.run / "config.yaml").read_text()
    workers = next((ln.split(":")[1].strip() for ln in config.splitlines() if ln.strip().startswith("workers:")), "")
    first_reach = next((float(r["seconds"]) for r in stage2), None)
    util = sorted(job.utilisation)
    return {
        "name": job.name, "wall_s": round(wall, 1), "batch_size": summary.get("batch_size"),
        "test_acc": summary.get("test_acc"), "best_valid_acc": summary.get("best_valid_acc"),
        "stage2_images_per_s": [round(float(r["images_per_s"])) for r in stage2],
        "first_finetune_epoch_s": first_reach, "workers": workers,
        "gpu_util_median": util[len(util) // 2] if util else None, "gpu_util_max": util[-1] if util else None,
        "log_tail": [ln for ln in proc.stderr.splitlines() if "stage 1:" in ln or "batch size" in ln][-4:],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, default=Path("data/fm-bench"))
    ap.add_argument("--demo", type=Path, default=Path("data/fashion-mnist"))
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu.md")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args()
    names = gpu_names()
    planned = jobs(args.bench, args.demo, len(names) if not args.dry_run else 2, args.runs)
    if args.dry_run:
        for job in planned:
            print(" ".join(job.cmd))
        return
    if not names:
        sys.exit("no CUDA GPU here (nvidia-smi found none): run this on a GPU machine; --dry-run shows the commands")
    for data, per_class in ((args.bench, "300"), (args.demo, "1000")):
        if not data.is_dir():
            subprocess.run([str(BIN / "imgtune"), "data", "fashion-mnist", str(data), "--per-class", per_class,
                            "--valid-per-class", "100", "--download"], check=True)  # fmt: skip
    results = [run(job) for job in planned]
    lines = [f"# imgtune on a GPU ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"GPUs: {'; '.join(names)}. CPU cores: {os.cpu_count()}. Each job: `--batch-size auto`, AMP as the "
             "CUDA default (bf16 autocast), DataLoader workers auto; GPU utilisation sampled every 0.5 s.", "",
             "| job | wall (s) | batch | workers | fine-tuning images/s by epoch | GPU util median / max (%) | "
             "best valid | test |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed: {str(r['failed']).splitlines()[-1] if r['failed'] else ''} |||||||")
            continue
        speeds = ", ".join(map(str, r["stage2_images_per_s"]))  # type: ignore[call-overload]
        util = f"{r['gpu_util_median']} / {r['gpu_util_max']}"
        lines.append(f"| {r['name']} | {r['wall_s']} | {r['batch_size']} | {r['workers']} | {speeds} | {util} | "
                     f"{r['best_valid_acc']} | {r['test_acc']} |")  # fmt: skip
    lines += ["", "```json", json.dumps(results, indent=1), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
