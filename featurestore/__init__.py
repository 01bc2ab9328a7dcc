"""featurestore: a feature store and embedding database for image classification.

    import featurestore

    store = featurestore.connect(".fs")
    hits = store.feature_set("efficientnet-lite0").search("shoe.jpg", k=10, where="label = 'sneaker'")
    for hit in hits:
        print(hit.rank, hit.image_id, hit.label, hit.distance, hit.similarity)
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from featurestore.config import Settings
    from featurestore.store import FeatureSetHandle, Store

__all__ = ["FeatureSetHandle", "Settings", "Store", "__version__", "connect"]

# Loaded on first use (PEP 562), so `import featurestore.cli.main` for `fs --help` does not pay for
# numpy, SQLAlchemy and pydantic, and the `fs` entry point can catch Ctrl-C while they load;
# `featurestore.Store` and `from featurestore import Store` work as before.
_LAZY = {"Settings": "featurestore.config", "Store": "featurestore.store", "FeatureSetHandle": "featurestore.store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")


def connect(path: str | PathLike[str] = ".fs", *, create: bool = False, **settings: Any) -> Store:
    """Open the store at ``path`` (like ``sqlite_utils.Database(path)`` or ``lancedb.connect(uri)``).

    Parameters
    ----------
    path : str or path-like
        The store folder (``fs --store``); default ``./.fs``.
    create : bool
        Create the folder and catalog if they do not exist (readers get an error instead).
    **settings
        Any :class:`Settings` field, e.g. ``database_url="postgresql://..."`` or
        ``search_memory_mb=4096``; unset fields come from ``FS_*`` variables.

    Returns
    -------
    Store
        Use it as a context manager, or call ``close()``, to release the catalog connection.
    """
    from featurestore.config import Settings
    from featurestore.store import Store

    return Store.open(Settings(store=path, **settings), create=create)
