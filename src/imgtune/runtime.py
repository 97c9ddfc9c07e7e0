"""How this process uses the machine: the memory allocator, inference precision, and background prefetching.

Every choice here comes from a measurement on the project's reference CPU (docs/speed.md); none is a guess.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30


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


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forward passes without gradients (features, validation, eval, predict);
    None is fp32. auto: bf16 on CUDA GPUs that have it (else fp16), bf16 on CPUs with native bf16 (measured
    2.2-2.5x the images/s of fp32 channels_last there), fp32 on other CPUs. Training precision is separate
    (recipe.amp_dtype_for): bf16 *training* measured slower than fp32 on the same CPU."""
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


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce the next items in a background thread while the caller works on the current one.

    Image decoding (PIL) and tensor resizing release the GIL, so on a 2-core machine a thread overlaps
    decoding with the model's compute without the start-up and copying costs of worker processes. Errors
    raised by the producer are re-raised in the caller; closing the generator stops the thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=produce, name="imgtune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
