"""Approximate nearest-neighbour indexes (HNSW, via usearch) over a store's feature sets.

One index per feature set, built by :func:`build_index` (``fs index build``),
saved under ``<store>/indexes/<feature_set>/`` and registered in the catalog
table ``vector_indexes`` with its params, vector count, the shards it covers and
its sha256. The search functions of :mod:`featurestore.search.service` call
:func:`search_indexed` and :func:`duplicate_groups_indexed` first and fall back
to exact search when they return nothing to use.

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

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.catalog import repository as repo
from featurestore.catalog.repository import IndexChangedError, IndexRecord, LiveShard
from featurestore.errors import FeatureStoreError, IntegrityError, InvalidInputError, NotFoundError
from featurestore.io.atomic import atomic_path, fsync_dir, is_temp, sha256_file
from featurestore.io.verified import check_file, regular_stat
from featurestore.search.cache import FILTERS_PER_SET, CompiledFilter, SetState
from featurestore.search.kernel import (
    METRICS,
    Hit,
    VectorIndex,
    _as_query,
    _union_edges,
    _UnionFind,
    _unit,
    near_duplicate_groups,
    top_k,
)
from featurestore.shards import read_selected, read_shard

if TYPE_CHECKING:
    from featurestore.store import FeatureSet, Store

FOLDER = "indexes"
SUFFIX = ".usearch"
DTYPES = ("f32", "f16", "i8")
USEARCH_METRIC = {"cosine": "cos", "l2": "l2sq"}

# A filter allowing at most this many images is searched exactly on their rows...
EXACT_ALLOWED_MAX = 2_000
# ...and so is one that would need more candidates than this from the index (about 2 k n / allowed)...
FETCH_MAX = 4_096
# ...or one allowing at most this many rows per candidate the index would expand (max(fetch, ef)):
# an HNSW candidate costs a few dozen scattered distance computations (2 M of them per node), an
# exact row one product streamed from memory. At 1M images a 1 % filter (10,000 rows, ~2,000
# candidates) is scored exactly, a 10 % one (100,000 rows, 200 candidates) through the index.
EXACT_ROWS_PER_CANDIDATE = 16
# Incremental builds rebuild instead when more than this share of the index is stale.
REBUILD_STALE_FRACTION = 0.2
# Duplicates: neighbours asked per vector at first, and at most (dense groups ask again).
DUP_NEIGHBOURS = 16
DUP_NEIGHBOURS_MAX = 1_024
# Candidate list (ef) of each vector's query while finding duplicates. A stored vector is not
# always found by its own query on clustered data: at 1M x 256 (M=16) it was missed 8.5 % of the
# time with ef=32, 2.5 % with 128 and 0.85 % with 256 (bench/bench_ann.py data); the pair of a
# near copy is lost only if both of its queries miss.
DUP_EXPANSION = 256
# Vectors added to / searched in the index per call while building or finding duplicates.
BATCH_ROWS = 8_192

Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


class IndexNotFoundError(NotFoundError):
    """A feature set has no index."""

    def __init__(self, feature_set: str, indexed: Sequence[str]):
        others = f"indexed sets: {', '.join(sorted(indexed))}" if indexed else "no feature set has one yet"
        FeatureStoreError.__init__(self, f"feature set {feature_set!r} has no index ({others}): build one with "
                                         f"`fs index build --features {feature_set}`")
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
    for record in repo.list_indexes(store.engine):
        shards = [s for s in repo.live_shards(store.engine, record.feature_set_id) if s.live]
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
    current = repo.get_index(store.engine, fs.id)
    base = IndexParams.from_json(current.params) if current is not None else IndexParams()
    given: dict[str, Any] = {"metric": metric, "dtype": dtype, "connectivity": connectivity,
                             "expansion_add": expansion_add, "expansion_search": expansion_search}
    params = replace(base, **{k: v for k, v in given.items() if v is not None}).check()
    shards = [s for s in repo.live_shards(store.engine, fs.id) if s.live]
    if not shards:
        raise InvalidInputError(f"feature set {fs.name!r} has no vectors yet: extract them first (`fs extract`)")
    plan = _plan_build(store, current, base, params, shards, rebuild)
    if plan.action in ("unchanged", "updated"):
        assert current is not None
        if plan.action == "updated":
            with store.writing():
                repo.update_params(store.engine, current.id, params.to_json())
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
        return _Plan("rebuilt", "--rebuild asked for", shards)
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
    check_file(path, None, "index file", f"rebuild it with `fs index build --features {record.feature_set} --rebuild`")
    if sha256_file(path) != record.sha256:
        raise IntegrityError(
            f"index file {path} does not match the sha256 recorded in the catalog; rebuild it with "
            f"`fs index build --features {record.feature_set} --rebuild`"
        )
    index = ui.Index.restore(str(path), view=False, connectivity=params.connectivity,
                             expansion_add=params.expansion_add, expansion_search=params.expansion_search)
    if index is None:
        raise IntegrityError(f"index file {path} is not a usearch index; rebuild it with --rebuild")
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
    if shard.live == shard.rows:
        # rows are whole-shard: the file's own ids
        ids, _ = read_shard(store.shard_source(shard.path, shard.sha256), shard.sha256)
        return ids
    return repo.shard_live_rows(store.engine, shard.id)[0]


def _read_live(store: Store, shard: LiveShard) -> tuple[np.ndarray, np.ndarray]:
    """The live (image ids, vectors) of one shard."""
    path = store.shard_source(shard.path, shard.sha256)
    if shard.live == shard.rows:
        return read_shard(path, shard.sha256)
    ids, rows = repo.shard_live_rows(store.engine, shard.id)
    _, vecs = read_selected(path, rows, shard.sha256)
    return ids, np.asarray(vecs, dtype=np.float32)


def _read_shards(store: Store, shards: Sequence[LiveShard]
                 ) -> Iterator[tuple[LiveShard, np.ndarray | None, np.ndarray | None]]:
    """Each shard's live rows; ``(shard, None, None)`` for one ``fs compact`` removed meanwhile."""
    for shard in shards:
        try:
            ids, vecs = _read_live(store, shard)
        except IntegrityError:
            if repo.shard_exists(store.engine, shard.id):
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
            old = repo.replace_index(
                store.engine, fs.id, current.id if current is not None else None, params=params.to_json(),
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
        rel = repo.drop_index(store.engine, fs.id)
        if rel is None:
            raise IndexNotFoundError(fs.name, [r.feature_set for r in repo.list_indexes(store.engine)])
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


def registered_objects(store: Store) -> set[str]:
    """Store-relative paths of the registered index files (the bucket store's orphan sweep keeps them)."""
    return set(repo.registered_paths(store.engine))


def remove_orphans(store: Store) -> list[Path]:
    """Delete index files the catalog does not know (temp files of crashed builds, indexes of dropped sets).

    Called by ``Store.writing()`` under the write lock, like the shard sweep.
    """
    root = store.root / FOLDER
    if not root.is_dir():
        return []
    keep = {(store.root / p).resolve() for p in repo.registered_paths(store.engine)}
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
    key: tuple[int, str, str]  # (id, sha256, params JSON) as the catalog had them when opened


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
        raise IntegrityError(f"index file {path} is damaged ({exc}); {hint}") from None


def _view(store: Store, fs: FeatureSet, record: IndexRecord, key: tuple[int, str, str]) -> _Opened:
    """Open an index file memory-mapped, after checking its size, sha256 and header against the catalog."""
    import usearch.index as ui

    path = _local(store, record.path)
    hint = (f"rebuild it with `fs index build --features {fs.name} --rebuild` "
            f"or remove it with `fs index drop {fs.name}`")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IntegrityError(f"index file {path} is missing; {hint}") from None
    regular_stat(path, "index file", hint)  # not a FIFO, device or folder, before usearch reads its header
    size = st.st_size
    if size != record.bytes:
        raise IntegrityError(f"index file {path} has {size:,} bytes, the catalog records {record.bytes:,}; {hint}")
    meta = _parse(path, hint, lambda: ui.Index.metadata(str(path)))
    if not meta or int(meta["dimensions"]) != int(fs.dim) or int(meta["count_present"]) != record.vectors:
        raise IntegrityError(f"index file {path} does not hold the {record.vectors:,} vectors of dim {fs.dim} "
                             f"the catalog records; {hint}")
    # usearch trusts the graph's bytes (a flipped offset crashed the process): hash them all before opening.
    check_file(path, record.sha256, "index file", hint)
    params = IndexParams.from_json(record.params)
    index = _parse(path, hint, lambda: ui.Index.restore(str(path), view=True,
                                                        expansion_search=params.expansion_search))
    return _Opened(record, params, index, threading.Lock(), key)


@dataclass(frozen=True)
class _State:
    record: IndexRecord
    opened: _Opened
    shards: list[LiveShard]  # the set's shards now, ``live`` not counted (= rows)


def _current(store: Store, fs: FeatureSet, cached: SetState | None = None) -> _State | None:
    """The registered index of ``fs``, opened (memory-mapped, once per store object), with the set's shards.

    Each call costs one cheap catalog round trip, none when ``cached`` (the
    set's facts cached by the search, issue 31) gives the index key and shards;
    the index is re-opened when it was rebuilt, and a new ``expansion_search``
    is applied without re-opening. A rebuild may delete the file between reading
    the catalog and opening it: then the catalog is read once more.
    """
    cache = store.ann_indexes
    for attempt in range(2):
        if cached is not None and not attempt:
            key = cached.snapshot.index_key
            shards = cached.remember("shards", lambda: [LiveShard(sh.id, sh.path, sh.rows, sh.rows)
                                                        for sh in cached.snapshot.shards])
        else:
            key, shards = repo.index_state(store.engine, fs.id)
        if key is None:
            return None
        with cache.lock:
            hit = cache.opened.get(int(fs.id))
        if hit is not None and hit.key == key:
            return _State(hit.record, hit, shards)
        record = repo.get_index(store.engine, fs.id)
        if record is None:
            continue
        if hit is not None and (hit.record.id, hit.record.sha256) == (record.id, record.sha256):
            hit.params = IndexParams.from_json(record.params)  # only expansion_search can differ
            hit.index.expansion_search = hit.params.expansion_search
            hit.record, hit.key = record, key
            return _State(record, hit, shards)
        try:
            opened = _view(store, fs, record, key)
        except IntegrityError:
            if attempt or repo.get_index(store.engine, fs.id) == record:
                raise
            continue
        with cache.lock:
            cache.opened[int(fs.id)] = opened
        return _State(record, opened, shards)
    return None


# ---------------------------------------------------------------------------
# searching


@dataclass(frozen=True)
class IndexedSearch:
    """What :func:`search_indexed` found.

    ``hits`` is None when the caller should search exactly (``note`` says why);
    otherwise ``methods[i]`` says how ``hits[i]`` was found: "index", or "exact"
    for rows the index does not cover (or a filter searched exactly).
    """

    hits: list[Hit] | None
    methods: list[str]
    method: str
    note: str


def search_indexed(
    store: Store,
    fs: FeatureSet,
    vector: np.ndarray,
    k: int,
    metric: str,
    exclude_ids: set[int] | None = None,
    allowed_ids: np.ndarray | CompiledFilter | None = None,
    cached: SetState | None = None,
) -> IndexedSearch | None:
    """Top-``k`` of a feature set through its index; None when it has no index.

    Same arguments and score convention as :func:`featurestore.search.service.search`
    (``vector`` already embedded, ``allowed_ids`` already resolved from ``where``,
    as ids or compiled to a bitmap). ``cached`` is the set's state as the search
    cached it (issue 31): the index key, shards, coverage and exact subsets of
    filtered rows then come from it instead of the catalog.
    """
    state = _current(store, fs, cached)
    if state is None:
        return None
    record, opened = state.record, state.opened
    if opened.params.metric != metric:
        return IndexedSearch(None, [], "exact", f"the index of {fs.name} is for {opened.params.metric}, "
                                                f"not {metric}: searched exactly")
    q = _as_query(vector, int(fs.dim))
    if metric == "cosine":
        _unit(q)  # a zero query is refused as in exact search
    excl = np.array(sorted(int(i) for i in exclude_ids or ()), dtype=np.int64)
    allowed = allowed_ids if isinstance(allowed_ids, CompiledFilter) or allowed_ids is None \
        else CompiledFilter.of(allowed_ids)
    n = len(opened.index)
    if allowed is not None and _exact_is_cheaper(k, excl.size, n, allowed.size, opened.params.expansion_search):
        return _filtered_exact(store, fs, state.shards, allowed, q, k, metric, excl,
                               f"the filter allows {allowed.size:,} images: searched them exactly", cached)
    if cached is not None:
        covered, uncovered, stale = cached.remember(("coverage", record.id, record.sha256),
                                                    lambda: _covered(store, fs, record, state.shards))
    else:
        covered, uncovered, stale = _covered(store, fs, record, state.shards)
    # Index keys of removed shards (fs compact) may be stale: check candidates in the catalog then.
    good = _candidate_filter(store, fs, covered, excl, allowed, check_live=stale)
    cand = _index_candidates(opened, q, k, n, excl.size, allowed.size if allowed is not None else None, good)
    if cand is None:  # the filter could not be satisfied from the index's candidates
        assert allowed is not None
        return _filtered_exact(store, fs, state.shards, allowed, q, k, metric, excl,
                               f"the filter allows {allowed.size:,} images, too few among the index's "
                               "candidates: searched them exactly", cached)
    keys, dists = cand
    scores = 1.0 - dists if metric == "cosine" else np.sqrt(np.maximum(dists, 0.0))
    idx_hits = [Hit(int(i), float(s)) for i, s in zip(keys.tolist(), scores.tolist(), strict=True)]
    exact_hits: list[Hit] = []
    if uncovered:
        exact_hits = top_k(q, _chunks(store, uncovered), k=k, metric=metric,
                           exclude_ids=set(excl.tolist()) or None,
                           allowed_ids=allowed.ids if allowed is not None else None)
    hits, methods = _merge(idx_hits, exact_hits, k, metric)
    note = f"HNSW index of {fs.name} (usearch, {metric}, {opened.params.dtype}, {n:,} vectors)"
    if uncovered:
        extra = sum(s.live for s in uncovered)
        note += (f"; {extra:,} vector(s) in {len(uncovered)} shard(s) written since the build searched exactly "
                 f"(`fs index build --features {fs.name}` adds them)")
    return IndexedSearch(hits, methods, "index", note)


def _covered(store: Store, fs: FeatureSet, record: IndexRecord, shards: list[LiveShard]
             ) -> tuple[set[int], list[LiveShard], bool]:
    """The shards the index covers, the live ones it does not, and whether some it covers is gone."""
    covered = set(record.shard_ids)
    return (covered, *_coverage(store, fs, covered, shards))


def _coverage(store: Store, fs: FeatureSet, covered: set[int], shards: list[LiveShard]
              ) -> tuple[list[LiveShard], bool]:
    """The live shards the index does not cover, and whether some shard it covers is gone.

    Live rows are counted only in the uncovered shards (counting every shard's is slow).
    """
    new = [s.id for s in shards if s.id not in covered]
    stale = bool(covered - {s.id for s in shards})
    if not new:
        return [], stale
    counted = repo.live_shards(store.engine, fs.id, count=new)
    return [s for s in counted if s.id not in covered and s.live], stale


def _fetch_for(k: int, n_excl: int, n: int, n_allowed: int) -> int:
    """Candidates to ask for so that about ``2 k`` allowed ones come back."""
    return int(math.ceil(2 * k * n / max(n_allowed, 1))) + n_excl


def _exact_is_cheaper(k: int, n_excl: int, n: int, n_allowed: int, expansion: int) -> bool:
    """Whether scoring the allowed rows exactly beats over-fetching from the index.

    The index search expands about ``max(fetch, ef)`` candidates, each costing
    a few dozen scattered distance computations; exact scoring streams the
    allowed rows through BLAS (see :data:`EXACT_ROWS_PER_CANDIDATE`).
    """
    if n_allowed <= EXACT_ALLOWED_MAX:
        return True
    fetch = _fetch_for(k, n_excl, n, n_allowed)
    return fetch > FETCH_MAX or n_allowed <= EXACT_ROWS_PER_CANDIDATE * max(fetch, expansion)


def _candidate_filter(store: Store, fs: FeatureSet, covered: set[int], excl: np.ndarray,
                      allowed: CompiledFilter | None, check_live: bool) -> Callable[[np.ndarray], np.ndarray]:
    def good(keys: np.ndarray) -> np.ndarray:
        mask = np.ones(keys.shape[0], dtype=bool)
        if excl.size:
            mask &= ~np.isin(keys, excl)
        if allowed is not None:
            mask &= allowed.allows(keys)
        if check_live and mask.any():
            loc = repo.locate(store.engine, fs.id, keys[mask])
            ok_ids = loc[np.isin(loc[:, 1], list(covered)), 0]
            mask &= np.isin(keys, ok_ids)
        return mask

    return good


def _index_candidates(opened: _Opened, q: np.ndarray, k: int, n: int, n_excl: int, n_allowed: int | None,
                      good: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys and distances of up to ``k`` good candidates, growing the fetch until enough pass.

    Returns None when a filtered search (``n_allowed`` images allowed) ran out of
    fetch budget with fewer than ``k``.
    """
    count = k + n_excl if n_allowed is None else _fetch_for(k, n_excl, n, n_allowed)
    qv = q.astype(np.float32)
    while True:
        count = min(count, n, max(FETCH_MAX, k + n_excl))
        with opened.lock:
            m = opened.index.search(qv, count, threads=1)
        keys = np.asarray(m.keys, dtype=np.uint64).astype(np.int64)
        dists = np.asarray(m.distances, dtype=np.float64)
        mask = good(keys)
        if mask.sum() >= k or count >= n:
            return keys[mask][:k], dists[mask][:k]
        if count >= max(FETCH_MAX, k + n_excl):
            return None if n_allowed is not None else (keys[mask], dists[mask])
        count *= 4


def _chunks(store: Store, shards: Sequence[LiveShard]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for _, ids, vecs in _read_shards(store, shards):
        if ids is not None and vecs is not None:
            yield ids, vecs


def _filtered_exact(store: Store, fs: FeatureSet, shards: list[LiveShard], allowed: CompiledFilter, q: np.ndarray,
                    k: int, metric: str, excl: np.ndarray, note: str, cached: SetState | None = None
                    ) -> IndexedSearch:
    """Exact search of the allowed images.

    For a filter the search cached (``--where``, issue 31), the allowed rows are
    read once into an in-memory :class:`VectorIndex` (when they fit a
    :data:`~featurestore.search.cache.FILTERS_PER_SET` share of the search memory
    budget) that later queries with it score directly. Otherwise: by the caller's
    in-memory exact path when the whole set fits the budget (loaded once, then
    cached), else by reading just their rows.
    """
    budget = max(0, int(store.settings.search_memory_mb)) * 2**20
    # each of the set's cached filters may keep its rows: together at most the search memory budget
    if allowed.shared and allowed.size * int(fs.dim) * 4 <= budget // FILTERS_PER_SET:
        subset = allowed.derive(("rows", fs.id, metric), lambda: _subset_index(store, fs, allowed.ids, metric))
        hits = subset.search(q, k, exclude_ids=set(excl.tolist()) or None) if len(subset) else []
        return IndexedSearch(hits, ["exact"] * len(hits), "exact", note)
    need = sum(s.rows for s in shards) * int(fs.dim) * 4
    if need <= budget:
        return IndexedSearch(None, [], "exact", note)
    hits = _exact_subset(store, fs, allowed.ids, q, k, metric, excl)
    return IndexedSearch(hits, ["exact"] * len(hits), "exact", note)


def _subset_index(store: Store, fs: FeatureSet, ids: np.ndarray, metric: str) -> VectorIndex:
    """The live vectors of the images ``ids`` (those that have one) in an in-memory exact index."""
    for attempt in range(2):
        loc = repo.locate(store.engine, fs.id, ids)
        live = {s.id: s for s in repo.live_shards(store.engine, fs.id, count=[])}
        try:
            got_ids, blocks = [], []
            bounds = np.flatnonzero(np.r_[True, loc[1:, 1] != loc[:-1, 1], True]) if len(loc) else [0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                shard = live[int(loc[a, 1])]
                file_ids, vecs = read_selected(store.shard_source(shard.path, shard.sha256), loc[a:b, 2])
                got_ids.append(np.asarray(file_ids, dtype=np.int64))
                blocks.append(np.asarray(vecs, dtype=np.float32))
            break
        except (IntegrityError, KeyError):
            if attempt:  # `fs compact` replaced a shard between locating and reading: locate again once
                raise
    mat = np.concatenate(blocks) if blocks else np.empty((0, int(fs.dim)), dtype=np.float32)
    return VectorIndex(np.concatenate(got_ids) if got_ids else np.empty(0, np.int64), mat, metric, copy=False)


def _exact_subset(store: Store, fs: FeatureSet, ids: np.ndarray, q: np.ndarray, k: int, metric: str,
                  excl: np.ndarray) -> list[Hit]:
    """Exact top-``k`` among the rows of ``ids`` only, read from their shards."""
    for attempt in range(2):
        loc = repo.locate(store.engine, fs.id, ids)
        shards = {s.id: s for s in repo.live_shards(store.engine, fs.id, count=[])}

        def chunks(loc: np.ndarray = loc, shards: dict[int, LiveShard] = shards
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            bounds = np.flatnonzero(np.r_[True, loc[1:, 1] != loc[:-1, 1], True]) if len(loc) else [0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                shard = shards[int(loc[a, 1])]
                file_ids, vecs = read_selected(store.shard_source(shard.path, shard.sha256), loc[a:b, 2], shard.sha256)
                yield file_ids, vecs

        try:
            return top_k(q, chunks(), k=k, metric=metric, exclude_ids=set(excl.tolist()) or None)
        except (IntegrityError, KeyError):
            if attempt:  # `fs compact` replaced a shard between locating and reading: locate again once
                raise
    return []  # pragma: no cover


def _merge(idx_hits: list[Hit], exact_hits: list[Hit], k: int, metric: str) -> tuple[list[Hit], list[str]]:
    """Best ``k`` of both lists (an image in both keeps its exact score), ties by ascending id."""
    seen = {h.image_id for h in exact_hits}
    both = [(h, "exact") for h in exact_hits] + [(h, "index") for h in idx_hits if h.image_id not in seen]
    sign = -1.0 if metric == "cosine" else 1.0
    both.sort(key=lambda hm: (sign * hm[0].score, hm[0].image_id))
    both = both[:k]
    return [h for h, _ in both], [m for _, m in both]


# ---------------------------------------------------------------------------
# near duplicates


@dataclass(frozen=True)
class IndexedGroups:
    groups: list[list[int]]
    note: str


def duplicate_groups_indexed(
    store: Store,
    fs: FeatureSet,
    threshold: float,
    allowed_ids: np.ndarray | None = None,
    progress: Progress | None = None,
    expansion: int | None = None,
) -> IndexedGroups | None:
    """Near-duplicate groups (cosine similarity >= ``threshold``, transitive) through the set's index.

    Every live vector queries the index for its nearest neighbours (more when
    its farthest neighbour is still above the threshold, so dense groups are
    complete); pairs above the threshold are joined with union-find, as in
    :func:`~featurestore.search.kernel.near_duplicate_groups`. Vectors in shards
    the index does not cover also query it and are compared exactly among
    themselves. Memory: the union-find arrays (16 bytes per vector), one shard of
    vectors at a time and the memory-mapped index. ``expansion`` is the candidate
    list of each query (default :data:`DUP_EXPANSION`): more finds more of the
    pairs, slower. Returns None when the set has no cosine index.
    """
    state = _current(store, fs)
    if state is None or state.opened.params.metric != "cosine":
        return None
    record, opened = state.record, state.opened
    report = progress or _no_progress
    shards = [s for s in repo.live_shards(store.engine, fs.id) if s.live]
    covered = set(record.shard_ids)
    uncovered = [s for s in shards if s.id not in covered]
    allowed = None if allowed_ids is None else np.unique(np.asarray(allowed_ids, dtype=np.int64))
    ids = np.sort(np.concatenate([_live_ids(store, s) for s in shards]) if shards else np.empty(0, np.int64))
    if allowed is not None:
        ids = ids[np.isin(ids, allowed)]
    note = f"HNSW index of {fs.name} (usearch, {opened.params.dtype}, {len(opened.index):,} vectors)"
    if ids.size < 2:
        return IndexedGroups([], note)
    ef = int(expansion) if expansion is not None else DUP_EXPANSION
    uf = _UnionFind(ids.size)
    done = 0
    for _, sids, vecs in _read_shards(store, shards):
        if sids is None or vecs is None:
            continue
        if allowed is not None:
            keep = np.isin(sids, ids)
            sids, vecs = sids[keep], vecs[keep]
        for start in range(0, len(sids), BATCH_ROWS):
            _dup_edges(opened, uf, ids, sids[start : start + BATCH_ROWS], vecs[start : start + BATCH_ROWS],
                       threshold, max(1, store.settings.workers), ef)
            done += min(BATCH_ROWS, len(sids) - start)
            report(done, ids.size)
    if uncovered:
        _uncovered_edges(store, uf, ids, uncovered, threshold)
    roots = uf.roots()
    order = np.lexsort((ids, roots))
    sroots, sids_sorted = roots[order], ids[order]
    bounds = np.flatnonzero(np.r_[True, sroots[1:] != sroots[:-1], True])
    groups = [sids_sorted[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a >= 2]
    groups.sort()
    if uncovered:
        note += f"; {sum(s.live for s in uncovered):,} vector(s) written since the build compared exactly"
    return IndexedGroups(groups, note)


def _dup_edges(opened: _Opened, uf: _UnionFind, ids: np.ndarray, qids: np.ndarray, vecs: np.ndarray,
               threshold: float, threads: int, expansion: int) -> None:
    """Union every query with its index neighbours at or above ``threshold`` (both among ``ids``)."""
    count = DUP_NEIGHBOURS
    rows = np.arange(len(qids))
    while rows.size:
        count = min(count, len(opened.index))
        with opened.lock:
            saved = opened.index.expansion_search
            opened.index.expansion_search = max(expansion, count)
            try:
                m = opened.index.search(vecs[rows], count, threads=threads)
            finally:
                opened.index.expansion_search = saved
        keys = np.asarray(m.keys, dtype=np.uint64).astype(np.int64).reshape(len(rows), -1)
        sims = 1.0 - np.asarray(m.distances, dtype=np.float64).reshape(len(rows), -1)
        # one query gives a Matches (only the keys found), several a BatchMatches (padded, with counts)
        counts = np.asarray(getattr(m, "counts", [keys.shape[1]])).reshape(-1)
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        hit = valid & (sims >= threshold) & (keys != qids[rows][:, None])
        pos = np.searchsorted(ids, keys)
        pos = np.minimum(pos, ids.size - 1)
        hit &= ids[pos] == keys  # neighbours outside the live (and allowed) ids are dropped
        qpos = np.searchsorted(ids, qids[rows])
        r, c = np.nonzero(hit)
        if r.size:
            _union_edges(uf, qpos[r], pos[r, c])
        # a query whose farthest neighbour is still above the threshold may have more: ask again
        full = valid[:, -1] & (sims[:, -1] >= threshold)
        if count >= min(DUP_NEIGHBOURS_MAX, len(opened.index)):
            break
        rows = rows[full]
        count *= 4


def _uncovered_edges(store: Store, uf: _UnionFind, ids: np.ndarray, uncovered: list[LiveShard],
                     threshold: float) -> None:
    """Exact pairs among the vectors the index does not cover (they must fit the search memory budget)."""
    budget = max(0, int(store.settings.search_memory_mb)) * 2**20
    parts = [(i, v) for _, i, v in _read_shards(store, uncovered) if i is not None and v is not None]
    if not parts:
        return
    uids = np.concatenate([p[0] for p in parts])
    need = uids.size * parts[0][1].shape[1] * 4
    if need > budget:
        raise FeatureStoreError(
            f"{uids.size:,} vectors were written since the index was built ({need / 2**20:,.0f} MiB, more than "
            f"the search memory budget of {store.settings.search_memory_mb} MiB): add them to the index first"
        )
    mat = np.concatenate([p[1] for p in parts])
    keep = np.isin(uids, ids)
    for group in near_duplicate_groups(uids[keep], mat[keep], threshold=threshold):
        pos = np.searchsorted(ids, np.asarray(group, dtype=np.int64))
        _union_edges(uf, np.full(pos.size - 1, pos[0]), pos[1:])
