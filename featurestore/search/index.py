"""Approximate nearest-neighbour indexes (HNSW, via usearch) over a store's feature sets.

One index per feature set, built by :func:`build_index` (``fs index build``),
saved under ``<store>/indexes/<feature_set>/`` and registered in the catalog
table ``vector_indexes`` with its params, vector count, the shards it covers and
its sha256. The search functions of :mod:`featurestore.search.service` call
:func:`~featurestore.search.index_query.search_indexed` and
:func:`~featurestore.search.index_query.duplicate_groups_indexed` first, through the
``usearch`` backend of :mod:`featurestore.search.backends` (the built-in index
backend plugin), and fall back to exact search when they return nothing to use.

Guarantees
----------
* Crash safety: the graph is built in memory without the store's write lock;
  the file is then written under the lock to a temp name in the same folder,
  fsynced and renamed (:mod:`featurestore.io.atomic`), and registered in one
  transaction that also unregisters the index it replaces, whose file is
  deleted last. A crash leaves at most an unregistered file, removed by the next
  ``fs index build`` / ``fs index drop`` (:func:`remove_orphans`).
* Nothing is silently missed: shards written after the build (``fs extract``,
  ``fs compact``) are not in the index; :func:`search_indexed` scores their live
  rows exactly and merges them with the index's candidates. Index keys whose
  shard is gone are checked against the catalog before they are returned. A
  second :func:`build_index` adds only the new shards (and removes keys of
  shards that are gone, or rebuilds when more than a fifth of the index is stale).
* Filters (``allowed`` ids, or a ``--where`` compiled once to a bitmap over
  image ids, :mod:`featurestore.search.cache`) are applied to the index's
  candidates with an adaptive over-fetch (the candidate count grows until ``k``
  allowed hits are found; usearch 2.26's Python search takes no predicate); a
  filter allowing few images (or few per candidate the index would expand),
  or one the over-fetch cannot satisfy, is searched exactly on just those
  images' rows, read once per compiled filter, so ``k`` results come back
  whenever ``k`` exist.
* Memory mapping: searches open the file with usearch's ``view`` (memory
  mapped, read-only), so several ``fs serve`` workers share one copy in the
  page cache. The file's sha256 is checked against the catalog before usearch
  opens it (once per process per file version, :mod:`featurestore.io.verified`),
  so damaged bytes or another set's index never reach native code; also before
  an index is extended, when a build finds it "unchanged", and by
  ``fs index list --verify`` and ``fs verify``.

Scores follow :mod:`featurestore.search.kernel`: cosine similarity (higher is
better; usearch's cosine distance is ``1 - similarity``) or Euclidean distance
(lower is better; usearch's ``l2sq`` distance is its square). With ``f16`` or
``i8`` storage the scores come from the quantised vectors.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.catalog.repository import Catalog, IndexChangedError, IndexKey, IndexRecord, LiveShard
from featurestore.errors import FeatureStoreError, IntegrityError, InvalidInputError, NotFoundError
from featurestore.io.atomic import atomic_path, fsync_dir, is_temp, sha256_file
from featurestore.io.verified import check_file
from featurestore.search.kernel import (
    METRICS,
)
from featurestore.vectors import live_part, part_ids, read_part

if TYPE_CHECKING:
    # the narrow interfaces the store satisfies (search sits below it), under the names used here
    from featurestore.search.protocol import SearchStore as Store
    from featurestore.vectors import RegisteredSet as FeatureSet

FOLDER = "indexes"
SUFFIX = ".usearch"
DTYPES = ("f32", "f16", "i8")
USEARCH_METRIC = {"cosine": "cos", "l2": "l2sq"}

# The reason of a rebuild the caller asked for (the CLI words it as its flag).
REBUILD_ASKED = "rebuild asked for"
# Incremental builds rebuild instead when more than this share of the index is stale.
REBUILD_STALE_FRACTION = 0.2
# Vectors added to / searched in the index per call while building or finding duplicates.
BATCH_ROWS = 8_192

Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


class IndexNotFoundError(NotFoundError):
    """A feature set has no index."""

    def __init__(self, feature_set: str, indexed: Sequence[str]):
        others = f"indexed sets: {', '.join(sorted(indexed))}" if indexed else "no feature set has one yet"
        FeatureStoreError.__init__(self, f"feature set {feature_set!r} has no index ({others})",
                                   remedy="index-build", feature_set=feature_set)
        self.name = feature_set
        self.available = sorted(indexed)


# ---------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched.

    Attributes
    ----------
    metric : {"cosine", "l2"}
    dtype : {"f32", "f16", "i8"}
        Storage of the vectors in the index: float32, float16 (half the size) or
        int8 (a quarter; cosine only, since usearch normalises vectors it quantises).
    connectivity : int
        HNSW ``M``: graph edges per node; more gives better recall and a larger index.
    expansion_add : int
        Candidate list size while inserting (``efConstruction``); more gives a better graph, slower build.
    expansion_search : int
        Candidate list size while searching (``ef``); more gives better recall, slower queries.
        It can be changed without rebuilding.
    """

    metric: str = "cosine"
    dtype: str = "f32"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 128

    def check(self) -> IndexParams:
        if self.metric not in METRICS:
            raise InvalidInputError(f"unknown metric {self.metric!r}; available: {', '.join(METRICS)}")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unknown index dtype {self.dtype!r}; available: {', '.join(DTYPES)}")
        if self.dtype == "i8" and self.metric != "cosine":
            raise InvalidInputError(
                "an i8 index normalises the vectors it quantises, so it only supports the cosine metric; "
                "use dtype f16 or f32 for l2"
            )
        for name, low, high in (("connectivity", 2, 256), ("expansion_add", 1, 65_536),
                                ("expansion_search", 1, 65_536)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return self

    def structure(self) -> tuple[str, str, int, int]:
        """What the file depends on (everything but ``expansion_search``)."""
        return self.metric, self.dtype, self.connectivity, self.expansion_add

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "library": "usearch", "usearch_version": _usearch_version()}

    @classmethod
    def from_json(cls, params: dict[str, Any]) -> IndexParams:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in params.items() if k in names})


def _usearch_version() -> str:
    import usearch

    return str(usearch.__version__)


# ---------------------------------------------------------------------------
# status


@dataclass(frozen=True)
class IndexStatus:
    """A registered index and how much of its feature set it covers."""

    record: IndexRecord
    params: IndexParams
    live_shards: int
    covered_shards: int
    uncovered_vectors: int
    stale_shards: int
    sha256_ok: bool | None = None  # None: not verified

    @property
    def feature_set(self) -> str:
        return self.record.feature_set


def list_indexes(store: Store, verify: bool = False) -> list[IndexStatus]:
    """Every index with its coverage; ``verify`` also re-hashes each file against the catalog's sha256."""
    out = []
    for record in store.catalog.list_indexes():
        shards = [s for s in store.catalog.live_shards(record.feature_set_id) if s.live]
        covered = set(record.shard_ids)
        uncovered = [s for s in shards if s.id not in covered]
        ok = None
        if verify:
            path = _local(store, record.path)
            ok = path.is_file() and sha256_file(path) == record.sha256
        out.append(IndexStatus(
            record=record, params=IndexParams.from_json(record.params), live_shards=len(shards),
            covered_shards=len(shards) - len(uncovered), uncovered_vectors=sum(s.live for s in uncovered),
            stale_shards=len(covered - {s.id for s in shards}), sha256_ok=ok,
        ))
    return out


def index_status(store: Store, feature_set: str) -> IndexStatus | None:
    """The index of one feature set with its coverage, or None."""
    fs = store.feature_set(feature_set)
    return next((s for s in list_indexes(store) if s.record.feature_set_id == fs.id), None)


# ---------------------------------------------------------------------------
# building


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_index` did.

    ``action`` is "created", "extended" (only new shards added), "rebuilt",
    "updated" (search params only, no new file) or "unchanged".
    """

    feature_set: str
    action: str
    reason: str
    params: IndexParams
    vectors: int
    added: int
    removed: int
    seconds: float
    path: Path | None
    bytes: int
    skipped_shards: int = 0


@dataclass
class _Plan:
    action: str
    reason: str
    to_add: list[LiveShard]
    keep: list[LiveShard] = field(default_factory=list)


def build_index(
    store: Store,
    feature_set: str,
    *,
    metric: str | None = None,
    dtype: str | None = None,
    connectivity: int | None = None,
    expansion_add: int | None = None,
    expansion_search: int | None = None,
    rebuild: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> BuildReport:
    """Build, extend or rebuild the HNSW index of a feature set.

    Params left as None keep those of the current index (or the defaults of
    :class:`IndexParams`). When the index exists with the same structure only the
    shards written since are added; changed structural params (or ``rebuild``)
    build it again from scratch; a changed ``expansion_search`` alone is recorded
    without rewriting the file.

    The graph is built in memory (about the size of the index file) without the
    write lock, so ``fs extract`` can run meanwhile; shards it writes are covered
    by the next build. Only writing and registering the file holds the lock.
    ``threads`` (default ``store.settings.workers``) insert in parallel; a
    single thread gives the same graph on every run.

    Raises
    ------
    NotFoundError
        No such feature set.
    InvalidInputError
        Bad params, or the set has no vectors.
    IntegrityError
        The current index file does not match its catalog sha256 (on an extension).
    FeatureStoreError
        Another build registered an index for the set meanwhile.
    """
    import usearch.index as ui

    started = time.perf_counter()
    report = progress or _no_progress
    fs = store.feature_set(feature_set)
    current = store.catalog.get_index(fs.id)
    base = IndexParams.from_json(current.params) if current is not None else IndexParams()
    given: dict[str, Any] = {"metric": metric, "dtype": dtype, "connectivity": connectivity,
                             "expansion_add": expansion_add, "expansion_search": expansion_search}
    params = replace(base, **{k: v for k, v in given.items() if v is not None}).check()
    shards = [s for s in store.catalog.live_shards(fs.id) if s.live]
    if not shards:
        raise InvalidInputError(f"feature set {fs.name!r} has no vectors yet", remedy="extract-them-first",
                                feature_set=fs.name)
    plan = _plan_build(store, current, base, params, shards, rebuild)
    if plan.action in ("unchanged", "updated"):
        assert current is not None
        if plan.action == "updated":
            with store.writing():
                store.catalog.update_params(current.id, params.to_json())
        return BuildReport(fs.name, plan.action, plan.reason, params, current.vectors, 0, 0,
                           time.perf_counter() - started, store.root / current.path, current.bytes)

    removed = 0
    if plan.action == "extended":
        assert current is not None
        index = _load_for_update(store, current, params)
        removed = _remove_stale(store, index, plan.keep)
    else:
        index = ui.Index(ndim=int(fs.dim), metric=USEARCH_METRIC[params.metric], dtype=params.dtype,
                         connectivity=params.connectivity, expansion_add=params.expansion_add,
                         expansion_search=params.expansion_search)
    workers = max(1, int(threads if threads is not None else store.settings.workers))
    added, replaced, new_ids, skipped = _add_shards(store, index, plan.to_add, plan.action == "extended",
                                                    workers, report)
    removed += replaced
    covered = [s.id for s in plan.keep] + new_ids
    path, nbytes = _save_and_register(store, fs, current, index, params, covered)
    return BuildReport(fs.name, plan.action, plan.reason, params, len(index), added, removed,
                       time.perf_counter() - started, path, nbytes, skipped)


def _add_shards(store: Store, index: Any, shards: list[LiveShard], extending: bool, workers: int,
                report: Progress) -> tuple[int, int, list[int], int]:
    """Insert the live rows of ``shards``; returns (added, replaced keys, shard ids added, shards skipped)."""
    total = sum(s.live for s in shards)
    added, replaced, done, skipped = 0, 0, [], 0
    for shard, ids, vecs in _read_shards(store, shards):
        if ids is None or vecs is None:
            skipped += 1
            continue
        keys = ids.astype(np.uint64)
        if extending:  # an image already in the index (its shard compacted away) gets its current vector
            present = np.asarray(index.contains(keys), dtype=bool)
            if present.any():
                index.remove(keys[present])
                replaced += int(present.sum())
        for start in range(0, len(ids), BATCH_ROWS):
            index.add(keys[start : start + BATCH_ROWS], vecs[start : start + BATCH_ROWS], threads=workers)
            added += min(BATCH_ROWS, len(ids) - start)
            report(added, total)
        done.append(shard.id)
    return added, replaced, done, skipped


def _plan_build(store: Store, current: IndexRecord | None, base: IndexParams, params: IndexParams,
                shards: list[LiveShard], rebuild: bool) -> _Plan:
    if current is None:
        return _Plan("created", "no index yet", shards)
    if rebuild:
        return _Plan("rebuilt", REBUILD_ASKED, shards)
    if params.structure() != base.structure():
        changed = [f"{n} {a} -> {b}" for n, a, b in zip(("metric", "dtype", "connectivity", "expansion_add"),
                                                          base.structure(), params.structure(), strict=True) if a != b]
        return _Plan("rebuilt", "params changed: " + ", ".join(changed), shards)
    if not _local(store, current.path).is_file():
        return _Plan("rebuilt", f"its file {current.path} is missing", shards)
    covered = set(current.shard_ids)
    keep = [s for s in shards if s.id in covered]
    new = [s for s in shards if s.id not in covered]
    kept_vectors = sum(s.live for s in keep)
    stale = current.vectors - kept_vectors
    if stale > REBUILD_STALE_FRACTION * max(current.vectors, 1):
        return _Plan("rebuilt", f"{stale:,} of its {current.vectors:,} vectors are in shards since compacted "
                                "or replaced", shards)
    if not new and stale == 0:
        try:  # "up to date" only for the very file registered (not one swapped in or damaged since)
            check_file(store.root / current.path, current.sha256, "index file", "")
        except IntegrityError:
            return _Plan("rebuilt", f"its file {current.path} does not match the sha256 recorded for it", shards)
        if params.expansion_search != base.expansion_search:
            return _Plan("updated", f"expansion_search {base.expansion_search} -> {params.expansion_search}", [])
        return _Plan("unchanged", "it covers every shard", [])
    reason = f"{len(new)} new shard(s)" + (f", {stale:,} stale vector(s)" if stale else "")
    return _Plan("extended", reason, new, keep)


def _load_for_update(store: Store, record: IndexRecord, params: IndexParams) -> Any:
    """The current index loaded into memory (not a view: views cannot be changed), sha256 checked first."""
    import usearch.index as ui

    path = _local(store, record.path)
    try:
        check_file(path, None, "index file")
    except IntegrityError as exc:
        raise IntegrityError(str(exc), remedy="index-rebuild", feature_set=record.feature_set, path=path) from None
    if sha256_file(path) != record.sha256:
        raise IntegrityError(f"index file {path} does not match the sha256 recorded in the catalog",
                             remedy="index-rebuild", feature_set=record.feature_set)
    index = ui.Index.restore(str(path), view=False, connectivity=params.connectivity,
                             expansion_add=params.expansion_add, expansion_search=params.expansion_search)
    if index is None:
        raise IntegrityError(f"index file {path} is not a usearch index", remedy="rebuild-flag")
    return index


def _remove_stale(store: Store, index: Any, keep: list[LiveShard]) -> int:
    """Remove keys whose image has no live row in the kept (covered, still registered) shards."""
    if not len(index):
        return 0
    keys = np.asarray(index.keys, dtype=np.uint64).astype(np.int64)
    valid = np.concatenate([_live_ids(store, s) for s in keep]) if keep else np.empty(0, np.int64)
    stale = keys[~np.isin(keys, valid)]
    if stale.size:
        index.remove(stale.astype(np.uint64))
    return int(stale.size)


def _live_ids(store: Store, shard: LiveShard) -> np.ndarray:
    shard_part = live_part(store.root, store.catalog, shard)
    return part_ids(shard_part, store.shard_source(shard.path, shard.sha256))


def _read_live(store: Store, shard: LiveShard) -> tuple[np.ndarray, np.ndarray]:
    """The live (image ids, vectors) of one shard."""
    return read_part(live_part(store.root, store.catalog, shard), store.shard_source(shard.path, shard.sha256))


def _read_shards(store: Store, shards: Sequence[LiveShard]
                 ) -> Iterator[tuple[LiveShard, np.ndarray | None, np.ndarray | None]]:
    """Each shard's live rows; ``(shard, None, None)`` for one ``fs compact`` removed meanwhile."""
    for shard in shards:
        try:
            ids, vecs = _read_live(store, shard)
        except IntegrityError:
            if store.catalog.shard_exists(shard.id):
                raise
            yield shard, None, None  # its rows moved to a newer shard, which stays uncovered
            continue
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            bad = ", ".join(str(int(i)) for i in ids[~finite][:5])
            raise InvalidInputError(f"vectors of image(s) {bad} in {shard.path} contain NaN or infinite values; "
                                    "re-extract that feature set")
        yield shard, ids, np.ascontiguousarray(vecs, dtype=np.float32)


def _save_and_register(store: Store, fs: FeatureSet, current: IndexRecord | None, index: Any,
                       params: IndexParams, covered: list[int]) -> tuple[Path, int]:
    """Write the index file atomically and register it, all under the write lock."""
    folder = store.root / FOLDER / fs.name
    with store.writing():  # which also removes what crashed builds left (remove_orphans)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        final = folder / f"{fs.name}-{params.metric}-{params.dtype}-{stamp}-{os.urandom(4).hex()}{SUFFIX}"
        with atomic_path(final) as tmp:  # temp name, fsync, rename, fsync the folder
            index.save(str(tmp))
            digest, nbytes = sha256_file(tmp), tmp.stat().st_size
        try:
            store.publish(final)  # a bucket store: the object is complete before the catalog points at it
            old = store.catalog.replace_index(
                fs.id, current.id if current is not None else None, params=params.to_json(),
                vectors=len(index), shard_ids=covered, nbytes=nbytes, sha256=digest,
                path=str(final.relative_to(store.root)))
        except IndexChangedError as exc:
            final.unlink(missing_ok=True)
            raise FeatureStoreError(f"the index of {fs.name!r} was not registered: {exc}; run the build again") \
                from None
        except BaseException:
            store.delete_file(str(final.relative_to(store.root)))
            raise
        if old is not None and old != str(final.relative_to(store.root)):
            store.delete_file(old)
            fsync_dir(folder)
    _forget(store, fs.id)
    return final, nbytes


def drop_index(store: Store, feature_set: str) -> Path:
    """Unregister a feature set's index and delete its file (returns the file's path)."""
    fs = store.feature_set(feature_set)
    with store.writing():
        rel = store.catalog.drop_index(fs.id)
        if rel is None:
            raise IndexNotFoundError(fs.name, [r.feature_set for r in store.catalog.list_indexes()])
        store.delete_file(rel)
    _forget(store, fs.id)
    return store.root / rel


def _local(store: Store, rel: str) -> Path:
    """``store.root / rel``, fetched first from the bucket of a bucket store (the callers check its sha256)."""
    from featurestore.io.objects import ObjectNotFoundError

    try:
        return store.local_file(rel)
    except ObjectNotFoundError:
        return store.root / rel  # missing: the callers say so


def registered_objects(catalog: Catalog) -> set[str]:
    """Store-relative paths of the registered index files (the bucket store's orphan sweep keeps them)."""
    return set(catalog.registered_paths())


def remove_orphans(store: Store) -> list[Path]:
    """Delete index files the catalog does not know (temp files of crashed builds, indexes of dropped sets).

    Called by ``Store.writing()`` under the write lock, like the shard sweep.
    """
    root = store.root / FOLDER
    if not root.is_dir():
        return []
    keep = {(store.root / p).resolve() for p in store.catalog.registered_paths()}
    removed = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            temp = is_temp(path)
            if path.is_file() and (temp or (path.suffix == SUFFIX and path.resolve() not in keep)):
                path.unlink(missing_ok=True)
                removed.append(path)
        if not any(folder.iterdir()):
            folder.rmdir()
        elif removed:
            fsync_dir(folder)
    return removed


# ---------------------------------------------------------------------------
# opening (memory-mapped, cached per store object)


@dataclass
class _Opened:
    record: IndexRecord
    params: IndexParams
    index: Any
    lock: threading.Lock  # concurrent searches of one usearch index are serialised
    key: IndexKey  # as the catalog had it when opened


class OpenedIndexes:
    """The indexes a store has opened (memory-mapped), by feature set id; owned by the store."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened: dict[int, _Opened] = {}

    def clear(self) -> None:
        """Forget them all (each memory map is released once no search uses it)."""
        with self.lock:
            self.opened.clear()


def _forget(store: Store, feature_set_id: int) -> None:
    cache = store.ann_indexes
    with cache.lock:
        cache.opened.pop(int(feature_set_id), None)


def _parse(path: Path, hint: str, read: Callable[[], Any]) -> Any:
    """``read()`` an index file with usearch, which raises ValueError / RuntimeError on bytes it
    cannot parse: those become a one-line IntegrityError naming the file and ``hint``."""
    try:
        return read()
    except (ValueError, RuntimeError) as exc:
        raise IntegrityError(f"index file {path} is damaged ({exc}); {hint}" if hint else
                             f"index file {path} is damaged ({exc})", path=path) from None
