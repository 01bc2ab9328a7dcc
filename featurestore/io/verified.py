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

A caller may also keep that record across processes (``remember_in``, a folder
of the store's working area): :func:`check_file` then writes, atomically, one
small JSON file per checked path holding the ``(device, inode, size, mtime_ns,
ctime_ns)`` of the file it hashed and the digest found, and a later process
whose ``os.stat`` gives the very same five values trusts that digest instead of
reading the file again (``fs search`` on a 100,000 x 256 index: 0.25 s of
hashing per start). Why that is safe:

* Any change to the bytes moves ``ctime`` (and ``mtime``) to the current time;
  ``os.utime`` can restore ``mtime`` but sets ``ctime`` to now, and only
  changing the system clock (root) could set it back. A file replaced by a
  rename has another inode or ctime. So a modified file never matches a record.
* Timestamps have a granularity (a kernel tick, or seconds on some file
  systems): a write in the same tick as the hashed version would keep its
  ``ctime``. A record is therefore only written when the file's ``ctime`` was
  older than :data:`RACY_NS` when it was opened for hashing (git's "racy
  clean" rule): any later write lands in a later tick.
* A record only vouches for the digest it names; it is accepted only when
  that equals the catalog's sha256. Whoever could forge a record could as well
  rewrite the catalog, which sits in the same store, so it adds no new trust.
* A record that cannot be read or written (read-only store, full disk) only
  means hashing again; ``fs verify`` never uses records and always hashes.

A file the caller has just written itself from bytes it hashed on the way
(a bucket store's read cache streams each download through sha256 into a
private temp name and renames it into place) is recorded by :func:`vouch`
without reading it again. The racy-tick rule cannot apply to it (its ctime is
now); what it guards against there is a size-preserving write into the
cache's copy, in place, by another program within one timestamp tick of the
rename, and such a writer could as well have damaged the copy after it was hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

from featurestore.errors import IntegrityError
from featurestore.io.atomic import atomic_open

_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)

_lock = threading.Lock()
_checked: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat key, digest found to match)

# A digest is remembered across processes only for a file whose ctime was at least this much older than
# the clock when it was opened for hashing: coarser than any file system's timestamp tick (FAT's 2 s).
RACY_NS = 2_000_000_000
# The folder of a store's working area (``store.root``) that keeps those records.
RECORDS_FOLDER = "verified"
_KEY_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


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


def record_path(folder: Path | str, path: Path | str) -> Path:
    """Where the cross-process record of ``path``'s verified digest is kept in ``folder``."""
    name = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32]
    return Path(folder) / f"{name}.json"


def _recorded(folder: Path | str, path: Path | str, key: tuple[int, ...]) -> str | None:
    """The digest recorded for ``path`` in exactly the version ``key``; None when absent, stale or unreadable."""
    try:
        with open(record_path(folder, path), encoding="utf-8") as fh:
            rec = json.load(fh)
        if rec.get("path") != os.path.abspath(path) or tuple(rec[f] for f in _KEY_FIELDS) != key:
            return None
        return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remember(folder: Path | str, path: Path | str, st: os.stat_result, digest: str, opened_ns: int) -> None:
    """Record (atomically) that ``path`` in the version ``st`` hashes to ``digest``; best effort."""
    if opened_ns - st.st_ctime_ns < RACY_NS:
        return  # a write in the same timestamp tick could keep this ctime: hash again next time
    rec = dict(zip(_KEY_FIELDS, _key(st), strict=True)) | {"path": os.path.abspath(path), "sha256": digest}
    try:
        with atomic_open(record_path(folder, path), "w", encoding="utf-8") as fh:
            json.dump(rec, fh)
    except OSError:
        pass  # a read-only or full store: the next process hashes the file again


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


def check_file(path: Path | str, sha256: str | None, what: str, hint: str = "", *, remedy: str = "",
               remember_in: Path | str | None = None) -> None:
    """Refuse ``path`` unless it is a regular file whose bytes have the recorded ``sha256``.

    ``sha256=None`` (a file registered before digests were recorded) checks only
    that it is a regular file. The digest is computed once per process per file
    version, or once per file version at all with ``remember_in`` (a folder
    keeping the record across processes; see the module docstring).

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
    if remember_in is not None and _recorded(remember_in, path, _key(st)) == sha256:
        with _lock:
            _checked[name] = (_key(st), sha256)
        return
    opened_ns = time.time_ns()
    digest, st = file_sha256(path, what, hint, remedy=remedy)
    if digest != sha256:
        with _lock:
            _checked.pop(name, None)
        raise _damaged(f"{what} {path} is corrupt or was replaced: its bytes do not match the sha256 the catalog "
                       f"recorded for it (sha256 {digest[:12]}..., recorded {sha256[:12]}...)", hint, remedy, path)
    with _lock:
        _checked[name] = (_key(st), sha256)
    if remember_in is not None:
        _remember(remember_in, path, st, digest, opened_ns)


def vouch(path: Path | str, sha256: str, remember_in: Path | str | None = None) -> None:
    """Record that ``path``, as it is now, holds the bytes of ``sha256``, which the caller hashed as it wrote them.

    Remembered in this process and, with ``remember_in``, across processes (see
    the module docstring for why the racy-tick rule is not applied here).
    Recording is best effort, like :func:`check_file`'s.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    with _lock:
        _checked[os.fspath(path)] = (_key(st), sha256)
    if remember_in is not None:
        _remember(remember_in, path, st, sha256, st.st_ctime_ns + RACY_NS)


def forget_record(path: Path | str, remember_in: Path | str) -> None:
    """Drop what is known of ``path`` (a file being deleted), in this process and in ``remember_in``."""
    with _lock:
        _checked.pop(os.fspath(path), None)
    try:
        record_path(remember_in, path).unlink(missing_ok=True)
    except OSError:
        pass


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
