"""Approximate nearest-neighbour index backends: the registry the search service and ``fs index`` look up.

A backend is registered by the plugin hook ``register_index_backends``
(:mod:`featurestore.plugins.hookspecs`); the built-in one is usearch's HNSW
(:mod:`featurestore.search.index`, :mod:`featurestore.search.index_query`),
registered by :mod:`featurestore.plugins.index_backends`. The catalog records
which backend made each index (``params["library"]``), so searches go to the
backend that can read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from featurestore.errors import NotFoundError

DEFAULT = "usearch"


@dataclass(frozen=True)
class IndexBackend:
    """The functions of one ANN library, as :mod:`featurestore.search.index` defines them for usearch.

    ``build(store, feature_set, **options) -> BuildReport``; ``search(store, fs, vector, k, metric,
    exclude_ids, allowed, cached=None) -> IndexedSearch | None`` (None: the set has no index of this
    backend); ``duplicates(store, fs, threshold, keep_ids, progress, expansion) -> IndexedGroups | None``;
    ``list(store, verify) -> list[IndexStatus]``; ``drop(store, feature_set) -> Path`` (raises
    ``NotFoundError`` when the set has no index); ``remove_orphans(store) -> list[Path]``.
    """

    name: str
    build: Callable[..., Any]
    search: Callable[..., Any]
    duplicates: Callable[..., Any]
    list: Callable[..., Any]
    drop: Callable[..., Any]
    remove_orphans: Callable[..., Any]
    description: str = ""


def index_backends() -> dict[str, IndexBackend]:
    """Every index backend the built-ins and plugins register, by name (the built-in usearch first)."""
    from featurestore import plugins

    found: dict[str, IndexBackend] = plugins.named("register_index_backends", "name", "index backend")
    return found


def index_backend(name: str | None = None) -> IndexBackend:
    """The backend called ``name`` (default: usearch).

    Raises
    ------
    NotFoundError
        No built-in or plugin registers it.
    """
    found = index_backends()
    chosen = name or DEFAULT
    if chosen not in found:
        raise NotFoundError("index backend", chosen, found, "A plugin adds index backends")
    return found[chosen]


def backend_of(params_json: str) -> IndexBackend:
    """The backend that made an index, from the params JSON its catalog row records (``library``)."""
    params = json.loads(params_json) if params_json else {}
    return index_backend(str(params.get("library") or DEFAULT))


def search_indexed(store: Any, fs: Any, vector: Any, k: int, metric: str, exclude_ids: Any, allowed: Any,
                   cached: Any) -> Any:
    """The k nearest through the set's index (``cached.snapshot.index_key`` names it), by the backend that made it."""
    key = cached.snapshot.index_key
    return backend_of(key[2]).search(store, fs, vector, k, metric, exclude_ids, allowed, cached=cached)


def duplicate_groups_indexed(store: Any, fs: Any, threshold: float, keep_ids: Any = None, progress: Any = None,
                             expansion: int | None = None) -> Any:
    """Near-duplicate groups through the set's index: the first backend holding one answers, else None."""
    for backend in index_backends().values():
        found = backend.duplicates(store, fs, threshold, keep_ids, progress, expansion)
        if found is not None:
            return found
    return None


def remove_orphans(store: Any) -> list[Any]:
    """Files of crashed builds and dropped sets, removed by every backend."""
    return [path for backend in index_backends().values() for path in backend.remove_orphans(store)]
