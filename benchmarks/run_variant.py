"""One imgtune training run as a line of results/variants.txt: the head stage's valid accuracy, each fine-tuning
epoch's, the test accuracy and the wall time. How the stage-2 experiments of the results issue were run:

usage: python benchmarks/run_variant.py NAME DATA [imgtune train options...]
  e.g. python benchmarks/run_variant.py f-none data/fm-bench --img-size 112 --epochs 3 --augment none
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMGTUNE = str(Path(sys.executable).parent / "imgtune")


def main() -> None:
    name, args = sys.argv[1], sys.argv[2:]
    out = Path("runs") / f"variant-{name}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    proc = subprocess.run([IMGTUNE, "train", *args, "--out", str(out)], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    head = max((float(r["valid_acc"]) for r in rows if r["stage"] == "1"), default=float("nan"))
    tuned = " ".join(f"{float(r['valid_acc']):.4f}" for r in rows if r["stage"] == "2")
    test = json.loads((out / "summary.json").read_text()).get("test_acc")
    line = f"{name:24s} head {head:.4f} | stage 2 {tuned} | test {test} | {wall:.0f} s  :: {' '.join(args)}"
    print(line)
    with (HERE / "results" / "variants.txt").open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
