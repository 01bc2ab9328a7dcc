"""Cheap measures of a photo's quality, for ``fs audit images`` (issue 25).

Each measure has a stated definition and a fixed threshold, so a finding can be
explained and reproduced. The pixels are those of the image's 256-pixel
thumbnail (longest side, the one the web grid shows, cached in the store),
converted to 8-bit luminance ``L`` (ITU-R 601-2, what Pillow's ``convert("L")`` gives):

* **blurred**: the variance of the 4-neighbour Laplacian of ``L``
  (``L[y-1,x] + L[y+1,x] + L[y,x-1] + L[y,x+1] - 4 L[y,x]``) is below
  :data:`BLUR_MAX`. Sharp edges give large responses; a large plain background
  lowers the variance too, so a product on white can be flagged: look at it.
* **dark** / **bright**: the mean of ``L`` / 255 is below :data:`DARK_MAX` /
  above :data:`BRIGHT_MIN`.
* **constant**: the standard deviation of ``L`` is below :data:`CONSTANT_MAX`
  (out of 255): nearly one colour, an empty or broken photo.
* **tiny**: the original's shorter side is below :data:`TINY_MIN` pixels.
* **aspect**: the original's longer side is more than :data:`ASPECT_MAX` times its shorter side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

BLUR_MAX = 20.0
DARK_MAX = 0.12
BRIGHT_MIN = 0.96
CONSTANT_MAX = 4.0
TINY_MIN = 64
ASPECT_MAX = 3.0

DEFINITIONS = {
    "blurred": f"variance of the Laplacian of the 256-px luminance < {BLUR_MAX:g}",
    "dark": f"mean luminance < {DARK_MAX:g} (0 black, 1 white)",
    "bright": f"mean luminance > {BRIGHT_MIN:g} (0 black, 1 white)",
    "constant": f"standard deviation of the luminance < {CONSTANT_MAX:g} of 255",
    "tiny": f"shorter side < {TINY_MIN} px",
    "aspect": f"longer side / shorter side > {ASPECT_MAX:g}",
}


@dataclass(frozen=True)
class PhotoMeasures:
    """The measures of one photo (see the module docstring for their definitions)."""

    laplacian_var: float
    brightness: float  # mean luminance, 0..1
    contrast: float  # std of the luminance, 0..255


def measure(image: Image.Image | bytes) -> PhotoMeasures:
    """Measure a decoded image, or the bytes of an image file (a thumbnail)."""
    img = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    lum = np.asarray(img.convert("L"), dtype=np.float64)
    if lum.shape[0] >= 3 and lum.shape[1] >= 3:
        lap = lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] - 4 * lum[1:-1, 1:-1]
        var = float(lap.var())
    else:
        var = 0.0
    return PhotoMeasures(var, float(lum.mean()) / 255.0, float(lum.std()))


def problems(m: PhotoMeasures | None, width: int, height: int) -> list[tuple[str, float]]:
    """(kind, measure) of each threshold the photo crosses; ``m`` None checks only the size."""
    out: list[tuple[str, float]] = []
    short, long_ = min(width, height), max(width, height)
    if short < TINY_MIN:
        out.append(("tiny", float(short)))
    if short > 0 and long_ / short > ASPECT_MAX:
        out.append(("aspect", long_ / short))
    if m is None:
        return out
    if m.contrast < CONSTANT_MAX:
        out.append(("constant", m.contrast))
    elif m.laplacian_var < BLUR_MAX:  # a constant photo has no edges either: say it once
        out.append(("blurred", m.laplacian_var))
    if m.brightness < DARK_MAX:
        out.append(("dark", m.brightness))
    elif m.brightness > BRIGHT_MIN:
        out.append(("bright", m.brightness))
    return out
