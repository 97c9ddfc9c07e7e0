"""fastai's `fine_tune` on the same work as tutorial_baseline.py (run by tutorial_vs_imgtune.py --fastai).

The same network and ImageNet weights (imgtune's tf_efficientnet_lite0 from the offline package, split into
backbone and head for fastai's freeze/unfreeze), ImageDataLoaders.from_folder with Resize(112) and fastai's
default aug_transforms on the GPU-style batch pipeline, batch 32, 2 workers; `fine_tune(3, freeze_epochs=3)`
(one-cycle, frozen then discriminative LRs) as fastai's documentation teaches it. Prints one JSON object.

fastai is not an imgtune dependency: install it beside the project without touching torch, e.g.
  pip install --no-deps --target /tmp/fastai-pkgs fastai fastcore fasttransform "fastprogress==1.0.3" \\
      fastdownload "plum-dispatch<2.10" beartype pandas scikit-learn joblib threadpoolctl scipy requests \\
      charset-normalizer urllib3 idna certifi cloudpickle python-dateutil six tzdata narwhals
(fastprogress 1.0.3: later versions import python-fasthtml and its web stack)
and run with PYTHONPATH=/tmp/fastai-pkgs.

usage: python benchmarks/fastai_baseline.py DATA [--img-size 112]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from fastai.vision.all import (
    Callback,
    CrossEntropyLossFlat,
    ImageDataLoaders,
    Learner,
    Resize,
    accuracy,
    aug_transforms,
    get_image_files,
    params,
)

from imgtune.models import create_model


class EpochTimes(Callback):
    """Train-phase seconds and images of every epoch (fastai's recorder keeps only the epoch total)."""

    order = 60  # after the Recorder (50), which holds the epoch's valid accuracy

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def before_train(self) -> None:
        self.t0, self.seen = time.perf_counter(), 0

    def after_batch(self) -> None:
        if self.training:
            self.seen += len(self.yb[0])

    def after_train(self) -> None:
        self.epochs.append({"train_seconds": time.perf_counter() - self.t0, "images": self.seen})

    def after_epoch(self) -> None:
        if not self.epochs or "valid_acc" in self.epochs[-1]:  # get_preds runs an epoch without training
            return
        e = self.epochs[-1]
        e["images_per_s"] = e["images"] / e["train_seconds"]
        e["valid_acc"] = float(self.recorder.values[-1][2])
        e["elapsed"] = time.perf_counter() - self.start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--img-size", type=int, default=112)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    dls = ImageDataLoaders.from_folder(
        args.data, train="train", valid="valid", item_tfms=Resize(args.img_size),
        batch_tfms=aug_transforms(), bs=32, num_workers=2,
    )  # fmt: skip
    model = create_model("tf_efficientnet_lite0", len(dls.vocab), pretrained=True)
    times = EpochTimes()
    learn = Learner(
        dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
        splitter=lambda m: [params(m.backbone), params(m.head)], cbs=[times],
    )  # fmt: skip
    with learn.no_bar():  # its progress bar writes to stdout, where the JSON goes
        learn.fine_tune(3, freeze_epochs=3)
    for i, e in enumerate(times.epochs):
        e["stage"] = 1 if i < 3 else 2
    test_dl = dls.test_dl(get_image_files(args.data / "test"), with_labels=True)
    t0 = time.perf_counter()
    with learn.no_bar():
        probs, labels = learn.get_preds(dl=test_dl)
    predict_s = time.perf_counter() - t0
    test_acc = float((probs.argmax(1) == labels).float().mean())
    print(json.dumps({
        "epochs": times.epochs, "final_valid_acc": times.epochs[-1]["valid_acc"], "test_acc": test_acc,
        "predict_images_per_s": len(labels) / predict_s, "wall_seconds": time.perf_counter() - start,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
