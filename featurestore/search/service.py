"""Search over a store's feature sets: query embedding, filters, cached indexes, duplicates.

:func:`search` ranks a feature set against a stored image (by id), a vector, or
a new image (embedded on the fly with the set's recorded extractor, see
:func:`embedder_for`), optionally filtered by a read-only SQL condition on the
``images`` table. Sets that fit ``Settings.search_memory_mb`` are loaded once
into a :class:`~featurestore.search.kernel.VectorIndex` cached by the store;
larger ones are streamed shard by shard through
:func:`~featurestore.search.kernel.top_k`. Both are exact.

What a search needs from the catalog besides its hits' paths and labels (the
set's row, shards and index record, the ids a ``--where`` allows) is cached per
set on the store and checked against the catalog's change counter once the
search is done, in the same statement that fetches the rows; see
:mod:`featurestore.search.cache`.

Every result carries ``distance`` (lower is better, whatever the metric:
``1 - cosine similarity`` for cosine, the Euclidean distance for l2) and, for
cosine, ``similarity``; the CLI, the HTTP API and Python use these names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from featurestore.catalog.repository import PathLabel, VectorLocation
from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    ImageNotFoundError,
    InvalidInputError,
    NoVectorError,
)
from featurestore.io.images import load_rgb, to_rgb
from featurestore.io.objects import is_object_url
from featurestore.search import backends as ann
from featurestore.search.cache import CompiledFilter, IdFilter, SetState
from featurestore.search.kernel import Hit, _as_query, _check_k, _check_metric, near_duplicate_groups, top_k
from featurestore.search.protocol import SearchStore
from featurestore.shards import read_row
from featurestore.vectors import RegisteredSet, read_images

Embedder = Callable[[PILImage.Image], np.ndarray]
# What a search can be asked about: a stored image's id, a vector, an image file (path or s3:// URL) or a PIL image.
Query = int | np.integer[Any] | np.ndarray | Sequence[float] | str | os.PathLike[str] | PILImage.Image


@dataclass(frozen=True)
class SearchResult:
    """One hit of :func:`search`, with the catalog facts a person needs.

    ``distance`` is lower-is-better for every metric; ``similarity`` is the
    cosine similarity (None for l2).
    """

    rank: int
    image_id: int
    path: str
    label: str | None
    distance: float
    similarity: float | None = None
    method: str = "exact"  # issue 14: "index" when found through the feature set's ANN index

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "image_id": self.image_id, "path": self.path, "label": self.label,
                "distance": self.distance, "similarity": self.similarity, "method": self.method}


class Found(list[Any]):
    """Search results or duplicates (a list), plus how they were found (issue 14).

    ``method`` is "index" when the feature set's ANN index was used, else "exact";
    ``note`` says more (coverage, why the index was not used), for a person.
    """

    def __init__(self, items: Iterable[Any] = (), method: str = "exact", note: str = ""):
        super().__init__(items)
        self.method = method
        self.note = note


@dataclass(frozen=True)
class DuplicateImage:
    """One member of a near-duplicate group found by :func:`duplicates` (groups numbered from 1)."""

    group: int
    image_id: int
    path: str
    label: str | None


def embedder_for(store: SearchStore, feature_set_name: str) -> Embedder:
    """A function embedding a new image exactly like the vectors of a stored feature set.

    The extractor comes from the store's cache (rebuilt from the feature set's
    catalog row by :func:`featurestore.features.registry.extractor_for`, its
    params checked against the stored ones). The function accepts a
    ``PIL.Image`` of any size and mode and returns a float32 vector of shape
    ``(dim,)``; it is thread-safe.
    """
    fs = store.feature_set(feature_set_name)
    ex, lock = store.extractor(fs.name)
    name, dim = fs.name, fs.dim

    def embed(image: PILImage.Image) -> np.ndarray:
        prepared = ex.prepare(to_rgb(image))
        with lock:  # CNN executors are not safe to call from several threads at once
            out = ex.compute([prepared])[name]
        vec = np.asarray(out, dtype=np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise DimensionMismatchError(f"{name}: the extractor gave {vec.shape[0]} values, expected {dim}")
        return vec

    return embed


def _index_key(store: SearchStore, fs: RegisteredSet) -> tuple[tuple[Any, ...], int]:
    """(cache key of the set's current shards, bytes its vectors need in memory)."""
    shards = store.catalog.shards(fs.id)
    # Shard row counts bound the live rows from above (compaction may orphan a few).
    size = sum(sh.rows for sh in shards) * int(fs.dim) * 4
    return (fs.name, tuple((sh.id, sh.rows) for sh in shards)), size


def clear_cache(store: SearchStore) -> None:
    """Drop the indexes and extractors cached by ``store`` (frees their memory)."""
    store.clear_caches()


def where_ids(store: SearchStore, condition: str) -> np.ndarray:
    """Ids of the images matching a SQL condition, run read-only under the SQL timeout.

    The condition is evaluated on the columns of the ``images`` table (``id``,
    ``sha256``, ``source_path``, ``width``, ``height``, ``format``, ``mode``,
    ``bytes``, ``label``, ``superclass``, ``ingested_at``) plus ``dataset_id``
    and ``dataset`` (the name) of each dataset the image belongs to, e.g.
    ``label = 'sandal' AND dataset = 'spring'``. It is parsed as one expression and checked by
    :mod:`featurestore.catalog.readonly` (the owner of user SQL), which runs it
    read-only within ``Settings.sql_timeout`` seconds.

    Raises
    ------
    InvalidInputError
        The condition is empty, not valid SQL, not allowed, or tries to write
        (one line naming the condition).
    QueryTimeoutError
        It ran longer than the timeout.
    """
    # hook (issue 11): user SQL goes through catalog.readonly only
    from featurestore.catalog.readonly import ReadOnlyCatalog  # sqlglot: only for a --where

    ids = ReadOnlyCatalog.from_settings(store.settings).image_ids_where(condition)
    return np.asarray(ids, dtype=np.int64)


def _set(store: SearchStore, feature_set: str | RegisteredSet) -> RegisteredSet:
    """The feature set named ``feature_set``, or the handle itself (saves a catalog query per call)."""
    return store.feature_set(feature_set) if isinstance(feature_set, str) else feature_set


def stored_vector(store: SearchStore, feature_set: str | RegisteredSet, image_id: int) -> np.ndarray:
    """The stored vector of one image in a feature set (float32, shape ``(dim,)``).

    Raises
    ------
    ImageNotFoundError
        No image has this id.
    NoVectorError
        The image has no vector in the set (the message names the ``fs extract``
        command to run).
    """
    fs = _set(store, feature_set)
    image_id = int(image_id)
    # Typed errors (HTTP answers 404 / 409 by type); both are also InvalidInputError.
    found = VectorLocation(False, None) if not 1 <= image_id <= 2**63 - 1 else \
        store.catalog.vector_location(fs.id, image_id)
    if not found.exists:
        raise ImageNotFoundError(image_id, remedy="list-ids")
    if (at := found.vector) is None:
        raise NoVectorError(image_id, fs.name, stored=fs, remedy="extract-first-or-image")
    return np.asarray(read_row(store.shard_source(at.path, at.sha256), at.row, at.sha256),
                      dtype=np.float32).reshape(-1)


def query_vector(store: SearchStore, feature_set: str | RegisteredSet, query: Query) -> tuple[np.ndarray, int | None]:
    """The query as a vector of ``feature_set``, plus the image id when it is a stored image.

    ``query`` is an image id (int), a vector (array of the set's dim), a
    ``PIL.Image`` or the path of an image file (decoded like at ingest, then
    embedded with :func:`embedder_for`), which may be an ``s3://`` URL.
    """
    fs = _set(store, feature_set)
    if isinstance(query, bool):
        raise InvalidInputError("the query must be an image id, a vector, an image or an image path")
    if isinstance(query, int | np.integer):
        return stored_vector(store, fs, int(query)), int(query)
    if isinstance(query, np.ndarray | list | tuple):
        vec = _as_query(np.asarray(query, dtype=np.float64), int(fs.dim))
        return vec, None
    if isinstance(query, str | os.PathLike):
        source = str(query) if is_object_url(query) else Path(query)
        image = load_rgb(source, store.settings.max_image_pixels, store.settings.max_file_bytes)
        return embedder_for(store, fs.name)(image), None
    if isinstance(query, PILImage.Image):
        return embedder_for(store, fs.name)(query), None
    raise InvalidInputError(
        f"the query must be an image id, a vector, a PIL image or an image path, not {type(query).__name__}"
    )


def add_image(store: SearchStore, feature_set: str, image_id: int, vector: np.ndarray) -> bool:
    """Store ``vector`` as image ``image_id``'s row of ``feature_set`` unless it has one.

    For an image just ingested (``IngestSummary.image_ids``) whose vector was
    computed for a query. Call under ``store.writing()``; returns whether it was written.
    """
    fs = store.feature_set(feature_set)
    if not store.images_lacking(fs.name, [int(image_id)]):
        return False
    store.append_vectors(fs, [int(image_id)], np.asarray(vector, dtype=np.float32).reshape(1, -1))
    return True


def search(
    store: SearchStore,
    feature_set: str,
    query: Query,
    k: int = 10,
    where: str | None = None,
    metric: str = "cosine",
    exclude_ids: Iterable[int] | None = None,
    allowed_ids: np.ndarray | None = None,
    exact: bool = False,
    id_filter: IdFilter | None = None,
) -> Found:
    """Top-``k`` images of a feature set nearest to ``query``: through its ANN index if it has one, else exact.

    Parameters
    ----------
    store : SearchStore
        A :class:`featurestore.store.Store`.
    feature_set : str
        Name of the feature set to rank.
    query : int, ndarray, str, os.PathLike or PIL.Image
        A stored image id (that image is excluded from the results), a vector
        of the set's dimension, or a new image (file path or ``PIL.Image``) of
        any size and mode, embedded with the set's recorded extractor
        (:func:`embedder_for`); new images are not stored.
    k : int
        Number of results (fewer when fewer images are eligible).
    where : str, optional
        SQL condition on the ``images`` columns plus ``dataset`` (see
        :func:`where_ids`), applied before ranking.
    metric : {"cosine", "l2"}
        Cosine similarity (higher is better) or Euclidean distance (lower is better).
    exclude_ids : iterable of int, optional
        Image ids never returned.
    allowed_ids : ndarray of int, optional
        Only these image ids are candidates (combined with ``where``); for callers
        that filter with bound parameters instead of an SQL condition.
    exact : bool
        Ignore the feature set's ANN index (``fs index build``) and score every
        row (recall 1.0). Without an index the search is always exact.
    id_filter : IdFilter, optional
        Only the ids its query selects (combined with the others), fetched once
        per catalog version and cached like a ``where`` (the HTTP ``label=`` /
        ``dataset=`` filters).

    Returns
    -------
    Found of SearchResult
        Best first, ranks from 1; equal scores ordered by ascending image id.
        ``.method`` is "index" or "exact", per hit too (see
        :func:`featurestore.search.index.search_indexed`).

    Notes
    -----
    When the set (rows x dim x 4 bytes) fits ``store.settings.search_memory_mb``
    it is loaded once into a :class:`VectorIndex` cached on ``store`` (reloaded
    when its shards change), so later calls in the same process cost about one
    matrix-vector product; otherwise shards are streamed through :func:`top_k`
    and memory stays bounded by the largest shard.
    """
    _check_metric(metric)
    k = _check_k(k)
    cache = store.search_cache
    for attempt in range(_ATTEMPTS):
        state = store.search_state(feature_set)
        last = attempt + 1 == _ATTEMPTS
        try:
            hits, methods, method, note = _search_at(store, state, query, k, where, metric, exclude_ids,
                                                     allowed_ids, exact, id_filter)
        except (FeatureStoreError, OSError):
            # A write since the state was cached (a compacted shard, a rebuilt index, a dropped set)
            # fails like damage would: look again on the catalog as it is now before reporting it.
            if last or store.catalog.catalog_version() == state.version:
                raise
            cache.drop(feature_set, state)
            continue
        now = store.catalog.rows_at_version([h.image_id for h in hits])
        if now.version == state.version or last:
            return Found(_results(now.rows, hits, metric, methods), method, note)
        cache.drop(feature_set, state)  # the catalog changed during or before this search: again, on it as it is
    raise AssertionError("unreachable")  # pragma: no cover


# Searches on the cached state of a set are checked against the catalog's change counter once they
# are done, and run again on a fresh state if it moved (issue 31); a set under continuous writes is
# searched on the freshest state after this many tries.
_ATTEMPTS = 3


def _search_at(store: SearchStore, state: SetState, query: Query, k: int, where: str | None, metric: str,
               exclude_ids: Iterable[int] | None, allowed_ids: np.ndarray | None, exact: bool,
               id_filter: IdFilter | None = None) -> tuple[list[Hit], list[str] | None, str, str]:
    """:func:`search` on one cached state of the set: (hits, how each was found, method, note)."""
    fs: RegisteredSet = state.handle
    vec, self_id = query_vector(store, fs, query)
    excl = {int(i) for i in exclude_ids} if exclude_ids is not None else set()
    if self_id is not None:
        excl.add(self_id)
    allowed = _compiled(store, state, where) if where is not None else None
    if id_filter is not None:
        chosen = state.compiled(("ids", id_filter.key), lambda _: (id_filter.fetch(), True))
        allowed = chosen if allowed is None else allowed.intersect(chosen.ids)
    if allowed_ids is not None:
        given = np.asarray(allowed_ids, dtype=np.int64)
        allowed = CompiledFilter.of(given) if allowed is None else allowed.intersect(given)
    if allowed is not None and allowed.size == 0:
        return [], None, "exact", ""
    note = ""
    # ANN index (issue 14): the backend that made the set's index (search/backends.py) searches it
    if not exact and state.snapshot.index_key is not None:
        indexed = ann.search_indexed(store, fs, vec, k, metric, excl, allowed, cached=state)
        if indexed is not None and indexed.hits is not None:
            return indexed.hits, indexed.methods, indexed.method, indexed.note
        note = indexed.note if indexed is not None else ""
    shard_key = (fs.name, tuple((sh.id, sh.rows) for sh in state.snapshot.shards))
    # Shard row counts bound the live rows from above (compaction may orphan a few).
    size = sum(sh.rows for sh in state.snapshot.shards) * int(fs.dim) * 4
    if not shard_key[1]:
        return [], None, "exact", note
    if size <= store.settings.search_memory_mb * 2**20:
        index = store.vector_index(fs, metric, shard_key, size)
        pos = None
        if allowed is not None and allowed.shared:
            # rows of this in-memory index the filter allows, found once per filter (the index is kept
            # beside them so a later index that reuses its id() is not mistaken for it)
            made, pos = allowed.derive(("positions", id(index)), lambda: (index, index.positions(allowed.bitmap)))
            if made is not index:
                pos = index.positions(allowed.bitmap)
        elif allowed is not None:
            pos = index.positions(allowed.bitmap)
        hits = index.search(vec, k, exclude_ids=excl or None, allowed_positions=pos,
                            allowed_ids=allowed.ids if allowed is not None and pos is None else None)
    else:
        hits = top_k(vec, store.iter_shards(fs.name), k=k, metric=metric, exclude_ids=excl or None,
                     allowed_ids=allowed.ids if allowed is not None else None)
    return hits, None, "exact", note


def _compiled(store: SearchStore, state: SetState, where: str) -> CompiledFilter:
    """``where`` compiled to the ids and bitmap it allows, once per condition and catalog version."""
    from featurestore.catalog.readonly import dialect_of, where_is_cacheable  # sqlglot: only for a --where

    def compile_ids(condition: str) -> tuple[np.ndarray, bool]:
        ids = where_ids(store, condition)  # checks the condition first: a bad one is never cached
        return ids, where_is_cacheable(condition, dialect_of(store.settings.catalog_url))

    return state.compiled(where, compile_ids)


_UNKNOWN = PathLabel("", None)  # an image deleted since it was found


def _results(rows: dict[int, PathLabel], hits: list[Hit], metric: str,
             methods: list[str] | None = None) -> list[SearchResult]:
    out = []
    for rank, h in enumerate(hits, start=1):
        path, label = rows.get(h.image_id, _UNKNOWN)
        how = methods[rank - 1] if methods is not None else "exact"
        if metric == "cosine":
            out.append(SearchResult(rank, h.image_id, path, label, distance=1.0 - h.score, similarity=h.score,
                                    method=how))
        else:
            out.append(SearchResult(rank, h.image_id, path, label, distance=h.score, method=how))
    return out


def duplicates(
    store: SearchStore,
    feature_set: str,
    threshold: float = 0.97,
    where: str | None = None,
    exact: bool = False,
    progress: Callable[[int, int], None] | None = None,
    expansion: int | None = None,
) -> Found:
    """Groups of near-duplicate images: cosine similarity >= ``threshold``, transitively.

    With a cosine ANN index (``fs index build``) and not ``exact``, every vector
    asks the index for its neighbours (memory bounded, ``expansion`` candidates
    per query, see :func:`featurestore.search.index.duplicate_groups_indexed`). Otherwise the
    feature set is loaded into memory (it must fit
    ``store.settings.search_memory_mb``; there is no streaming variant).

    Returns
    -------
    Found of DuplicateImage
        Members of every group of two or more images, group by group (numbered
        from 1, ordered by their smallest image id), ids ascending within a group;
        ``.method`` is "index" or "exact".

    Raises
    ------
    FeatureStoreError
        The set is larger than the memory budget (the message gives the size).
    """
    fs = store.feature_set(feature_set)
    keep_ids = where_ids(store, where) if where is not None else None
    # ANN index (issue 14): near duplicates through the set's cosine index, by its backend (search/backends.py)
    if not exact:
        indexed = ann.duplicate_groups_indexed(store, fs, threshold, keep_ids, progress, expansion)
        if indexed is not None:
            return Found(_duplicate_rows(store, indexed.groups), "index", indexed.note)
    shard_key, need = _index_key(store, fs)
    if keep_ids is not None:
        # the budget applies to what is compared, and only that is read: the rows --where keeps
        need = min(need, int(keep_ids.size) * int(fs.dim) * 4)
    budget = store.settings.search_memory_mb * 2**20
    if need > budget:
        raise FeatureStoreError(
            f"feature set {fs.name!r} needs {need / 2**20:,.0f} MiB in memory to look for duplicates, more "
            f"than the search memory budget of {store.settings.search_memory_mb} MiB; duplicate search does "
            "not stream: raise FS_SEARCH_MEMORY_MB (or {memory_mb}), or narrow it with {where}",
            params=("memory_mb", "where"), feature_set=fs.name
        )
    if not shard_key[1]:
        return Found([], "exact")
    if keep_ids is not None:
        ids, mat = read_images(store.root, store.catalog, fs, keep_ids, store.shard_source)
    else:
        ids, mat = store.read_set(fs.name)
    groups = near_duplicate_groups(ids, mat, threshold=threshold)
    return Found(_duplicate_rows(store, groups), "exact")


def _duplicate_rows(store: SearchStore, groups: list[list[int]]) -> list[DuplicateImage]:
    info = store.catalog.image_paths_labels([i for g in groups for i in g])
    return [
        DuplicateImage(n, i, (found := info.get(i, _UNKNOWN)).source_path, found.label)
        for n, group in enumerate(groups, start=1)
        for i in group
    ]
