"""Resizing decoded images to the fixed grid a feature family works on.

Every pixel-based family (raw pixels, random projection, low-level descriptors)
first brings the image to a fixed ``(width, height)``. How it gets there is part
of the feature set's parameters, because a different rule or filter gives
different vectors:

``"stretch"``
    Resize straight to ``(width, height)``, ignoring the aspect ratio. Every
    output pixel comes from the image; shapes are distorted when the aspect
    ratios differ. This is what the paper does (every image to 640x480).
``"letterbox"``
    Scale by ``min(width / w, height / h)`` so the whole image fits, keeping
    the aspect ratio, and paste it centred on a black canvas (the left/top
    margin is the floor of half the spare room). Nothing is distorted; the
    margins are zeros.

The resampling filter is fixed to Pillow's ``BILINEAR`` with no
``reducing_gap``: on downscaling Pillow widens the kernel to the scale factor,
so it is antialiased, and it is exact (no JPEG draft or box pre-reduction,
whose output depends on how the image was decoded). It is recorded as
``"resize_filter": "bilinear"`` in the params of every family that uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import InvalidInputError

RESIZE_RULES: tuple[str, ...] = ("stretch", "letterbox")
"""The supported resize rules, in documentation order."""

RESIZE_FILTER = "bilinear"
"""Name of the resampling filter, as recorded in feature-set params."""

_PIL_FILTER = Image.Resampling.BILINEAR

MAX_IMAGE_BYTES = 64 * 2**20
"""Largest resized image a pixel-based family works on, ``W * H * 3`` bytes: 64 MiB (4096x4096 is 48 MiB).

Every image of a batch (and of the batches decoded ahead) is held resized in
memory, so a size such as 100000x100000 (28 GiB per image) is refused before
any work instead of running until the machine runs out of memory.
"""


def check_size(size: Any, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[int, int]:
    """Validate a ``(width, height)`` pair and return it as a tuple of ints.

    Parameters
    ----------
    size : sequence of two positive ints
        Target width and height in pixels.
    max_bytes : int
        Largest ``W * H * 3`` allowed (:data:`MAX_IMAGE_BYTES`).

    Returns
    -------
    tuple of int
        ``(width, height)``.

    Raises
    ------
    InvalidInputError
        If ``size`` is not two positive integers, or the resized image would
        exceed ``max_bytes``.
    """
    try:
        w, h = size
        if int(w) != w or int(h) != h:
            raise ValueError
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"image size must be two positive integers (width, height), got {size!r}"
        ) from None
    if w < 1 or h < 1:
        raise InvalidInputError(f"image size must be positive, got {w}x{h}")
    if w * h * 3 > max_bytes:
        raise InvalidInputError(
            f"image size {w}x{h} is {w * h * 3 / 2**20:,.0f} MiB of RGB pixels per image; the limit is "
            f"{max_bytes / 2**20:g} MiB per resized image (e.g. 4096x4096), since every image of a batch is "
            "held resized in memory"
        )
    return w, h


def check_rule(rule: str) -> str:
    """Return ``rule`` if it is one of :data:`RESIZE_RULES`, else raise ``InvalidInputError``."""
    if rule not in RESIZE_RULES:
        raise InvalidInputError(f"unknown resize rule {rule!r}; choose one of: {', '.join(RESIZE_RULES)}")
    return rule


def resize_params(size: tuple[int, int], rule: str) -> dict[str, Any]:
    """The params entries describing a resize, shared by the pixel-based families.

    Returns ``{"size": [W, H], "resize_rule": rule, "resize_filter": "bilinear"}``.
    """
    w, h = check_size(size)
    return {"size": [w, h], "resize_rule": check_rule(rule), "resize_filter": RESIZE_FILTER}


def resize_rgb(img: Image.Image, size: tuple[int, int], rule: str = "stretch") -> np.ndarray:
    """Resize an image to ``size`` and return its RGB pixels.

    Parameters
    ----------
    img : PIL.Image.Image
        Any Pillow image; non-RGB modes (``L``, ``RGBA``, ``P``, ...) are
        converted to RGB first (alpha is dropped, not composited).
    size : tuple of int
        Target ``(width, height)``, Pillow's order.
    rule : {"stretch", "letterbox"}
        How to handle a different aspect ratio; see the module docstring.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(height, width, 3)``, C-contiguous.

    Raises
    ------
    InvalidInputError
        For a bad size or rule.
    """
    w, h = check_size(size)
    check_rule(rule)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if rule == "stretch":
        out = img if img.size == (w, h) else img.resize((w, h), _PIL_FILTER)
    else:
        iw, ih = img.size
        scale = min(w / iw, h / ih)
        nw = min(w, max(1, round(iw * scale)))
        nh = min(h, max(1, round(ih * scale)))
        inner = img if (nw, nh) == (iw, ih) else img.resize((nw, nh), _PIL_FILTER)
        if (nw, nh) == (w, h):
            out = inner
        else:
            out = Image.new("RGB", (w, h), (0, 0, 0))
            out.paste(inner, ((w - nw) // 2, (h - nh) // 2))
    arr = np.asarray(out, dtype=np.uint8)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr
