"""Fine-tuning speed on this CPU, one idea at a time, side by side in one process: training steps/s of
tf_efficientnet_lite0 (offline ImageNet weights, BatchNorm statistics frozen, AdamW) on uint8 batches in RAM,
as imgtune's stage 2 runs them, for each variant against the default (fp32, channels_last, batch 32, all
layers, 112 px). Variants are timed in rounds (each variant once per round, in turn), so that a slow spell of
this shared machine hits all of them; the table gives the median of the rounds and the ratio to the default.

usage: python benchmarks/finetune_speed.py [--rounds 3] [--steps 12] [--out benchmarks/results/finetune_speed.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description

from imgtune import prefix
from imgtune.models import create_model, set_requires_grad, unfreeze_top
from imgtune.runtime import tune_allocator

HERE = Path(__file__).resolve().parent


@dataclass
class Variant:
    name: str
    size: int = 112
    batch: int = 32
    channels_last: bool = True
    bf16: bool = False
    unfreeze: int | None = None  # top N block groups (None: all layers)
    threads: int | None = None
    compile: bool = False
    cached: bool = False  # with unfreeze: the frozen blocks' outputs computed once, only the top runs per step


VARIANTS = [
    Variant("default: fp32, channels_last, batch 32, all layers, 112 px"),
    Variant("contiguous (no channels_last)", channels_last=False),
    Variant("batch 64", batch=64),
    Variant("batch 128", batch=128),
    Variant("96 px (a progressive-resizing epoch)", size=96),
    Variant("80 px", size=80),
    Variant("top 12 of 17 block groups trainable", unfreeze=12),
    Variant("top 6 of 17 block groups trainable", unfreeze=6),
    Variant("top 12 trainable, frozen blocks' outputs cached", unfreeze=12, cached=True),
    Variant("top 6 trainable, frozen blocks' outputs cached", unfreeze=6, cached=True),
    Variant("bf16 autocast", bf16=True),
    Variant("1 thread", threads=1),
    Variant("torch.compile (compile time excluded)", compile=True),
]


def stepper(v: Variant) -> tuple[Callable[[], None], float]:
    """A function taking one training step for the variant, and the seconds its set-up took (compilation)."""
    model = create_model("tf_efficientnet_lite0", 10, pretrained=True)
    set_requires_grad(model, True)
    unfreeze_top(model, v.unfreeze)
    model.bn_policy = "frozen"
    model.use_channels_last(v.channels_last)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, 256, (v.batch, 3, v.size, v.size), dtype=torch.uint8)
    y = torch.randint(0, 10, (v.batch,))
    loss_fn = nn.CrossEntropyLoss()
    net: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if v.compile else model
    if v.cached:
        net, x = cached_top(model, x)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    return step, time.perf_counter() - t0


def cached_top(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """What stage 2 trains on when it caches the frozen part (imgtune.prefix): (the model from the first
    trainable block on, as a function; the frozen stem and blocks' output for x, computed once)."""
    start = prefix.frozen_blocks(model)
    assert start is not None, "nothing frozen to cache"
    mid = prefix.bottom(model, x, start).clone()  # out of inference mode: the top trains on it

    def top(z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(prefix.Midway(z, start))
        return out

    model.eval()
    with torch.no_grad():
        assert torch.allclose(top(mid), model(x), atol=1e-4), "the split does not reproduce the model"
    model.train()
    print(f"cached input: {tuple(mid.shape[1:])} = {mid[0].numel() * 4 / 1024:.1f} KiB per image (float32)")
    return top, mid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", help="comma-separated indices of VARIANTS (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "finetune_speed.md")
    args = ap.parse_args()
    tune_allocator()
    default_threads = torch.get_num_threads()
    chosen = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else VARIANTS
    steps: dict[str, tuple[Callable[[], None], float]] = {}
    rates: dict[str, list[float]] = {v.name: [] for v in chosen}
    for _ in range(args.rounds):
        for v in chosen:
            torch.set_num_threads(v.threads or default_threads)
            if v.name not in steps:
                steps[v.name] = stepper(v)
            step = steps[v.name][0]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[v.name].append(args.steps * v.batch / (time.perf_counter() - t0))
            print(f"{v.name}: {rates[v.name][-1]:.1f} images/s", flush=True)
    torch.set_num_threads(default_threads)
    base = statistics.median(rates[chosen[0].name])
    lines = [
        f"# Fine-tuning speed, one idea at a time ({time.strftime('%Y-%m-%d %H:%M')})", "",
        f"CPU: {cpu_description()}; torch {torch.__version__}; {args.rounds} rounds of {args.steps} training steps "
        "per variant (median; all steps of a round back to back, the variants in turn).", "",
        "| variant | training images/s (median) | per round | vs default | set-up incl. compile (s) |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for v in chosen:
        med = statistics.median(rates[v.name])
        lines.append(f"| {v.name} | {med:.1f} | {', '.join(f'{r:.0f}' for r in rates[v.name])} | "
                     f"{med / base:.2f}x | {steps[v.name][1]:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
