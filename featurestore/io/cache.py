"""A local read cache of remote files (shard objects), bounded in bytes, least-recently-used evicted.

Files are kept by content: the catalog's sha256 names the file, so two URLs
with the same bytes share one copy and a changed object can never be served
from a stale copy under its old checksum.

A download is streamed into a temp name in the cache folder while it is
hashed, chunk by chunk (hashlib and file writes release the GIL, so several
downloads, their hashing and the readers' decoding overlap), and renamed into
place only once its length and sha256 match the catalog's: a failed, short
or wrong download leaves no entry, and bytes in the bucket that no longer
match the catalog are an :class:`IntegrityError` like a damaged local shard.
No fsync: a copy lost or torn by a power cut fails its check and is fetched again.

A copy is checked again whenever it is served, through
:func:`featurestore.io.verified.check_file` with the cache's own record folder:
a copy whose stat fingerprint (device, inode, size, mtime, ctime) is the one
recorded when it was downloaded (or last hashed) is trusted without reading it,
in this process or a later one; any other copy (rewritten, replaced, touched)
is hashed, and discarded and fetched again if its bytes are wrong.

Use is recorded in the copy's mtime, at most once a minute per copy (touching
moves the fingerprint, so the record is renewed then); eviction removes the
least recently used copies until the total fits the cap. Copies a reader has
been promised (pinned) are not evicted by this process, and the bytes being
downloaded count against the cap: a download that cannot fit is served from
memory instead of being kept. Several processes may share the folder: a
reader sees a whole copy or none.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.io import verified
from featurestore.io.atomic import is_temp, tmp_path_for
from featurestore.io.objects import ObjectStream

# The folder (inside the cache folder) of the copies' verified-digest records.
RECORDS = "verified"
# A copy used again within this long keeps its mtime: LRU order to the minute, and no record to renew.
TOUCH_NS = 60 * 10**9
# A temp file untouched this long is a download whose process died (a live one writes every few ms).
STALE_TEMP_NS = 3600 * 10**9


class ReadCache:
    """Local copies of remote files in ``folder``, at most ``max_bytes`` in all.

    Parameters
    ----------
    folder : Path
        Where the copies live (created on first use).
    max_bytes : int
        Cap of the cache's total size; a single file larger than the cap (or
        than the room left beside the copies being read) is served but not kept.
    """

    def __init__(self, folder: Path, max_bytes: int):
        if max_bytes < 0:
            raise InvalidInputError(f"the read cache's size cap must be >= 0, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.records = self.folder / RECORDS
        self._lock = threading.Lock()
        self._pins: dict[Path, int] = {}  # copies handed to readers and not yet released
        self._reserved = 0  # bytes of the downloads being written

    def path_for(self, sha256: str) -> Path:
        """Where the copy of the content with this sha256 lives."""
        return self.folder / sha256[:2] / sha256

    def fetch(self, name: str, sha256: str, download: Callable[[], bytes | ObjectStream], *,
              pin: bool = False) -> Path | bytes:
        """The verified content of ``name``: a path to the cached copy, or the bytes when it cannot be kept.

        Parameters
        ----------
        name : str
            What the file is (its URL), for error messages.
        sha256 : str
            The checksum the catalog records.
        download : callable
            Returns the remote bytes, or an :class:`~featurestore.io.objects.ObjectStream`
            (called on a miss, or when the copy is damaged).
        pin : bool
            Keep the copy from this cache's eviction until :meth:`release` (a reader will open it).

        Raises
        ------
        IntegrityError
            The downloaded bytes are short or do not match ``sha256`` (nothing is cached).
        """
        path = self.path_for(sha256)
        if pin:
            self._pin(path)
        try:
            if self._intact(path, sha256):
                return path
            got = download()
            stream = ObjectStream(len(got), iter([got])) if isinstance(got, bytes | bytearray | memoryview) else got
            kept = self._store(name, sha256, path, stream)
        except BaseException:
            if pin:
                self.release(path)
            raise
        if pin and not isinstance(kept, Path):
            self.release(path)
        return kept

    def release(self, path: Path) -> None:
        """A reader is done with a copy :meth:`fetch` pinned: it may be evicted again."""
        with self._lock:
            left = self._pins.get(path, 0) - 1
            if left > 0:
                self._pins[path] = left
            else:
                self._pins.pop(path, None)

    def _pin(self, path: Path) -> None:
        with self._lock:
            self._pins[path] = self._pins.get(path, 0) + 1

    def _store(self, name: str, sha256: str, path: Path, stream: ObjectStream) -> Path | bytes:
        """Write a download into the cache, hashing it on the way; its bytes when there is no room."""
        size = int(stream.size)
        with self._lock:
            room = size <= self.max_bytes and self._make_room(self.max_bytes - self._reserved - size)
            if room:
                self._reserved += size
        if not room:
            data = b"".join(stream.chunks)
            _check(name, sha256, len(data), size, hashlib.sha256(data).hexdigest())
            return data
        tmp = tmp_path_for(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            h, written = hashlib.sha256(), 0
            with open(tmp, "wb") as fh:
                for block in stream.chunks:
                    h.update(block)
                    fh.write(block)
                    written += len(block)
            _check(name, sha256, written, size, h.hexdigest())
            os.replace(tmp, path)
            verified.vouch(path, sha256, self.records)  # hashed as it was written: no second read
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= size
        return path

    def _intact(self, path: Path, sha256: str) -> bool:
        """Whether the copy at ``path`` has the bytes of ``sha256`` (a damaged one is removed).

        Hashed only when its fingerprint is not the one recorded (see the
        module docstring); marked most recently used at most once a minute.
        """
        try:
            st = path.stat()
        except OSError:
            return False
        try:
            verified.check_file(path, sha256, "cached copy", remember_in=self.records)
        except IntegrityError:
            self._discard(path)
            return False
        if time.time_ns() - st.st_mtime_ns >= TOUCH_NS:
            try:
                os.utime(path)  # most recently used; the copy was just checked, so its new fingerprint is vouched for
                verified.vouch(path, sha256, self.records)
            except OSError:
                return False
        return True

    def _discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        verified.forget_record(path, self.records)

    def adopt(self, path: Path, sha256: str) -> None:
        """Move a file this process just wrote and uploaded (bytes of ``sha256``) into the cache.

        Renamed when the cache is on the same file system, else dropped: the
        first read then fetches it.
        """
        size = path.stat().st_size
        with self._lock:
            room = size <= self.max_bytes and self._make_room(self.max_bytes - self._reserved - size)
        if not room:
            path.unlink(missing_ok=True)
            return
        dst = self.path_for(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dst)
            verified.vouch(dst, sha256, self.records)
        except OSError:
            path.unlink(missing_ok=True)

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        out: list[tuple[Path, os.stat_result]] = []
        if not self.folder.is_dir():
            return out
        for sub in self.folder.iterdir():
            if not sub.is_dir() or sub.name == RECORDS:
                continue
            for f in sub.iterdir():
                try:
                    st = f.stat()
                    if is_temp(f):  # a download in progress, or one a killed process left: gone after an hour
                        if time.time_ns() - st.st_mtime_ns > STALE_TEMP_NS:
                            f.unlink()
                        continue
                except OSError:  # evicted by another process meanwhile
                    continue
                out.append((f, st))
        return out

    def size(self) -> int:
        """Bytes the cached copies take."""
        return sum(st.st_size for _, st in self._entries())

    def _make_room(self, budget: int) -> bool:
        """Evict unpinned copies, least recently used first, until at most ``budget`` bytes remain.
        Whether that was reached. Call under ``_lock``."""
        entries = sorted(self._entries(), key=lambda e: e[1].st_mtime_ns)
        total = sum(st.st_size for _, st in entries)
        for path, st in entries:
            if total <= max(0, budget):
                break
            if path in self._pins:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            verified.forget_record(path, self.records)
            total -= st.st_size
        return total <= budget

    def evict(self, budget: int) -> int:
        """Remove least-recently-used copies until at most ``budget`` bytes remain; the number removed."""
        with self._lock:
            before = len(self._entries())
            self._make_room(budget)
            return before - len(self._entries())


def _check(name: str, sha256: str, got_bytes: int, size: int, digest: str) -> None:
    if got_bytes != size:
        raise IntegrityError(f"{name}: the download ended after {got_bytes:,} of {size:,} bytes; nothing was cached, "
                             "read it again (check the object store's connection if it persists)")
    if digest != sha256:
        raise IntegrityError(
            f"{name} does not match the sha256 recorded in the catalog (got {digest[:12]}..., expected "
            f"{sha256[:12]}...): the object was damaged or replaced"
        )
