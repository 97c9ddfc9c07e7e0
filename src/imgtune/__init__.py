"""imgtune: from a folder of images to a trained, evaluated classifier.

import imgtune
cfg = imgtune.Config(data={"path": "data/fashion-mnist", "img_size": 112})
result = imgtune.train(cfg)
print(imgtune.evaluate(result.run_dir, "data/fashion-mnist").accuracy)
"""

from imgtune.api import PredictResult, TrainResult, evaluate, load, predict, resume, train
from imgtune.config import Config, ConfigError, build_config
from imgtune.metrics import EvalResult
from imgtune.models import Classifier, create_model
from imgtune.predict import OnnxPredictor, Predictor, TorchPredictor

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "Config",
    "ConfigError",
    "EvalResult",
    "OnnxPredictor",
    "PredictResult",
    "Predictor",
    "TorchPredictor",
    "TrainResult",
    "build_config",
    "create_model",
    "evaluate",
    "load",
    "predict",
    "resume",
    "train",
]
