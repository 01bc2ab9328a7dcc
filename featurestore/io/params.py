"""Parameter JSON: the one canonical form of params recorded in the catalog.

Feature-set and model params are stored in JSON columns; what comes back is
lists for tuples and plain Python numbers for numpy scalars. Comparing params
(is this the same feature set?) and keying caches must use that same form, so
every such place goes through :func:`canonical`.
"""

from __future__ import annotations

import json
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def canonical(params: Any) -> Any:
    """``params`` as a JSON column returns them (tuples -> lists, numpy -> Python, keys -> str)."""
    return json.loads(json.dumps(params, default=_plain))


def params_key(params: Any) -> str:
    """A stable string for ``params`` (sorted keys), for cache keys and fingerprints."""
    return json.dumps(canonical(params), sort_keys=True, separators=(",", ":"))
