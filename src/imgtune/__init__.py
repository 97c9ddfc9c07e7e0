"""imgtune: from a folder of images to a trained, evaluated classifier.

import imgtune
result = imgtune.train("data/fashion-mnist", img_size=112, epochs=2)   # or imgtune.train(imgtune.Config(...))
print(imgtune.evaluate(result.run_dir, "data/fashion-mnist").accuracy)
print(imgtune.load(result.run_dir)("photo.jpg"))   # [{"label": ..., "score": ...}, ...]

The names below are imported when first used (PEP 562), so `import imgtune.files` or `python -m imgtune
--help` do not pay for torch, timm and torchvision before they need them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "ExplainResult": "api", "PredictResult": "api", "TrainResult": "api", "calibrate": "api", "evaluate": "api",
    "explain": "api", "load": "api", "predict": "api", "resume": "api", "train": "api", "compare": "compare",
    "RECIPES": "config",
    "Config": "config", "ConfigError": "config", "build_config": "config", "EvalResult": "metrics",
    "Classifier": "models", "create_model": "models", "EnsemblePredictor": "predict", "OnnxPredictor": "predict",
    "Predictor": "predict", "TorchPredictor": "predict",
}  # fmt: skip

__all__ = sorted(_WHERE)


class _Package(types.ModuleType):
    """`imgtune.predict` and `imgtune.compare` are API functions and submodules at once. Importing a submodule
    sets the package's attribute of that name to the module, which would hide the function; this package
    keeps the function (the submodule stays reachable as `sys.modules["imgtune.predict"]`, which is what
    `from imgtune.predict import X` uses)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _WHERE:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'imgtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"imgtune.{_WHERE[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly (__all__ re-exports them)
    # ruff: noqa: F401
    from imgtune.api import (
        ExplainResult,
        PredictResult,
        TrainResult,
        calibrate,
        evaluate,
        explain,
        load,
        predict,
        resume,
        train,
    )
    from imgtune.compare import compare
    from imgtune.config import RECIPES, Config, ConfigError, build_config
    from imgtune.metrics import EvalResult
    from imgtune.models import Classifier, create_model
    from imgtune.predict import EnsemblePredictor, OnnxPredictor, Predictor, TorchPredictor
