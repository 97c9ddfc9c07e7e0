"""`imgtune compare`: train several variants on the same split, seed and budget; one table, one page.

The classic use is "how much does pretraining help?": each model once from ImageNet weights (hub, packaged, or
a `model.weights` file: offline, weights downloaded elsewhere) and once from random init
(`pretrained_vs_scratch`), with the same epochs and, optionally, the same wall-clock budget.
"""

from __future__ import annotations

import csv
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.config import Config
from imgtune.files import atomic_write_text
from imgtune.progress import Progress
from imgtune.runtime import StopRequest

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    model: str
    pretrained: bool


@dataclass
class VariantResult:
    variant: Variant
    run_dir: Path
    best_valid_acc: float
    test_acc: float | None
    epochs_run: int
    wall_seconds: float

    def row(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "model": self.variant.model,
            "pretrained": self.variant.pretrained,
            "best_valid_acc": round(self.best_valid_acc, 4),
            "test_acc": "" if self.test_acc is None else round(self.test_acc, 4),
            "epochs_run": self.epochs_run,
            "wall_seconds": round(self.wall_seconds, 1),
            "run": str(self.run_dir),
        }


def variants(models: list[str], pretrained_vs_scratch: bool) -> list[Variant]:
    out = []
    for m in models:
        out.append(Variant(f"{m} pretrained", m, True))
        if pretrained_vs_scratch:
            out.append(Variant(f"{m} scratch", m, False))
    return out


def compare(
    base: Config,
    models: list[str],
    *,
    pretrained_vs_scratch: bool = False,
    budget_minutes: float | None = None,
    out: Path = Path("runs/compare"),
    progress: Progress | None = None,
    stop: StopRequest | None = None,
) -> list[VariantResult]:
    """Train each variant of `base` (same data, split, seed, epochs; optional equal time budget) into
    OUT/<variant>/, then write OUT/results.csv and OUT/compare.html."""
    from imgtune.recipe import train
    from imgtune.runs import ensure_free

    out = Path(out)
    ensure_free(out)
    results: list[VariantResult] = []
    split_file = base.data.split_file
    for v in variants(models, pretrained_vs_scratch):
        folder = out / v.name.replace(" ", "-")
        train_cfg = base.train.model_copy(update={"max_minutes": budget_minutes} if budget_minutes else {})
        cfg = base.model_copy(
            update={
                # the scratch variant starts from random init, also when the others start from a weights file
                "model": base.model.model_copy(
                    update={"name": v.model, "pretrained": v.pretrained} | ({} if v.pretrained else {"weights": None})
                ),
                "data": base.data.model_copy(update={"split_file": split_file}),
                "train": train_cfg,
                "out": folder,
            }
        )
        log.info("compare: training %s into %s", v.name, folder)
        r = train(cfg, progress, stop)
        if split_file is None and (r.run_dir / "split.csv").is_file():
            split_file = r.run_dir / "split.csv"  # every later variant trains and validates on these images
        results.append(
            VariantResult(
                v, r.run_dir, r.best_valid_acc, r.test.accuracy if r.test else None, int(r.summary["epochs_run"]),
                float(r.summary["wall_seconds"]),
            )
        )  # fmt: skip
    write_results(out, results)
    return results


def write_results(out: Path, results: list[VariantResult]) -> None:
    rows = [r.row() for r in results]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "compare.html", _page(out, results))


def _curves(results: list[VariantResult], out: Path) -> Path:
    from imgtune.report import read_rows, save_figure, subplots

    fig, axes = subplots(1, 2, figsize=(11, 4))
    for r in results:
        rows = read_rows(r.run_dir / "metrics.csv")
        acc = [float(x["valid_acc"]) for x in rows]
        clock, total = [], 0.0
        for x in rows:
            total += float(x["seconds"])
            clock.append(total / 60)
        axes[0].plot(range(1, len(acc) + 1), acc, "-o", markersize=3, label=r.variant.name)
        axes[1].plot(clock, acc, "-o", markersize=3, label=r.variant.name)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training minutes (epochs only)")
    for ax in axes:
        ax.set_ylabel("valid accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out / "curves.png")


def _page(out: Path, results: list[VariantResult]) -> str:
    from imgtune.report import STYLE, figure_html

    esc = html.escape
    head = "".join(f"<th>{esc(k)}</th>" for k in results[0].row())
    body = "".join(
        "<tr>" + "".join(f"<td data-variant='{esc(r.variant.name)}' data-column='{esc(k)}'>{esc(str(v))}</td>"
                         for k, v in r.row().items()) + "</tr>"
        for r in results
    )  # fmt: skip
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>imgtune compare</title><style>{STYLE}</style></head><body>"
        "<h1>imgtune compare</h1><p>Same data, split, seed and epochs for every variant.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
        + figure_html(_curves(results, out), "validation accuracy, per epoch and over training time")
        + "</body></html>"
    )
