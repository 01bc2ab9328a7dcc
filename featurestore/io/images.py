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

Draft decode (issue 29): given ``draft=(w, h)``, a JPEG is decoded at the
smallest of 1/8, 1/4, 1/2 or full scale that still covers ``w`` x ``h``
(``Image.draft``: libjpeg scales in its inverse DCT, so the skipped pixels are
never computed), before the EXIF rotation, whose quarter turns swap the sides
asked for. Other formats are decoded in full.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featurestore.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from featurestore.io.objects import ObjectNotFoundError, ObjectTooLargeError, is_object_url, read_object

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Truncated files must fail, not decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(InvalidInputError):
    """A file that is not a readable image; the message is the reason only.

    The subclasses say what kind of failure it was (the HTTP service answers
    415 / 413 by type); a plain ``ImageDecodeError`` is a corrupt, truncated or
    unreadable file.
    """


class NotAnImageError(ImageDecodeError, UnsupportedMediaError):
    """Empty, or bytes Pillow cannot identify as any image format."""


class ImageTooLargeError(ImageDecodeError, PayloadTooLargeError):
    """A decompression bomb: more pixels than the limit."""


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


_pillow_limit_lock = threading.Lock()


def _allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels`` (our own check below enforces the limit).

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` in ``Image.open``
    whatever the caller wants; a larger ``FS_MAX_IMAGE_PIXELS`` raises Pillow's
    process-wide limit to match. It only ever goes up, so a concurrent caller
    with a smaller limit is still held to its own by :func:`_open_checked`.
    """
    with _pillow_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and max_pixels > current:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if max_pixels < 1:
        raise InvalidInputError(f"the pixel limit must be positive, got {max_pixels} (FS_MAX_IMAGE_PIXELS)")
    _allow_pixels(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ImageTooLargeError("decompression bomb: image exceeds the pixel limit") from None
        except UnidentifiedImageError:
            raise NotAnImageError("not an image (Pillow cannot identify the format)") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a format's header that Pillow cannot parse
            raise ImageDecodeError(f"corrupt image header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(raise FS_MAX_IMAGE_PIXELS if the image is genuine)"
        )
    return img


def decode_bytes(data: bytes, max_pixels: int = 89_478_485, draft: tuple[int, int] | None = None) -> DecodedImage:
    """Decode ``data`` (validating it) and return metadata plus RGB pixels.

    With ``draft`` a JPEG may be decoded at a reduced scale that still covers
    ``draft`` (module docstring); ``width`` and ``height`` are then those of the
    reduced image.
    """
    if not data:
        raise NotAnImageError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    img = _open_checked(data, max_pixels)
    fmt = img.format or "unknown"
    mode = img.mode
    try:
        if draft is not None and fmt == "JPEG":
            w, h = draft
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed or rotated by a quarter turn
                w, h = h, w
            img.draft("RGB", (w, h))  # type: ignore[attr-defined]  # JpegImageFile; a no-op when nothing fits
        img.load()
        # exif_transpose copies the image even when there is nothing to do; only call it when needed.
        if img.getexif().get(0x0112, 1) not in (0, 1):
            img = ImageOps.exif_transpose(img) or img
        rgb = to_rgb(img)
        rgb.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt} data: {exc}") from None
    return DecodedImage(digest, rgb.width, rgb.height, fmt, mode, len(data), rgb)


MAX_FILE_BYTES = 200 * 1024 * 1024
"""Default largest image file read (``FS_MAX_FILE_MB``, 200 MiB)."""

_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(mode: int) -> ImageDecodeError:
    kind = _kind(mode)
    what = kind if kind == "not a regular file" else f"not a regular file: {kind}"
    return ImageDecodeError(f"{what}; only regular image files are read")


def _human(n: float) -> str:
    return f"{n / 2**20:,.4g} MiB" if n >= 2**20 else f"{n / 2**10:,.4g} KiB"


def _too_large(size: int, max_bytes: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"file is larger than the {_human(max_bytes)} limit ({_human(size)} or more); "
        "raise FS_MAX_FILE_MB if it is a genuine image"
    )


def read_bytes(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read an image file: regular files only, at most ``max_bytes``; OS errors become a one-line reason.

    An ``s3://bucket/key`` string is read from object storage
    (:mod:`featurestore.io.objects`) under the same size cap.

    FIFOs, devices, sockets and symlinks to them are refused from ``os.stat``
    before anything is opened (opening a FIFO blocks until a writer appears;
    reading ``/dev/zero`` never ends). The file is opened with ``O_NONBLOCK``
    and checked again on the open descriptor, so a file swapped for a FIFO in
    between cannot block either, and no more than ``max_bytes + 1`` bytes are
    ever read.
    """
    if is_object_url(path):
        return _read_object(str(path), max_bytes)
    try:
        return _read_regular(path, max_bytes)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageDecodeError("broken symlink") from None
        raise ImageDecodeError("file not found (moved or deleted since it was listed)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(f"unreadable: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ImageDecodeError(f"invalid path: {exc}") from None


def _read_object(url: str, max_bytes: int) -> bytes:
    try:
        return read_object(url, max_bytes)
    except ObjectTooLargeError as exc:
        raise _too_large(exc.size, max_bytes) from None
    except ObjectNotFoundError:
        raise ImageDecodeError("object not found (deleted since it was listed)") from None


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ImageDecodeError("is a directory")
    if not stat.S_ISREG(mode):
        raise _not_regular(mode)


def _read_regular(path: Path | str, max_bytes: int) -> bytes:
    st = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device
    _check_regular(st.st_mode)
    if st.st_size > max_bytes:
        raise _too_large(st.st_size, max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        _check_regular(os.fstat(fd).st_mode)  # the same file as stat()ed, not one swapped in since
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:  # grew after the stat
        raise _too_large(size, max_bytes)
    return b"".join(chunks)


def load_rgb(path: Path | str, max_pixels: int = 89_478_485, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """Decode the file at ``path`` to RGB; errors name the file."""
    try:
        return decode_bytes(read_bytes(path, max_bytes), max_pixels).image
    except ImageDecodeError as exc:
        raise type(exc)(f"{path}: {exc}") from None  # keeps the kind
