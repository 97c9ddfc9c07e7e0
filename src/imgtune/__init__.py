"""imgtune: from a folder of images to a trained, evaluated classifier.

import imgtune
cfg = imgtune.Config(data={"path": "data/fashion-mnist", "img_size": 112})
result = imgtune.train(cfg)
print(imgtune.evaluate(result.run_dir, "data/fashion-mnist").accuracy)
"""

from imgtune.api import PredictResult, TrainResult, calibrate, evaluate, load, predict, resume, train
from imgtune.compare import compare
from imgtune.config import RECIPES, Config, ConfigError, build_config
from imgtune.metrics import EvalResult
from imgtune.models import Classifier, create_model
from imgtune.predict import EnsemblePredictor, OnnxPredictor, Predictor, TorchPredictor

__version__ = "0.1.0"

__all__ = [
    "RECIPES",
    "Classifier",
    "Config",
    "ConfigError",
    "EnsemblePredictor",
    "EvalResult",
    "OnnxPredictor",
    "PredictResult",
    "Predictor",
    "TorchPredictor",
    "TrainResult",
    "build_config",
    "calibrate",
    "compare",
    "create_model",
    "evaluate",
    "load",
    "predict",
    "resume",
    "train",
]
