"""Side by side, in one run: the tutorial-style loop (tutorial_baseline.py) vs imgtune's default recipe on the
same image folder, model (tf_efficientnet_lite0, offline ImageNet weights) and input size. Writes a table of
wall time, images/s, accuracies, time to reach the baseline's final valid accuracy, predict throughput and
peak RSS, with imgtune/baseline ratios, to benchmarks/results/tutorial_vs_imgtune.md.

Reference workload (the speed issue): imgtune data fashion-mnist data/fm-bench --per-class 300 --valid-per-class 100

usage: python benchmarks/tutorial_vs_imgtune.py [--data data/fm-bench] [--img-size 112]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, list[tuple[float, str]], float, float]:
    """Run cmd under /usr/bin/time: (stdout, [(seconds since start, stderr line)], wall seconds, peak RSS GB)."""
    start = time.monotonic()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    lines: list[tuple[float, str]] = []
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        lines.append((time.monotonic() - start, line.rstrip()))
    out = proc.stdout.read()
    proc.wait()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n" + "\n".join(t for _, t in lines[-30:]))
    peak = next(int(t.split()[1]) for _, t in lines if t.startswith("PEAK_KB"))
    return out, lines, wall, peak / 1e6


def imgtune_reach(lines: list[tuple[float, str]], target: float) -> float | None:
    """Seconds until imgtune's log first shows a valid accuracy >= target (stage-1 end or a stage-2 epoch)."""
    for t, text in lines:
        m = re.search(r"stage 1: .* best valid acc ([0-9.]+)", text) or re.search(
            r"epoch \d+ \(stage 2\):.*valid loss [0-9.]+ acc ([0-9.]+)", text
        )
        if m and float(m.group(1)) >= target:
            return t
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("data/fm-bench"))
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tutorial_vs_imgtune.md")
    ap.add_argument("--fastai-path", type=Path, help="where fastai is installed (see fastai_baseline.py): adds it")
    args = ap.parse_args()
    imgtune = str(BIN / "imgtune")
    if not args.data.is_dir():
        subprocess.run([imgtune, "data", "fashion-mnist", str(args.data), "--per-class", "300",
                        "--valid-per-class", "100", "--download"], check=True)  # fmt: skip

    weights = Path("runs/bench-tutorial.pt")
    weights.parent.mkdir(exist_ok=True)
    baseline = [sys.executable, str(HERE / "tutorial_baseline.py"), str(args.data), "--img-size", str(args.img_size)]
    out, _, base_wall, base_rss = timed([*baseline, "--save", str(weights)])
    base: dict[str, Any] = json.loads(out)
    # predicting is a fresh process for both, start-up included, as a user runs it
    _, _, base_pred_wall, _ = timed([*baseline, "--predict", str(weights)])

    fa: dict[str, Any] | None = None
    if args.fastai_path is not None:
        env = {**os.environ, "PYTHONPATH": f"{args.fastai_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, str(HERE / "fastai_baseline.py"), str(args.data), "--img-size", str(args.img_size)]
        out, _, fa_wall, fa_rss = timed(cmd, env)
        fa = {**json.loads(out.strip().splitlines()[-1]), "wall": fa_wall, "rss": fa_rss}

    run = Path("runs/bench-imgtune")
    shutil.rmtree(run, ignore_errors=True)
    _, lines, it_wall, it_rss = timed([imgtune, "train", str(args.data), "--img-size", str(args.img_size),
                                       "--out", str(run), "--no-report"])  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    stage1_s = next(t for t, text in lines if re.search(r"stage 1: \d+ epochs? in", text))
    stage1_acc = max(float(r[6]) for r in rows if r[1] == "1")
    stage2_ips = [float(r[8]) for r in rows if r[1] == "2"]
    reach = imgtune_reach(lines, base["final_valid_acc"])

    test_dir = args.data / "test"
    n_test = sum(1 for p in test_dir.rglob("*.png"))
    _, _, pred_wall, _ = timed([imgtune, "predict", str(run), str(test_dir), "--out", str(run / "pred.csv")])

    b1 = [e for e in base["epochs"] if e["stage"] == 1]
    b2 = [e for e in base["epochs"] if e["stage"] == 2]
    b1_s = b1[-1]["elapsed"]
    b1_acc = max(e["valid_acc"] for e in b1)
    b2_ips = sum(e["images_per_s"] for e in b2) / len(b2)
    it2_ips = sum(stage2_ips) / max(1, len(stage2_ips))
    pred_ips = n_test / pred_wall
    base_pred_ips = n_test / base_pred_wall

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    def fastai(figure: str) -> tuple[str, float | None]:
        """fastai's value for a figure (as text, as a number), or blanks without a fastai run."""
        if fa is None:
            return "", None
        f1 = [e for e in fa["epochs"] if e["stage"] == 1]
        f2 = [e for e in fa["epochs"] if e["stage"] == 2]
        value = {
            "wall": fa["wall"], "stage1_s": f1[-1]["elapsed"], "stage1_acc": max(e["valid_acc"] for e in f1),
            "stage2_ips": sum(e["images_per_s"] for e in f2) / len(f2), "final_acc": fa["final_valid_acc"],
            "test_acc": fa["test_acc"], "predict_in_run": fa["predict_images_per_s"], "rss": fa["rss"],
            "stage1_ips": sum(e["images_per_s"] for e in f1) / len(f1),
        }[figure]  # fmt: skip
        return (f"{value:.4f}" if "acc" in figure else f"{value:.2f}" if figure == "rss" else f"{value:.0f}"), value

    def row(name: str, tut: str, it: str, vs_tut: str, target: str, figure: str | None = None,
            mine: float | None = None, higher_is_better: bool = True) -> str:  # fmt: skip
        text, value = fastai(figure) if figure else ("", None)
        vs_fa = ""
        if value is not None and mine is not None:
            vs_fa = f"{mine - value:+.4f}" if "acc" in (figure or "") else ratio(mine, value)
        return f"| {name} | {tut} | {text} | {it} | {vs_tut} | {vs_fa} | {target} |"

    it_test = summary.get("test_acc", 0)
    it_final = float(rows[-1][6])
    b1_ips = sum(e["images_per_s"] for e in b1) / len(b1)
    table = [
        "| figure | tutorial loop | fastai fine_tune | imgtune | imgtune / tutorial | imgtune / fastai | target |",
        "|---|---|---|---|---|---|---|",
        row("wall time, whole run (s)", f"{base_wall:.0f}", f"{it_wall:.0f}", ratio(it_wall, base_wall), "<= 0.50x",
            "wall", it_wall),
        row("frozen stage: wall from start (s)", f"{b1_s:.0f}", f"{stage1_s:.0f}", ratio(stage1_s, b1_s), "<= 0.20x",
            "stage1_s", stage1_s),
        row("frozen stage: epochs", "3", "solved" if "head solved" in "".join(t for _, t in lines) else
            str(sum(1 for r in rows if r[1] == "1")), "", ""),
        row("frozen stage: train images/s (tutorial, fastai: per epoch)", f"{b1_ips:.0f}", "features once", "", "",
            "stage1_ips"),
        row("frozen stage: best valid acc", f"{b1_acc:.4f}", f"{stage1_acc:.4f}", f"{stage1_acc - b1_acc:+.4f}", "> 0",
            "stage1_acc", stage1_acc),
        row("fine-tuning: train images/s", f"{b2_ips:.1f}", f"{it2_ips:.1f}", ratio(it2_ips, b2_ips), ">= 2x",
            "stage2_ips", it2_ips),
        row("final valid acc", f"{base['final_valid_acc']:.4f}", f"{it_final:.4f}", "", "", "final_acc", it_final),
        row("time to the tutorial's final valid acc (s)", f"{base_wall:.0f}",
            f"{reach:.0f}" if reach is not None else "not reached",
            ratio(reach, base_wall) if reach is not None else "", "<= 0.33x"),
        row("test acc (10,000 images)", f"{base['test_acc']:.4f}", f"{it_test:.4f}",
            f"{it_test - base['test_acc']:+.4f}", ">= +0.03", "test_acc", it_test),
        row("predict on the test set, fresh process (images/s)", f"{base_pred_ips:.0f}", f"{pred_ips:.0f}",
            ratio(pred_ips, base_pred_ips), ">= 3x"),
        row("(test loop at the end of the training run, images/s)", f"{base['predict_images_per_s']:.0f}", "", "", "",
            "predict_in_run"),
        row("peak RSS of training (GB)", f"{base_rss:.2f}", f"{it_rss:.2f}", "", "imgtune <= 2.5", "rss", it_rss),
    ]  # fmt: skip
    text = (
        f"# tutorial loop vs imgtune ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Data: {args.data} ({summary['train_images']} train, {summary['valid_images']} valid, {n_test} test), "
        f"tf_efficientnet_lite0 (offline ImageNet weights), {args.img_size} px, one run, side by side.\n"
        "Predict: each side is a fresh process (`tutorial_baseline.py --predict`, `imgtune predict`) timed from "
        "start to exit, so start-up, model load and decoding are included. fastai: `fine_tune(3, freeze_epochs=3)`, "
        "batch 32, 2 workers, aug_transforms, the same network and weights (benchmarks/fastai_baseline.py); its "
        "predict figure is its test pass at the end of the training run.\n\n" + "\n".join(table) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
