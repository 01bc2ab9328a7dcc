"""Where a store's files live: a local folder or a prefix of an S3 bucket, behind one small interface.

Keys are the paths the catalog records, relative to the store (``features/rp128/rp128-....h5``).
Both backends write a whole object or nothing: the folder through the temp ->
fsync -> rename helper, the bucket by one PUT (atomic on S3). Nothing here
knows the catalog; the store decides what to write, register, read and delete.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from featurestore.config import Settings
from featurestore.io.atomic import is_temp, write_bytes_atomic
from featurestore.io.objects import Bucket, ObjectNotFoundError, ObjectStream, bucket, parse_url


class StoredObject(NamedTuple):
    """One listed file or object: its key (relative to the store), size and last change."""

    key: str
    size: int
    modified: datetime


class Storage(Protocol):
    """The operations the store needs from where its files live."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Write the object whole (readers see the old one or the complete new one)."""

    def get(self, key: str) -> bytes:
        """The whole object (:class:`ObjectNotFoundError` if absent)."""

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive)."""

    def list(self, prefix: str = "") -> list[StoredObject]:
        """Every object whose key starts with ``prefix``, sorted by key (temp files excluded)."""

    def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""

    def exists(self, key: str) -> bool:
        """Whether the object is there."""


class FolderStorage:
    """Files under a local folder (the store's own folder, or one every node mounts)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def put(self, key: str, data: bytes) -> None:
        write_bytes_atomic(self.root / key, data)

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no file {self.root / key}") from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            with open(self.root / key, "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no file {self.root / key}") from None

    def list(self, prefix: str = "") -> list[StoredObject]:
        out = []
        base = self.root / prefix if prefix.endswith("/") else (self.root / prefix).parent
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix) or is_temp(path):
                    continue
                try:
                    st = path.stat()
                except OSError:  # removed meanwhile
                    continue
                out.append(StoredObject(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return sorted(out)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()


class BucketStorage:
    """Objects under ``s3://bucket/prefix/`` (through :mod:`featurestore.io.objects`, on obstore).

    Errors are those of :mod:`featurestore.io.objects`: one line naming the
    setting to fix (a missing bucket, refused credentials, an unreachable endpoint).
    """

    def __init__(self, url: str, settings: Settings):
        parsed = parse_url(url)
        self.prefix = parsed.key.strip("/") + "/" if parsed.key.strip("/") else ""
        self.url = f"s3://{parsed.bucket}/{self.prefix}"
        self.bucket: Bucket = bucket(parsed.bucket, settings)

    def key(self, key: str) -> str:
        """The object key in the bucket of a store-relative ``key``."""
        return self.prefix + key

    def put(self, key: str, data: bytes) -> None:
        self.bucket.put(self.key(key), data)

    def get(self, key: str) -> bytes:
        return self.bucket.get(self.key(key))

    def stream(self, key: str) -> ObjectStream:
        """The object as it downloads (:meth:`Bucket.stream`)."""
        return self.bucket.stream(self.key(key))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.bucket.get_range(self.key(key), start, end)

    def list(self, prefix: str = "") -> list[StoredObject]:
        cut = len(self.prefix)
        return [StoredObject(o.url.key[cut:], o.size, o.last_modified)
                for o in self.bucket.list(self.key(prefix))]

    def delete(self, key: str) -> None:
        self.bucket.delete(self.key(key))

    def exists(self, key: str) -> bool:
        try:
            self.bucket.size(self.key(key))
        except ObjectNotFoundError:
            return False
        return True

    def probe(self) -> None:
        """Fail now, in one line, if the bucket is missing, the credentials refused or the endpoint silent."""
        self.bucket.probe(self.prefix)


def open_storage(settings: Settings) -> Storage:
    """The storage of the store ``settings`` describe: its bucket prefix, or its folder."""
    if settings.store_url:
        return BucketStorage(settings.store_url, settings)
    return FolderStorage(settings.store)
