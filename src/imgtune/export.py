"""ONNX export with the preprocessing inside the graph, and a parity check against onnxruntime.

The exported model takes what any image library produces after the run's resize rule (centre crop by default,
or squash, or letterbox: the metadata says which): RGB, NCHW, uint8,
at the training size (`image`: [batch, 3, S, S]); it normalises inside the graph and outputs softmax
probabilities (`probabilities`: [batch, classes]). Class names and preprocessing travel in the model's
metadata, so a consumer needs nothing but the .onnx file.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtune.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from imgtune.data import decode_prepared
from imgtune.errors import UserError
from imgtune.files import atomic_write_bytes
from imgtune.images import ImageError
from imgtune.layouts import DataError, list_files
from imgtune.models import Classifier, model_from_checkpoint

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4  # max |p_torch - p_onnxruntime| over all classes and images
INPUT, OUTPUT = "image", "probabilities"


class ExportError(UserError, RuntimeError):
    """Export failed or the exported model does not match the PyTorch model."""


class _Probabilities(nn.Module):
    def __init__(self, model: Classifier, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature  # from --calibrate; 1 = none

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.model(image) / self.temperature).softmax(dim=1)


@dataclass
class ExportResult:
    path: Path
    images_checked: int
    max_abs_diff: float
    top1_agree: bool
    opset: int


def _check_images(ckpt: Checkpoint, images: list[Path] | None, limit: int = 16) -> torch.Tensor:
    """Real images for the parity check: those given, else the run's own validation/training images."""
    candidates: list[Path] = list(images or [])
    if not candidates:
        data = Path(ckpt.config.get("data", {}).get("path", ""))
        for sub in ("valid", "val", "validation", "test", "train", "."):
            if (data / sub).is_dir():
                candidates = list_files(data / sub)[:200]
                break
    step = max(1, len(candidates) // limit)
    tensors = []
    for path in candidates[::step]:
        try:
            tensors.append(decode_prepared(path, ckpt.preprocessing))
        except ImageError:
            continue
        if len(tensors) >= limit:
            break
    if not tensors:
        raise DataError(
            "no readable images for the ONNX parity check (the run's data folder is gone?): pass --images PATH..."
        )
    return torch.stack(tensors)


def check_parity(model: nn.Module, onnx_bytes: bytes, images: torch.Tensor) -> tuple[float, bool]:
    """(max abs difference of probabilities, same top-1 for every image) between torch and onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: images.numpy()})[0]
    model.eval()
    with torch.inference_mode():
        want = model(images).float().numpy()
    diff = float(np.abs(got - want).max())
    return diff, bool((got.argmax(1) == want.argmax(1)).all())


def export_onnx(
    run: Path | str, out: Path | str | None = None, opset: int = 18, images: list[Path] | None = None
) -> ExportResult:
    """Write RUN's best checkpoint as ONNX (default RUN/model.onnx) after checking it against PyTorch."""
    import onnx

    ckpt_path = resolve_checkpoint(Path(run))
    ckpt = load_checkpoint(ckpt_path)
    out_path = Path(out) if out is not None else ckpt_path.parent.parent / "model.onnx"
    prep = ckpt.preprocessing
    model = model_from_checkpoint(ckpt).eval()
    wrapped = _Probabilities(model, ckpt.temperature).eval()
    sample = _check_images(ckpt, images)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/tracer chatter is not the user's problem
        torch.onnx.export(
            wrapped,
            (sample[:2],),
            buf,  # type: ignore[arg-type]  # file-like objects work; the stub says path only
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = {
        "imgtune_format": "1",
        "classes": json.dumps(ckpt.display_names),
        "class_folders": json.dumps(ckpt.classes),
        "preprocessing": json.dumps(prep.to_dict()),
        "input": f"{INPUT}: uint8 RGB, NCHW, {prep.img_size}x{prep.img_size}: {prep.description}; normalisation is "
        "inside the graph",
        "output": f"{OUTPUT}: softmax over the classes, in the order of 'classes'",
        "architecture": str(ckpt.arch["name"]),
        "temperature": str(ckpt.temperature),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = meta["input"] + "; " + meta["output"]
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    diff, agree = check_parity(wrapped, data, sample)
    if diff > PARITY_ATOL or not agree:
        raise ExportError(
            f"ONNX export of {ckpt_path} does not match PyTorch on {len(sample)} real images: max |Δp| = {diff:.2e}"
            f" (limit {PARITY_ATOL:.0e}), same top-1: {agree}. Nothing was written; try another --opset."
        )
    atomic_write_bytes(out_path, data)
    log.info("exported %s: parity on %d images, max |Δp| %.2e", out_path, len(sample), diff)
    return ExportResult(out_path, len(sample), diff, agree, opset)


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except Exception as e:  # protobuf's DecodeError and friends: a damaged or foreign file
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    return {p.key: p.value for p in proto.metadata_props}
