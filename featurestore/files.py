"""Where one store lives, a local folder or an S3 bucket: opening it, and its files (publish, fetch, delete, sweep).

:class:`featurestore.store.Store` holds one :class:`StoreFiles` and keeps the
public names (``store.publish``, ``store.local_file``, ``store.delete_file``,
``store.shard_source``, ``store.present``). Paths are those the catalog
records, relative to the store. A bucket store works in a local folder
(:func:`work_folder`: temp files, files being written, copies of small files)
and keeps every file that matters in the bucket; shards are read through a
verified read cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.catalog import database
from featurestore.catalog.repository import Catalog
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, IntegrityError, InvalidInputError
from featurestore.io.atomic import is_temp, write_bytes_atomic
from featurestore.io.lock import write_lock
from featurestore.shards import ShardBytes, ShardSource, remove_orphans
from featurestore.vectors import ShardPart

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from featurestore.io.cache import ReadCache
    from featurestore.io.storage import BucketStorage


# Shard downloads in flight at once, and shards fetched ahead of the readers: streaming GETs are
# bound by the server and the hashing, and on 2 cores 4 streams reach the raw GET rate (more only
# add contention with the decoding); 6 ahead keep the readers fed while bounding the copies pinned.
FETCHERS = 4
AHEAD = 6


class Fetched:
    """What to open for each of a list of shards (``fetched(i)``), fetched ahead of the readers.

    ``done(i)`` says the reader of shard ``i`` has finished with it: its copy
    may be evicted again and one more shard is fetched ahead. Readers that
    call it from several threads get each shard as soon as its download is
    verified, while later ones are still downloading.
    """

    def __init__(self, fetch: Callable[[int], ShardSource], n: int, pool: ThreadPoolExecutor | None,
                 cache: ReadCache | None = None):
        self._fetch, self._n, self._pool, self._cache = fetch, n, pool, cache
        self._lock = threading.Lock()
        self._futures: dict[int, Future[ShardSource]] = {}
        self._got: dict[int, ShardSource] = {}
        self._next = 0
        with self._lock:
            self._submit(AHEAD)

    def _submit(self, count: int) -> None:
        while self._pool is not None and count > 0 and self._next < self._n:
            self._futures[self._next] = self._pool.submit(self._fetch, self._next)
            self._next += 1
            count -= 1

    def __call__(self, i: int) -> ShardSource:
        if self._pool is None:
            return self._fetch(i)
        with self._lock:
            if i >= self._next:  # a reader ran past the window (done() not called): move it on
                self._submit(i + AHEAD - self._next)
            future = self._futures[i]
        got = future.result()
        with self._lock:
            self._got[i] = got
        return got

    def done(self, i: int) -> None:
        """The reader of shard ``i`` has finished: unpin its copy, fetch one more ahead."""
        if self._pool is None:
            return
        with self._lock:
            self._futures.pop(i, None)
            got = self._got.pop(i, None)
            self._submit(1)
        if isinstance(got, Path) and self._cache is not None:
            self._cache.release(got)

    def close(self) -> None:
        """Cancel what was not started and unpin every copy still held."""
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
            self._next = self._n
        for future in futures:
            future.cancel()
        for future in futures:
            if not future.cancelled():
                try:
                    got = future.result()
                except Exception:  # noqa: BLE001 - the reader already failed or did not need it
                    continue
                if isinstance(got, Path) and self._cache is not None:
                    self._cache.release(got)
        self._got.clear()


def work_folder(settings: Settings) -> Path:
    """The local working folder of the bucket store ``settings`` describe (under the cache folder)."""
    url = settings.store_url or str(settings.store)
    return settings.cache_folder / "work" / hashlib.sha256(url.encode()).hexdigest()[:16]


def open_engine(settings: Settings, create: bool) -> Engine:
    """The catalog engine of the store ``settings`` describe, its schema checked (or, with ``create``, made).

    ``create=True`` (writers) makes the folder and the schema on first use,
    under the write lock so two first writers cannot both migrate; readers
    get a clear error when there is no store yet, and never write.
    """
    if settings.store_url:
        return _open_bucket(settings, create)
    root = settings.store
    if not root.exists():
        if not create:
            raise FeatureStoreError(f"no store at {root}", remedy="create-store", path=root)
        root.mkdir(parents=True)
    elif not root.is_dir():
        raise InvalidInputError(f"store path {root} is a file, not a folder", remedy="another-store", path=root)

    def folder_lock(_: Engine) -> AbstractContextManager[None]:
        for sub in ("features", "models", "artifacts"):
            (root / sub).mkdir(exist_ok=True)
        return write_lock(root, settings.lock_timeout)

    return _migrated_engine(settings.catalog_url, create, folder_lock)


def _migrated_engine(url: str, create: bool, lock: Callable[[Engine], AbstractContextManager[None]]) -> Engine:
    """The catalog's engine with its schema current; a store being created is migrated under ``lock``
    (two first writers must not both create the schema), a closed engine on any error."""
    engine = database.make_engine(url)
    try:
        if create and not database.is_current(engine, url):
            with lock(engine):
                database.ensure_schema(engine, url, create=True)
        else:
            database.ensure_schema(engine, url, create=False)
    except Exception:
        engine.dispose()
        raise
    return engine


def _open_bucket(settings: Settings, create: bool) -> Engine:
    from featurestore.catalog.database import advisory_lock
    from featurestore.io.storage import BucketStorage

    url = settings.store_url
    assert url is not None
    BucketStorage(url, settings).probe()  # a missing bucket, bad credentials, no server: one line, now
    work_folder(settings).mkdir(parents=True, exist_ok=True)
    return _migrated_engine(settings.catalog_url, create,
                            lambda engine: advisory_lock(engine, url, settings.lock_timeout))


class StoreFiles:
    """Where one store's files are: :attr:`root` and, for a bucket store, :attr:`bucket` and its read cache."""

    def __init__(self, settings: Settings, catalog: Catalog, root: Path, url: str | None):
        self.settings = settings
        self.catalog = catalog
        self.root = root
        self.bucket: BucketStorage | None = None
        self.read_cache: ReadCache | None = None
        if url:
            from featurestore.io.cache import ReadCache
            from featurestore.io.storage import BucketStorage

            self.bucket = BucketStorage(url, settings)
            self.read_cache = ReadCache(settings.cache_folder / "objects", settings.cache_bytes)

    def publish(self, path: Path) -> None:
        """Upload a file just written under :attr:`root` to the bucket (no-op for a folder store).

        Call before the catalog registers it: an object is complete once the PUT
        returns, so the catalog never points at a partial object.
        """
        if self.bucket is not None:
            self.bucket.put(path.relative_to(self.root).as_posix(), path.read_bytes())

    def adopt(self, path: Path, sha256: str) -> None:
        """A shard just written and registered: the first read of it needs no download."""
        if self.read_cache is not None:
            self.read_cache.adopt(path, sha256)

    def discard(self, path: Path) -> None:
        """Remove a file written under :attr:`root` that was never registered (and its object, if put)."""
        path.unlink(missing_ok=True)
        if self.bucket is not None:
            self.bucket.delete(path.relative_to(self.root).as_posix())

    def local_file(self, rel: str, sha256: str | None = None) -> Path:
        """A local path holding the store file ``rel`` (fetched from the bucket into :attr:`root` if needed).

        ``sha256`` (what the catalog records) is checked on download; a mismatch
        is an :class:`IntegrityError`. For a folder store this is ``root / rel``.
        """
        path = self.root / rel
        if self.bucket is None or path.is_file():
            return path
        data = self.bucket.get(rel)
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{self.bucket.url}{rel} does not match the sha256 recorded in the catalog: "
                                 "the object was damaged or replaced", remedy="run-verify", path=rel)
        write_bytes_atomic(path, data)
        return path

    def delete_file(self, rel: str) -> None:
        """Delete a store file (its local copy and, for a bucket store, its object)."""
        (self.root / rel).unlink(missing_ok=True)
        if self.bucket is not None:
            self.bucket.delete(rel)

    def shard_source(self, rel: str, sha256: str | None) -> ShardSource:
        """What the shard readers open for the shard ``rel``: its file, or for a bucket store the verified
        copy in the read cache (or its bytes, when larger than the cache)."""
        if self.bucket is None or self.read_cache is None:
            return self.root / rel
        if not sha256:  # registered without a digest: nothing to key the cache by
            return ShardBytes(self.bucket.url + rel, self.bucket.get(rel))
        return self._cached(rel, sha256)

    def _cached(self, rel: str, sha256: str, pin: bool = False) -> ShardSource:
        assert self.bucket is not None and self.read_cache is not None
        bucket = self.bucket
        got = self.read_cache.fetch(bucket.url + rel, sha256, lambda: bucket.stream(rel), pin=pin)
        return got if isinstance(got, Path) else ShardBytes(bucket.url + rel, got)

    def part_source(self, part: ShardPart) -> ShardSource:
        """:meth:`shard_source` of the shard that holds ``part``."""
        return self.shard_source(part.path.relative_to(self.root).as_posix(), part.sha256)

    @contextmanager
    def fetching(self, parts: Sequence[ShardPart]) -> Iterator[Fetched]:
        """``source(i)``: what to open for ``parts[i]``, fetched ahead with several GETs in flight.

        For a bucket store each GET streams into the read cache while it is
        hashed, :data:`FETCHERS` at a time and at most :data:`AHEAD` shards
        beyond those the readers have finished (``source.done(i)``), so the
        first shard is decoded while later ones download and the copies
        waiting for a reader stay within a few shards. The readers open the
        verified copies (HDF5 reads a file faster than bytes in memory). A
        folder store opens its files directly.
        """
        if self.bucket is None or self.read_cache is None:
            yield Fetched(lambda i: self.part_source(parts[i]), len(parts), None)
            return
        with ThreadPoolExecutor(max_workers=FETCHERS) as pool:
            fetched = Fetched(lambda i: self._pinned(parts[i]), len(parts), pool, self.read_cache)
            try:
                yield fetched
            finally:
                fetched.close()

    def _pinned(self, part: ShardPart) -> ShardSource:
        rel = part.path.relative_to(self.root).as_posix()
        return self._cached(rel, part.sha256, pin=True) if part.sha256 else self.shard_source(rel, None)

    def present(self, rels: Sequence[str]) -> set[str]:
        """Which of the store files ``rels`` exist (one listing of ``features/`` for a bucket store)."""
        if self.bucket is None:
            return {r for r in rels if (self.root / r).is_file()}
        listed = {o.key for o in self.bucket.list("features/")}
        return {r for r in rels if r in listed or (not r.startswith("features/") and self.bucket.exists(r))}

    def sweep(self) -> None:
        """Delete temp files, unregistered shards and artifacts, and deleted sets' folders. Under the lock.

        Index files are swept by their backends (``Store.writing`` calls them next).
        """
        refs = self.catalog.shard_refs()
        if self.bucket is not None:
            self.remove_orphan_objects(["features/", "indexes/"])
        # A registered shard whose file is gone (deleted by hand, a lost disk) is unregistered, so its
        # images count as lacking and a plain `fs extract` recomputes them.
        found = self.present(list(refs.values()))
        gone = {i: p for i, p in refs.items() if p not in found}
        if gone:
            self.catalog.unregister_shards(gone)
        names = {Path(p).name for i, p in refs.items() if i not in gone}
        features = self.root / "features"
        for folder in features.iterdir() if features.exists() else []:
            if folder.is_dir():
                remove_orphans(folder, names)
        artifacts = {Path(p).name for p in self.catalog.artifact_paths()}
        sweep = [self.root / "projections", self.root / "artifacts", *(self.root / "models").glob("*/")]
        for folder in sweep:
            for path in folder.iterdir() if folder.is_dir() else []:
                lost = folder.name == "artifacts" and path.suffix == ".pkl" and path.name not in artifacts
                if path.is_file() and (is_temp(path) or lost):
                    path.unlink(missing_ok=True)

    def remove_orphan_objects(self, prefixes: Sequence[str], grace: float | None = None) -> list[str]:
        """Delete shard and index objects under ``prefixes`` the catalog does not know. Under the lock.

        Only objects older than ``grace`` seconds (default ``orphan_grace``) go: a
        crashed writer (or a Ray worker whose driver died) leaves complete but
        unregistered objects, and the grace period spares one that a live
        writer on another machine has put but not yet registered.
        """
        import datetime as dt

        assert self.bucket is not None
        from featurestore.search import index as ann_index

        keep = set(self.catalog.shard_refs().values()) | ann_index.registered_objects(self.catalog)
        wait = self.settings.orphan_grace if grace is None else grace
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=wait)
        removed = []
        for obj in [o for prefix in prefixes for o in self.bucket.list(prefix)]:
            name = obj.key.rsplit("/", 1)[-1]
            ours = obj.key.endswith((".h5", ann_index.SUFFIX)) or is_temp(Path(name))
            if ours and obj.key not in keep and obj.modified <= cutoff:
                self.bucket.delete(obj.key)
                removed.append(obj.key)
        return removed
