"""Raw pixels as a feature set (the un-projected input of the left flow).

Mostly useful as a baseline and for small sizes: at the paper's 640x480 a
vector is 921,600 float32 values, 3.7 MB per image (3.7 GB per 1,000 images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor, FeatureSpec
from featurestore.features.resize import check_rule, check_size, resize_params, resize_rgb

MAX_VECTOR_BYTES = 64 * 2**20
"""Largest pixels vector, ``W * H * 3`` float32 values: 64 MiB (about 5.6 million pixels, e.g. 2560x2160)."""

MAX_BATCH_BYTES = 2 * 2**30
"""Largest batch (resized bytes plus float32 vectors of ``batch_size`` images): 2 GiB."""


def check_pixels(size: Any, batch_size: int = 1) -> tuple[int, int]:
    """Validate a pixels size against the memory it needs, before any work.

    Raises
    ------
    InvalidInputError
        The vector of one image would exceed :data:`MAX_VECTOR_BYTES`, or a
        batch of ``batch_size`` images :data:`MAX_BATCH_BYTES`; the message
        gives the largest size (or batch) that fits.
    """
    w, h = check_size(size)
    vector = w * h * 3 * 4
    if vector > MAX_VECTOR_BYTES:
        raise InvalidInputError(
            f"pixels{w}x{h} vectors would hold {w * h * 3:,} float32 values = {vector / 2**20:,.0f} MiB per "
            f"image; the limit is {MAX_VECTOR_BYTES / 2**20:g} MiB per vector (at most "
            f"{MAX_VECTOR_BYTES // 12:,} pixels, e.g. 2560x2160), since vectors are held in memory and shards; "
            "use a smaller size or a random projection ({rp})", params=("rp",)
        )
    per_image = vector + w * h * 3
    if batch_size * per_image > MAX_BATCH_BYTES:
        raise InvalidInputError(
            f"a batch of {batch_size} pixels{w}x{h} images needs {batch_size * per_image / 2**30:,.1f} GiB; the "
            f"limit is {MAX_BATCH_BYTES / 2**30:g} GiB per batch: use a batch of at most "
            f"{max(1, MAX_BATCH_BYTES // per_image)}"
        )
    return w, h


class PixelsExtractor(Extractor):
    """RGB pixels at a fixed size, scaled to ``0..1``.

    The image is resized (see :mod:`featurestore.features.resize`), flattened
    row-major as ``H x W x 3`` (R, G, B per pixel) and each byte ``v`` becomes
    ``float32(v) / float32(255)``, so values lie in ``[0, 1]`` and 0 and 255
    map exactly to 0.0 and 1.0.

    At 640x480 a vector is 921,600 float32 = 3.7 MB per image; prefer
    :class:`~featurestore.features.projection.RandomProjectionExtractor` or a
    small size (e.g. 32x32 -> 3,072 values).

    Parameters
    ----------
    size : tuple of int
        ``(width, height)``.
    rule : {"stretch", "letterbox"}
        Resize rule.
    name : str, optional
        Feature set name; defaults to ``f"pixels{W}x{H}"``.

    Notes
    -----
    Params: ``{"size": [W, H], "resize_rule": rule, "resize_filter": "bilinear",
    "layout": "RGB HxWx3 flattened row-major", "scale": "uint8 / 255"}``.
    """

    kind = "pixels"

    def __init__(self, size: tuple[int, int] = (640, 480), rule: str = "stretch", name: str | None = None):
        self.size = check_pixels(size)
        self.rule = check_rule(rule)
        w, h = self.size
        self.name = name or f"pixels{w}x{h}"
        self.dim = w * h * 3

    def outputs(self) -> list[FeatureSpec]:
        params: dict[str, Any] = resize_params(self.size, self.rule)
        params.update({"layout": "RGB HxWx3 flattened row-major", "scale": "uint8 / 255"})
        return [FeatureSpec(name=self.name, kind=self.kind, dim=self.dim, params=params)]

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Resize and flatten to ``W*H*3`` uint8 (kept as bytes until the batch)."""
        return resize_rgb(image, self.size, self.rule).reshape(-1)

    def compute(self, prepared: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = np.empty((len(prepared), self.dim), dtype=np.float32)
        for i, row in enumerate(prepared):
            np.divide(row, np.float32(255), out=out[i], dtype=np.float32)
        return {self.name: out}
