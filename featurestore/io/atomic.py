"""Crash-safe files: the one temp -> fsync -> rename helper every writer uses.

A file written through :func:`atomic_path` (or the helpers built on it) is
either absent or complete: it is written under a temp name in the same folder
(``.tmp-<pid>-<random>-<name>``, same file system, so the rename is atomic),
flushed to disk, renamed over the final name, and the folder is fsynced so the
rename itself survives a power cut. A crash leaves at most a temp file, which
:func:`is_temp` recognises and the next writer removes under the store's lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(final: Path) -> Path:
    """A temp name beside ``final`` that :func:`is_temp` recognises."""
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{final.name}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is an in-progress file of :func:`atomic_path` (safe to delete under the write lock)."""
    return path.name.startswith(TMP_PREFIX)


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path to write ``final``'s content to; publish it when the block succeeds.

    On success the temp file is fsynced, renamed over ``final`` and the folder
    fsynced; on any error (or interrupt) the temp file is removed and ``final``
    is untouched. The folder is created if needed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)


@contextmanager
def atomic_open(final: Path | str, mode: str = "wb", **kwargs: object) -> Iterator[IO]:
    """:func:`atomic_path` as an open file (``"wb"`` or ``"w"``)."""
    with atomic_path(final) as tmp, open(tmp, mode, **kwargs) as fh:  # type: ignore[call-overload]
        yield fh


def write_bytes_atomic(final: Path | str, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_open(final, "wb") as fh:
        fh.write(data)


def copy_atomic(src: Path | str, final: Path | str) -> None:
    """Copy ``src`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
