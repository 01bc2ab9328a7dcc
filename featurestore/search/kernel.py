"""Exact nearest-neighbour search over feature vectors.

The kernel is pure numpy and knows nothing about the catalog or
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

Searching a store's feature sets (catalog, shards, filters) is
:mod:`featurestore.search.service`; matrix products go through
:mod:`featurestore.search.blas`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from featurestore.errors import DimensionMismatchError, InvalidInputError
from featurestore.search import blas

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

        with blas.GATE:
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

    def positions(self, allowed: np.ndarray) -> np.ndarray | None:
        """Rows of this index whose id ``allowed`` (a boolean bitmap indexed by image id) marks; None: all."""
        inside = self.ids < allowed.size
        keep = np.zeros(self.ids.shape, dtype=bool)
        keep[inside] = allowed[self.ids[inside]]
        pos = np.flatnonzero(keep)
        return None if pos.size == len(self) else pos

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
        allowed_positions: np.ndarray | None = None,
    ) -> list[Hit]:
        """Exact top-``k`` for one query; same arguments and result as :func:`top_k`.

        ``allowed_positions`` (rows of this index, from :meth:`positions`) replaces
        ``allowed_ids`` when a caller filters many queries the same way.
        """
        k = _check_k(k)
        q = _as_query(query, self.dim)
        qdir = (_unit(q) if self.metric == "cosine" else q).astype(np.float32)
        excl = _id_array(exclude_ids)
        pos = self._positions(allowed_ids) if allowed_positions is None else allowed_positions
        if pos is not None and pos.size * 4 < len(self):
            # few rows allowed: gathering them is cheaper than scoring every row
            scores = blas.product(self._rows[pos], qdir)
        else:
            scores = blas.product(self._rows, qdir)
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
            with blas.GATE:
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
        # scipy costs ~0.3 s to import: only duplicate grouping with dense tiles needs it, never a search
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


