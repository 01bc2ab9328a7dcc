"""What search asks of a store: :class:`SearchStore`, the narrow interface :class:`featurestore.store.Store` satisfies.

Search sits below the store (the store's handles call it), so it names this
protocol instead of the store's class: the import graph only points down, type
hints included. It adds to :class:`featurestore.vectors.StoreView` the store's
vector reads, its write lock and the caches it owns for search (extractors,
in-memory indexes, per-set search state, opened ANN indexes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from featurestore.vectors import FeatureMatrix, RegisteredSet, StoreView

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from featurestore.features.base import Extractor
    from featurestore.search.cache import SearchCache, SetState
    from featurestore.search.index import OpenedIndexes
    from featurestore.search.kernel import VectorIndex


class SearchStore(StoreView, Protocol):
    """A store as search uses it (see :class:`featurestore.store.Store` for each member)."""

    @property
    def search_cache(self) -> SearchCache: ...
    @property
    def ann_indexes(self) -> OpenedIndexes: ...

    def search_state(self, name: str) -> SetState: ...

    def extractor(self, feature_set: str, batch_size: int = 1) -> tuple[Extractor, threading.Lock]: ...

    def vector_index(self, fs: RegisteredSet, metric: str, shard_key: tuple[Any, ...], size: int) -> VectorIndex: ...

    def iter_shards(self, feature_set: str) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def read_set(self, feature_set: str) -> tuple[np.ndarray, np.ndarray]: ...

    def read_matrix(self, feature_sets: Sequence[str], *, dataset: str | None = None, labelled_only: bool = False,
                    image_ids: Sequence[int] | None = None, skip_missing: bool = False) -> FeatureMatrix: ...

    def images_lacking(self, feature_set: str, image_ids: Sequence[int] | None = None) -> list[int]: ...

    def append_vectors(self, feature_set: RegisteredSet, image_ids: Sequence[int] | np.ndarray,
                       vectors: np.ndarray | list[np.ndarray], session: Session | None = None,
                       runtime: str | None = None) -> Path: ...

    def writing(self, sweep: bool = True) -> AbstractContextManager[None]: ...

    def clear_caches(self) -> None: ...
