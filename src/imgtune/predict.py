"""Prediction: a checkpoint becomes a `Predictor` (model + preprocessing + class names), which turns files
into probabilities and rows of a CSV. Evaluation runs through the same decoding and batching code.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from imgtune.data import decode_prepared
from imgtune.errors import UserError
from imgtune.explain import Explainer, ExplainError, Explanation, class_index, iter_explanations, make_explainer
from imgtune.files import atomic_write_text
from imgtune.images import ImageError, in_memory_rgb
from imgtune.layouts import DataError, list_files, natural_key, readable
from imgtune.metrics import EvalResult, compute_metrics
from imgtune.models import Classifier, model_from_checkpoint
from imgtune.runtime import autocast, inference_dtype, pick_device, tune_allocator
from imgtune.transforms import Preprocessing, prepare

log = logging.getLogger(__name__)
# decode a batch on several threads only when one image costs more than this on one thread: for small images
# (a 28-px PNG: 0.3 ms) the threads' hand-offs cost more than they share (measured: 800 against 878 images/s)
PARALLEL_DECODE_S = 0.001


class InputError(UserError, ValueError):
    """A path given to predict matches nothing."""


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders recursively (hidden entries skipped), globs ('**' allowed); order kept,
    duplicates dropped. Images are judged by content when decoded, so no extension filter here."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_files(p)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(item)):
            found = []
            for m in sorted(glob.glob(str(item), recursive=True)):
                mp = Path(m)
                found += list_files(mp) if mp.is_dir() else [mp]
        else:
            raise InputError(f"{item}: no such file or folder, and no glob pattern")
        if not found:
            log.warning("%s: no files found", item)
        out += found
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


class _Decoded(Dataset[tuple[torch.Tensor | None, int, str]]):
    def __init__(self, paths: Sequence[Path], prep: Preprocessing) -> None:
        self.paths, self.prep = list(paths), prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return decode_prepared(self.paths[i], self.prep), i, ""
        except ImageError as e:
            return None, i, e.reason


def _collate(
    items: list[tuple[torch.Tensor | None, int, str]],
) -> tuple[torch.Tensor | None, list[int], list[Any]]:
    good = [(t, i) for t, i, _ in items if t is not None]
    bad = [(i, r) for t, i, r in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], bad


def decoded_batches(
    paths: Sequence[Path], prep: Preprocessing, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]]:
    """(images, their indices into paths, [(index, reason)] of unreadable ones).

    workers > 0: decoded in that many processes, overlapping the model's compute (many cores). workers = 0
    (the default on 2 cores): the model waits while a batch decodes, then runs on all cores, so the two never
    compete for a core; a batch is shared between one thread per core (Pillow and the resize release the GIL)
    when an image costs more than PARALLEL_DECODE_S to decode, else decoded in this thread. Measured on 2
    cores with the int8 model (benchmarks/results/predict_path.md): threads gave 1.4-1.6x images/s on JPEG
    photos and 1.8x on 12-MP camera JPEGs, and lost 2-9% on 28-px PNGs; decoding the next batch while the model
    runs gained nothing, and a decoding process lost (530-560 against 610-630 images/s, torch fp32). torch's
    own threads are set to one while a batch decodes: a small image's resize is too short to split (decoding
    alone ran 10-15% faster)."""
    if workers > 0:
        loader = DataLoader(
            _Decoded(paths, prep), batch_size=batch_size, num_workers=workers, collate_fn=_collate, shuffle=False
        )
        yield from loader
        return
    dataset = _Decoded(paths, prep)
    threads = max(1, min(8, os.cpu_count() or 1))
    model_threads = torch.get_num_threads()
    cost: float | None = None  # seconds one image took to decode on one thread, in the last batch

    def decode(indices: range) -> list[tuple[torch.Tensor | None, int, str]]:
        return [dataset[i] for i in indices]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(paths), batch_size):
            batch = range(start, min(start + batch_size, len(paths)))
            torch.set_num_threads(1)  # one core per decoding thread: the resize's own threads only contended
            try:
                items = []
                if cost is None:  # the first image, alone, tells what decoding costs here
                    t0 = time.perf_counter()
                    items, batch = decode(batch[:1]), batch[1:]
                    cost = time.perf_counter() - t0
                parallel = threads > 1 and cost > PARALLEL_DECODE_S
                t0 = time.perf_counter()
                shares = pool.map(decode, [batch[k::threads] for k in range(threads)]) if parallel else [decode(batch)]
                items += [item for share in shares for item in share]
                if len(batch):
                    cost = (time.perf_counter() - t0) * (threads if parallel else 1) / len(batch)
            finally:
                torch.set_num_threads(model_threads)
            yield _collate(sorted(items, key=lambda item: item[1]))


@dataclass
class Scores:
    logits: torch.Tensor  # N x classes log-probabilities of the decodable inputs
    kept: list[int]  # their indices into the inputs
    skipped: list[dict[str, str]]  # unreadable inputs: {path, reason}
    plain: torch.Tensor | None = None  # with TTA: the single-view log-probabilities


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation views of prepared uint8 images: the image, its mirror, a 1.15x zoom on the
    centre (multi-scale: the object larger, the border cropped away) and that zoom's mirror. The first view is
    exactly what prediction without TTA sees."""
    from torchvision.transforms.v2 import functional as TF

    s = images.shape[-1]
    inner = max(1, round(s / 1.15))
    zoom = TF.resize(TF.center_crop(images, [inner, inner]), [s, s], antialias=True)
    return [images, images.flip(-1), zoom, zoom.flip(-1)]


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def confidence(self) -> float:
        return self.top[0][1]


class Predictor:
    """Turns image files into class probabilities; the backends (PyTorch, ONNX Runtime) supply `logits`."""

    def __init__(self, prep: Preprocessing, classes: list[str], display_names: list[str] | None = None) -> None:
        # classes: the folder names (what data is matched by); display_names: what people read
        self.prep, self.classes = prep, classes
        self.display_names = [readable(n) for n in display_names or classes]
        self.checkpoint: dict[str, Any] = {}
        self.backend = "none"
        self.temperature = 1.0  # temperature scaling fitted with --calibrate (in the checkpoint)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S (prepared) -> N x classes scores whose softmax is the probabilities
        (temperature scaling included)."""
        raise NotImplementedError

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Softmax probabilities; with tta, averaged over `tta_views`."""
        if not tta:
            return self.logits(images).softmax(1)
        return torch.stack([self.logits(v).softmax(1) for v in tta_views(images)]).mean(0)

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(k, len(self.classes)))
        values, idx = probs.topk(k, dim=1)
        return [
            [(self.display_names[c], float(p)) for p, c in zip(pr.tolist(), ix.tolist(), strict=True)]
            for pr, ix in zip(values, idx, strict=True)
        ]

    def scores_for_paths(
        self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None, tta: bool = False
    ) -> Scores:
        """Log-probabilities for every decodable path (TTA-averaged with tta), the indices they belong to, the
        unreadable files; decoding runs in worker processes, overlapping the model's compute."""
        if workers is None:
            workers = 0 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) - 1)
        chunks: list[torch.Tensor] = []
        plain: list[torch.Tensor] = []
        kept: list[int] = []
        skipped: list[dict[str, str]] = []
        for images, idx, bad in decoded_batches(paths, self.prep, batch_size, workers):
            for i, reason in bad:
                log.warning("skipped unreadable image %s: %s", paths[i], reason)
                skipped.append({"path": str(paths[i]), "reason": reason})
            if images is None:
                continue
            with torch.inference_mode():
                if tta:
                    views = [self.logits(v).log_softmax(1) for v in tta_views(images)]
                    plain.append(views[0])
                    chunks.append(torch.stack(views).exp().mean(0).clamp_min(1e-12).log())
                else:
                    chunks.append(self.logits(images).log_softmax(1))
            kept += idx
        empty = torch.empty(0, len(self.classes))
        single = (torch.cat(plain) if plain else empty) if tta else None
        return Scores(torch.cat(chunks) if chunks else empty, kept, skipped, single)

    def evaluate(
        self,
        pairs: Sequence[tuple[Path, str]],
        split: str = "test",
        batch_size: int = 64,
        workers: int | None = None,
        tta: bool = False,
    ) -> EvalResult:
        """Metrics on (file, class name) pairs; classes are matched to the model's by name."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({c for _, c in pairs if c not in index})
        if unknown:
            raise DataError(f"class(es) {unknown} in the {split} data are not classes of this model ({self.classes})")
        paths = [p for p, _ in pairs]
        sc = self.scores_for_paths(paths, batch_size, workers, tta)
        labels = torch.tensor([index[pairs[i][1]] for i in sc.kept], dtype=torch.long)
        return compute_metrics(
            sc.logits, labels, self.display_names, split, sc.skipped, paths=[str(paths[i]) for i in sc.kept],
            temperature=self.temperature, plain_logits=sc.plain,
        )  # fmt: skip

    def predict(
        self,
        paths: Sequence[Path],
        top_k: int = 3,
        batch_size: int = 64,
        workers: int | None = None,
        tta: bool = False,
    ) -> tuple[list[Prediction], list[dict[str, str]]]:
        sc = self.scores_for_paths(paths, batch_size, workers, tta)
        tops = self.top_k(sc.logits.softmax(1), top_k)
        return [Prediction(str(paths[i]), top) for i, top in zip(sc.kept, tops, strict=True)], sc.skipped

    def __call__(
        self, images: Any, top_k: int = 5, batch_size: int = 64, tta: bool = False
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Classify like a Hugging Face pipeline: one image (a path, a PIL image, an H x W x C array, a C x H x W
        tensor) -> [{"label", "score"}, ...] best first; a list of them, an N x H x W x C array or an
        N x C x H x W tensor -> one such list per image. An unreadable file raises ImageError naming it."""
        batch, single = as_image_list(images)
        prepared = [self._prepared(x, i) for i, x in enumerate(batch)]
        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(prepared), batch_size):
            probs = self.probabilities(torch.stack(prepared[start : start + batch_size]), tta=tta)
            out += [[{"label": label, "score": p} for label, p in top] for top in self.top_k(probs, top_k)]
        return out[0] if single else out

    def _prepared(self, image: Any, index: int) -> torch.Tensor:
        if isinstance(image, str | Path):
            return decode_prepared(Path(image), self.prep)
        return prepare(in_memory_rgb(image, f"image {index}"), self.prep)

    def explainer(self, method: str = "gradcam", layer: str | None = None) -> Explainer:
        """The map maker: explain.METHODS; Grad-CAM at `layer` (None: the last convolutional block)."""
        raise ExplainError(
            f"explanations need the PyTorch model's gradients, which {self.backend} does not give: "
            "explain with the run folder or its best.pt"
        )

    def iter_explanations(
        self, paths: Sequence[Path], explainer: Explainer, *, target: str | None = None, batch_size: int = 16,
        skipped: list[dict[str, str]] | None = None,
    ) -> Iterator[tuple[Explanation, torch.Tensor]]:  # fmt: skip
        """(explanation, decoded image) per readable path, a batch at a time: see `explain`."""
        index = None if target is None else class_index(target, self.classes, self.display_names)
        return iter_explanations(explainer, self.prep, paths, self.display_names, target=index,
                                 temperature=self.temperature, batch_size=batch_size, skipped=skipped)  # fmt: skip

    def explain(
        self, paths: Sequence[Path | str], *, method: str = "gradcam", target: str | None = None,
        layer: str | None = None, batch_size: int = 16,
    ) -> tuple[list[Explanation], list[dict[str, str]]]:  # fmt: skip
        """Maps of where the evidence is (explain.METHODS: Grad-CAM at `layer`, None: the last convolutional
        block; or occlusion) for the predicted class or `target` (a class name); unreadable files are skipped
        and listed."""
        skipped: list[dict[str, str]] = []
        found = self.iter_explanations([Path(p) for p in paths], self.explainer(method, layer), target=target,
                                       batch_size=batch_size, skipped=skipped)  # fmt: skip
        return [e for e, _ in found], skipped


def as_image_list(images: Any) -> tuple[list[Any], bool]:
    """(the images one by one, whether a single image was given): a list/tuple is many, a 4-D array or
    tensor is a batch, anything else is one image."""
    if isinstance(images, list | tuple):
        return list(images), False
    if isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


class TorchPredictor(Predictor):
    """A Classifier in eval mode, channels_last (measured here: 1.7x faster CPU inference than NCHW), under
    the inference precision (`runtime.inference_dtype`: bf16 where the hardware runs it natively)."""

    def __init__(
        self,
        model: Classifier,
        prep: Preprocessing,
        classes: list[str],
        device: torch.device,
        display_names: list[str] | None = None,
        precision: str = "auto",
    ) -> None:
        super().__init__(prep, classes, display_names)
        tune_allocator()
        self.device = device
        self.dtype = inference_dtype(precision, device)
        self.model = model.to(device).eval()
        self.model.use_channels_last()
        self.backend = "torch" if self.dtype is None else f"torch ({str(self.dtype).removeprefix('torch.')})"

    @classmethod
    def load(cls, run: Path | str, device: str = "auto", precision: str = "auto") -> TorchPredictor:
        path = resolve_checkpoint(Path(run))
        ckpt = load_checkpoint(path)
        predictor = cls(
            model_from_checkpoint(ckpt), ckpt.preprocessing, ckpt.classes, pick_device(device), ckpt.display_names,
            precision,
        )  # fmt: skip
        predictor.temperature = ckpt.temperature
        predictor.checkpoint = {**ckpt.describe(), "path": str(path)}
        return predictor

    def explainer(self, method: str = "gradcam", layer: str | None = None) -> Explainer:
        return make_explainer(self.model, self.prep.img_size, method, layer)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            out: torch.Tensor = self.model(images.to(self.device, non_blocking=True)).float().cpu()
        return out / self.temperature if self.temperature != 1.0 else out


class OnnxPredictor(Predictor):
    """An exported model (imgtune export) run by ONNX Runtime; class names and preprocessing come from its
    metadata, so the .onnx file is all it needs."""

    def __init__(self, path: Path) -> None:
        from imgtune.packages import need

        ort = need("onnxruntime", f"running {path.name} (an ONNX model)")
        from imgtune.export import INPUT, unreadable

        try:  # the metadata comes from the session: importing onnx to read it cost 0.7 s of a predict's start
            session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        except Exception as e:  # a damaged or foreign file: ORT's InvalidProtobuf, Fail, ...
            raise unreadable(path, e) from None
        meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        if "preprocessing" not in meta or "classes" not in meta:
            raise CheckpointError(f"{path}: not an imgtune ONNX export (no classes/preprocessing metadata)")
        folders = json.loads(meta.get("class_folders", meta["classes"]))
        super().__init__(
            Preprocessing.from_dict(json.loads(meta["preprocessing"])), folders, json.loads(meta["classes"])
        )
        self.session = session
        self.input_name = INPUT
        self.metadata = meta
        self.precision = meta.get("precision", "fp32")  # "int8" for imgtune export --int8
        self.backend = "onnxruntime" if self.precision == "fp32" else f"onnxruntime ({self.precision})"
        self.checkpoint = {"path": str(path)}

    @classmethod
    def load(cls, run: Path | str) -> OnnxPredictor:
        """RUN may be the .onnx file or a run folder holding model.onnx (imgtune export RUN writes it)."""
        path = Path(run)
        if path.is_dir():
            path = path / "model.onnx"
            if not path.is_file():
                raise CheckpointError(f"{path}: not found; create it with: imgtune export {run}")
        elif path.suffix != ".onnx":
            raise CheckpointError(f"{path}: the onnxruntime backend needs an .onnx file or a run folder")
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        return cls(path)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        probs = self.session.run(None, {self.input_name: images.numpy()})[0]
        return torch.from_numpy(probs).clamp_min(1e-12).log()  # log-probabilities: softmax gives them back


class EnsemblePredictor(Predictor):
    """Weighted mean of several models' probabilities. Each member keeps its own preprocessing (input size,
    mean/std) and temperature, so different architectures and sizes combine; classes are matched by name."""

    def __init__(self, members: Sequence[Predictor], weights: Sequence[float] | None = None) -> None:
        if len(members) < 2:
            raise InputError("an ensemble needs at least two runs")
        first = members[0]
        for m in members[1:]:
            if sorted(m.classes) != sorted(first.classes):
                raise InputError(
                    f"{m.checkpoint.get('path', 'a run')} has classes {m.classes}, but "
                    f"{first.checkpoint.get('path', 'the first run')} has {first.classes}: they cannot be ensembled"
                )
        w = list(weights) if weights is not None else [1.0] * len(members)
        if len(w) != len(members) or any(x < 0 for x in w) or sum(w) <= 0:
            raise InputError(f"ensemble weights {w}: need one non-negative weight per run ({len(members)}), not all 0")
        super().__init__(first.prep, first.classes, first.display_names)
        self.members = list(members)
        self.weights = [x / sum(w) for x in w]
        self.backend = "ensemble of " + ", ".join(m.backend for m in members)
        self.checkpoint = {"path": " + ".join(str(m.checkpoint.get("path", "?")) for m in members)}
        # column order of each member -> the first member's class order
        self.columns = [[m.classes.index(c) for c in first.classes] for m in members]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise InputError("an ensemble takes files (each member decodes at its own size), not a prepared batch")

    def scores_for_paths(
        self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None, tta: bool = False
    ) -> Scores:
        parts = [m.scores_for_paths(paths, batch_size, workers, tta) for m in self.members]
        common = sorted(set.intersection(*(set(p.kept) for p in parts)))  # unreadable for any member: skipped

        def mix(tensors: list[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros(len(common), len(self.classes))
            for t, part, cols, w in zip(tensors, parts, self.columns, self.weights, strict=True):
                where = {k: j for j, k in enumerate(part.kept)}
                rows = [where[i] for i in common]
                total += w * t[rows][:, cols].exp()
            return total.clamp_min(1e-12).log()

        skipped = {s["path"]: s for p in parts for s in p.skipped}
        plain = mix([p.plain for p in parts if p.plain is not None]) if tta else None
        return Scores(mix([p.logits for p in parts]), common, list(skipped.values()), plain)


def load_predictor(run: Path | str, device: str = "auto", backend: str = "torch", precision: str = "auto") -> Predictor:
    """precision (torch backend): auto, fp32, bf16 or fp16, as `runtime.inference_dtype` reads it. An .onnx
    file always goes to onnxruntime (torch cannot read it), wherever a run or checkpoint is accepted."""
    if backend == "torch" and Path(run).suffix.lower() == ".onnx":
        log.info("%s is an ONNX model: using the onnxruntime backend", run)
        backend = "onnxruntime"
    if backend == "torch":
        return TorchPredictor.load(run, device, precision)
    if backend == "onnxruntime":
        return OnnxPredictor.load(run)
    raise ValueError(f"backend {backend!r} is not one of torch, onnxruntime")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A cell a spreadsheet would run as a formula gets a leading apostrophe (OWASP's CSV-injection advice)."""
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A CSV of dict rows under `columns` (other keys left out), text cells spreadsheet-safe."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def predictions_csv(rows: Sequence[Prediction], top_k: int) -> str:
    header = ["path", "label", "confidence"]
    for r in range(2, top_k + 1):
        header += [f"top{r}_label", f"top{r}_confidence"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[str] = [spreadsheet_safe(row.path)]
        for label, p in row.top[:top_k]:
            cells += [spreadsheet_safe(label), f"{p:.6f}"]
        cells += [""] * (len(header) - len(cells))
        writer.writerow(cells)
    return buf.getvalue()


def submission_csv(rows: Sequence[Prediction], id_from: str = "stem", columns: Sequence[str] = ("id", "label")) -> str:
    """Kaggle-style `id,label` (or the competition's own header, e.g. food-11's Id,Category): the id is the file's
    stem ("stem"), name ("name") or path ("path"); rows in natural order of the ids (0002 before 0010)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(columns))
    idents = []
    for row in rows:
        path = Path(row.path)
        idents.append(({"stem": path.stem, "name": path.name, "path": row.path}[id_from], row.label))
    for ident, label in sorted(idents, key=lambda r: natural_key(r[0])):
        writer.writerow([spreadsheet_safe(ident), spreadsheet_safe(label)])
    return buf.getvalue()


def write_predictions(path: Path, text: str) -> None:
    atomic_write_text(Path(path), text)
