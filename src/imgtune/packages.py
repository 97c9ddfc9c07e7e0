"""The packages imgtune runs on: their versions, recorded wherever a model is written, and the extras that
bring the optional ones.

A checkpoint is rebuilt by `timm.create_model` and read by torch, an export is run by onnxruntime: when a
file misbehaves on another machine, the versions that wrote it are the first thing to compare. And the
exporter, the server and the trackers are extras (`pip install 'imgtune[serve]'`), so a missing one must say
which extra brings it rather than end in a bare ImportError.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from types import ModuleType

from imgtune.errors import UserError

# module -> (distribution, extra that brings it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "multipart": ("python-multipart", "serve"),
    "starlette": ("starlette", "serve"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

# what a model file depends on: recorded in checkpoints, summary.json and ONNX metadata
STACK = ("imgtune", "torch", "torchvision", "timm", "numpy")


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def version(distribution: str) -> str | None:
    """The installed version of a distribution, or None; a module already imported says its own (torch's has
    the build: 2.5.0+cu124, 2.5.0+cpu)."""
    module = sys.modules.get(distribution.replace("-", "_"))
    if isinstance(getattr(module, "__version__", None), str):
        return str(module.__version__)  # type: ignore[union-attr]
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(*extra: str) -> dict[str, str]:
    """{package: version} of the stack a model file depends on, plus `extra` distributions (e.g. onnxruntime
    for an export); packages not installed are left out."""
    found = {name: version(name) for name in (*STACK, *extra)}
    if found.get("imgtune") is None:  # a source tree on sys.path, not installed
        from imgtune import __version__

        found["imgtune"] = __version__
    return {name: v for name, v in found.items() if v is not None}


def need(module: str, what: str) -> ModuleType:
    """Import an optional module for `what` (e.g. "imgtune serve"), or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        distribution, extra = OPTIONAL.get(top, (top, "all"))
        raise MissingExtra(
            f"{what} needs {distribution}, which is not installed ({e}): pip install 'imgtune[{extra}]'"
        ) from None


def need_all(modules: tuple[str, ...], what: str) -> None:
    """Check several optional modules at once, before any work starts."""
    for module in modules:
        need(module, what)
