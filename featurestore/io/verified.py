"""Stored files checked before they are opened: regular files only, bytes matching the catalog's sha256.

Every file the store reads (feature shards, index files, projections, model
checkpoints, run artifacts) is registered in the catalog with the sha256 of its
bytes, under the feature set (or model, or run) that owns it. Before a reader
opens one, :func:`check_file`

* refuses anything but a regular file, from ``os.stat`` (a FIFO would block the
  open forever, ``/dev/zero`` never ends, a directory is no file), and
* hashes the whole file and compares the digest with the recorded one, so a
  file of another set swapped in (or symlinked) under this name, or a value
  rewritten through h5py (whose own Fletcher-32 checksums the writer recomputes),
  is an :class:`~featurestore.errors.IntegrityError` before any byte reaches h5py
  or usearch's native code.

Hashing costs one read of the file, so it is done once per process per file
version: a file is hashed again only when its ``(device, inode, size, mtime,
ctime)`` changed. ``ctime`` cannot be set back from user space (``touch -d``
sets it to now), so rewriting a file in place always re-triggers the hash.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

from featurestore.errors import IntegrityError

_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)

_lock = threading.Lock()
_checked: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat key, digest found to match)


def _damaged(message: str, hint: str, remedy: str, path: Path | str) -> IntegrityError:
    return IntegrityError(f"{message}; {hint}" if hint else message, remedy=remedy, path=path)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (``a FIFO (named pipe)``, ``a directory``...)."""
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return "not a regular file"


def regular_stat(path: Path | str, what: str, hint: str = "", *, remedy: str = "") -> os.stat_result:
    """``os.stat(path)`` (symlinks followed) of a regular file; anything else is an :class:`IntegrityError`.

    Parameters
    ----------
    what : str
        What the file is, for the message (``feature shard``, ``index file``...).
    hint : str
        Appended to the message (after "; ") when given.
    remedy : str
        The next step, as a key the front ends word (:class:`~featurestore.errors.FeatureStoreError`).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _damaged(f"{what} {path} is missing or unreadable (no such file)", hint, remedy, path) from None
    except OSError as exc:
        raise _damaged(f"{what} {path} is missing or unreadable ({exc.strerror or exc})", hint, remedy, path) from None
    if not stat.S_ISREG(st.st_mode):
        raise _damaged(f"{what} {path} is not a regular file ({kind_of(st.st_mode)})", hint, remedy, path)
    return st


def _key(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: Path | str, what: str = "file", hint: str = "check the file", *,
                remedy: str = "") -> tuple[str, os.stat_result]:
    """sha256 of a regular file's bytes and its stat, opened without blocking (a FIFO swapped in cannot hang).

    Raises
    ------
    IntegrityError
        The path is missing or not a regular file.
    """
    regular_stat(path, what, hint, remedy=remedy)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _damaged(f"{what} {path} is missing or unreadable ({exc.strerror or exc})", hint, remedy, path) from None
    try:
        st = os.fstat(fd)  # the file opened, not one swapped in since the stat
        if not stat.S_ISREG(st.st_mode):
            raise _damaged(f"{what} {path} is not a regular file ({kind_of(st.st_mode)})", hint, remedy, path)
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest(), st


def check_file(path: Path | str, sha256: str | None, what: str, hint: str = "", *, remedy: str = "") -> None:
    """Refuse ``path`` unless it is a regular file whose bytes have the recorded ``sha256``.

    ``sha256=None`` (a file registered before digests were recorded) checks only
    that it is a regular file. The digest is computed once per process per file
    version (see the module docstring).

    Raises
    ------
    IntegrityError
        Missing, not a regular file, or other bytes than the catalog records;
        the message names the file and ends with ``hint``.
    """
    st = regular_stat(path, what, hint, remedy=remedy)
    if not sha256:
        return
    name = os.fspath(path)
    with _lock:
        hit = _checked.get(name)
    if hit is not None and hit == (_key(st), sha256):
        return
    digest, st = file_sha256(path, what, hint, remedy=remedy)
    if digest != sha256:
        with _lock:
            _checked.pop(name, None)
        raise _damaged(f"{what} {path} is corrupt or was replaced: its bytes do not match the sha256 the catalog "
                       f"recorded for it (sha256 {digest[:12]}..., recorded {sha256[:12]}...)", hint, remedy, path)
    with _lock:
        _checked[name] = (_key(st), sha256)


def digest_written(path: Path | str) -> str:
    """sha256 of a file this process just wrote, remembered as checked (its first read does not hash it again)."""
    digest, st = file_sha256(path)
    with _lock:
        _checked[os.fspath(path)] = (_key(st), digest)
    return digest


def mark_checked(path: Path | str, sha256: str) -> None:
    """Record that ``path``, as it is now, has been found to hold the bytes of ``sha256`` (by the caller)."""
    st = os.stat(path)
    with _lock:
        _checked[os.fspath(path)] = (_key(st), sha256)


def forget() -> None:
    """Drop the record of files already checked (the next open of each hashes it again)."""
    with _lock:
        _checked.clear()
