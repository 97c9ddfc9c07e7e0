"""Random streams: seeding them, and capturing/restoring all of them (Python, NumPy, torch, CUDA, a loader's
generator) as tensors and plain values, so last.pt stays loadable with weights_only=True and a resumed run
draws exactly what the uninterrupted one would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py[0], "internal": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what rng_state saved; the loader generator only when one is given."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
