"""Plots (RUN/plots/*.png) and one self-contained page (RUN/report.html) per run.

Written at the end of training and by `imgtune eval`. Matplotlib with the Agg backend, so it works headless;
the page embeds every image as a data URI and loads nothing from elsewhere, so it can be mailed or archived.
Numbers on the page carry `data-metric` attributes: a test reads them back and compares them with `eval --json`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from imgtune.files import atomic_write_bytes, atomic_write_text
from imgtune.layouts import readable
from imgtune.metrics import EvalResult
from imgtune.tracking import METRIC_COLUMNS, MONITORS

log = logging.getLogger(__name__)

GRID = 16  # images per gallery


class InlineFigure(Figure):
    """A Figure that a notebook shows inline whatever its matplotlib backend (IPython asks for `_repr_png_`)."""

    def _repr_png_(self) -> bytes:
        return png(self)


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[InlineFigure, Any]:
    """A figure and its axes made without pyplot: no backend is chosen or switched (a notebook keeps its
    inline one; a server needs no display), and no figure is left open in pyplot's registry."""
    squeeze = kwargs.pop("squeeze", True)
    fig = InlineFigure(**kwargs)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def png(fig: Figure, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: Path) -> Path:
    atomic_write_bytes(path, png(fig))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run: Path, out: Path) -> Path | None:
    """Loss and accuracy per epoch, train and valid, with the stage boundary marked."""
    rows = read_rows(run / "metrics.csv")
    return save_figure(curves_figure(rows), out) if rows else None


def _value(cell: Any) -> float:
    return math.nan if cell in ("", None) else float(cell)


def curves_figure(rows: Sequence[dict[str, Any]]) -> InlineFigure:
    """The curves of metrics rows (metrics.csv's, or TrainResult.history): loss and accuracy per epoch."""
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("loss", "acc"), strict=True):
        for split, style in (("train", "-"), ("valid", "-o")):
            ax.plot(epochs, [_value(r[f"{split}_{what}"]) for r in rows], style, label=split, markersize=3)
        stages = [int(r["stage"]) for r in rows]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle="--", linewidth=1)
                ax.text(epochs[i] - 0.4, ax.get_ylim()[1], f" stage {stages[i]}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_lr(run: Path, out: Path) -> Path | None:
    rows = read_rows(run / "lr.csv")
    if not rows:
        return None
    fig, ax = subplots(figsize=(7, 3))
    for stage in sorted({r["stage"] for r in rows}):
        part = [r for r in rows if r["stage"] == stage]
        ax.plot([int(r["step"]) for r in part], [float(r["lr"]) for r in part], label=f"stage {stage}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("head LR")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def plot_confusion(result: EvalResult, out: Path) -> Path:
    k = len(result.classes)
    size = min(14.0, 3 + 0.45 * k)
    fig, ax = subplots(figsize=(size, size))
    norm = torch.tensor(result.confusion_normalized)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                n = result.confusion_matrix[i][j]
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ticks = range(k) if k <= 40 else []
    ax.set_xticks(list(ticks), [result.classes[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [result.classes[i] for i in ticks], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.split}: rows normalised (colour), counts (numbers)")
    return save_figure(fig, out)


def plot_reliability(result: EvalResult, out: Path) -> Path:
    fig, ax = subplots(figsize=(4.5, 4.5))
    bins = [b for b in result.reliability if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] for b in bins], width=1 / len(result.reliability), edgecolor="k", alpha=0.7,
           label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, [b["confidence"] for b in bins], "o", color="C3", markersize=3, label="mean confidence")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {result.ece:.4f} (T = {result.temperature:.2f})")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


CAPTION_WIDTH = 24  # characters of a 7-pt caption line under a 1.9-inch panel


def caption(true: str, predicted: str, confidence: float) -> str:
    """ "true X / pred Y 0.93", each name wrapped to the panel's width and cut after two lines, so long class
    names (flowers-102's "hard-leaved pocket orchid", ImageNet's breeds) never run into the next panel."""

    def fit(prefix: str, name: str, suffix: str = "") -> str:
        lines = textwrap.wrap(f"{prefix} {name}", CAPTION_WIDTH, break_long_words=True) or [prefix]
        if len(lines) > 2:
            lines = [lines[0], lines[1][: CAPTION_WIDTH - 3].rstrip() + "..."]
        if suffix and len(lines[-1]) + len(suffix) <= CAPTION_WIDTH:
            lines[-1] += suffix
        elif suffix:
            lines.append(suffix.strip())
        return "\n".join(lines)

    return fit("true", true) + "\n" + fit("pred", predicted, f" {confidence:.2f}")


def _gallery(images: Sequence[torch.Tensor], captions: Sequence[str], colours: Sequence[str], out: Path) -> Path:
    n = len(images)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    lines = max((c.count("\n") + 1 for c in captions), default=2)
    fig, axes = subplots(rows, cols, figsize=(1.9 * cols, (1.9 + 0.15 * lines) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap, colour in zip(axes.flat, images, captions, colours, strict=False):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(cap, fontsize=7, color=colour)
    return save_figure(fig, out)


def _load_images(paths: Sequence[str], size: int) -> list[torch.Tensor]:
    from imgtune.data import decode_prepared
    from imgtune.transforms import Preprocessing

    prep = Preprocessing(img_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return [decode_prepared(Path(p), prep) for p in paths]


def plot_predictions(result: EvalResult, out: Path, size: int = 96) -> Path | None:
    """A fixed, seeded sample of images with true and predicted class (green right, red wrong)."""
    if not result.samples:
        return None
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(result.samples), generator=g)[:GRID].tolist()
    chosen = [result.samples[i] for i in pick]
    captions = [caption(result.classes[t], result.classes[p], c) for _, t, p, c in chosen]
    colours = ["green" if t == p else "red" for _, t, p, _ in chosen]
    return _gallery(_load_images([s[0] for s in chosen], size), captions, colours, out)


def plot_top_losses(result: EvalResult, out: Path, size: int = 96) -> Path | None:
    """The most confidently wrong images: label noise, ambiguous classes, or what the model has not learnt."""
    if not result.top_losses:
        return None
    captions = [caption(m["true"], m["predicted"], m["confidence"]) for m in result.top_losses]
    images = _load_images([m["path"] for m in result.top_losses], size)
    return _gallery(images, captions, ["red"] * len(images), out)


def plot_top_losses_gradcam(run: Path, result: EvalResult, out: Path, side: int = 160) -> Path | None:
    """The top losses again, each under the Grad-CAM map of the class the model wrongly gave: whether it looked
    at the object and misread it, or at something else (a background, a tag, a watermark)."""
    from imgtune.checkpoint import CheckpointError
    from imgtune.explain import overlay
    from imgtune.predict import TorchPredictor

    best = run / "checkpoints" / "best.pt"
    if not result.top_losses or not best.is_file():
        return None
    try:
        predictor = TorchPredictor.load(best, precision="fp32")
        found = list(predictor.iter_explanations([Path(m["path"]) for m in result.top_losses], predictor.explainer()))
    except (CheckpointError, OSError) as e:  # the report goes on without the maps
        log.warning("no Grad-CAM maps in the report: %s", e)
        return None
    shown = {e.path: torch.from_numpy(np.array(overlay(img, e, side))).permute(2, 0, 1) for e, img in found}
    kept = [m for m in result.top_losses if m["path"] in shown]
    captions = [caption(m["true"], m["predicted"], m["confidence"]) for m in kept]
    return _gallery([shown[m["path"]] for m in kept], captions, ["red"] * len(kept), out)


def plot_augmented(
    dataset: Any, augment: Callable[[torch.Tensor], torch.Tensor] | None, classes: Sequence[str], out: Path,
    seed: int = 0,
) -> Path | None:  # fmt: skip
    """What the model really sees in training: training images through the training augmentation."""
    if len(dataset) == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for i in torch.randperm(len(dataset), generator=g)[:GRID].tolist():
        item = dataset[i]
        if item is not None:
            images.append(item[0])
            captions.append(readable(classes[item[1]]))
    if not images:
        return None
    batch = torch.stack(images)
    if augment is not None:
        with torch.random.fork_rng(devices=[]):  # the plot must not shift the training's random stream
            torch.manual_seed(seed)
            batch = (augment(batch) * 255).round().to(torch.uint8)
    return _gallery(list(batch), captions, ["black"] * len(images), out)


# ---------------------------------------------------------------------------------------------- the page


def _data_uri(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def figure_html(path: Path | None, title: str) -> str:
    uri = _data_uri(path)
    if not uri:
        return ""
    return f'<figure><img src="{uri}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'


def _metric(name: str, value: float | None, label: str) -> str:
    text = "–" if value is None else f"{value:.4f}"
    return f'<tr><th>{html.escape(label)}</th><td data-metric="{name}">{text}</td></tr>'


STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.2em .7em;border-bottom:1px solid #eee;text-align:left}
td{font-variant-numeric:tabular-nums} figure{margin:.8em 0} img{max-width:100%;height:auto}
figcaption{color:#666;font-size:.9em} pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}
.warn{color:#a60}
"""


def render_html(run: Path, result: EvalResult, plots: dict[str, Path | None]) -> str:
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>imgtune report: {esc(run.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>imgtune report: {esc(run.name)}</h1>",
        f"<p>Evaluated on the <b>{esc(result.split)}</b> split: <span data-metric='n'>{result.n}</span> images"
        + (", test-time augmentation" if result.tta else "")
        + ".</p>",
        *_data_section(summary, result),
        *_training_section(summary, plots),
        *_metrics_section(result, plots),
        *_calibration_and_predictions(result, plots),
        "<h2>Configuration</h2>", f"<pre>{esc(config)}</pre>", "</body></html>",
    ]  # fmt: skip
    return "\n".join(p for p in parts if p)


def _data_section(summary: dict[str, Any], result: EvalResult) -> list[str]:
    esc = html.escape
    parts = ["<h2>Data</h2><table>"]
    for key in ("classes", "train_images", "valid_images", "test_images", "processes", "best_epoch"):
        if key in summary:
            parts.append(f"<tr><th>{esc(key.replace('_', ' '))}</th><td>{esc(str(summary[key]))}</td></tr>")
    parts.append("</table>")
    warnings = [f"unreadable file skipped: {s['path']}: {s['reason']}" for s in summary.get("skipped_files", [])]
    warnings += [f"unreadable file skipped: {s['path']}: {s['reason']}" for s in result.skipped]
    warnings += list(summary.get("data_warnings", []))
    if warnings:
        parts.append("<ul>" + "".join(f"<li class='warn'>{esc(w)}</li>" for w in warnings[:50]) + "</ul>")
    parts.append(
        "<p>A full audit (duplicates and near-duplicates across splits): <code>imgtune data check DATA</code>.</p>"
    )
    return parts


def _training_section(summary: dict[str, Any], plots: dict[str, Path | None]) -> list[str]:
    monitor = MONITORS.get(str(summary.get("monitor", "")))
    picked = ""
    if monitor is not None and "best_epoch" in summary:
        better = "higher" if monitor.maximize else "lower"
        column = html.escape(monitor.column)
        picked = (f"<p>Best epoch <b>{summary['best_epoch']}</b>, picked by {html.escape(monitor.label)} "
                  f"({better} is better; metrics.csv column <code>{column}</code>).</p>")  # fmt: skip
    return ["<h2>Training</h2>", picked, figure_html(plots.get("curves"), "loss and accuracy per epoch"),
            figure_html(plots.get("lr"), "learning rate per step"),
            figure_html(plots.get("samples"), "augmented training samples: what the model sees")]  # fmt: skip


def _metrics_section(result: EvalResult, plots: dict[str, Path | None]) -> list[str]:
    esc = html.escape
    parts = [
        f"<h2>Metrics ({esc(result.split)})</h2><table>",
        _metric("accuracy", result.accuracy, "accuracy (top-1)"),
        _metric("top5", result.top5, "top-5 accuracy"),
        _metric("loss", result.loss, "loss (cross-entropy)"),
        _metric("macro_f1", result.macro_f1, "macro F1"),
        _metric("macro_precision", result.macro_precision, "macro precision"),
        _metric("macro_recall", result.macro_recall, "macro recall"),
        _metric("weighted_f1", result.weighted_f1, "weighted F1"),
        _metric("balanced_accuracy", result.balanced_accuracy, "balanced accuracy"),
        _metric("ece", result.ece, "expected calibration error"),
    ]
    # monitors registered beyond the built-in ones (tracking.register_monitor): their value on this split too
    parts += [_metric(m.name, m.read(result), m.name.replace("_", " ")) for m in MONITORS.values()
              if m.read is not None and m.column not in METRIC_COLUMNS]  # fmt: skip
    if result.tta:
        parts.append(_metric("accuracy_without_tta", result.accuracy_without_tta, "accuracy without TTA"))
    parts.append("</table><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>")
    for m in result.per_class:
        parts.append(
            f"<tr><th>{esc(m.label)}</th><td>{m.precision:.4f}</td><td>{m.recall:.4f}</td><td>{m.f1:.4f}</td>"
            f"<td>{m.support}</td></tr>"
        )
    parts.append("</table>")
    parts.append(figure_html(plots.get("confusion"), "confusion matrix"))
    if result.most_confused:
        parts.append("<table><tr><th>true</th><th>predicted</th><th>count</th></tr>")
        parts += [f"<tr><td>{esc(m['true'])}</td><td>{esc(m['predicted'])}</td><td>{m['count']}</td></tr>"
                  for m in result.most_confused]  # fmt: skip
        parts.append("</table>")
    return parts


def _calibration_and_predictions(result: EvalResult, plots: dict[str, Path | None]) -> list[str]:
    esc = html.escape
    parts = [
        "<h2>Calibration</h2>",
        f"<p>Temperature <span data-metric='temperature'>{result.temperature:.4f}</span>"
        + (" (fitted with --calibrate)" if result.temperature != 1.0 else " (none: train with --calibrate to fit one)")
        + "</p>",
        figure_html(plots.get("reliability"), "reliability diagram"),
        "<h2>Predictions</h2>",
        figure_html(plots.get("predictions"), "a sample of predictions (green: right, red: wrong)"),
        "<h2>Top losses</h2>",
        figure_html(plots.get("top_losses"), "the most confidently wrong images"),
        figure_html(plots.get("top_losses_gradcam"), "where the model looked: Grad-CAM of the class it wrongly gave"),
    ]
    if result.top_losses:
        parts.append("<table><tr><th>file</th><th>true</th><th>predicted</th><th>confidence</th></tr>")
        parts += [f"<tr><td>{esc(m['path'])}</td><td>{esc(m['true'])}</td><td>{esc(m['predicted'])}</td>"
                  f"<td>{m['confidence']:.3f}</td></tr>" for m in result.top_losses]  # fmt: skip
        parts.append("</table>")
    return parts


def write_report(
    run: Path,
    result: EvalResult,
    train_dataset: Any = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Path:
    """RUN/plots/*.png and RUN/report.html for `result` (the test split, or valid when there is none)."""
    run = Path(run)
    folder = run / "plots"
    folder.mkdir(exist_ok=True)
    plots: dict[str, Path | None] = {
        "curves": plot_curves(run, folder / "curves.png"),
        "lr": plot_lr(run, folder / "lr.png"),
        "confusion": plot_confusion(result, folder / "confusion_matrix.png"),
        "reliability": plot_reliability(result, folder / "reliability.png"),
        "predictions": plot_predictions(result, folder / "predictions.png"),
        "top_losses": plot_top_losses(result, folder / "top_losses.png"),
        "top_losses_gradcam": plot_top_losses_gradcam(run, result, folder / "top_losses_gradcam.png"),
    }
    if train_dataset is not None:
        classes = json.loads((run / "classes.json").read_text()) if (run / "classes.json").is_file() else []
        plots["samples"] = plot_augmented(train_dataset, augment, classes, folder / "samples.png")
    elif (folder / "samples.png").is_file():
        plots["samples"] = folder / "samples.png"
    page = run / "report.html"
    atomic_write_text(page, render_html(run, result, plots))
    atomic_write_text(run / f"eval_{result.split}.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return page
