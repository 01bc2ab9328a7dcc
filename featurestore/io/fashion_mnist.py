"""Export packaged data sets as image folders that ``fs ingest`` can read.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``, which
installs the four original gzipped IDX files under
:data:`FASHION_MNIST_DIR`. :func:`export_fashion_mnist` writes them as

``dest/<superclass>/<class>/<split>-<index:05d>.<ext>``

where ``split`` is ``train`` or ``test`` (the ``t10k`` files) and ``index`` is the
image's position in that split's file, so every exported file can be traced
back to its source row. The superclass level gives a coarse label for
hierarchical experiments (:data:`FASHION_MNIST_SUPERCLASS`):

========  =====================================
footwear  sandal, sneaker, ankle-boot
tops      t-shirt, pullover, coat, shirt
bottoms   trouser
dresses   dress
bags      bag
========  =====================================
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.io.atomic import TMP_PREFIX, write_bytes_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Filesystem-safe class names, in label order (label 0 is ``t-shirt``).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

#: The names used by the data set's authors, in label order.
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Class -> superclass (the first folder level of an export).
FASHION_MNIST_SUPERCLASS: dict[str, str] = {
    "t-shirt": "tops",
    "trouser": "bottoms",
    "pullover": "tops",
    "dress": "dresses",
    "coat": "tops",
    "sandal": "footwear",
    "shirt": "tops",
    "sneaker": "footwear",
    "bag": "bags",
    "ankle-boot": "footwear",
}

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test", "all")
FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "jpg": ("JPEG", "jpg")}
JPEG_QUALITY = 90
# Records the encoding parameters of the last export that finished in a folder.
_STAMP = ".fashion-mnist-export.json"

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetMissingError(FeatureStoreError, FileNotFoundError):
    """The files of a packaged data set are not where they were looked for."""

    def __init__(self, directory: Path, missing: list[str] | None = None):
        msg = "Fashion-MNIST not found at {directory}: install it with `apt-get install dataset-fashion-mnist` " \
              "(or pass {source} DIR)"
        if missing:
            msg += "; missing: {missing_files}"
        super().__init__(msg, params=("source",), directory=directory, missing_files=", ".join(missing or []))
        self.missing = list(missing or [])


@dataclass
class ExportSummary:
    """What :func:`export_fashion_mnist` did."""

    written: int
    skipped_existing: int
    dest: Path
    #: images per class in the export (written + skipped), in label order
    per_class: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.written + self.skipped_existing


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into an array of its declared shape.

    Parameters
    ----------
    path : Path or str

    Returns
    -------
    ndarray
        ``uint8`` for the MNIST family (type code 0x08); other IDX type codes
        give the matching native-endian dtype.

    Raises
    ------
    InvalidInputError
        The file is missing, not gzip/IDX, truncated, or has trailing bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise InvalidInputError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"cannot decompress it ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise _corrupt(path, "bad magic number (expected 0x0000 followed by type and rank bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise _corrupt(path, f"unknown IDX type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise _corrupt(path, f"header declares {ndim} dimensions but is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise _corrupt(path, f"shape {shape} needs {expected} data bytes but the file has {body}")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _corrupt(path: Path, reason: str) -> InvalidInputError:
    return InvalidInputError(
        f"corrupt IDX file {path}: {reason}; replace it "
        "(for Fashion-MNIST: `apt-get install --reinstall dataset-fashion-mnist`)"
    )


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"640x480"`` into ``(width, height)``."""
    try:
        w, h = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"size must look like WIDTHxHEIGHT (e.g. 640x480), got {text!r}") from None
    if w < 1 or h < 1:
        raise InvalidInputError(f"size must be positive, got {text!r}")
    return w, h


def load_fashion_mnist(
    split: str = "all", source: Path | str | None = None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Load images and labels of the requested split(s).

    Returns
    -------
    list of (split, images, labels)
        ``images`` is ``(n, 28, 28)`` uint8, ``labels`` ``(n,)`` uint8 in 0..9.

    Raises
    ------
    DatasetMissingError
        Some of the needed files are absent from ``source``.
    InvalidInputError
        A file is corrupt or images and labels disagree.
    """
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    directory = Path(source) if source is not None else FASHION_MNIST_DIR
    names = ("train", "test") if split == "all" else (split,)
    missing = [f for name in names for f in _FILES[name] if not (directory / f).is_file()]
    if missing:
        raise DatasetMissingError(directory, missing)
    out = []
    for name in names:
        img_path, lbl_path = (directory / f for f in _FILES[name])
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise _corrupt(
                img_path, f"expected (n, rows, cols) uint8 images, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise _corrupt(
                lbl_path,
                f"{labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                f"for {images.shape[0]} images in {img_path.name}",
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise _corrupt(lbl_path, f"label {int(labels.max())} is outside 0..9")
        out.append((name, images, labels))
    return out


def _balanced_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Positions of a class-balanced sample, sorted; deterministic for a seed.

    Each class gets ``limit // 10`` images and the first ``limit % 10`` classes
    one more; a class with fewer images than its quota gives all it has (the
    export is then smaller than ``limit``).
    """
    rng = np.random.default_rng(seed)
    n_classes = len(FASHION_MNIST_CLASSES)
    picked = []
    for label in range(n_classes):
        quota = limit // n_classes + (1 if label < limit % n_classes else 0)
        members = np.flatnonzero(labels == label)
        take = min(quota, members.size)
        if take:
            picked.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def _encode(pixels: np.ndarray, size: tuple[int, int] | None, pil_format: str) -> bytes:
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    if pil_format == "JPEG":
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly it; True if written."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    write_bytes_atomic(path, data)
    return True


def export_fashion_mnist(
    dest: Path | str,
    limit: int | None = None,
    size: tuple[int, int] | None = None,
    fmt: str = "png",
    split: str = "all",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
    source: Path | str | None = None,
) -> ExportSummary:
    """Write Fashion-MNIST as ``dest/<superclass>/<class>/<split>-<index:05d>.<ext>``.

    Parameters
    ----------
    dest : Path
        Output folder (created if needed).
    limit : int, optional
        Export a class-balanced sample of this many images (``limit // 10`` per
        class, the remainder to the first classes), drawn from the chosen
        split(s) with ``seed``; the same arguments always pick the same images.
    size : (width, height), optional
        Upscale the 28x28 originals with BICUBIC to this size (aspect ratio is
        not kept) and save as 3-channel RGB, as most CNN pipelines expect.
        Without it images are saved as they are: 28x28 grayscale ("L").
    fmt : {"png", "jpeg"}
        PNG (lossless) or JPEG at quality 90 (``.jpg`` files). The high-resolution
        use case is ``size=(640, 480), fmt="jpeg"``.
    split : {"train", "test", "all"}
    seed : int
        Seed of the ``limit`` sample.
    progress : callable(done, total), optional
        Called from the calling thread after each image.
    workers : int
        Encoding threads (Pillow releases the GIL while encoding).
    source : Path, optional
        Folder holding the four ``*-ubyte.gz`` files; :data:`FASHION_MNIST_DIR` by default.

    Returns
    -------
    ExportSummary

    Notes
    -----
    Each file is written to a temporary name in its folder, fsynced, then
    renamed, so an interrupted export leaves no partial image; leftover
    temporaries from an interrupted run are removed at the start of the next.
    A file that already exists with exactly the bytes that would be written is
    skipped, so re-running the same export rewrites nothing. When the last
    export into ``dest`` finished with the same ``size`` and ``fmt`` (recorded
    in ``dest/.fashion-mnist-export.json``), existing files are trusted without
    even being re-encoded, which makes a re-run nearly free; the record is
    removed as soon as an export with other parameters starts.
    """
    size = _check_export_args(fmt, limit, workers, size)
    pil_format, ext = FORMATS[fmt]
    data = load_fashion_mnist(split, source)

    # one flat table of (split, index, label) over the chosen splits
    split_of = np.concatenate([np.full(len(lb), i, dtype=np.int8) for i, (_, _, lb) in enumerate(data)])
    index_of = np.concatenate([np.arange(len(lb)) for _, _, lb in data])
    labels = np.concatenate([lb for _, _, lb in data])
    chosen = np.arange(labels.size) if limit is None else _balanced_sample(labels, limit, seed)

    dest = Path(dest)
    params = {"format": pil_format, "size": list(size) if size else None}
    trusted, class_dirs = _prepare_dest(dest, params)
    per_class = dict.fromkeys(FASHION_MNIST_CLASSES, 0)
    jobs = []
    for pos in chosen.tolist():
        name, images, _ = data[split_of[pos]]
        cls = FASHION_MNIST_CLASSES[labels[pos]]
        per_class[cls] += 1
        jobs.append((class_dirs[cls] / f"{name}-{index_of[pos]:05d}.{ext}", images[index_of[pos]]))

    def work(job: tuple[Path, np.ndarray]) -> bool:
        path, pixels = job
        if trusted and path.exists():
            return False
        return _write_if_changed(path, _encode(pixels, size, pil_format))

    written = _run_bounded(work, jobs, workers, progress)
    write_bytes_atomic(dest / _STAMP, json.dumps(params).encode())
    skipped = len(jobs) - written
    return ExportSummary(written=written, skipped_existing=skipped, dest=dest, per_class=per_class)


def _check_export_args(fmt: str, limit: int | None, workers: int, size: tuple[int, int] | None
                       ) -> tuple[int, int] | None:
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown image format {fmt!r}; available: png, jpeg")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise InvalidInputError(f"limit must be a positive number of images, got {limit!r}")
    if workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    if size is None:
        return None
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise InvalidInputError(f"size must be positive, got {size[0]}x{size[1]}")
    need = size[0] * size[1] * 3
    if need > MAX_EXPORT_IMAGE_BYTES:
        raise InvalidInputError(
            f"{{size}} {size[0]}x{size[1]} would need {need / 2**20:,.0f} MiB per image (RGB, one per worker, "
            f"several times that while encoding); the limit is {MAX_EXPORT_IMAGE_BYTES // 2**20} MiB per image, "
            "e.g. 4096x4096", params=("size",)
        )
    return size


MAX_EXPORT_IMAGE_BYTES = 64 * 2**20
"""Largest exported image, as RGB bytes (4096x4096 fits): an upscale is held several times while encoded."""


def _prepare_dest(dest: Path, params: dict) -> tuple[bool, dict[str, Path]]:
    """Create the class folders, remove leftover temp files; whether existing files can be trusted."""
    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / _STAMP
    try:
        trusted = json.loads(stamp.read_text()) == params
    except (OSError, ValueError):
        trusted = False
    if not trusted:
        stamp.unlink(missing_ok=True)
    class_dirs = {c: dest / FASHION_MNIST_SUPERCLASS[c] / c for c in FASHION_MNIST_CLASSES}
    for folder in class_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
    return trusted, class_dirs


def _run_bounded(work: Callable[[Any], bool], jobs: list, workers: int,
                 progress: Callable[[int, int], None] | None) -> int:
    """Run ``work`` over ``jobs`` in a thread pool with a bounded window; how many returned True."""
    written = 0
    total = len(jobs)
    window = max(4, workers * 8)  # bounded in flight, so a failure stops the export promptly
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[bool]] = deque()
        it = iter(jobs)
        try:
            for done in range(1, total + 1):
                while len(pending) < window:
                    job = next(it, None)
                    if job is None:
                        break
                    pending.append(pool.submit(work, job))
                written += bool(pending.popleft().result())
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return written
