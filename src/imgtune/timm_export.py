"""`imgtune export RUN --format timm`: the model as timm's own hub folders are laid out (model.safetensors +
config.json), so plain timm loads it without imgtune:

    model = timm.create_model("local-dir:DIR", pretrained=True)
    cfg = timm.data.resolve_data_config(model=model)          # input size, mean/std, interpolation, crop
    labels = model.pretrained_cfg["label_names"]

imgtune's Classifier is a timm body with its classifier reset plus a head; with a linear head that is exactly
timm's model for N classes, so the weights map over name by name and the parity check compares the two on
real images. What timm cannot rebuild (the built-in CNNs, MLP heads, VGG cut after fc6) is refused with the
reason; ONNX exports those.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtune.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from imgtune.export import PARITY_ATOL, ExportError, check_images  # the same bar as the ONNX export
from imgtune.files import atomic_write_bytes, atomic_write_text
from imgtune.models import Classifier, model_from_checkpoint
from imgtune.packages import versions
from imgtune.scratch import BUILTIN

log = logging.getLogger(__name__)
# imgtune's resize policies as timm's crop modes ("border" letterboxes, on the mean colour rather than black)
CROP_MODES = {"crop": "center", "squash": "squash", "pad": "border"}


@dataclass
class TimmExport:
    folder: Path
    architecture: str
    images_checked: int
    max_abs_diff: float


def why_not_timm(ckpt: Checkpoint) -> str | None:
    """Why timm cannot rebuild this checkpoint's model, or None when it can."""
    arch = ckpt.arch
    body = arch.get("body") or {}
    if arch["name"] in BUILTIN:
        return f"{arch['name']} is one of imgtune's built-in CNNs, which timm does not have"
    if arch.get("head"):
        return f"its head is an MLP ({arch['head']}); timm's models end in one linear classifier"
    if body.get("keep_fc") is not None:
        return "its VGG was cut after fc6/fc7 (model.keep_fc), which timm's VGG cannot be built as"
    return None


def timm_model(ckpt: Checkpoint, model: Classifier) -> nn.Module:
    """timm's own model for the run's classes, holding the run's weights (temperature folded into the
    classifier, so its softmax is the calibrated probabilities)."""
    import timm

    net = timm.create_model(ckpt.arch["name"], pretrained=False, num_classes=len(ckpt.classes))
    classifier = net.get_classifier()  # type: ignore[operator]
    prefix = next(name for name, module in net.named_modules() if module is classifier)
    linear = list(model.head.children())[-1]
    assert isinstance(linear, nn.Linear), linear  # a linear head: why_not_timm turned MLP heads away
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state[f"{prefix}.weight"] = linear.weight.detach() / ckpt.temperature
    state[f"{prefix}.bias"] = linear.bias.detach() / ckpt.temperature
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"the run's weights do not map onto timm's {ckpt.arch['name']}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")  # fmt: skip
    return net.eval()


def hub_config(ckpt: Checkpoint, net: nn.Module) -> dict[str, Any]:
    """config.json as timm's hub folders have it: architecture, classes, and the pretrained_cfg that timm's
    resolve_data_config turns into the preprocessing."""
    prep, labels = ckpt.preprocessing, ckpt.display_names
    source: dict[str, Any] = dict(getattr(net, "pretrained_cfg", {}) or {})
    pretrained_cfg = {
        "input_size": [3, prep.img_size, prep.img_size], "interpolation": prep.interpolation,
        "mean": list(prep.mean), "std": list(prep.std), "crop_pct": 1.0, "crop_mode": CROP_MODES[prep.resize],
        "num_classes": len(labels), "label_names": labels, "fixed_input_size": False,
        "classifier": source.get("classifier", ""), "first_conv": source.get("first_conv", ""),
    }  # fmt: skip
    return {
        "architecture": ckpt.arch["name"], "num_classes": len(labels), "num_features": int(ckpt.arch["num_features"]),
        "label_names": labels, "pretrained_cfg": pretrained_cfg,
        "imgtune": {"class_folders": ckpt.classes, "resize": prep.resize, "temperature": ckpt.temperature,
                    "trained_with": ckpt.versions, "exported_with": versions("safetensors")},
    }  # fmt: skip


def export_timm(run: Path | str, out: Path | str | None = None, images: list[Path] | None = None) -> TimmExport:
    """Write RUN's best checkpoint as DIR/model.safetensors + DIR/config.json (default RUN/timm/), after
    checking timm's model against imgtune's on real images."""
    from safetensors.torch import save

    ckpt_path = resolve_checkpoint(Path(run))
    ckpt = load_checkpoint(ckpt_path)
    why = why_not_timm(ckpt)
    if why is not None:
        raise ExportError(f"{ckpt_path} cannot be exported in timm's format: {why}. Export it as ONNX instead "
                          "(imgtune export RUN), which holds any imgtune model")  # fmt: skip
    model = model_from_checkpoint(ckpt).eval()
    net = timm_model(ckpt, model)
    sample = check_images(ckpt, images)
    mean = torch.tensor(ckpt.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(ckpt.preprocessing.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = (model(sample) / ckpt.temperature).softmax(1)
        got = net((sample.float() / 255 - mean) / std).softmax(1)
    diff = float((want - got).abs().max())
    if diff > PARITY_ATOL:
        raise ExportError(f"timm's model does not match imgtune's on {len(sample)} images (max |Δp| {diff:.2e}); "
                          "nothing was written")  # fmt: skip
    folder = Path(out) if out is not None else ckpt_path.parent.parent / "timm"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / "config.json", json.dumps(hub_config(ckpt, net), indent=2) + "\n")
    log.info("exported %s for timm: parity on %d images, max |Δp| %.2e", folder, len(sample), diff)
    return TimmExport(folder, ckpt.arch["name"], len(sample), diff)
