"""Thumbnails of catalogued images, cached in the store by content.

A thumbnail is keyed by the image's sha256 and the size, so it never goes stale
(content is immutable; a file changed since ingest is refused, not thumbnailed):

    <store>/thumbnails/<size>/<sha[:2]>/<sha>.jpg

It is written with the one atomic-file helper (temp -> fsync -> rename), so a
crash leaves at most a ``.tmp-*`` file; :func:`sweep_temp_files` removes those.
When the store cannot be written (a read-only mount) the thumbnail is served
without being cached.

A store in a bucket keeps them under its prefix too (the same key,
``thumbnails/<size>/<sha[:2]>/<sha>.jpg``): a thumbnail is made once for the
store, PUT whole, and every other machine GETs it into its local folder on
first use instead of reading and decoding the original again. The catalog
records no digest of a thumbnail, so one fetched from the bucket is accepted
only if it is a JPEG Pillow can open at the expected size; anything else is
made again from the (sha256-checked) original and PUT over it.

Images are decoded as everywhere else (EXIF orientation applied, any mode to
RGB, see :mod:`featurestore.io.images`); JPEGs are decoded at a reduced scale
(``Image.draft``) when the thumbnail is much smaller than the original.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import stat
import time
import warnings
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps

from featurestore.errors import FeatureStoreError, IntegrityError
from featurestore.io.atomic import TMP_PREFIX, write_bytes_atomic
from featurestore.io.images import ImageDecodeError, to_rgb
from featurestore.io.objects import (
    ObjectNotFoundError,
    ObjectStorageError,
    ObjectTooLargeError,
    is_object_url,
    read_object,
)

THUMBNAIL_SIZES = (128, 256, 512, 1024)
"""The sizes (longest side, pixels) a thumbnail can have; others are refused so the cache stays bounded."""
FOLDER = "thumbnails"
JPEG_QUALITY = 85


class SourceChangedError(IntegrityError):
    """The image's file no longer holds the content catalogued at ingest."""


class SourceUnavailableError(FeatureStoreError, FileNotFoundError):
    """The image's file is gone, unreadable or not a regular file."""


class ThumbnailObjects(Protocol):
    """Where a bucket store keeps its thumbnails (:class:`featurestore.io.storage.BucketStorage` is one)."""

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...


def thumbnail_path(store_root: Path, sha256: str, size: int) -> Path:
    return store_root / thumbnail_key(sha256, size)


def thumbnail_key(sha256: str, size: int) -> str:
    """The thumbnail's path relative to the store (its object key in a bucket store)."""
    return f"{FOLDER}/{size}/{sha256[:2]}/{sha256}.jpg"


def _fetched(remote: ThumbnailObjects, key: str, size: int) -> bytes | None:
    """The thumbnail another machine made, if the bucket has a sound one."""
    try:
        jpeg = remote.get(key)
    except (ObjectNotFoundError, ObjectStorageError):
        return None
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(jpeg)) as im:
            warnings.simplefilter("ignore")
            sound = im.format == "JPEG" and max(im.size) <= size
            im.load()
    except Exception:  # noqa: BLE001 - any undecodable object is made again
        return None
    return jpeg if sound else None


def read_source(path: Path | str, sha256: str, nbytes: int) -> bytes:
    """The bytes of a catalogued image file, checked against the size and sha256 recorded at ingest.

    Only regular files are read (a FIFO or device put in place of the image is
    refused without blocking), and at most one byte more than was catalogued.
    An ``s3://`` source is read from object storage under the same rules.

    Raises
    ------
    SourceUnavailableError
        The file is missing, unreadable or not a regular file.
    SourceChangedError
        Its content differs from what was ingested.
    """
    if is_object_url(path):
        data = _read_object_source(str(path), nbytes)
    else:
        data = _read_file_source(path, nbytes)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != nbytes or not hmac.compare_digest(digest, sha256):
        raise SourceChangedError(f"image file {path} changed since it was ingested (sha256 differs)",
                                 remedy="re-ingest", path=path)
    return data


def _read_object_source(url: str, nbytes: int) -> bytes:
    try:
        return read_object(url, max(0, int(nbytes)) + 1)
    except ObjectNotFoundError:
        raise SourceUnavailableError(f"image object {url} is missing (moved or deleted since ingest)") from None
    except ObjectTooLargeError:
        raise SourceChangedError(f"image object {url} changed since it was ingested (size differs)",
                                 remedy="re-ingest", path=url) from None
    except ObjectStorageError as exc:
        raise SourceUnavailableError(str(exc)) from None


def _read_file_source(path: Path | str, nbytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SourceUnavailableError(f"image file {path} is missing (moved or deleted since ingest)") from None
    except OSError as exc:
        raise SourceUnavailableError(f"image file {path} cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise SourceUnavailableError(f"image file {path} is not a regular file any more")
        return fh.read(max(0, int(nbytes)) + 1)


def render_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG of at most ``size`` x ``size`` pixels (aspect kept, never enlarged) of an image file's bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"decompression bomb: {w}x{h} pixels exceeds the limit of {max_pixels:,}")
            orientation = img.getexif().get(0x0112, 1)
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # type: ignore[attr-defined]  # decode at 1/2, 1/4 or 1/8 scale when that is still >= size
            img.load()
            if orientation not in (0, 1):
                img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
            rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
        except ImageDecodeError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"cannot decode the image: {exc}") from None
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def thumbnail(store_root: Path, source: Path | str, sha256: str, nbytes: int, size: int,
              max_pixels: int = 89_478_485, remote: ThumbnailObjects | None = None) -> bytes:
    """The cached thumbnail of a catalogued image, made (and cached, when the store is writable) on first use.

    Parameters
    ----------
    store_root : Path
        The store folder (thumbnails go under ``thumbnails/``).
    source, sha256, nbytes
        The image's file and the sha256 and size recorded at ingest.
    size : int
        One of :data:`THUMBNAIL_SIZES`.
    remote : ThumbnailObjects, optional
        A bucket store's objects: a thumbnail missing locally is fetched from
        there, and one made here is PUT there (see the module docstring).

    Raises
    ------
    ValueError
        ``size`` is not one of :data:`THUMBNAIL_SIZES`.
    SourceUnavailableError, SourceChangedError, ImageDecodeError
        The file cannot be thumbnailed.
    """
    if size not in THUMBNAIL_SIZES:
        raise ValueError(f"thumbnail size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
    cached = thumbnail_path(store_root, sha256, size)
    try:
        return cached.read_bytes()
    except OSError:
        pass
    key = thumbnail_key(sha256, size)
    jpeg = _fetched(remote, key, size) if remote is not None else None
    if jpeg is None:
        jpeg = render_thumbnail(read_source(source, sha256, nbytes), size, max_pixels)
        if remote is not None:
            try:
                remote.put(key, jpeg)
            except ObjectStorageError:
                pass  # served and kept locally; another machine makes its own
    try:
        write_bytes_atomic(cached, jpeg)
    except OSError:
        pass  # a read-only store still serves thumbnails, it just cannot keep them
    return jpeg


def sweep_temp_files(store_root: Path, older_than: float = 3600.0) -> int:
    """Remove temp files that crashed cache writers left under ``thumbnails/`` and ``maps/``.

    Only files older than ``older_than`` seconds go, so another process's write in progress is left alone.
    """
    removed = 0
    limit = time.time() - older_than
    temps = [*(store_root / FOLDER).glob(f"*/*/{TMP_PREFIX}*"), *(store_root / "maps").glob(f"*/{TMP_PREFIX}*")]
    for tmp in temps:
        try:
            if tmp.is_file() and tmp.stat().st_mtime < limit:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    return removed
