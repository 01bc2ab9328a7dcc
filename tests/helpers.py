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


def brute(query, ids, mat, k, metric, exclude=(), allowed=None):  # type: ignore[no-untyped-def]
    """Reference: score every row in float64, sort by (score, id)."""
    x = mat.astype(np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        scores = np.where(norms > 0, x @ q / safe / np.linalg.norm(q), 0.0)
        key = -scores
    else:
        scores = np.linalg.norm(x - q, axis=1)
        key = scores
    ok = ~np.isin(ids, list(exclude))
    if allowed is not None:
        ok &= np.isin(ids, allowed)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((ids[idx], key[idx]))][:k]
    return ids[order].tolist(), scores[order]
