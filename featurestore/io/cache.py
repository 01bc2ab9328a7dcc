"""A local read cache of remote files (shard objects), bounded in bytes, least-recently-used evicted.

Files are kept by content: the catalog's sha256 names the file, so two URLs
with the same bytes share one copy and a changed object can never be served
from a stale copy under its old checksum. Every file is checked against the
sha256 both when it is fetched (before it enters the cache) and when it is
served, so a cache damaged on disk is repaired by one more fetch, and bytes
in the bucket that no longer match the catalog are an :class:`IntegrityError`
like a damaged local shard. Use is recorded in the file's mtime; eviction
removes the least recently used files until the total fits the cap. Writes go
through the one temp -> fsync -> rename helper, so several processes may share
the folder: a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.io.atomic import is_temp, tmp_path_for
from featurestore.io.verified import mark_checked


def _digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


class ReadCache:
    """Local copies of remote files in ``folder``, at most ``max_bytes`` in all.

    Parameters
    ----------
    folder : Path
        Where the copies live (created on first use).
    max_bytes : int
        Cap of the cache's total size; a single file larger than the cap is
        served but not kept.
    """

    def __init__(self, folder: Path, max_bytes: int):
        if max_bytes < 0:
            raise InvalidInputError(f"the read cache's size cap must be >= 0, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self._checked: dict[Path, tuple[int, ...]] = {}  # copies hashed by this object, by stat key

    def path_for(self, sha256: str) -> Path:
        """Where the copy of the content with this sha256 lives."""
        return self.folder / sha256[:2] / sha256

    def fetch(self, name: str, sha256: str, download: Callable[[], bytes]) -> Path | bytes:
        """The verified content of ``name``: a path to the cached copy, or the bytes when too large to keep.

        Parameters
        ----------
        name : str
            What the file is (its URL), for error messages.
        sha256 : str
            The checksum the catalog records.
        download : callable
            Returns the remote bytes (called on a miss, or when the copy is damaged).

        Raises
        ------
        IntegrityError
            The downloaded bytes do not match ``sha256``.
        """
        path = self.path_for(sha256)
        if self._intact(path, sha256):
            return path
        data = download()
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise IntegrityError(
                f"{name} does not match the sha256 recorded in the catalog (got {got[:12]}..., expected "
                f"{sha256[:12]}...): the object was damaged or replaced"
            )
        if len(data) > self.max_bytes:
            return data
        self.evict(self.max_bytes - len(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp name and rename (a reader sees a whole copy or none) but no fsync: a copy lost or torn by a
        # power cut fails the sha256 check on its next use and is fetched again.
        tmp = tmp_path_for(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._remember(path, sha256)
        return path

    def _intact(self, path: Path, sha256: str) -> bool:
        """Whether the copy at ``path`` has the bytes of ``sha256``; marks it most recently used.

        A copy is hashed once per process per version of the file (its stat
        key, recorded after our own ``utime``): a copy damaged or replaced on
        disk changes size or ctime and is hashed again.
        """
        try:
            st = path.stat()
        except OSError:
            return False
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._checked.get(path) != key and _digest(path) != sha256:
            self._checked.pop(path, None)
            return False
        try:
            os.utime(path)  # most recently used
            self._remember(path, sha256)
        except OSError:
            return False
        return True

    def _remember(self, path: Path, sha256: str) -> None:
        # Both here and for the shard readers' own check (featurestore.io.verified): one hash per copy.
        st = path.stat()
        self._checked[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        mark_checked(path, sha256)

    def adopt(self, path: Path, sha256: str) -> None:
        """Move a file this process just wrote and uploaded (bytes of ``sha256``) into the cache.

        Renamed when the cache is on the same file system, else dropped: the
        first read then fetches it.
        """
        size = path.stat().st_size
        if size > self.max_bytes:
            path.unlink(missing_ok=True)
            return
        self.evict(self.max_bytes - size)
        dst = self.path_for(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dst)
            self._remember(dst, sha256)
        except OSError:
            path.unlink(missing_ok=True)

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        out: list[tuple[Path, os.stat_result]] = []
        if not self.folder.is_dir():
            return out
        for sub in self.folder.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if is_temp(f):
                    continue
                try:
                    out.append((f, f.stat()))
                except OSError:  # evicted by another process meanwhile
                    continue
        return out

    def size(self) -> int:
        """Bytes the cached copies take."""
        return sum(st.st_size for _, st in self._entries())

    def evict(self, budget: int) -> int:
        """Remove least-recently-used copies until at most ``budget`` bytes remain; the number removed."""
        entries = sorted(self._entries(), key=lambda e: e[1].st_mtime_ns)
        total = sum(st.st_size for _, st in entries)
        removed = 0
        for path, st in entries:
            if total <= max(0, budget):
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= st.st_size
            removed += 1
        return removed
