"""What a figure was measured on: every results file names the CPU and whether it has native bf16, since these
machines come as an AVX2-only EPYC or one with AVX-512 and bf16, and the figures differ between them."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_description() -> str:
    """e.g. 'AMD EPYC, 2 cores, AVX-512 BF16: yes' (Linux); the platform's name elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    isa = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {isa}, native bf16: {'yes' if 'avx512_bf16' in info else 'no'}"
