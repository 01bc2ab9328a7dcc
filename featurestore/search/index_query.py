"""Searching the ANN indexes of :mod:`featurestore.search.index` (usearch HNSW): k nearest and near duplicates.

:func:`search_indexed` and :func:`duplicate_groups_indexed` open a set's index
memory-mapped (once per store object, after checking it against the catalog)
and merge its candidates with exact scores for the rows it does not cover; the
guarantees are those listed in :mod:`featurestore.search.index`. The built-in
``usearch`` index backend (:mod:`featurestore.plugins.index_backends`) registers them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurestore.catalog.repository import IndexKey, IndexRecord, LiveShard
from featurestore.errors import FeatureStoreError, IntegrityError
from featurestore.io.verified import RECORDS_FOLDER, check_file, regular_stat
from featurestore.search.cache import FILTERS_PER_SET, CompiledFilter, SetState
from featurestore.search.index import (
    BATCH_ROWS,
    IndexParams,
    Progress,
    _live_ids,
    _local,
    _no_progress,
    _Opened,
    _parse,
    _read_shards,
)
from featurestore.search.kernel import (
    Hit,
    VectorIndex,
    _as_query,
    _union_edges,
    _UnionFind,
    _unit,
    near_duplicate_groups,
    top_k,
)
from featurestore.shards import read_selected
from featurestore.vectors import read_images

if TYPE_CHECKING:
    # the narrow interfaces the store satisfies (search sits below it), under the names used here
    from featurestore.search.protocol import SearchStore as Store
    from featurestore.vectors import RegisteredSet as FeatureSet


# A filter allowing at most this many images is searched exactly on their rows...
EXACT_ALLOWED_MAX = 2_000
# ...and so is one that would need more candidates than this from the index (about 2 k n / allowed)...
FETCH_MAX = 4_096
# ...or one allowing at most this many rows per candidate the index would expand (max(fetch, ef)):
# an HNSW candidate costs a few dozen scattered distance computations (2 M of them per node), an
# exact row one product streamed from memory. At 1M images a 1 % filter (10,000 rows, ~2,000
# candidates) is scored exactly, a 10 % one (100,000 rows, 200 candidates) through the index.
EXACT_ROWS_PER_CANDIDATE = 16
# Duplicates: neighbours asked per vector at first, and at most (dense groups ask again).
DUP_NEIGHBOURS = 16
DUP_NEIGHBOURS_MAX = 1_024
# Candidate list (ef) of each vector's query while finding duplicates. A stored vector is not
# always found by its own query on clustered data: at 1M x 256 (M=16) it was missed 8.5 % of the
# time with ef=32, 2.5 % with 128 and 0.85 % with 256 (bench/bench_ann.py data); the pair of a
# near copy is lost only if both of its queries miss.
DUP_EXPANSION = 256
# How a search note says the vectors searched exactly get into the index (the CLI names its command).
INDEX_BUILD_ADDS = "a build of the index adds them"


def _view(store: Store, fs: FeatureSet, record: IndexRecord, key: IndexKey) -> _Opened:
    """Open an index file memory-mapped, after checking its size, sha256 and header against the catalog.

    A failed check is an :class:`IntegrityError` whose next step is to rebuild or drop the index
    (remedy ``index-rebuild-or-drop``).
    """
    try:
        return _checked_view(store, fs, record, key)
    except IntegrityError as exc:
        raise IntegrityError(str(exc), remedy="index-rebuild-or-drop", feature_set=fs.name,
                             path=exc.facts.get("path", record.path)) from None


def _checked_view(store: Store, fs: FeatureSet, record: IndexRecord, key: IndexKey) -> _Opened:
    import usearch.index as ui

    path = _local(store, record.path)
    hint = ""  # the remedy is added by _view
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IntegrityError(f"index file {path} is missing") from None
    regular_stat(path, "index file", hint)  # not a FIFO, device or folder, before usearch reads its header
    size = st.st_size
    if size != record.bytes:
        raise IntegrityError(f"index file {path} has {size:,} bytes, the catalog records {record.bytes:,}")
    meta = _parse(path, hint, lambda: ui.Index.metadata(str(path)))
    if not meta or int(meta["dimensions"]) != int(fs.dim) or int(meta["count_present"]) != record.vectors:
        raise IntegrityError(f"index file {path} does not hold the {record.vectors:,} vectors of dim {fs.dim} "
                             "the catalog records")
    # usearch trusts the graph's bytes (a flipped offset crashed the process): hash them all before opening,
    # once per file version (a record in the store's working folder spares the next process re-reading it).
    check_file(path, record.sha256, "index file", hint, remember_in=store.root / RECORDS_FOLDER)
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
            key, shards = store.catalog.index_state(fs.id)
        if key is None:
            return None
        with cache.lock:
            hit = cache.opened.get(int(fs.id))
        if hit is not None and hit.key == key:
            return _State(hit.record, hit, shards)
        record = store.catalog.get_index(fs.id)
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
            if attempt or store.catalog.get_index(fs.id) == record:
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
                 f"({INDEX_BUILD_ADDS})")
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
    counted = store.catalog.live_shards(fs.id, count=new)
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
            loc = store.catalog.locate(fs.id, keys[mask])
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
    got_ids, mat = read_images(store.root, store.catalog, fs, ids, store.shard_source)
    return VectorIndex(got_ids, mat, metric, copy=False)


def _exact_subset(store: Store, fs: FeatureSet, ids: np.ndarray, q: np.ndarray, k: int, metric: str,
                  excl: np.ndarray) -> list[Hit]:
    """Exact top-``k`` among the rows of ``ids`` only, read from their shards."""
    for attempt in range(2):
        loc = store.catalog.locate(fs.id, ids)
        shards = {s.id: s for s in store.catalog.live_shards(fs.id, count=[])}

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
    shards = [s for s in store.catalog.live_shards(fs.id) if s.live]
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
