"""A handle on one stored feature set (:meth:`featurestore.store.Store.feature_set` returns one).

It sits below the store and names the narrow interface the store satisfies
(:class:`featurestore.search.protocol.SearchStore`), not the store's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.catalog import feature_versions as versions
from featurestore.catalog.schema import FeatureSet as FeatureSetRow
from featurestore.catalog.versions import SetSnapshot

if TYPE_CHECKING:
    import pyarrow as pa

    from featurestore.search import service as search_service
    from featurestore.search.protocol import SearchStore
    from featurestore.search.service import Query


class FeatureSetHandle:
    """A handle on one stored feature set: its catalog facts plus ``read`` and ``search``.

    ``name``, ``kind``, ``dim``, ``dtype``, ``params`` and ``id`` are those the
    catalog records (its catalog row is :class:`featurestore.catalog.schema.FeatureSet`).
    """

    def __init__(self, store: SearchStore, row: FeatureSetRow | SetSnapshot):
        self._store = store
        self.id: int = int(row.id)
        self.name: str = row.name
        self.kind: str = row.kind
        self.dim: int = int(row.dim)
        self.dtype: str = row.dtype
        self.params: dict[str, Any] = dict(row.params or {})

    def __repr__(self) -> str:
        return f"FeatureSetHandle({self.name!r}, kind={self.kind!r}, dim={self.dim})"

    def read(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(image_ids, vectors)``: every stored vector, or those of ``ids`` (in id order)."""
        if ids is None:
            return self._store.read_set(self.name)
        fm = self._store.read_matrix([self.name], image_ids=ids, skip_missing=True)
        return fm.image_ids, fm.X

    def search(self, query: Query, k: int = 10, *, where: str | None = None, metric: str = "cosine",
               **kwargs: Any) -> list[search_service.SearchResult]:
        """The ``k`` stored images nearest to ``query`` (an image id, a vector, an image path or a PIL image).

        Every result has ``distance`` (lower is better, for every metric) and,
        for cosine, ``similarity``; see :func:`featurestore.search.service.search`.
        """
        from featurestore.search import service as search_service

        return search_service.search(self._store, self.name, query, k, where=where, metric=metric, **kwargs)

    def to_arrow(self, *, dataset: str | None = None, where: str | None = None) -> pa.Table:
        """Every stored vector as a ``pyarrow.Table`` (one row per image, in id order).

        Columns ``image_id``, ``sha256``, ``label``, ``superclass``, ``datasets``
        and one ``fixed_size_list<float32>`` column named after the set; ``dataset``
        and ``where`` (a SQL condition, as in :meth:`search`) select the images.
        """
        from featurestore import arrow  # pyarrow is imported only when Arrow is asked for

        store = self._store
        plan = arrow.plan_features(store.catalog, store.settings, [self.name], dataset=dataset, where=where)
        public = versions.public_name(self.name)
        if public != self.name:  # an older version (``feature_set(name, version=N)``): the column keeps the name
            plan = replace(plan, columns=tuple(replace(c, name=public) for c in plan.columns),
                           lacking={public: plan.lacking[self.name]})
        return arrow.feature_table(store.catalog, store.root, plan)
