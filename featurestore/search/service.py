"""Search over a store's feature sets: query embedding, filters, cached indexes, duplicates.

:func:`search` ranks a feature set against a stored image (by id), a vector, or
a new image (embedded on the fly with the set's recorded extractor, see
:func:`embedder_for`), optionally filtered by a read-only SQL condition on the
``images`` table. Sets that fit ``Settings.search_memory_mb`` are loaded once
into a :class:`~featurestore.search.kernel.VectorIndex` cached by the store;
larger ones are streamed shard by shard through
:func:`~featurestore.search.kernel.top_k`. Both are exact.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.errors import DimensionMismatchError, FeatureStoreError, IntegrityError, InvalidInputError
from featurestore.search.kernel import VectorIndex, _as_query, _check_k, _check_metric, near_duplicate_groups, top_k

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from featurestore.catalog.schema import FeatureSet
    from featurestore.store import Store


# ---------------------------------------------------------------------------
# store level: embedding new images like the stored ones


Embedder = Callable[["PILImage.Image"], np.ndarray]


def embedder_for(store: Store, feature_set_name: str) -> Embedder:
    """A function embedding a new image exactly like the vectors of a stored feature set.

    The extractor is rebuilt from the feature set's catalog row (random
    projection: the persisted matrix, checked against its sha256; pixels;
    low-level descriptors; CNN: the registered checkpoint, sha256-verified, and
    the recorded layer), and its output params are compared with the stored
    ones, so a changed library or model cannot silently produce other vectors.
    The function accepts a ``PIL.Image`` of any size and mode (it is converted
    to RGB like at ingest, then resized by the extractor) and returns a float32
    vector of shape ``(dim,)``. It is thread-safe. Embedders are cached on the
    store object per feature set.

    Parameters
    ----------
    store : Store
    feature_set_name : str

    Returns
    -------
    callable
        ``PIL.Image -> ndarray of shape (dim,)``.

    Raises
    ------
    NotFoundError
        No such feature set (the message lists the existing ones).
    FeatureStoreError
        The extractor cannot be rebuilt, or its params differ from the stored ones.
    """
    fs = store.feature_set(feature_set_name)
    cache = _cache(store)
    key = (fs.id, fs.name, json.dumps(fs.params, sort_keys=True, default=str))
    with cache.lock:
        hit = cache.embedders.get(key)
    if hit is not None:
        return hit
    from featurestore.pipelines.extract import extractor_for

    ex = extractor_for(store, fs.name, batch_size=1)
    from featurestore.io.images import to_rgb

    lock = threading.Lock()
    name, dim = fs.name, fs.dim

    def embed(image: PILImage.Image) -> np.ndarray:
        prepared = ex.prepare(to_rgb(image))
        with lock:  # CNN executors are not safe to call from several threads at once
            out = ex.compute([prepared])[name]
        vec = np.asarray(out, dtype=np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise DimensionMismatchError(f"{name}: the extractor gave {vec.shape[0]} values, expected {dim}")
        return vec

    with cache.lock:
        cache.embedders[key] = embed
    return embed


# ---------------------------------------------------------------------------
# store level: cache, filters, loading


@dataclass(frozen=True)
class SearchResult:
    """One hit of :func:`search`, with the catalog facts a person needs (score: see module docstring)."""

    rank: int
    image_id: int
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class DuplicateImage:
    """One member of a near-duplicate group found by :func:`duplicates` (groups numbered from 1)."""

    group: int
    image_id: int
    path: str
    label: str | None


class _SearchCache:
    """Per-store cache: loaded indexes (LRU, bounded by the memory budget) and embedders."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.indexes: OrderedDict[tuple[int, str], tuple[tuple[Any, ...], VectorIndex, int]] = OrderedDict()
        self.embedders: dict[tuple[Any, ...], Embedder] = {}


def _cache(store: Store) -> _SearchCache:
    cache = store.__dict__.get("_search_cache")
    if cache is None:
        cache = store.__dict__.setdefault("_search_cache", _SearchCache())
    return cache


def clear_cache(store: Store) -> None:
    """Drop the indexes and embedders cached on ``store`` (frees their memory)."""
    store.__dict__.pop("_search_cache", None)


def _shards(store: Store, fs: FeatureSet) -> list[tuple[int, str, int]]:
    from sqlalchemy import select

    from featurestore.catalog.schema import FeatureShard

    with store.engine.connect() as conn:
        rows = conn.execute(
            select(FeatureShard.id, FeatureShard.path, FeatureShard.rows)
            .where(FeatureShard.feature_set_id == fs.id)
            .order_by(FeatureShard.id)
        ).all()
    return [(int(i), str(p), int(n)) for i, p, n in rows]


def _budget_bytes(store: Store) -> int:
    return max(0, int(store.settings.search_memory_mb)) * 2**20


def _set_bytes(fs: FeatureSet, shards: list[tuple[int, str, int]]) -> int:
    # Shard row counts bound the live rows from above (compaction may orphan a few).
    return sum(n for _, _, n in shards) * int(fs.dim) * 4


def _index(store: Store, fs: FeatureSet, metric: str, shards: list[tuple[int, str, int]]) -> VectorIndex:
    """The cached in-memory index of ``fs`` for ``metric``, (re)loaded when its shards changed."""
    cache = _cache(store)
    key = (int(fs.id), metric)
    shard_key = (fs.name, tuple((i, n) for i, _, n in shards))
    with cache.lock:
        entry = cache.indexes.get(key)
        if entry is not None and entry[0] == shard_key:
            cache.indexes.move_to_end(key)
            return entry[1]
        cache.indexes.pop(key, None)
    ids, mat = store.read_set(fs.name)
    index = VectorIndex(ids, mat, metric, copy=False)
    del mat
    size = _set_bytes(fs, shards)
    with cache.lock:
        budget = _budget_bytes(store)
        # Least recently used indexes go first so the cache stays within the budget.
        while cache.indexes and sum(e[2] for e in cache.indexes.values()) + size > budget:
            cache.indexes.popitem(last=False)
        cache.indexes[key] = (shard_key, index, size)
    return index


_WHERE_SQL = (
    "SELECT images.id FROM (SELECT images.*, datasets.name AS dataset FROM images "
    "JOIN datasets ON datasets.id = images.dataset_id) AS images WHERE {cond}"
)


def where_ids(store: Store, condition: str) -> np.ndarray:
    """Ids of the images matching a SQL condition, run on a read-only catalog connection.

    The condition is evaluated on the columns of the ``images`` table (``id``,
    ``sha256``, ``source_path``, ``width``, ``height``, ``format``, ``mode``,
    ``bytes``, ``label``, ``superclass``, ``dataset_id``, ``ingested_at``) plus
    ``dataset``, the dataset's name, e.g. ``label = 'sandal' AND dataset = 'spring'``.
    The connection cannot write (SQLite ``mode=ro``; PostgreSQL read-only session).

    Raises
    ------
    InvalidInputError
        The condition is empty, not valid SQL, or tries to write (the message
        is the database's, on one line).
    """
    from sqlalchemy.exc import DBAPIError, StatementError

    from featurestore.catalog.database import make_readonly_engine

    cond = (condition or "").strip().rstrip(";").strip()
    if not cond:
        raise InvalidInputError("--where needs a SQL condition, e.g. label = 'sneaker'")
    engine = make_readonly_engine(store.settings.catalog_url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(_WHERE_SQL.format(cond=cond)).fetchall()
            conn.rollback()
    except (DBAPIError, StatementError) as exc:
        orig = getattr(exc, "orig", None)
        lines = str(orig if orig is not None else exc).strip().splitlines()
        msg = lines[0] if lines else type(exc).__name__
        if "readonly" in msg.replace(" ", "").lower() or "read-only" in msg.lower():
            raise InvalidInputError(f"--where is read-only: the condition tries to write ({msg})") from None
        raise InvalidInputError(f"bad --where condition {cond!r}: {msg}") from None
    finally:
        engine.dispose()
    return np.fromiter((int(r[0]) for r in rows), dtype=np.int64, count=len(rows))


def stored_vector(store: Store, feature_set: str, image_id: int) -> np.ndarray:
    """The stored vector of one image in a feature set (float32, shape ``(dim,)``).

    Raises
    ------
    InvalidInputError
        No image has this id, or it has no vector in the set (the message names
        the ``fs extract`` command to run).
    """
    from sqlalchemy import select

    from featurestore.catalog.schema import FeatureRow, FeatureShard, Image
    from featurestore.store import _extract_hint

    fs = store.feature_set(feature_set)
    image_id = int(image_id)
    with store.engine.connect() as conn:
        exists = conn.execute(select(Image.id).where(Image.id == image_id)).first()
        loc = conn.execute(
            select(FeatureShard.path, FeatureRow.row)
            .join(FeatureShard, FeatureShard.id == FeatureRow.shard_id)
            .where(FeatureRow.feature_set_id == fs.id, FeatureRow.image_id == image_id)
        ).first()
    if exists is None:
        raise InvalidInputError(
            f"no image with id {image_id} in the catalog; list ids with "
            '`fs sql "SELECT id, source_path, label FROM images"`'
        )
    if loc is None:
        raise InvalidInputError(
            f"image {image_id} has no vector in {fs.name}: run `{_extract_hint(fs)}` first, "
            "or search with --image PATH"
        )
    path, row = store.root / loc[0], int(loc[1])
    from featurestore.shards import read_row

    vec = read_row(path, row)
    return np.asarray(vec, dtype=np.float32).reshape(-1)


def _describe(store: Store, image_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
    from sqlalchemy import select

    from featurestore.catalog.schema import Image

    out: dict[int, tuple[str, str | None]] = {}
    ids = [int(i) for i in image_ids]
    with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for i, p, lb in conn.execute(
                select(Image.id, Image.source_path, Image.label).where(Image.id.in_(chunk))
            ):
                out[int(i)] = (str(p), lb)
    return out


# ---------------------------------------------------------------------------
# store level: search and duplicates


def query_vector(store: Store, feature_set: str, query: Any) -> tuple[np.ndarray, int | None]:
    """The query as a vector of ``feature_set``, plus the image id when it is a stored image.

    ``query`` is an image id (int), a vector (array of the set's dim), a
    ``PIL.Image`` or the path of an image file (decoded like at ingest, then
    embedded with :func:`embedder_for`).
    """
    fs = store.feature_set(feature_set)
    if isinstance(query, bool):
        raise InvalidInputError("the query must be an image id, a vector, an image or an image path")
    if isinstance(query, int | np.integer):
        return stored_vector(store, fs.name, int(query)), int(query)
    if isinstance(query, np.ndarray | list | tuple):
        vec = _as_query(np.asarray(query, dtype=np.float64), int(fs.dim))
        return vec, None
    if isinstance(query, str | os.PathLike):
        from featurestore.io.images import load_rgb

        image = load_rgb(Path(query), store.settings.max_image_pixels)
        return embedder_for(store, fs.name)(image), None
    from PIL import Image as PILImageModule

    if isinstance(query, PILImageModule.Image):
        return embedder_for(store, fs.name)(query), None
    raise InvalidInputError(
        f"the query must be an image id, a vector, a PIL image or an image path, not {type(query).__name__}"
    )


def add_image(store: Store, feature_set: str, image_id: int, vector: np.ndarray) -> bool:
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
    store: Store,
    feature_set: str,
    query: Any,
    k: int = 10,
    where: str | None = None,
    metric: str = "cosine",
    exclude_ids: Iterable[int] | None = None,
    allowed_ids: np.ndarray | None = None,
) -> list[SearchResult]:
    """Exact top-``k`` images of a feature set nearest to ``query`` (recall 1.0).

    Parameters
    ----------
    store : Store
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

    Returns
    -------
    list of SearchResult
        Best first, ranks from 1; equal scores ordered by ascending image id.

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
    fs = store.feature_set(feature_set)
    vec, self_id = query_vector(store, fs.name, query)
    excl = {int(i) for i in exclude_ids} if exclude_ids is not None else set()
    if self_id is not None:
        excl.add(self_id)
    allowed = where_ids(store, where) if where is not None else None
    if allowed_ids is not None:
        given = np.asarray(allowed_ids, dtype=np.int64)
        allowed = given if allowed is None else np.intersect1d(allowed, given)
    if allowed is not None and allowed.size == 0:
        return []
    for attempt in range(2):
        shards = _shards(store, fs)
        if not shards:
            return []
        try:
            if _set_bytes(fs, shards) <= _budget_bytes(store):
                index = _index(store, fs, metric, shards)
                hits = index.search(vec, k, exclude_ids=excl or None, allowed_ids=allowed)
            else:
                hits = top_k(vec, store.iter_shards(fs.name), k=k, metric=metric, exclude_ids=excl or None,
                             allowed_ids=allowed)
            break
        except IntegrityError:
            # `fs compact` may have replaced a shard between listing and reading it: list again once.
            if attempt:
                raise
    info = _describe(store, [h.image_id for h in hits])
    return [
        SearchResult(rank, h.image_id, *info.get(h.image_id, ("", None)), score=h.score)
        for rank, h in enumerate(hits, start=1)
    ]


def duplicates(
    store: Store,
    feature_set: str,
    threshold: float = 0.97,
    where: str | None = None,
) -> list[DuplicateImage]:
    """Groups of near-duplicate images: cosine similarity >= ``threshold``, transitively.

    The feature set is loaded into memory (it must fit
    ``store.settings.search_memory_mb``; there is no streaming variant).

    Returns
    -------
    list of DuplicateImage
        Members of every group of two or more images, group by group (numbered
        from 1, ordered by their smallest image id), ids ascending within a group.

    Raises
    ------
    FeatureStoreError
        The set is larger than the memory budget (the message gives the size).
    """
    fs = store.feature_set(feature_set)
    shards = _shards(store, fs)
    need, budget = _set_bytes(fs, shards), _budget_bytes(store)
    if need > budget:
        raise FeatureStoreError(
            f"feature set {fs.name!r} needs {need / 2**20:,.0f} MiB in memory to look for duplicates, more "
            f"than the search memory budget of {store.settings.search_memory_mb} MiB; duplicate search does "
            "not stream: raise FS_SEARCH_MEMORY_MB (or --memory-mb), or narrow it with --where"
            if where is None else
            f"feature set {fs.name!r} needs {need / 2**20:,.0f} MiB in memory, more than the search memory "
            f"budget of {store.settings.search_memory_mb} MiB; raise FS_SEARCH_MEMORY_MB (or --memory-mb)"
        )
    if not shards:
        return []
    ids, mat = store.read_set(fs.name)
    if where is not None:
        keep = np.isin(ids, where_ids(store, where))
        ids, mat = ids[keep], mat[keep]
    groups = near_duplicate_groups(ids, mat, threshold=threshold)
    info = _describe(store, [i for g in groups for i in g])
    return [
        DuplicateImage(n, i, *info.get(i, ("", None)))
        for n, group in enumerate(groups, start=1)
        for i in group
    ]
