"""Test helpers importable from any test module (``from helpers import make_image``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB",
               fmt: str | None = None, **save: object) -> Path:
    """Write a small random image; each seed gives different content."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path
