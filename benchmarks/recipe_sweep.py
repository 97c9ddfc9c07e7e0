"""One variant of imgtune's recipe on the speed issue's reference workload: a line of results per call.

usage: python benchmarks/recipe_sweep.py NAME [imgtune train flags ...]
Appends NAME, wall seconds, seconds until the valid accuracy first reaches --target (the tutorial loop's
final valid accuracy; default 0.874, benchmarks/results/tutorial_vs_imgtune.md), the stage-1 best valid
accuracy, each fine-tuning epoch's valid accuracy, test accuracy, peak RSS (GB) and the flags to
benchmarks/results/recipe_sweep.tsv. Run variants one after the other on a quiet machine: the wall figures
are only comparable within one sitting. This is how the stage-2 defaults (LR, epochs, no EMA) were chosen
(docs/results.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tutorial_vs_imgtune import BIN, imgtune_reach, timed  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    name, flags = sys.argv[1], sys.argv[2:]
    data = Path(os.environ.get("SWEEP_DATA", "data/fm-bench"))
    target = float(os.environ.get("SWEEP_TARGET", "0.874"))
    run = Path("runs/sweep") / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [str(BIN / "imgtune"), "train", str(data), "--img-size", "112", "--out", str(run), "--no-report", *flags]
    _, lines, wall, rss = timed(cmd)
    summary = json.loads((run / "summary.json").read_text())
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    stage1 = max((float(r[6]) for r in rows if r[1] == "1"), default=0.0)
    stage2 = " ".join(f"{float(r[6]):.3f}" for r in rows if r[1] == "2")
    reach = imgtune_reach(lines, target)
    fields = [name, f"{wall:.0f}", "-" if reach is None else f"{reach:.0f}", f"{stage1:.3f}", stage2,
              f"{summary['test_acc']:.4f}", f"{rss:.2f}", " ".join(flags)]  # fmt: skip
    out = HERE / "results" / "recipe_sweep.tsv"
    if not out.exists():
        out.write_text("name\twall_s\treach_s\tstage1_valid\tstage2_valid_by_epoch\ttest_acc\tpeak_rss_gb\tflags\n")
    with out.open("a") as f:
        f.write("\t".join(fields) + "\n")
    print("\t".join(fields))


if __name__ == "__main__":
    main()
