"""Object storage (S3 and S3-compatible servers) through obstore.

A location is a URL ``s3://bucket/key``. The client of a bucket is built from
:class:`~featurestore.config.Settings` (``FS_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``FS_S3_TIMEOUT``) and kept per
(bucket, settings). Requests have short timeouts and few retries, so an
unreachable server fails in seconds with a line naming the variable to set,
never a hang. A PUT is atomic on S3: an object is either absent or complete,
so no temp-and-rename is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, InvalidInputError

SCHEME = "s3://"

T = TypeVar("T")


class ObjectStorageError(FeatureStoreError, OSError):
    """Object storage cannot be used: the message says which setting to fix."""


class BucketNotFoundError(ObjectStorageError):
    """The bucket does not exist on the server."""


class CredentialsError(ObjectStorageError):
    """The server refused the credentials (or their absence)."""


class EndpointUnreachableError(ObjectStorageError):
    """No answer from the server within the timeout."""


class ObjectNotFoundError(FeatureStoreError, LookupError):
    """No object at the URL."""


@dataclass(frozen=True)
class ObjectURL:
    """A parsed ``s3://bucket/key`` (``key`` may be empty or a prefix)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, key: str) -> ObjectURL:
        """The URL of ``key`` in the same bucket."""
        return ObjectURL(self.bucket, key)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    url: ObjectURL
    size: int
    last_modified: datetime


class ObjectStream(NamedTuple):
    """An object being downloaded: its size (from the response's headers) and its bytes, chunk by chunk."""

    size: int
    chunks: Iterator[bytes]


# Chunks of a streamed GET: small enough that hashing and writing one overlaps the next's arrival
# (hashlib and file writes release the GIL), large enough that the per-chunk Python work is noise.
STREAM_CHUNK = 2 << 20


def is_object_url(path: object) -> bool:
    """Whether ``path`` is an object-storage URL (a str starting with ``s3://``)."""
    return isinstance(path, str) and path.startswith(SCHEME)


def reader_threads(workers: int, sources: Iterable[object]) -> int:
    """Threads to read (and decode) ``sources``: ``workers``, or 8 times as many (at most 64) if any is a URL.

    A GET spends most of its time waiting on the network, not on a core, so
    reading objects at the rate the cores decode them takes more requests in
    flight than there are cores.
    """
    if any(is_object_url(s) for s in sources):
        return max(workers, min(64, workers * 8))
    return workers


def parse_url(url: str) -> ObjectURL:
    """``s3://bucket/key`` -> :class:`ObjectURL`; anything else is an :class:`InvalidInputError`."""
    if not is_object_url(url):
        raise InvalidInputError(f"{url!r} is not an object-storage URL; write s3://BUCKET/PREFIX")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket or "\0" in url:
        raise InvalidInputError(f"{url!r} names no bucket; write s3://BUCKET/PREFIX")
    return ObjectURL(bucket, key)


def _endpoint_hint(settings: Settings) -> str:
    where = settings.s3_endpoint or "AWS S3 (FS_S3_ENDPOINT is not set)"
    return f"{where}: set FS_S3_ENDPOINT to the server's URL, or check it is running"


def _translate(exc: Exception, url: ObjectURL, settings: Settings) -> Exception:
    """An obstore error as one line that names the object and the setting to fix."""
    text = str(exc)
    if "NoSuchBucket" in text:
        return BucketNotFoundError(
            f"bucket {url.bucket!r} does not exist on {settings.s3_endpoint or 'AWS S3'}; create it, "
            "or fix the bucket in the s3:// URL (or FS_S3_ENDPOINT if it is the wrong server)")
    refused = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden",
               "401 Unauthorized", "ExpiredToken")
    if any(word in text for word in refused) or type(exc).__name__ in ("PermissionDeniedError",
                                                                        "UnauthenticatedError"):
        return CredentialsError(
            f"{settings.s3_endpoint or 'AWS S3'} refused access to {url}; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to credentials allowed to use the bucket")
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "404 Not Found" in text:
        return ObjectNotFoundError(f"no object at {url}")
    sending = ("error sending request", "timed out", "Timeout", "onnection refused", "dns error")
    if any(word in text for word in sending):
        return EndpointUnreachableError(f"cannot reach the object store for {url} at {_endpoint_hint(settings)}")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ObjectStorageError(f"object storage error on {url}: {first[:300]}")


class Bucket:
    """The objects of one bucket: list, get, ranged get, put and delete by key.

    Every error is one of this module's errors (or :class:`ObjectNotFoundError`),
    never obstore's multi-line report.
    """

    def __init__(self, bucket: str, settings: Settings):
        from obstore.store import S3Store  # the Rust client: loaded when an s3:// path is first used

        self.name = bucket
        self.settings = settings
        timeout = settings.s3_timeout
        options: dict[str, Any] = {
            "timeout": timedelta(seconds=timeout),
            "connect_timeout": timedelta(seconds=max(1.0, timeout / 5)),
            "allow_http": True,
        }
        config: dict[str, Any] = {"region": settings.aws_region}
        if settings.s3_endpoint:
            config["endpoint"] = settings.s3_endpoint
        if settings.aws_access_key_id and settings.aws_secret_access_key:
            config["access_key_id"] = settings.aws_access_key_id
            config["secret_access_key"] = settings.aws_secret_access_key
        else:
            config["skip_signature"] = True
        retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=timeout)}  # 5xx of a busy server
        self._store = S3Store(bucket, config=config, client_options=options,  # type: ignore[arg-type]
                              retry_config=retry)  # type: ignore[arg-type]

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FeatureStoreError:  # ours already (a size cap)
            raise
        except Exception as exc:
            raise _translate(exc, ObjectURL(self.name, key), self.settings) from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""
        import obstore

        def run() -> list[ObjectInfo]:
            out = []
            for chunk in obstore.list(self._store, prefix=prefix or None):
                for meta in chunk:
                    out.append(ObjectInfo(ObjectURL(self.name, meta["path"]), int(meta["size"]),
                                          meta["last_modified"]))
            return out

        return sorted(self._call(prefix, run), key=lambda o: o.url.key)

    def probe(self, prefix: str = "") -> None:
        """List at most one object under ``prefix``: a missing bucket, refused credentials or a silent
        endpoint fail here, in one line, before any work starts."""
        import obstore

        def run() -> None:
            for _chunk in obstore.list(self._store, prefix=prefix or None, chunk_size=1):
                break

        self._call(prefix, run)

    def size(self, key: str) -> int:
        """The object's size in bytes."""
        import obstore

        return int(self._call(key, lambda: obstore.head(self._store, key))["size"])

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole object; one larger than ``max_bytes`` is refused before its body is read."""
        import obstore

        def run() -> bytes:
            result = obstore.get(self._store, key)
            size = int(result.meta["size"])  # from the response's headers: one request, not HEAD + GET
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLargeError(size, max_bytes)
            return bytes(result.bytes())

        return self._call(key, run)

    def stream(self, key: str, chunk: int = STREAM_CHUNK) -> ObjectStream:
        """Start a GET of the object: its size now, its bytes as they arrive (errors translated on the way)."""
        import obstore

        result = self._call(key, lambda: obstore.get(self._store, key))
        size = int(result.meta["size"])
        chunks = iter(result.stream(min_chunk_size=chunk))

        def body() -> Iterator[bytes]:
            while True:
                block = self._call(key, lambda: next(chunks, None))
                if block is None:
                    return
                yield block

        return ObjectStream(size, body())

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive) of the object."""
        import obstore

        if end <= start:
            return b""
        return self._call(key, lambda: bytes(obstore.get_range(self._store, key, start=start, end=end)))

    def put(self, key: str, data: bytes) -> None:
        """Write the object in one PUT (atomic: readers see the old object or the whole new one)."""
        import obstore

        self._call(key, lambda: obstore.put(self._store, key, data))

    def delete(self, key: str) -> None:
        """Delete the object (no error when it is already gone)."""
        import obstore

        self._call(key, lambda: obstore.delete(self._store, key))


_buckets: dict[tuple, Bucket] = {}
_buckets_lock = threading.Lock()


def bucket(name: str, settings: Settings | None = None) -> Bucket:
    """The (shared) client of bucket ``name`` under ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    cache_key = (name, settings.s3_endpoint, settings.aws_access_key_id, settings.aws_secret_access_key,
                 settings.aws_region, settings.s3_timeout)
    with _buckets_lock:
        found = _buckets.get(cache_key)
        if found is None:
            found = _buckets[cache_key] = Bucket(name, settings)
        return found


def list_objects(url: str, settings: Settings | None = None) -> list[ObjectInfo]:
    """Every object under the URL's prefix (recursive, sorted by key)."""
    parsed = parse_url(url)
    return bucket(parsed.bucket, settings).list(parsed.key)


def read_object(url: str, max_bytes: int | None = None, settings: Settings | None = None) -> bytes:
    """The object at ``url``; an object larger than ``max_bytes`` is refused unread (:class:`ObjectTooLargeError`)."""
    parsed = parse_url(url)
    data = bucket(parsed.bucket, settings).get(parsed.key, max_bytes)
    if max_bytes is not None and len(data) > max_bytes:  # replaced by a larger object since the HEAD
        raise ObjectTooLargeError(len(data), max_bytes)
    return data


def write_object(url: str, data: bytes, settings: Settings | None = None) -> None:
    """Put ``data`` at ``url`` (atomically)."""
    parsed = parse_url(url)
    bucket(parsed.bucket, settings).put(parsed.key, data)


def delete_object(url: str, settings: Settings | None = None) -> None:
    """Delete the object at ``url``."""
    parsed = parse_url(url)
    bucket(parsed.bucket, settings).delete(parsed.key)


class ObjectTooLargeError(InvalidInputError):
    """An object over the size cap; refused before its bytes are read."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit
        super().__init__(f"object is larger than the limit ({size:,} bytes > {limit:,})")
