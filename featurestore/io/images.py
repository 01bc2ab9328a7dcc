"""Decoding and validation of image files (Pillow).

Every image becomes 8-bit RGB the same way, wherever it is decoded (ingest,
extract, search by file, prediction):

* EXIF orientation is applied (``ImageOps.exif_transpose``), so width/height
  are those of the upright image;
* palette (``P``) images are expanded; images with alpha (``RGBA``, ``LA``,
  ``PA``, palette with transparency) are composited on white;
* CMYK and YCbCr use Pillow's conversion to RGB;
* 16-bit and 32-bit integer images (``I;16*``, ``I``) are scaled linearly from
  their full range to 0..255; float images (``F``) are clipped to 0..255;
* grayscale (``L``, ``1``) is replicated to three channels.

Files larger than ``max_pixels`` (Pillow's decompression-bomb limit by
default) are refused before they are decoded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featurestore.errors import InvalidInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Truncated files must fail, not decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(InvalidInputError):
    """A file that is not a readable image; the message is the reason only."""


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded for ingest: its metadata and the RGB pixels."""

    sha256: str
    width: int
    height: int
    format: str
    mode: str
    nbytes: int
    image: Image.Image


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "I;32"):
        arr = np.asarray(img)
        maxval = 65535.0 if mode.startswith("I;16") else float(max(arr.max(), 1))
        scaled = np.clip(arr.astype(np.float64) * (255.0 / maxval), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ImageDecodeError("decompression bomb: image exceeds the pixel limit") from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not an image (Pillow cannot identify the format)") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(raise FS_MAX_IMAGE_PIXELS if the image is genuine)"
        )
    return img


def decode_bytes(data: bytes, max_pixels: int = 89_478_485) -> DecodedImage:
    """Fully decode ``data`` (validating it) and return metadata plus RGB pixels."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    img = _open_checked(data, max_pixels)
    fmt = img.format or "unknown"
    mode = img.mode
    try:
        img.load()
        # exif_transpose copies the image even when there is nothing to do; only call it when needed.
        if img.getexif().get(0x0112, 1) not in (0, 1):
            img = ImageOps.exif_transpose(img) or img
        rgb = to_rgb(img)
        rgb.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {exc}") from None
    return DecodedImage(digest, rgb.width, rgb.height, fmt, mode, len(data), rgb)


def read_bytes(path: Path) -> bytes:
    """Read a file, turning OS errors into a one-line reason."""
    try:
        if path.is_symlink() and not path.exists():
            raise ImageDecodeError("broken symlink")
        return path.read_bytes()
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("file not found (moved or deleted since it was listed)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(f"unreadable: {exc.strerror or exc}") from None


def load_rgb(path: Path, max_pixels: int = 89_478_485) -> Image.Image:
    """Decode the file at ``path`` to RGB; errors name the file."""
    try:
        return decode_bytes(read_bytes(path), max_pixels).image
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None
