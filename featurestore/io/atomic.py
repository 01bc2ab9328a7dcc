"""Small file-system helpers for crash-safe writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(final: Path) -> Path:
    """A temp name in the same folder as ``final`` (same file system, so rename is atomic)."""
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{final.name}")


def publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final`` and fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
