"""`imgtune data issues`: the images to look at before training - likely wrong labels, near-duplicates within
a split, outliers - and `train --exclude / --relabel`, which act on what was found.

Everything comes from one pass over the labelled images: a backbone's features (the pretrained default, or a
trained run's backbone) feed K cross-validated linear heads (confident.py) for the label issues and, by their
cosine distances, the outliers (far from all their neighbours); `data check`'s fingerprints of the same decoded
pixels give the near-duplicates.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtune.audit import fingerprint, near_pairs
from imgtune.confident import find_label_issues, out_of_fold_probabilities
from imgtune.config import Config
from imgtune.data import decode_many
from imgtune.features import extract_features, tensor_batches
from imgtune.files import atomic_write_text
from imgtune.layouts import DataError, Sample, Split, load_split
from imgtune.models import Classifier, create_model, model_from_checkpoint
from imgtune.predict import FORMULA_START, rows_csv
from imgtune.runtime import inference_dtype, pick_device
from imgtune.transforms import Preprocessing

log = logging.getLogger(__name__)
DUPLICATE_TOLERANCE = 3  # near-duplicates: thumbnails within this many grey levels (data check's default)
NEIGHBOURS = 10  # an outlier's score: its mean cosine distance to this many nearest images
OUTLIER_Z = 6.0  # flagged when the score is this many robust deviations (1.4826 MAD) above the median
CHUNK = 1024  # images decoded at a time; rows of a similarity matrix at a time
THUMB = 96


@dataclass
class IssuesResult:
    issues: list[dict[str, Any]]  # path, split, given, suggested, score (p of the given label), p_suggested
    duplicates: list[dict[str, Any]]  # split, path, duplicate_of, mean_abs_diff (grey levels)
    outliers: list[dict[str, Any]]  # path, split, label, score
    images: int
    classes: list[str]
    seconds: float
    weight_decay: float
    features: str  # what the features came from
    skipped: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"{self.images} labelled images, {len(self.classes)} classes; features: {self.features}; "
                 f"{self.seconds:.1f} s"]  # fmt: skip
        lines.append(f"{len(self.issues)} likely label issue(s) (confident learning on out-of-fold probabilities)")
        for row in self.issues[:10]:
            lines.append(f"  {row['path']}: labelled {row['given']}, looks like {row['suggested']} "
                         f"(p given {row['score']:.3f}, suggested {row['p_suggested']:.3f})")  # fmt: skip
        lines.append(f"{len(self.duplicates)} near-duplicate pair(s) within a split (16 x 16 thumbnails within "
                     f"{DUPLICATE_TOLERANCE} grey levels)")  # fmt: skip
        lines += [f"  {d['path']} ~ {d['duplicate_of']}" for d in self.duplicates[:5]]
        lines.append(f"{len(self.outliers)} outlier(s)")
        lines += [f"  {o['path']} ({o['label']}, score {o['score']:.3f})" for o in self.outliers[:5]]
        lines += [f"{what}: {path}" for what, path in self.files.items()]
        return "\n".join(lines)


def _labelled(split: Split) -> list[tuple[str, Sample]]:
    return [(name, s) for name in ("train", "valid") for s in split.subsets()[name] if s.label >= 0]


def _backbone(cfg: Config, run: Path | None, classes: int) -> tuple[Classifier, Preprocessing, str]:
    if run is not None:
        from imgtune.checkpoint import load_checkpoint, resolve_checkpoint

        ckpt = load_checkpoint(resolve_checkpoint(run))
        return model_from_checkpoint(ckpt), ckpt.preprocessing, f"the backbone of {run}"
    model = create_model(cfg.model.name, classes, pretrained=cfg.model.pretrained, weights=cfg.model.weights)
    origin = "pretrained" if cfg.model.pretrained or cfg.model.weights else "random"
    return model, model.preprocessing(cfg.data.img_size, cfg.data.resize), f"{cfg.model.name} ({origin})"


def _features(
    model: Classifier, prep: Preprocessing, device: torch.device, paths: list[Path], batch_size: int
) -> tuple[torch.Tensor, list[tuple[int, np.ndarray]], list[Any], list[int]]:
    """(features, fingerprints, unreadable files, indices of the readable paths), decoding CHUNK images at a
    time so that a large folder never sits in memory as pixels."""
    feats, prints, skipped, kept = [], [], [], []
    for start in range(0, len(paths), CHUNK):
        images, ok, bad = decode_many(paths[start : start + CHUNK], prep)
        skipped += bad
        kept += [start + i for i in ok]
        batches = tensor_batches(images, torch.zeros(len(images), dtype=torch.long), batch_size, shuffle=False)
        f, _ = extract_features(model, batches, device, inference_dtype("auto", device))
        feats.append(f)
        prints += [fingerprint(img) for img in images]
    return torch.cat(feats), prints, skipped, kept


def _near_duplicates(prints: list[tuple[int, np.ndarray]], names: list[str], paths: list[str]) -> list[dict[str, Any]]:
    """Pairs within one split that are the same picture resized or re-encoded: `data check`'s fingerprints
    (dHash, then 16 x 16 grey thumbnails within DUPLICATE_TOLERANCE grey levels), here within a split. Backbone
    features were tried first and missed: a resized copy of a noisy image scored 0.90 cosine similarity,
    below different images of the same class (0.97)."""
    found = []
    for split in ("train", "valid"):
        idx = [i for i, n in enumerate(names) if n == split]
        for i, j, mad in near_pairs([prints[k] for k in idx], None, DUPLICATE_TOLERANCE):
            found.append({"split": split, "path": paths[idx[j]], "duplicate_of": paths[idx[i]],
                          "mean_abs_diff": round(mad, 2)})  # fmt: skip
    return sorted(found, key=lambda d: d["mean_abs_diff"])


def _outlier_scores(unit: torch.Tensor) -> np.ndarray:
    """Mean cosine distance of each image to its NEIGHBOURS nearest others."""
    k = min(NEIGHBOURS, len(unit) - 1)
    scores = np.empty(len(unit), dtype=np.float64)
    for start in range(0, len(unit), CHUNK):
        sim = unit[start : start + CHUNK] @ unit.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -2.0  # not its own neighbour
        scores[start : start + len(sim)] = (1 - sim.topk(k, dim=1).values).mean(1).numpy()
    return scores


def _outliers(scores: np.ndarray) -> np.ndarray:
    median = np.median(scores)
    spread = 1.4826 * np.median(np.abs(scores - median)) or 1e-12
    z = (scores - median) / spread
    found = np.flatnonzero(z > OUTLIER_Z)
    return found[np.argsort(-scores[found])]


# long: one pass over the data, then the three analyses on its features, in order
def find_issues(
    cfg: Config, *, run: Path | None = None, folds: int = 5, out: Path | None = None, html_page: bool = False,
    batch_size: int = 64, max_score: float | None = None,
) -> IssuesResult:  # fmt: skip
    """Label issues, near-duplicates and outliers among DATA's labelled training and validation images; with
    `out`, issues.csv there and near_duplicates.csv, outliers.csv (and issues.html) beside it. max_score: keep
    only the issues whose given label has at most this out-of-fold probability (the surest ones)."""
    if folds < 2:
        raise DataError(f"--folds {folds}: cross-validation needs at least 2 folds")
    started = time.perf_counter()
    dcfg = cfg.data
    split = load_split(dcfg.path, dcfg.valid_fraction, cfg.seed, dcfg.split_file, dcfg.label_rule())
    entries = _labelled(split)
    counts = np.bincount([s.label for _, s in entries], minlength=len(split.classes))
    if len(entries) < 2 * folds or (counts[counts > 0] < folds).any():
        shown = dict(zip(split.classes, counts.tolist(), strict=True))
        raise DataError(f"{dcfg.path}: every class needs at least {folds} labelled images for {folds}-fold "
                        f"cross-validation (counts {shown})")  # fmt: skip
    device = pick_device(cfg.device)
    model, prep, source = _backbone(cfg, run, len(split.classes))
    model.to(device).use_channels_last()
    feats, prints, skipped, kept = _features(model, prep, device, [s.path for _, s in entries], batch_size)
    entries = [entries[i] for i in kept]
    labels = np.array([s.label for _, s in entries], dtype=np.int64)
    probs, wd = out_of_fold_probabilities(feats, labels, len(split.classes), folds, cfg.seed)
    paths = [str(s.path) for _, s in entries]
    names = [n for n, _ in entries]
    issues = []
    for i in find_label_issues(labels, probs):
        if max_score is not None and probs[i, labels[i]] > max_score:
            continue
        best = int(probs[i].argmax())
        issues.append({"path": paths[i], "split": names[i], "given": split.classes[labels[i]],
                       "suggested": split.classes[best], "score": round(float(probs[i, labels[i]]), 6),
                       "p_suggested": round(float(probs[i, best]), 6)})  # fmt: skip
    unit = torch.nn.functional.normalize(feats.float(), dim=1)
    duplicates = _near_duplicates(prints, names, paths)
    scores = _outlier_scores(unit)
    outliers = [{"path": paths[i], "split": names[i], "label": split.classes[labels[i]],
                 "score": round(float(scores[i]), 6)} for i in _outliers(scores)]  # fmt: skip
    result = IssuesResult(issues, duplicates, outliers, len(entries), list(split.classes),
                          time.perf_counter() - started, wd, source,
                          [{"path": s.path, "reason": s.reason} for s in skipped])  # fmt: skip
    if out is not None:
        _write(result, Path(out), html_page, probs, labels, paths)
    return result


def _write(
    result: IssuesResult, out: Path, html_page: bool, probs: np.ndarray, labels: np.ndarray, paths: list[str]
) -> None:
    folder = out.parent
    files = {
        "label issues": out,
        "near-duplicates": folder / "near_duplicates.csv",
        "outliers": folder / "outliers.csv",
    }
    atomic_write_text(out, rows_csv(result.issues, ["path", "given", "suggested", "score", "p_suggested", "split"]))
    columns = ["path", "duplicate_of", "mean_abs_diff", "split"]
    atomic_write_text(files["near-duplicates"], rows_csv(result.duplicates, columns))
    atomic_write_text(files["outliers"], rows_csv(result.outliers, ["path", "label", "score", "split"]))
    if html_page:
        files["review page"] = out.with_suffix(".html")
        atomic_write_text(files["review page"], review_page(result, probs, labels, paths))
    result.files = files


def _thumb(path: str) -> str:
    """A THUMB-px JPEG as a data URI: the page works offline and alone."""
    from PIL import Image

    from imgtune.images import ImageError, load_rgb

    try:
        image = load_rgb(Path(path), draft_size=THUMB)
    except ImageError:
        return ""
    im = Image.fromarray(image.permute(1, 2, 0).numpy())
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def review_page(result: IssuesResult, probs: np.ndarray, labels: np.ndarray, paths: list[str], limit: int = 200) -> str:
    """issues.html: each flagged image beside the most typical image of its given class and of the
    suggested one (the highest out-of-fold probability among images labelled so), then the duplicates."""
    esc = html.escape
    typical = {}
    for c, name in enumerate(result.classes):
        members = np.flatnonzero(labels == c)
        if len(members):
            typical[name] = paths[int(members[np.argmax(probs[members, c])])]
    cells = []
    for row in result.issues[:limit]:
        given, suggested = esc(row["given"]), esc(row["suggested"])
        figs = [
            (row["path"], f"this image<br>labelled <b>{given}</b> (p {row['score']:.2f})"),
            (typical.get(row["given"], ""), f"a typical {given}"),
            (typical.get(row["suggested"], ""), f"a typical <b>{suggested}</b> (p {row['p_suggested']:.2f})"),
        ]
        imgs = "".join(f"<figure><img src='{_thumb(p)}' alt='{esc(p)}'><figcaption>{c}</figcaption></figure>"
                       for p, c in figs if p)  # fmt: skip
        cells.append(f"<div class='issue'><p class='path'>{esc(row['path'])}</p>{imgs}</div>")
    dups = "".join(
        f"<div class='issue'><p class='path'>{esc(d['path'])} ~ {esc(d['duplicate_of'])}</p>"
        f"<figure><img src='{_thumb(d['path'])}' alt=''></figure><figure><img src='{_thumb(d['duplicate_of'])}' alt=''>"
        "</figure></div>" for d in result.duplicates[:50]
    )  # fmt: skip
    more = f"<p>{len(result.issues) - limit} more in issues.csv</p>" if len(result.issues) > limit else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>imgtune: data issues</title>
<style>body{{font-family:system-ui,sans-serif;margin:16px;color:#1d2430}}.issue{{display:inline-block;vertical-align:top;
margin:8px;padding:8px;border:1px solid #d0d5dd;border-radius:8px;max-width:340px}}figure{{display:inline-block;
margin:4px;text-align:center;font-size:12px;width:100px}}img{{width:96px;height:96px;object-fit:contain;
background:#eee}}.path{{font-size:11px;overflow-wrap:anywhere;margin:0}}</style></head><body>
<h1>Data issues</h1><p>{result.images} images, {len(result.classes)} classes, features: {esc(result.features)}.
{len(result.issues)} likely label issue(s), most suspicious first; {len(result.duplicates)} near-duplicate pair(s);
{len(result.outliers)} outlier(s).</p><h2>Label issues</h2>{"".join(cells)}{more}
<h2>Near-duplicates</h2>{dups or "<p>none</p>"}</body></html>
"""


# -------------------------------------------------------------------------------- acting on it: train


def _read_rows(file: Path) -> list[dict[str, str]] | list[str]:
    """A CSV with a header (dict rows) when its first line names a `path` column, else one path a line."""
    text = file.read_text(encoding="utf-8-sig", errors="surrogateescape")  # -sig: a spreadsheet's BOM
    first = text.splitlines()[0] if text.strip() else ""
    if "path" in [c.strip().lower() for c in next(csv.reader([first]), [])]:
        return [
            {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            for row in csv.DictReader(io.StringIO(text))
        ]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _resolver(root: Path) -> Any:
    def resolve(value: str) -> Path:
        if value.startswith("'") and value[1:2] in FORMULA_START:
            value = value[1:]  # the apostrophe our CSVs put before a cell a spreadsheet would run
        p = Path(value)
        if not p.is_absolute() and not p.exists() and (root / p).exists():
            p = root / p
        return p.resolve()

    return resolve


@dataclass
class Curation:
    """What --exclude and --relabel changed: kept in the run folder (exclude.txt, relabel.csv) and summary.json."""

    excluded: list[str] = field(default_factory=list)  # resolved paths left out
    relabelled: list[tuple[str, str]] = field(default_factory=list)  # (resolved path, new class)
    record: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> dict[str, Path]:
        """RUN/exclude.txt and RUN/relabel.csv: exactly what was applied, which a resume re-applies."""
        files = {}
        if "exclude_file" in self.record:
            files["exclude"] = folder / "exclude.txt"
            atomic_write_text(files["exclude"], "".join(f"{p}\n" for p in self.excluded))
        if "relabel_file" in self.record:
            files["relabel"] = folder / "relabel.csv"
            atomic_write_text(
                files["relabel"], rows_csv([{"path": p, "label": c} for p, c in self.relabelled], ["path", "label"])
            )
        return files


def curate(split: Split, exclude: Path | None, relabel: Path | None) -> tuple[Split, Curation]:
    """The split without the excluded images and with the new labels, in train and valid (the test split is
    what the run is judged on: left as it is)."""
    if exclude is None and relabel is None:
        return split, Curation()
    for given in (exclude, relabel):
        if given is not None and not Path(given).is_file():
            raise DataError(f"{given}: no such file")
    resolve = _resolver(split.root)
    known = {s.path.resolve(): s for name in ("train", "valid") for s in split.subsets()[name]}
    record: dict[str, Any] = {}
    drop: set[Path] = set()
    if exclude is not None:
        rows = _read_rows(exclude)
        listed = {resolve(r["path"] if isinstance(r, dict) else r) for r in rows}
        drop = listed & set(known)
        record.update(exclude_file=str(exclude), excluded=len(drop), exclude_unmatched=len(listed - drop))
        if listed - drop:
            log.warning("%s: %d of its %d paths are not training or validation images of %s (e.g. %s)", exclude,
                        len(listed - drop), len(listed), split.root, sorted(listed - drop)[0])  # fmt: skip
    relabels: dict[Path, int] = {}
    if relabel is not None:
        index = {c: i for i, c in enumerate(split.classes)}
        for n, row in enumerate(_read_rows(relabel), start=2):
            if not isinstance(row, dict) or not (row.get("label") or row.get("suggested")):
                raise DataError(f"{relabel}: needs a header with path and label (or suggested) columns")
            label = row.get("label") or row.get("suggested", "")
            if label not in index:
                raise DataError(f"{relabel}, line {n}: {label!r} is not a class ({', '.join(split.classes)})")
            path = resolve(row["path"])
            if path in known and path not in drop:
                relabels[path] = index[label]
        record.update(relabel_file=str(relabel), relabelled=sum(known[p].label != c for p, c in relabels.items()))

    def kept(samples: list[Sample]) -> list[Sample]:
        out = []
        for s in samples:
            p = s.path.resolve()
            if p not in drop:
                out.append(replace(s, label=relabels[p]) if p in relabels else s)
        return out

    curated = replace(split, train=kept(split.train), valid=kept(split.valid))
    log.info("curated: %s", ", ".join(f"{k} {v}" for k, v in record.items() if not k.endswith("_file")))
    changed = [(str(p), split.classes[c]) for p, c in sorted(relabels.items()) if known[p].label != c]
    return curated, Curation(sorted(str(p) for p in drop), changed, record)
