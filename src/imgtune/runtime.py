"""How this process uses the machine: the device, the memory allocator, the training and inference precision,
and how it answers SIGINT/SIGTERM.

Every choice here comes from a measurement on the project's reference CPU (docs/speed.md); none is a guess.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from imgtune.errors import UserError

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30


class DeviceError(UserError, RuntimeError):
    """The device asked for is not there."""


def pick_device(device: str = "auto") -> torch.device:
    """auto: the CUDA GPU when PyTorch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


class StopRequest:
    """Asks a training run to stop: the loop finishes its current step, writes last.pt and raises
    `engine.Interrupted`. Each run is handed its own (the CLI installs signal handlers on one); library users
    call `request()` from another thread, a callback or a handler of their own."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def install(self) -> StopRequest:
        """The first SIGINT/SIGTERM requests a stop; a second one aborts at once (KeyboardInterrupt)."""
        import signal

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n{signal.Signals(signum).name}: stopping after the current step "
                  "(send it again to abort at once)", file=sys.stderr, flush=True)  # fmt: skip

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return self


@cache
def tune_allocator() -> bool:
    """Keep large freed blocks in the heap instead of handing them back to the kernel.

    glibc serves every allocation above its mmap threshold (128 KB at start, rising to 32 MB at most) with a
    fresh mmap and returns it with munmap on free. A CNN's activations are allocated and freed every batch, so
    each batch page-faults tens of megabytes of zeroed memory: measured here, EfficientNet-Lite0 inference
    spent most of its time in the kernel and ran at 130-240 images/s, and at 300-400 with this setting (the
    same effect PyTorch's performance guide gets from jemalloc or tcmalloc). The cost is that memory freed
    after the peak is kept by the process. No-op outside glibc. Returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD))
    log.debug("glibc allocator: mmap threshold 1 GB (%s)", "applied" if ok else "refused")
    return ok


@cache
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix instructions, where bf16 inference is faster than fp32. Elsewhere the
    CPU emulates bf16 by conversion and it is slower, so this reads the CPU flags rather than asking whether
    PyTorch can run bf16 at all."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training steps; None is fp32. auto: bf16 on CUDA GPUs that have it (else fp16,
    with loss scaling), fp32 on CPUs, where bf16 training measured about 2x slower than fp32 on this project's
    reference CPU (shared/MEASURED.md)."""
    if precision == "auto" and device.type != "cuda":
        return None
    return inference_dtype(precision, device)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forward passes without gradients (features, validation, eval, predict);
    None is fp32. auto: bf16 on CUDA GPUs that have it (else fp16), bf16 on CPUs with native bf16 (measured
    2.2-2.5x the images/s of fp32 channels_last there), fp32 on other CPUs. Training precision is separate
    (`training_dtype`): bf16 *training* measured slower than fp32 on the same CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def largest_batch(step: Callable[[int], None], start: int, limit: int) -> int:
    """The largest batch size that `step` runs without CUDA running out of memory: doubling from start up
    to limit, or halving from start when start itself does not fit. step(b) runs one training step of b
    images (forward and backward) and must free what it allocated."""

    def fits(b: int) -> bool:
        try:
            step(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    b = max(1, min(start, limit))
    if not fits(b):
        while b > 1:
            b //= 2
            if fits(b):
                return b
        raise RuntimeError("a batch of one image does not fit in GPU memory")
    while b * 2 <= limit and fits(b * 2):
        b *= 2
    return b


def probe_batch_size(
    model: torch.nn.Module, device: torch.device, img_size: int, start: int, limit: int, amp: torch.dtype | None
) -> int:
    """The largest batch for which a fine-tuning step (every parameter trainable: the stage that needs the
    most memory) on random images fits in GPU memory. The model comes back as it was: weights (the probe's
    BatchNorm updates are not training), trainable flags and mode."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()

    def step(b: int) -> None:
        x = torch.randint(0, 256, (b, 3, img_size, img_size), dtype=torch.uint8, device=device)
        with autocast(device, amp):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        return largest_batch(step, start, limit)
    finally:
        model.load_state_dict(saved)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
