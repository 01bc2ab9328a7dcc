"""Exact nearest-neighbour search over feature vectors, and over a store's feature sets.

The kernel (first half) is pure numpy and knows nothing about the catalog or
HDF5: callers hand in ``(ids, matrix)`` pairs and get :class:`Hit` objects
back. Three entry points:

* :func:`top_k` streams chunks (e.g. read shard by shard), so memory stays
  bounded by the largest chunk; every row is scored, so recall is 1.0.
* :class:`VectorIndex` holds one matrix in memory, prepared once, for many
  queries; a single query costs about one BLAS matrix-vector product.
* :func:`near_duplicate_groups` finds groups of near-identical vectors with
  blocked matrix products and union-find.

Score convention
----------------
``metric="cosine"``: the score is the cosine similarity in ``[-1, 1]``, higher is
better. A stored row whose norm is zero scores 0 against every query.

``metric="l2"``: the score is the Euclidean distance, lower is better. Rows are
ranked with ``||x||^2 - 2 x.q`` in the matrix dtype; the distance reported for
the returned hits is recomputed directly as ``||x - q||`` in float64, so a query
that is itself stored reports 0.0 rather than float32 rounding noise.

Hits come best first; equal scores are ordered by ascending image id, so the
result does not depend on how the rows were split into chunks. Fewer than
``k`` hits come back when fewer rows are eligible.

Store level (second half)
-------------------------
* :func:`search` ranks a feature set of a :class:`~featurestore.store.Store`
  against a stored image (by id), a vector, or a new image (embedded on the fly
  with the set's recorded extractor, see :func:`embedder_for`), optionally
  filtered by a read-only SQL condition on the ``images`` table
  (:func:`where_ids`). Sets that fit ``Settings.search_memory_mb`` are loaded
  once into a :class:`VectorIndex` cached on the store object; larger ones are
  streamed shard by shard through :func:`top_k`. Both are exact.
* :func:`duplicates` groups the near-duplicate images of a feature set.
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

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from featurestore.catalog.models import FeatureSet
    from featurestore.store import Store

METRICS = ("cosine", "l2")

# Above this many excluded ids, filter rows before scoring instead of asking
# for k + len(exclude) candidates and dropping the excluded ones afterwards.
_EXCLUDE_PREFILTER = 256
# search_many scores at most this many (query, row) pairs at once (64 MiB float32).
_BATCH_CELLS = 1 << 24


@dataclass(frozen=True)
class Hit:
    """One search result: an image id and its score (see the module docstring)."""

    image_id: int
    score: float


# ---------------------------------------------------------------------------
# validation helpers


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
    return metric


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_query(query: np.ndarray, dim: int | None = None) -> np.ndarray:
    q = np.asarray(query, dtype=np.float64)
    if q.ndim == 2 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 1:
        raise DimensionMismatchError(f"the query must be a single vector, got an array of shape {q.shape}")
    if dim is not None and q.shape[0] != dim:
        raise DimensionMismatchError(
            f"the query has dimension {q.shape[0]} but the vectors have dimension {dim}"
        )
    if not np.isfinite(q).all():
        raise InvalidInputError("the query vector contains NaN or infinite values")
    return q


def _unit(q: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(q))
    if norm == 0.0:
        raise InvalidInputError(
            "the query vector has zero norm, so its cosine similarity is undefined; use metric='l2'"
        )
    return q / norm


def _id_array(ids: Iterable[int] | np.ndarray | None) -> np.ndarray:
    if ids is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64, copy=False).ravel()
    return np.fromiter((int(i) for i in ids), dtype=np.int64)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(
            f"image ids must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def _as_matrix(mat: np.ndarray, n_ids: int, dim: int | None) -> np.ndarray:
    m = np.asarray(mat)
    if m.ndim != 2:
        raise DimensionMismatchError(f"vectors must form a 2-D (rows, dim) matrix, got shape {m.shape}")
    if m.shape[0] != n_ids:
        raise DimensionMismatchError(f"{n_ids} image ids were given for a matrix of {m.shape[0]} rows")
    if dim is not None and m.shape[1] != dim:
        raise DimensionMismatchError(
            f"the query has dimension {dim} but the vectors have dimension {m.shape[1]}"
        )
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float32)
    return m


def _row_sq_norms(mat: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", mat, mat)


def _reject_nonfinite(keys: np.ndarray, ids: np.ndarray) -> None:
    if not np.isfinite(keys).all():
        bad = ids[~np.isfinite(keys)][:5]
        raise InvalidInputError(
            f"vectors of image(s) {', '.join(str(int(i)) for i in bad)} contain NaN or infinite values; "
            "re-extract that feature set"
        )


# ---------------------------------------------------------------------------
# ranking


def _best(keys: np.ndarray, ids: np.ndarray, k: int, higher: bool) -> np.ndarray:
    """Positions of the best ``k`` keys, best first, ties broken by ascending id.

    ``np.argpartition`` finds the k-th best value in O(n); every row at least as
    good is kept (so ties at the boundary are all seen) and only those few are
    sorted by (key, id).
    """
    n = keys.shape[0]
    if n > k:
        if higher:
            kth = keys[np.argpartition(keys, n - k)[n - k]]
            cand = np.flatnonzero(keys >= kth)
        else:
            kth = keys[np.argpartition(keys, k - 1)[k - 1]]
            cand = np.flatnonzero(keys <= kth)
    else:
        cand = np.arange(n)
    ck = keys[cand]
    order = np.lexsort((ids[cand], -ck if higher else ck))[:k]
    return cand[order]


def _l2_exact(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    diff = rows.astype(np.float64) - q
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _hits(ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
    return [Hit(int(i), float(s)) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]


# ---------------------------------------------------------------------------
# streaming search


def top_k(
    query: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int = 10,
    metric: str = "cosine",
    exclude_ids: set[int] | None = None,
    allowed_ids: np.ndarray | None = None,
) -> list[Hit]:
    """Exact top-``k`` search over a stream of ``(ids, matrix)`` chunks.

    Parameters
    ----------
    query : ndarray of shape (d,)
        The query vector.
    chunks : iterable of (ids, mat)
        ``ids`` is an integer array of shape (m,), ``mat`` a float matrix of shape
        (m, d) whose rows are the vectors of those ids. Chunks may have any size
        (including 0); only one is held at a time, plus the running best ``k``.
    k : int
        Number of hits wanted (fewer come back when fewer rows are eligible).
    metric : {"cosine", "l2"}
        Cosine similarity (higher is better) or Euclidean distance (lower is better).
    exclude_ids : set of int, optional
        Image ids never returned (typically the query image itself).
    allowed_ids : ndarray of int, optional
        When given, only these image ids are candidates (e.g. the result of a
        catalog filter); rows are filtered with ``np.isin`` before scoring.

    Returns
    -------
    list of Hit
        Best first; equal scores ordered by ascending image id.

    Raises
    ------
    DimensionMismatchError
        A chunk's vectors do not have the query's dimension.
    InvalidInputError
        ``k < 1``, an unknown metric, a zero query under cosine, or non-finite vectors.
    """
    _check_metric(metric)
    k = _check_k(k)
    q = _as_query(query)
    cosine = metric == "cosine"
    qdir = _unit(q) if cosine else q
    excl = _id_array(exclude_ids)
    prefilter_excl = excl.size > _EXCLUDE_PREFILTER
    allowed = None if allowed_ids is None else _id_array(allowed_ids)
    want = k if prefilter_excl else k + excl.size

    best_ids = np.empty(0, dtype=np.int64)
    best_scores = np.empty(0, dtype=np.float64)
    for chunk_ids, chunk_mat in chunks:
        ids = _as_ids(chunk_ids)
        mat = _as_matrix(chunk_mat, ids.shape[0], q.shape[0])
        keep = None
        if allowed is not None:
            keep = np.isin(ids, allowed)
        if prefilter_excl:
            outside = ~np.isin(ids, excl)
            keep = outside if keep is None else keep & outside
        if keep is not None and not keep.all():
            ids, mat = ids[keep], mat[keep]
        if ids.size == 0:
            continue

        dots = mat @ qdir.astype(mat.dtype)
        _reject_nonfinite(dots, ids)
        if cosine:
            norms = np.sqrt(_row_sq_norms(mat))
            keys = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
        else:
            keys = 0.5 * _row_sq_norms(mat) - dots
        _reject_nonfinite(keys, ids)

        sel = _best(keys, ids, want, higher=cosine)
        if excl.size and not prefilter_excl:
            sel = sel[~np.isin(ids[sel], excl)]
        cand_scores = keys[sel].astype(np.float64) if cosine else _l2_exact(mat[sel], q)

        all_ids = np.concatenate([best_ids, ids[sel]])
        all_scores = np.concatenate([best_scores, cand_scores])
        pick = _best(all_scores, all_ids, k, higher=cosine)
        best_ids, best_scores = all_ids[pick], all_scores[pick]
    return _hits(best_ids, best_scores)


# ---------------------------------------------------------------------------
# in-memory index


class VectorIndex:
    """An in-memory matrix prepared once for repeated exact queries.

    Cosine indexes keep L2-normalised rows (a float32 copy; zero rows stay zero),
    so a query costs one matrix-vector product plus an ``argpartition``. L2
    indexes keep the matrix as given (float32, not copied when already float32
    and C-contiguous: do not modify it afterwards) plus half the squared row
    norms.

    Parameters
    ----------
    ids : ndarray of int, shape (n,)
    mat : ndarray, shape (n, d)
    metric : {"cosine", "l2"}
    copy : bool
        ``False`` lets a cosine index normalise ``mat`` in place when it is
        already float32 and C-contiguous (no second copy of the matrix; the
        caller must not use ``mat`` afterwards).
    """

    def __init__(self, ids: np.ndarray, mat: np.ndarray, metric: str = "cosine", *, copy: bool = True):
        self.metric = _check_metric(metric)
        self.ids = _as_ids(ids).copy()
        given = _as_matrix(mat, self.ids.shape[0], None)
        rows = np.ascontiguousarray(given, dtype=np.float32)
        owned = rows is not given or not copy
        sq = _row_sq_norms(rows)
        # A non-finite value makes its row's squared norm non-finite, so the full
        # (n, d) check only runs when something is wrong (or a huge norm overflowed).
        if not np.isfinite(sq).all() and not np.isfinite(rows).all():
            bad = self.ids[~np.isfinite(rows).all(axis=1)][:5]
            raise InvalidInputError(
                f"vectors of image(s) {', '.join(str(int(i)) for i in bad)} contain NaN or infinite "
                "values; re-extract that feature set"
            )
        self.dim = rows.shape[1]
        if self.metric == "cosine":
            norms = np.sqrt(sq)
            # zero rows are divided by 1 and stay zero
            safe = np.where(norms > 0, norms, np.float32(1))[:, None]
            self._rows = np.divide(rows, safe, out=rows if owned else None)
            self._half_sq = None
        else:
            self._rows = rows
            self._half_sq = (0.5 * sq).astype(np.float32)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def _positions(self, allowed_ids: np.ndarray | None) -> np.ndarray | None:
        if allowed_ids is None:
            return None
        pos = np.flatnonzero(np.isin(self.ids, _id_array(allowed_ids)))
        return None if pos.size == len(self) else pos

    def _rank(
        self,
        scores: np.ndarray,
        q: np.ndarray,
        k: int,
        excl: np.ndarray,
        pos: np.ndarray | None,
    ) -> list[Hit]:
        """Turn one row of raw dot products into hits (``scores`` may be modified)."""
        cosine = self.metric == "cosine"
        ids = self.ids
        if pos is not None:
            if scores.shape[0] != pos.shape[0]:
                scores = scores[pos]
            ids = ids[pos]
        if not cosine:
            assert self._half_sq is not None  # l2 indexes always keep it
            half_sq = self._half_sq if pos is None else self._half_sq[pos]
            scores = np.subtract(half_sq, scores, out=scores)
        if excl.size > _EXCLUDE_PREFILTER:
            outside = np.flatnonzero(~np.isin(ids, excl))
            scores, ids = scores[outside], ids[outside]
            pos = outside if pos is None else pos[outside]
            excl = excl[:0]
        sel = _best(scores, ids, k + excl.size, higher=cosine)
        if excl.size:
            sel = sel[~np.isin(ids[sel], excl)][:k]
        if cosine:
            return _hits(ids[sel], scores[sel])
        rows_sel = sel if pos is None else pos[sel]
        dist = _l2_exact(self._rows[rows_sel], q)
        order = np.lexsort((ids[sel], dist))
        return _hits(ids[sel][order], dist[order])

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        exclude_ids: set[int] | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> list[Hit]:
        """Exact top-``k`` for one query; same arguments and result as :func:`top_k`."""
        k = _check_k(k)
        q = _as_query(query, self.dim)
        qdir = (_unit(q) if self.metric == "cosine" else q).astype(np.float32)
        excl = _id_array(exclude_ids)
        pos = self._positions(allowed_ids)
        if pos is not None and pos.size * 4 < len(self):
            # few rows allowed: gathering them is cheaper than scoring every row
            scores = self._rows[pos] @ qdir
        else:
            scores = self._rows @ qdir
        return self._rank(scores, q, k, excl, pos)

    def search_many(
        self,
        queries: np.ndarray,
        k: int = 10,
        exclude_ids: Sequence[Iterable[int] | None] | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Exact top-``k`` for each row of ``queries`` using matrix-matrix products.

        Parameters
        ----------
        queries : ndarray of shape (nq, d)
        k : int
        exclude_ids : sequence of iterables of int, optional
            One entry per query (``None`` for nothing), e.g. ``[[i] for i in ids]``
            to keep each stored image from matching itself.
        allowed_ids : ndarray of int, optional
            Shared candidate restriction for all queries.

        Returns
        -------
        list of list of Hit
            One list per query, in query order.
        """
        k = _check_k(k)
        Q = np.asarray(queries, dtype=np.float64)
        if Q.ndim == 1:
            Q = Q[None, :]
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            got = Q.shape[1] if Q.ndim == 2 else Q.shape
            raise DimensionMismatchError(
                f"the queries have dimension {got} but the vectors have dimension {self.dim}"
            )
        if not np.isfinite(Q).all():
            raise InvalidInputError("the query matrix contains NaN or infinite values")
        if exclude_ids is not None and len(exclude_ids) != Q.shape[0]:
            raise InvalidInputError(
                f"exclude_ids has {len(exclude_ids)} entries for {Q.shape[0]} queries; give one per query"
            )
        if self.metric == "cosine":
            norms = np.linalg.norm(Q, axis=1)
            if (norms == 0).any():
                first = int(np.flatnonzero(norms == 0)[0])
                raise InvalidInputError(
                    f"query {first} has zero norm, so its cosine similarity is undefined; use metric='l2'"
                )
            Qdir = (Q / norms[:, None]).astype(np.float32)
        else:
            Qdir = Q.astype(np.float32)
        pos = self._positions(allowed_ids)
        rows = self._rows if pos is None else self._rows[pos]
        n_rows = max(rows.shape[0], 1)
        step = max(1, _BATCH_CELLS // n_rows)

        out: list[list[Hit]] = []
        for start in range(0, Q.shape[0], step):
            block = Qdir[start : start + step] @ rows.T
            for j in range(block.shape[0]):
                i = start + j
                excl = _id_array(exclude_ids[i] if exclude_ids is not None else None)
                out.append(self._rank(block[j], Q[i], k, excl, pos))
        return out


# ---------------------------------------------------------------------------
# near duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = int(parent[i])
        return i

    def roots(self) -> np.ndarray:
        """The root of every element, by vectorised pointer jumping."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller root wins so the result does not depend on edge order
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _union_edges(uf: _UnionFind, rows: np.ndarray, cols: np.ndarray) -> None:
    """Union every (rows[i], cols[i]) pair, collapsing dense tiles first.

    A tile of many identical vectors can have millions of edges; reducing them
    to one edge per tile-local connected component keeps the Python loop at
    most proportional to the number of distinct vertices.
    """
    if rows.size > 4 * np.unique(np.concatenate([rows, cols])).size:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        verts, inv = np.unique(np.concatenate([rows, cols]), return_inverse=True)
        r, c = inv[: rows.size], inv[rows.size :]
        graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(verts.size, verts.size))
        _, labels = connected_components(graph, directed=False)
        order = np.argsort(labels, kind="stable")
        first = np.r_[True, labels[order][1:] != labels[order][:-1]]
        heads = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        rows, cols = verts[order[heads]], verts[order]
        keep = rows != cols
        rows, cols = rows[keep], cols[keep]
    for a, b in zip(rows.tolist(), cols.tolist(), strict=True):
        uf.union(a, b)


def near_duplicate_groups(
    ids: np.ndarray,
    mat: np.ndarray,
    threshold: float = 0.97,
    block: int = 4096,
) -> list[list[int]]:
    """Group vectors whose cosine similarity is at least ``threshold``.

    Similarity is transitive here: if a~b and b~c, all three are one group
    (union-find over the pairs above the threshold).

    The matrix is normalised once (a float32 copy, ``n * d * 4`` bytes), then
    scored tile by tile: each ``block``-row slab against the column slabs at or
    after it (the product is symmetric), so at most ``block * block`` scores are
    in memory at once. Rows with zero norm match nothing.

    Parameters
    ----------
    ids : ndarray of int, shape (n,)
    mat : ndarray, shape (n, d)
    threshold : float
        Minimum cosine similarity, in [-1, 1].
    block : int
        Tile side length.

    Returns
    -------
    list of list of int
        Groups of two or more image ids, each sorted ascending; the groups are
        sorted (by their smallest id).
    """
    id_arr = _as_ids(ids)
    rows = np.ascontiguousarray(_as_matrix(mat, id_arr.shape[0], None), dtype=np.float32)
    if not -1.0 <= float(threshold) <= 1.0:
        raise InvalidInputError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    block = _check_k(block)
    n = rows.shape[0]
    if n < 2:
        return []
    norms = np.sqrt(_row_sq_norms(rows))[:, None]
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    del rows
    zero = norms[:, 0] == 0

    uf = _UnionFind(n)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            sims = unit[i0:i1] @ unit[j0:j1].T
            r, c = np.nonzero(sims >= threshold)
            r += i0
            c += j0
            keep = (r < c) & ~zero[r] & ~zero[c]
            if keep.any():
                _union_edges(uf, r[keep], c[keep])

    roots = uf.roots()
    order = np.lexsort((id_arr, roots))
    sroots, sids = roots[order], id_arr[order]
    bounds = np.flatnonzero(np.r_[True, sroots[1:] != sroots[:-1], True])
    groups = [sids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a >= 2]
    groups.sort()
    return groups


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
    from featurestore.extract import extractor_for

    ex = extractor_for(store, fs.name, batch_size=1)
    from featurestore.images import to_rgb

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

    from featurestore.catalog.models import FeatureShard

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

    from featurestore.catalog.models import FeatureRow, FeatureShard, Image
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
    from featurestore.storage import read_row

    vec = read_row(path, row)
    return np.asarray(vec, dtype=np.float32).reshape(-1)


def _describe(store: Store, image_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
    from sqlalchemy import select

    from featurestore.catalog.models import Image

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
        from featurestore.images import load_rgb

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
