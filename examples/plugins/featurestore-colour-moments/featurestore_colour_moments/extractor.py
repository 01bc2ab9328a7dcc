"""The colour-moments extractor: per-channel mean, standard deviation and skewness (9 dims)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor, FeatureSpec

SPACES = {"rgb": "RGB", "hsv": "HSV", "ycbcr": "YCbCr"}
"""Colour spaces by option value -> Pillow mode."""
MOMENTS = ("mean", "std", "skewness")


def colour_moments(channels: np.ndarray) -> np.ndarray:
    """Mean, standard deviation and skewness of each column of ``channels`` (pixels x channels, 0..1).

    Skewness is the cube root of the third central moment, so all three moments
    are in the channel's own units (Stricker and Orengo's definition). The result
    is ordered moment by moment: the three means, the three stds, the three skewnesses.
    """
    x = channels.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    std = np.sqrt((centred**2).mean(axis=0))
    skew = np.cbrt((centred**3).mean(axis=0))
    return np.concatenate([mean, std, skew]).astype(np.float32)


class ColourMomentsExtractor(Extractor):
    """Colour moments of an image resized to ``size`` (stretch) in colour space ``space``.

    Parameters
    ----------
    space : {"rgb", "hsv", "ycbcr"}
        Colour space (Pillow's conversion of the RGB image); channels scaled to 0..1.
    size : int
        The image is first resized to ``size`` x ``size`` (bilinear): moments
        change little with resolution and a small image is fast.
    name : str, optional
        Feature set name; ``colour-moments`` for RGB, else ``colour-moments-<space>``.
    """

    def __init__(self, space: str = "rgb", size: int = 64, name: str | None = None):
        if space not in SPACES:
            raise InvalidInputError(f"unknown colour space {space!r} for colour-moments; use {', '.join(SPACES)}")
        if not 8 <= int(size) <= 1024:
            raise InvalidInputError(f"colour-moments size {size} is out of range; use 8 to 1024")
        self.space, self.size = space, int(size)
        self.name = name or ("colour-moments" if space == "rgb" else f"colour-moments-{space}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ColourMomentsExtractor:
        """From ``fs extract --feature colour-moments:space=hsv,size=64`` (values are strings)."""
        unknown = set(options) - {"space", "size"}
        if unknown:
            raise InvalidInputError(
                f"colour-moments takes the options space and size, not {', '.join(sorted(unknown))}")
        size = str(options.get("size", "64"))
        if not size.isdigit():
            raise InvalidInputError(f"colour-moments size {size!r} is not a whole number of pixels")
        return cls(space=str(options.get("space", "rgb")).lower(), size=int(size))

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> ColourMomentsExtractor:
        """The extractor of a stored set (its catalog params)."""
        return cls(space=params["space"], size=int(params["size"][0]), name=name)

    def params(self) -> dict[str, Any]:
        return {"space": self.space, "size": [self.size, self.size], "resize_rule": "stretch",
                "resize_filter": "bilinear", "moments": list(MOMENTS), "scale": "uint8 / 255",
                "layout": "means, stds, skewnesses; channels in the space's order"}

    def outputs(self) -> list[FeatureSpec]:
        return [FeatureSpec(self.name, "colour-moments", 3 * len(MOMENTS), self.params())]

    def prepare(self, image: Image.Image) -> np.ndarray:
        small = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.asarray(small.convert(SPACES[self.space]), dtype=np.float64).reshape(-1, 3) / 255.0
        return colour_moments(pixels)

    def compute(self, prepared: list[Any]) -> dict[str, np.ndarray]:
        out = np.stack(prepared).astype(np.float32) if prepared else np.zeros((0, 9), np.float32)
        return {self.name: out}
