"""The built-in ANN index backend (usearch HNSW), registered through the plugin hook ``register_index_backends``.

Its code (and usearch) is imported when the hook is called, not when the ``fs`` command starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurestore.plugins import hookimpl


@hookimpl
def register_index_backends(register: Callable[[Any], None]) -> None:
    from featurestore.search import index, index_query
    from featurestore.search.backends import IndexBackend

    register(IndexBackend(
        "usearch", build=index.build_index, search=index_query.search_indexed,
        duplicates=index_query.duplicate_groups_indexed, list=index.list_indexes, drop=index.drop_index,
        remove_orphans=index.remove_orphans, description="HNSW graphs (usearch), memory-mapped for search",
    ))
