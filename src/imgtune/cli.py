"""Command line: each command parses its flags, builds a Config or arguments, and calls one API function.

Errors that are the user's to fix (bad data, bad config, unusable checkpoint) are printed as one clear line
and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from imgtune.config import Backend, Config, ConfigError, Device, Precision, build_config, resolve
from imgtune.distributed import env_rank, teardown
from imgtune.errors import Interrupted, UserError
from imgtune.options import (
    CHECK_FLAGS,
    COMPARE_FLAGS,
    ISSUES_FLAGS,
    LR_FIND_FLAGS,
    TRAIN_FLAGS,
    Flag,
    numbers,
    overrides,
    with_flags,
)

app = typer.Typer(
    help="Fine-tune pretrained image classifiers on a folder of images: train, evaluate, predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: "[default]" stays text (rich markup would swallow "[adamw]")
)
data_app = typer.Typer(help="Prepare and audit dataset folders.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes to whatever sys.stderr is now (tests and notebooks swap it), not the stream seen at setup."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if env_rank() != 0:
        level = logging.WARNING  # under torchrun: rank 0 logs progress, the others only their problems
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("imgtune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# ------------------------------------------------------------------------------------------------- data


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ valid/ test/ class folders into.")],
    per_class: Annotated[int | None, typer.Option(help="Training images per class (default: all the rest).")] = None,
    valid_per_class: Annotated[
        int, typer.Option(help="Validation images per class, from the official train set.")
    ] = 500,
    source: Annotated[Path | None, typer.Option(help="Folder with the IDX .gz files.")] = None,
    download: Annotated[bool, typer.Option(help="Fetch with torchvision when no local copy exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the per-class selection.")] = 0,
) -> None:
    """Write real Fashion-MNIST as PNG image folders (test = the official 10,000 test images)."""
    from imgtune.sources import write_fashion_mnist

    counts = write_fashion_mnist(out, per_class, valid_per_class, source, seed, download)
    typer.echo(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " images")


def _data_cifar(which: str, title: str) -> None:
    def command(
        out: Annotated[Path, typer.Argument(help="Folder to write train/ valid/ test/ class folders into.")],
        per_class: Annotated[
            int | None, typer.Option(help="Training images per class (default: all the rest).")
        ] = None,
        valid_per_class: Annotated[
            int, typer.Option(help="Validation images per class, from the official train set.")
        ] = 500 if which == "cifar10" else 50,
        source: Annotated[
            Path | None, typer.Option(help="The python-version .tar.gz archive, or the folder it extracts to.")
        ] = None,
        download: Annotated[bool, typer.Option(help="Fetch the archive with torchvision (checksummed).")] = False,
        seed: Annotated[int, typer.Option(help="Seed of the per-class selection.")] = 0,
    ) -> None:
        from imgtune.sources import write_cifar

        counts = write_cifar(which, out, per_class, valid_per_class, source, seed, download)
        typer.echo(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " images")

    command.__doc__ = f"Write {title} as PNG image folders (test = the official 10,000 test images)."
    data_app.command(which)(command)


_data_cifar("cifar10", "CIFAR-10")
_data_cifar("cifar100", "CIFAR-100 (100 fine classes)")


def _fetched(result: Any) -> None:
    typer.echo(f"{result.out}: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()) + " images")
    typer.echo(f"class names: {result.out / 'class_names.json'} (used by imgtune train {result.out})")


_MIRROR = typer.Option(help="Base URL to download from instead of the official one (a mirror, a local server).")


def _data_fastai(which: str, title: str) -> None:
    def command(
        out: Annotated[Path, typer.Argument(help="Folder to write train/ val/ <wnid> folders into.")],
        size: Annotated[str, typer.Option(help="160 or 320 (px, shortest side), or full.")] = "160",
        source: Annotated[
            Path | None, typer.Option(help="The downloaded .tgz, or the folder holding it (no download).")
        ] = None,
        mirror: Annotated[str | None, _MIRROR] = None,
    ) -> None:
        from imgtune.fetchers import fetch_fastai
        from imgtune.progress import auto_progress

        _fetched(fetch_fastai(which, out, size, source, mirror, progress=auto_progress()))

    command.__doc__ = (
        f"Download {title} (fastai's archive: resumable, checksummed) and convert it: train/ val/ class folders, "
        "the noisy-label CSV, class_names.json (wnid -> name)."
    )
    data_app.command(which)(command)


_data_fastai("imagenette", "Imagenette (10 easy ImageNet classes)")
_data_fastai("imagewoof", "Imagewoof (10 dog breeds)")


@data_app.command("flowers102")
def data_flowers102(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ valid/ test/ class folders into.")],
    split: Annotated[
        str,
        typer.Option(help="official (10+10 per class to train/validate, 6,149 test) or large (train on the 6,149)."),
    ] = "official",
    source: Annotated[
        Path | None, typer.Option(help="Folder with 102flowers.tgz, imagelabels.mat, setid.mat (no download).")
    ] = None,
    mirror: Annotated[str | None, _MIRROR] = None,
) -> None:
    """Download Oxford flowers-102 (resumable, checksummed) and convert it: class folders 1..102 and
    class_names.json (number -> flower name)."""
    from imgtune.fetchers import fetch_flowers102
    from imgtune.progress import auto_progress

    _fetched(fetch_flowers102(out, split, source, mirror, progress=auto_progress()))


@data_app.command("check")
@with_flags(CHECK_FLAGS)
def data_check(
    data: Annotated[Path, typer.Argument(help="Dataset folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    near_tolerance: Annotated[
        int,
        typer.Option(help="Near-duplicates: 16x16 grey thumbnails within N grey levels on average (-1: off)."),
    ] = 3,
    fail_on_leak: Annotated[
        bool, typer.Option("--fail-on-leak", help="Exact or near duplicates across splits are an error.")
    ] = False,
    **flags: Any,
) -> None:
    """Audit a dataset folder: classes, counts, unreadable files, exact and near duplicates across splits,
    tiny images. The options that say where the classes are mean what they mean for train.

    Exit status 0 when the folder is trainable, 1 when it is not.
    """
    from imgtune.audit import audit

    cfg = _config(data, None, flags, CHECK_FLAGS, None)
    tolerance = near_tolerance if near_tolerance >= 0 else None
    report = audit(data, cfg.data.valid_fraction, cfg.seed, tolerance, fail_on_leak, cfg.data.label_rule())
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    raise typer.Exit(0 if report.trainable else 1)


@data_app.command("issues")
@with_flags(ISSUES_FLAGS)
def data_issues(
    data: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[
        Path, typer.Option(help="The label issues CSV; near_duplicates.csv, outliers.csv beside it.")
    ] = Path("issues.csv"),
    run: Annotated[Path | None, typer.Option(help="Features from this run's trained backbone [pretrained].")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the out-of-fold probabilities.", min=2)] = 5,
    html_page: Annotated[bool, typer.Option("--html", help="Also write a review page with thumbnails.")] = False,
    max_score: Annotated[
        float | None,
        typer.Option(help="Keep only issues whose given label has at most this probability, e.g. 0.01 [all].", min=0.0),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    device: Annotated[Device, typer.Option()] = "auto",
    **flags: Any,
) -> None:
    """Find likely wrong labels (confident learning on out-of-fold predictions of linear heads over backbone
    features), near-duplicates within a split and outliers, among the labelled training and validation images."""
    from imgtune.curate import find_issues

    cfg = _config(data, None, flags, ISSUES_FLAGS, None).model_copy(update={"device": device})
    result = find_issues(cfg, run=run, folds=folds, out=out, html_page=html_page, batch_size=batch_size,
                         max_score=max_score)  # fmt: skip
    typer.echo(result.format())
    if result.issues:
        typer.echo(f"to train without them:  imgtune train {data} --exclude {out}")
        typer.echo(f"to take the suggestions: imgtune train {data} --relabel {out}   (after checking them)")


# ------------------------------------------------------------------------------------------------ train


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """--set train.stage2.optimizer=sgd --set train.milestones=[10,20]: values parsed as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.stage2.optimizer=sgd")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({first}); quote text: KEY='VALUE'"
            ) from None
    return out


def _columns(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(","))
    if len(names) != 2 or not all(names):
        raise ConfigError(f"--columns {text!r}: a submission has two columns, e.g. Id,Category")
    return names


def _floats(text: str | None, flag: str) -> list[float] | None:
    return None if text is None else numbers(float, "0.6,0.4")(text, flag)


def _config(data: Path | None, file: Path | None, flags: dict[str, Any], table: list[Flag], sets: list[str] | None,
            recipes: bool = False, recipe: str | None = None) -> Config:  # fmt: skip
    """The command's Config: the YAML file < DATA and the flags < --set; with `recipes`, over the defaults of
    `recipe` (or of the one the model calls for)."""
    given = {"data.path": data, **overrides(table, flags)}
    if not recipes:
        return build_config(file, given, explicit=_parse_sets(sets))
    return resolve(file, given, _parse_sets(sets), recipe=recipe)


@app.command()
@with_flags(TRAIN_FLAGS, recipes=True)
def train(
    data: Annotated[
        Path | None, typer.Argument(help="Dataset folder (train/ + valid/ [+ test/], or class folders).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder from its last.pt.")] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Defaults: transfer or scratch [scratch for built-in models, else transfer].")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Any config key: --set train.stage2.lr=1e-4.")
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
    **flags: Any,
) -> None:
    """Fine-tune a pretrained model: head on frozen features, then all layers; best checkpoint kept.

    Every option sets the config key of the same name (docs/options.md lists them all, with --set for the rest).
    """
    from imgtune.progress import auto_progress
    from imgtune.runtime import StopRequest

    stop = StopRequest().install()  # Ctrl-C / SIGTERM: finish the step, write last.pt, exit; twice: abort
    if resume is not None:
        from imgtune.recipe import resume as run_resume

        _report(run_resume(resume, progress=auto_progress(), stop=stop))
        return
    if data is None and config is None:
        _fail("give a dataset folder (DATA), --config FILE or --resume RUN")
    cfg = _config(data, config, flags, TRAIN_FLAGS, set_, recipes=True, recipe=recipe)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from imgtune.api import train as run_train

    _report(run_train(cfg, progress=auto_progress(), stop=stop))


@app.command()
@with_flags(COMPARE_FLAGS)
def compare(
    data: Annotated[Path, typer.Argument(help="Dataset folder.")],
    models: Annotated[str, typer.Option(help="Comma-separated model names, e.g. tf_efficientnet_lite0,cnn5.")],
    pretrained_vs_scratch: Annotated[
        bool, typer.Option("--pretrained-vs-scratch", help="Each model also from random init.")
    ] = False,
    budget_minutes: Annotated[
        float | None, typer.Option(help="Wall-clock budget per variant: no epoch starts after it.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config shared by every variant.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the variants' runs, results.csv, compare.html.")] = Path(
        "runs/compare"
    ),
    set_: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Any config key, for every variant.")
    ] = None,
    **flags: Any,
) -> None:
    """Train variants on the same split, seed and budget (e.g. pretrained vs scratch); one table and page."""
    from imgtune.compare import compare as run_compare
    from imgtune.progress import auto_progress
    from imgtune.runtime import StopRequest

    stop = StopRequest().install()
    base = _config(data, config, flags, COMPARE_FLAGS, set_)
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        _fail("--models: give at least one model name")
    results = run_compare(
        base, names, pretrained_vs_scratch=pretrained_vs_scratch, budget_minutes=budget_minutes, out=out,
        progress=auto_progress(), stop=stop,
    )  # fmt: skip
    for r in results:
        test = f"{r.test_acc:.4f}" if r.test_acc is not None else "-"
        typer.echo(f"{r.variant.name:<40} valid {r.best_valid_acc:.4f}  test {test}  {r.wall_seconds:7.1f} s")
    typer.echo(f"comparison: {out / 'compare.html'}")


@app.command("lr-find")
@with_flags(LR_FIND_FLAGS)
def lr_find(
    data: Annotated[Path, typer.Argument(help="Dataset folder.")],
    stage: Annotated[int, typer.Option(help="1: head on frozen features; 2: all layers, after training the head.")] = 1,
    steps: Annotated[int, typer.Option(help="Batches in the range test.")] = 200,
    out: Annotated[Path, typer.Option(help="Plot to write (a .csv of the curve goes beside it).")] = Path(
        "lr_find.png"
    ),
    config: Annotated[Path | None, typer.Option("--config", help="YAML config, as for train.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Any config key, as for train.")
    ] = None,
    **flags: Any,
) -> None:
    """LR range test: plot loss against an exponentially rising LR and print a suggested LR."""
    if stage not in (1, 2):
        _fail(f"--stage {stage}: choose 1 or 2")
    from imgtune.recipe import find_lr

    cfg = _config(data, config, flags, LR_FIND_FLAGS, set_)
    result = find_lr(cfg, stage=stage, steps=steps, out=out)
    typer.echo(f"suggested LR for stage {stage}: {result.suggestion:.3g}")
    typer.echo(f"rule: {result.rule}; loss minimum {min(result.losses):.4f} over {len(result.lrs)} batches")
    typer.echo(f"plot: {out}  curve: {out.with_suffix('.csv')}")


def _report(result: Any) -> None:
    if env_rank() != 0:  # under torchrun rank 0 speaks for all
        return
    if math.isnan(result.best_valid_acc):
        typer.echo(f"no validation split: the last epoch ({result.best_epoch}) is kept")
    else:
        typer.echo(f"best valid accuracy {result.best_valid_acc:.4f} (epoch {result.best_epoch})")
    if result.test is not None:
        typer.echo(f"test accuracy {result.test.accuracy:.4f} on {result.test.n} images")
    typer.echo(f"run folder: {result.run_dir}")


# ------------------------------------------------------------------------------------------ eval, predict


def _is_run(item: str | Path) -> bool:
    path = Path(item)
    if path.is_dir():
        return (path / "checkpoints").is_dir() or (path / "model.onnx").is_file()
    return path.suffix in (".pt", ".onnx") and path.is_file()


def _runs_first(items: list[str], ensemble: bool, what: str) -> tuple[list[str], list[str]]:
    """RUN [RUN ...] then the rest: with --ensemble every leading run folder/checkpoint is a run."""
    if not items:
        _fail(f"give RUN and {what}")
    n = 1
    if ensemble:
        while n < len(items) - 1 and _is_run(items[n]):
            n += 1
        if n < 2:
            _fail(f"--ensemble needs two or more runs before the {what}")
    return items[:n], items[n:]


@app.command("eval")
def eval_(
    items: Annotated[list[str], typer.Argument(help="RUN [RUN ... with --ensemble] DATA", metavar="RUN... DATA")],
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation (4 views); reports the gain.")] = False,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Average the probabilities of several runs.")] = False,
    weights: Annotated[str | None, typer.Option(help="Ensemble weights per run, e.g. 0.6,0.4 [equal].")] = None,
    class_names: Annotated[Path | None, typer.Option(help="JSON {folder name: display name}.")] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write RUN/plots/ and RUN/report.html (single run).")
    ] = True,
    batch_size: Annotated[int, typer.Option()] = 64,
    device: Annotated[Device, typer.Option()] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decoding worker processes [auto].")] = None,
    precision: Annotated[
        Precision, typer.Option(help="auto (bf16 where native, else fp32), fp32, bf16, fp16.")
    ] = "auto",
) -> None:
    """Accuracy, top-5, loss, per-class and averaged precision/recall/F1, confusion matrix, calibration."""
    if split not in ("test", "valid"):
        _fail(f"--split {split!r}: choose test or valid")
    runs, rest = _runs_first(items, ensemble, "DATA")
    if len(rest) != 1:
        _fail(f"expected one DATA folder after the run(s), got {rest}")
    from imgtune.api import evaluate

    result = evaluate(
        runs, rest[0], split, batch_size=batch_size, device=device, workers=workers, tta=tta,
        weights=_floats(weights, "--weights"), class_names=class_names, precision=precision,
    )  # fmt: skip
    if report and len(runs) == 1 and Path(runs[0]).is_dir():
        from imgtune.report import write_report

        page = write_report(Path(runs[0]), result)
        typer.echo(f"report: {page}", err=True)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder.")],
    split: Annotated[str, typer.Option(help="The labelled split to fit on (not the test split).")] = "valid",
    device: Annotated[Device, typer.Option()] = "auto",
) -> None:
    """Fit temperature scaling on the validation split and store it in the checkpoint (predict uses it)."""
    from imgtune.api import calibrate as run_calibrate

    fit = run_calibrate(run, data, split, device=device)
    typer.echo(f"temperature {fit.temperature:.4f}: {split} ECE {fit.ece_before:.4f} -> {fit.ece_after:.4f} "
               f"({fit.n} images); stored in the checkpoint")  # fmt: skip


@app.command()
def predict(
    items: Annotated[
        list[str], typer.Argument(help="RUN [RUN ... with --ensemble] then image files, folders (recursive), globs.")
    ],
    out: Annotated[Path | None, typer.Option(help="CSV file to write [print to stdout].")] = None,
    top_k: Annotated[int, typer.Option(help="Labels per image in the CSV.")] = 3,
    fmt: Annotated[
        str, typer.Option("--format", help="csv (path,label,confidence,...) or submission (id,label).")
    ] = "csv",
    id_from: Annotated[str, typer.Option(help="Submission ids: the file's stem, name or path.")] = "stem",
    columns: Annotated[
        str, typer.Option(help="The submission's header, id column then label column, e.g. Id,Category.")
    ] = "id,label",
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation (4 views, averaged).")] = False,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Average the probabilities of several runs.")] = False,
    weights: Annotated[str | None, typer.Option(help="Ensemble weights per run, e.g. 0.6,0.4 [equal].")] = None,
    class_names: Annotated[Path | None, typer.Option(help="JSON {folder name: display name}.")] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    device: Annotated[Device, typer.Option()] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decoding worker processes [auto].")] = None,
    backend: Annotated[Backend, typer.Option(help="torch (the checkpoint) or onnxruntime (RUN/model.onnx).")] = "torch",
    precision: Annotated[
        Precision, typer.Option(help="auto (bf16 where native, else fp32), fp32, bf16, fp16.")
    ] = "auto",
) -> None:
    """Classify images; CSV columns path,label,confidence[,top2_label,top2_confidence,...] or id,label."""
    runs, paths = _runs_first(items, ensemble, "images")
    if not paths:
        _fail("give images, folders or globs after the run(s)")
    if fmt not in ("csv", "submission") or id_from not in ("stem", "name", "path"):
        _fail(f"--format {fmt!r} / --id-from {id_from!r}: choose csv|submission and stem|name|path")
    from imgtune.api import predict as run_predict

    result = run_predict(
        runs, paths, out=out, top_k=top_k, batch_size=batch_size, device=device, workers=workers, backend=backend,
        tta=tta, weights=_floats(weights, "--weights"), class_names=class_names, format=fmt, id_from=id_from,
        precision=precision, columns=_columns(columns),
    )  # fmt: skip
    if out is None:
        typer.echo(result.csv(), nl=False)
    else:
        typer.echo(f"{len(result.rows)} predictions written to {out}", err=True)
    if result.skipped:
        typer.echo(f"{len(result.skipped)} unreadable file(s) skipped:", err=True)
        for s in result.skipped:
            typer.echo(f"  {s['path']}: {s['reason']}", err=True)


@app.command()
def explain(
    items: Annotated[list[str], typer.Argument(help="RUN, then image files, folders (recursive), globs.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlays, explain.csv and heatmaps.npz.")],
    method: Annotated[str, typer.Option(help="gradcam, or occlusion (49 forward passes an image).")] = "gradcam",
    target: Annotated[
        str | None, typer.Option("--class", help="Explain this class (folder or display name) [the predicted one].")
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help="Module name to explain, e.g. backbone.blocks.5 [the last conv block].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[Device, typer.Option()] = "auto",
) -> None:
    """Where the model looks: a class activation map per image, as an overlay PNG, its peak in the image's own
    pixels (explain.csv) and the raw map at the model's input size (heatmaps.npz)."""
    runs, paths = _runs_first(items, False, "images")
    if not paths:
        _fail("give images, folders or globs after the run")
    from imgtune.api import explain as run_explain

    result = run_explain(runs[0], paths, out, method=method, target=target, layer=layer, device=device,
                         batch_size=batch_size)  # fmt: skip
    typer.echo(f"{len(result.rows)} {result.method} map(s) of {result.layer} written to {result.out} "
               f"(overlays, explain.csv, heatmaps.npz)")  # fmt: skip
    if result.skipped:
        typer.echo(f"{len(result.skipped)} unreadable file(s) skipped:", err=True)
        for s in result.skipped:
            typer.echo(f"  {s['path']}: {s['reason']}", err=True)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint file.")],
    format: Annotated[
        str, typer.Option("--format", help="onnx, or timm: model.safetensors + config.json that timm loads.")
    ] = "onnx",
    out: Annotated[
        Path | None, typer.Option(help="Output [RUN/model.onnx, RUN/model.int8.onnx; --format timm: folder RUN/timm].")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    images: Annotated[
        list[Path] | None, typer.Option("--images", help="Images for the parity check [the run's data].")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Static int8 quantization, written only if it passes the accuracy guard.")
    ] = False,
    calibration: Annotated[int, typer.Option(help="--int8: training images to calibrate on.", min=1)] = 256,
    calibration_method: Annotated[
        str, typer.Option(help="--int8: auto (each in turn until one passes), minmax, entropy or percentile.")
    ] = "auto",
    calibration_images: Annotated[
        list[Path] | None,
        typer.Option("--calibration-images", help="--int8: calibrate on these files/folders [training images]."),
    ] = None,
) -> None:
    """Export to ONNX (uint8 RGB NCHW in, probabilities out, preprocessing inside), checked against PyTorch;
    with --int8, an int8 model checked against the fp32 one on the validation split."""
    if format not in ("onnx", "timm"):
        _fail(f"--format {format!r}: choose onnx or timm")
    if format == "timm":
        from imgtune.timm_export import export_timm

        t = export_timm(run, out, images)
        typer.echo(f"{t.folder}: model.safetensors + config.json ({t.architecture}); parity with imgtune on "
                   f"{t.images_checked} real images: max |Δp| {t.max_abs_diff:.1e}. "
                   f'Load it with timm.create_model("local-dir:{t.folder}", pretrained=True)')  # fmt: skip
        return
    if int8:
        from imgtune.quantize import export_int8

        q = export_int8(run, out, calibration=calibration, method=calibration_method, opset=opset,
                        calibration_images=calibration_images, progress=lambda line: typer.echo(line, err=True))  # fmt: skip
        typer.echo(f"{q.path}: int8 ({q.method} calibration, {q.calibration_images} images); {q.guard.describe()}")
        return
    from imgtune.export import PARITY_ATOL, export_onnx

    result = export_onnx(run, out, opset, images)
    typer.echo(
        f"{result.path}: opset {result.opset}; parity with PyTorch on {result.images_checked} real images: "
        f"max |Δp| {result.max_abs_diff:.1e} (limit {PARITY_ATOL:.0e}), same top-1"
    )


@app.command()
def serve(
    run: Annotated[
        Path, typer.Argument(help="Run folder or checkpoint (torch), or model.onnx / run folder (onnxruntime).")
    ],
    host: Annotated[str, typer.Option(help="Address to bind; other than loopback, a token is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    backend: Annotated[Backend, typer.Option(help="torch or onnxruntime.")] = "torch",
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body accepted.")] = 20.0,
    token: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer TOKEN' on every API call.")] = None,
    device: Annotated[Device, typer.Option()] = "auto",
    precision: Annotated[
        Precision, typer.Option(help="auto (bf16 where native, else fp32), fp32, bf16, fp16.")
    ] = "auto",
    read_timeout: Annotated[
        float,
        typer.Option(help="Seconds a client has to send a request's headers, and then its body (408 after).", min=0.1),
    ] = 30.0,
    max_active: Annotated[
        int, typer.Option(help="Requests handled at once; more get a 503 with Retry-After.", min=1)
    ] = 64,
) -> None:
    """Serve predictions over HTTP (POST /predict, GET /health, GET /classes) with a web page at /."""
    from imgtune.packages import need_all

    need_all(("fastapi", "uvicorn", "multipart"), "imgtune serve")
    from imgtune.serve import serve as run_server

    run_server(
        run, host=host, port=port, backend=backend, max_upload_mb=max_upload_mb, token=token, device=device,
        precision=precision, read_timeout_s=read_timeout, max_active=max_active,
    )  # fmt: skip


def main() -> None:
    try:
        app()
    except Interrupted as e:
        if env_rank() == 0:
            typer.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        teardown()  # leave torchrun's process group cleanly (nothing to do outside torchrun)
