"""Fixtures that build small, real image folders on disk (PNG/JPEG files written with Pillow)."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on a hub download
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Three classes a pretrained backbone separates at once: colour and a shape.
PALETTE = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 210)}


def shape_image(colour: tuple[int, int, int], seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + 150
    x0, y0 = rng.integers(2, size // 3, 2)
    w = int(rng.integers(size // 3, size // 2))
    arr[y0 : y0 + w, x0 : x0 + w] = np.array(colour, dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def write_class_folders(
    root: Path,
    per_class: int,
    seed: int = 0,
    fmt: str = "png",
    classes: dict[str, tuple[int, int, int]] = PALETTE,
) -> Path:
    for k, (c, colour) in enumerate(classes.items()):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(colour, seed * 10_000 + k * 1000 + i).save(root / c / f"{i}.{fmt}")
    return root


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """make_dataset(layout="split"|"single", train=, valid=, test=) -> dataset root."""

    def make(layout: str = "split", train: int = 12, valid: int = 4, test: int = 4, name: str = "ds") -> Path:
        root = tmp_path / name
        if layout == "single":
            return write_class_folders(root, train + valid, seed=1)
        write_class_folders(root / "train", train, seed=1)
        write_class_folders(root / "valid", valid, seed=2)
        if test:
            write_class_folders(root / "test", test, seed=3, fmt="jpg")
        return root

    return make


def small_dataset(factory: pytest.TempPathFactory, name: str, train: int, valid: int) -> Path:
    """Module-scoped datasets: train/ and valid/ with the three colour classes."""
    root = factory.mktemp(name) / "ds"
    write_class_folders(root / "train", train, seed=1)
    write_class_folders(root / "valid", valid, seed=2)
    return root


# no report (plots cost ~3 s a run; test_report.py and test_extending.py check them)
SMALL_RUN = {"data.img_size": 32, "data.batch_size": 8, "train.patience": None, "data.augment": "light",
             "train.report": False}  # fmt: skip


def train_small(data: Path, out: Path, **overrides: object) -> Any:
    """A few-second training run on a `small_dataset`: 32 px, batch 8, no early stopping (overrides win)."""
    import imgtune

    return imgtune.train(imgtune.build_config(overrides={"data.path": data, "out": out, **SMALL_RUN, **overrides}))


def blank_checkpoint() -> Any:
    """The checkpoint template of a Trainer built by hand around a plain module (no arch, no classes)."""
    from imgtune.checkpoint import Checkpoint
    from imgtune.transforms import Preprocessing

    return Checkpoint(arch={}, classes=[], preprocessing=Preprocessing(32, (0.5,) * 3, (0.5,) * 3), state_dict={})


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims a huge image: what a decompression bomb looks like to a decoder."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(pw: Any) -> Any:
    """Debian's headless Chromium under Playwright (Playwright cannot download its own browser here)."""
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    )  # fmt: skip


@dataclass
class SeenPage:
    images: int
    broken: list[str]  # alt texts of images that did not load
    external: list[str]  # requests to anything but the file itself and data: URIs
    metrics: dict[str, str]  # data-metric attributes -> text
    text: str


def open_offline_page(page_file: Path) -> SeenPage:
    """A self-contained HTML file opened in headless Chromium: what loaded, what it asked for, what it says."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        broken = page.eval_on_selector_all(
            "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)"
        )
        count = page.eval_on_selector_all("img", "imgs => imgs.length")
        metrics = page.eval_on_selector_all(
            "[data-metric]", "els => Object.fromEntries(els.map(e => [e.dataset.metric, e.textContent]))"
        )
        text = page.text_content("body") or ""
        browser.close()
    return SeenPage(count, broken, [u for u in requests if not u.startswith(("file:", "data:"))], metrics, text)
