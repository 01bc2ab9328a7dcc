"""What a search caches per feature set, valid while the catalog's change counter stands still (issue 31).

A search through the store used to ask the catalog, per query, for the set's
row, its index record and shard list, the ids a ``--where`` filter allows
(100,000 of them for a 10 % filter at a million images) and the hits' paths and
labels. Only the last depends on the hits; the rest changes only when the
catalog does. :class:`SearchCache` (one per store object) keeps per set a
:class:`SetState`: a :class:`~featurestore.catalog.versions.SetSnapshot` read at
counter ``v``, and what was derived from it (live-row counts of shards the
index does not cover, compiled filters, exact subsets of filtered rows).

How it stays correct: :func:`featurestore.search.service.search` runs on the
cached state, then fetches the hits' paths and labels together with the
counter in one statement (:meth:`featurestore.catalog.versions.Versions.rows_at_version`).
If the counter moved since the state was read, the state is dropped and the
search runs again on a fresh one; so a write committed before a search finished
is seen by it, and a search costs one catalog round trip when nothing changed.
The counter is bumped by triggers in the writing transaction itself (migration
0012), so writers in other processes (``fs ingest``, ``fs extract``, ``fs index
build``, another ``fs serve`` worker) invalidate it too.

A filter is compiled once per (condition, counter) to the sorted ids it allows
and a bitmap over image ids (one byte per id up to the largest), so checking
an index candidate costs an array lookup. Conditions that read other tables
(``predictions``...), the clock or random numbers are not cached
(:func:`featurestore.catalog.readonly.where_is_cacheable`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.catalog.versions import SetSnapshot
from featurestore.vectors import RegisteredSet

# Compiled filters kept per set (least recently used dropped first).
FILTERS_PER_SET = 16


@dataclass(frozen=True)
class IdFilter:
    """Ids a caller selects with its own query (e.g. the HTTP ``label=`` filter, bound parameters).

    ``fetch()`` runs that query; its result is cached with the set's state under
    ``key`` like a ``--where``, so it is fetched again only after the catalog changed.
    """

    key: Hashable
    fetch: Callable[[], np.ndarray]


@dataclass
class CompiledFilter:
    """The images a ``--where`` condition allows: sorted unique ids and a bitmap indexed by image id.

    ``derived`` holds what callers computed from it once (row positions in an
    in-memory index, an exact subset of the allowed vectors), by key.
    """

    ids: np.ndarray
    bitmap: np.ndarray
    shared: bool = False  # kept in a SetState for later searches (worth deriving things from)
    derived: dict[Any, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, ids: np.ndarray) -> CompiledFilter:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[ids >= 0]
        bitmap = np.zeros(int(ids[-1]) + 1 if ids.size else 0, dtype=bool)
        bitmap[ids] = True
        return cls(ids, bitmap)

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def allows(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``keys`` (image ids) the filter allows."""
        keys = np.asarray(keys, dtype=np.int64)
        inside = (keys >= 0) & (keys < self.bitmap.size)
        out = np.zeros(keys.shape, dtype=bool)
        out[inside] = self.bitmap[keys[inside]]
        return out

    def intersect(self, ids: np.ndarray) -> CompiledFilter:
        """A new filter allowing only those of ``ids`` this one allows."""
        ids = np.asarray(ids, dtype=np.int64)
        return CompiledFilter.of(ids[self.allows(ids)])

    def derive(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` (under this filter's lock, so concurrent searches build it once)."""
        with self.lock:
            if key not in self.derived:
                self.derived[key] = make()
            return self.derived[key]


@dataclass
class SetState:
    """A feature set's catalog facts at one value of the change counter, and what was derived from them."""

    snapshot: SetSnapshot
    handle: RegisteredSet  # the store's FeatureSetHandle built from the snapshot
    lock: threading.Lock = field(default_factory=threading.Lock)
    filters: OrderedDict[Hashable, CompiledFilter] = field(default_factory=OrderedDict)
    memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.snapshot.version

    def compiled(self, where: Hashable, compile_ids: Callable[[Any], tuple[np.ndarray, bool]]) -> CompiledFilter:
        """The filter ``where`` (a condition, or an :class:`IdFilter` key) compiled at this state's counter.

        ``compile_ids`` runs the SQL: it returns the ids and whether they may be
        cached (see :func:`~featurestore.catalog.readonly.where_is_cacheable`).
        """
        with self.lock:
            hit = self.filters.get(where)
            if hit is not None:
                self.filters.move_to_end(where)
                return hit
        ids, cacheable = compile_ids(where)
        compiled = CompiledFilter.of(ids)
        if cacheable:
            compiled.shared = True
            with self.lock:
                compiled = self.filters.setdefault(where, compiled)
                while len(self.filters) > FILTERS_PER_SET:
                    self.filters.popitem(last=False)
        return compiled

    def remember(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` for this state (e.g. live rows of shards the index does not cover)."""
        with self.lock:
            if key in self.memo:
                return self.memo[key]
        value = make()
        with self.lock:
            return self.memo.setdefault(key, value)


class SearchCache:
    """The :class:`SetState` of each feature set a store object searched, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, SetState] = {}

    def state(self, catalog: Any, name: str, handle: Callable[[SetSnapshot], RegisteredSet],
              missing: Callable[[], Any]) -> SetState:
        """The cached state of set ``name``, read from the catalog when there is none.

        ``missing()`` raises the error for a set that does not exist.
        """
        with self._lock:
            hit = self._states.get(name)
        if hit is not None:
            return hit
        snap = catalog.set_snapshot(name)
        if snap is None:
            missing()
            raise AssertionError(f"no feature set {name!r}")  # missing() raises
        state = SetState(snap, handle(snap))
        with self._lock:
            current = self._states.get(name)
            if current is None or current.version < state.version:
                self._states[name] = state
                return state
            return current

    def drop(self, name: str, stale: SetState | None = None) -> None:
        """Forget the state of ``name`` (only if it is still ``stale`` when given)."""
        with self._lock:
            if stale is None or self._states.get(name) is stale:
                self._states.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
