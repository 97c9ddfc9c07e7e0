"""The tutorial-style loop that imgtune is measured against (run by tutorial_vs_imgtune.py).

What the notebooks do: ImageFolder + torchvision transforms + DataLoader, eager fp32; the pretrained backbone
frozen for 3 epochs (Adam 1e-3, head only), then unfrozen for 3 epochs (Adam 1e-4), batch 32, the best-valid
weights kept; then the test set. The same network and ImageNet weights as imgtune's default
(tf_efficientnet_lite0 from the offline package), so the comparison is about the loop, not the model.
Prints one JSON object.

usage: python benchmarks/tutorial_baseline.py DATA [--img-size 112] [--save WEIGHTS]
       python benchmarks/tutorial_baseline.py DATA --predict WEIGHTS   (the test loop alone, a fresh process)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import datasets, transforms

from imgtune.models import create_model


def loaders(data: Path, size: int, workers: int) -> dict[str, torch.utils.data.DataLoader[Any]]:
    train_tf = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor()
    ])  # fmt: skip
    eval_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    out = {}
    for split, tf in (("train", train_tf), ("valid", eval_tf), ("test", eval_tf)):
        ds = datasets.ImageFolder(str(data / split), transform=tf)
        out[split] = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=split == "train", num_workers=workers)
    return out


def run_epoch(model: nn.Module, loader: Any, opt: torch.optim.Optimizer | None) -> tuple[float, float, int]:
    train = opt is not None
    model.train(train)
    loss_fn = nn.CrossEntropyLoss()
    total, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(train):
        for x, y in loader:
            logits = model(x)  # imgtune's Classifier normalises [0, 1] input itself (mean = std = 0.5)
            loss = loss_fn(logits, y)
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
            total += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return total / seen, correct / seen, seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--save", type=Path, help="write the best weights here")
    ap.add_argument("--predict", type=Path, help="only run the test loop with these weights")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    dl = loaders(args.data, args.img_size, args.workers)
    model = create_model("tf_efficientnet_lite0", len(dl["train"].dataset.classes), pretrained=True)  # type: ignore[attr-defined]
    if args.predict is not None:
        model.load_state_dict(torch.load(args.predict, weights_only=True))
        t0 = time.perf_counter()
        _, test_acc, n_test = run_epoch(model, dl["test"], None)
        print(json.dumps({"test_acc": test_acc, "predict_images_per_s": n_test / (time.perf_counter() - t0)}))
        return
    epochs: list[dict[str, Any]] = []
    best_acc, best_state = -1.0, None
    for stage, lr, frozen in ((1, 1e-3, True), (2, 1e-4, False)):
        for p in model.backbone.parameters():
            p.requires_grad_(not frozen)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(3):
            t0 = time.perf_counter()
            _, _, n = run_epoch(model, dl["train"], opt)
            train_s = time.perf_counter() - t0
            _, valid_acc, _ = run_epoch(model, dl["valid"], None)
            if valid_acc > best_acc:
                best_acc, best_state = valid_acc, copy.deepcopy(model.state_dict())
            epochs.append({"stage": stage, "train_seconds": train_s, "images_per_s": n / train_s,
                           "seconds": time.perf_counter() - t0, "valid_acc": valid_acc,
                           "elapsed": time.perf_counter() - start})  # fmt: skip
    assert best_state is not None
    model.load_state_dict(best_state)
    if args.save is not None:
        torch.save(best_state, args.save)
    t0 = time.perf_counter()
    _, test_acc, n_test = run_epoch(model, dl["test"], None)
    predict_s = time.perf_counter() - t0
    print(json.dumps({
        "epochs": epochs, "best_valid_acc": best_acc, "final_valid_acc": epochs[-1]["valid_acc"], "test_acc": test_acc,
        "predict_images_per_s": n_test / predict_s, "wall_seconds": time.perf_counter() - start,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
