"""Views of the images: the grid's filters and order as query parameters, parsed once for every page and route
that shows or exports a view (the grid, the image page's next / previous, the exports, ``/v1/browse``).

Values arrive as text; each bad one raises :class:`~featurestore.errors.InvalidInputError` naming it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from featurestore.catalog import repository as q
from featurestore.errors import InvalidInputError

MAX_ID = 2**63 - 1
MAX_SELECTION = 5_000  # images of a lasso selection (bound parameters stay under SQLite's limit)
SELECTIONS_KEPT = 64


def text(value: str | None) -> str | None:
    """The stripped value, or None when empty."""
    value = (value or "").strip()
    return value or None


def whole(value: str | None, what: str, low: int = 1, high: int = MAX_ID) -> int | None:
    """A whole number between ``low`` and ``high`` (None when empty)."""
    t = text(value)
    if t is None:
        return None
    try:
        n = int(t)
    except ValueError:
        raise InvalidInputError(f"{what} must be a whole number, not {t!r}") from None
    if not low <= n <= high:
        raise InvalidInputError(f"{what} must be between {low} and {high:,}, not {n:,}")
    return n


def number(value: str | None, what: str) -> float | None:
    """A number (None when empty)."""
    t = text(value)
    if t is None:
        return None
    try:
        return float(t)
    except ValueError:
        raise InvalidInputError(f"{what} must be a number such as 0.5, not {t!r}") from None


def correct(value: str | None) -> bool | None:
    """yes / no / any -> True / False / None."""
    t = text(value)
    if t in (None, "any"):
        return None
    if t in ("yes", "no"):
        return t == "yes"
    raise InvalidInputError(f"correct must be yes, no or any, not {t!r}")


def query(params: dict[str, Any]) -> str:
    """A query string of the parameters that have a value."""
    return urlencode({k: v for k, v in params.items() if v not in (None, "", False)})


def flag(value: str | None, what: str, default: bool) -> bool:
    """1 / 0 (yes / no, on / off) -> True / False; ``default`` when empty."""
    t = text(value)
    if t is None:
        return default
    if t in ("1", "yes", "on", "true"):
        return True
    if t in ("0", "no", "off", "false"):
        return False
    raise InvalidInputError(f"{what} must be 1 or 0, not {t!r}")


def source(value: str | None) -> str | None:
    """Which predictions of a run: "test", "stored" or None (automatic)."""
    t = text(value)
    if t not in (None, "test", "stored"):
        raise InvalidInputError(f"predictions must be test or stored, not {t!r}")
    return t


VIEW_KEYS = ("dataset", "superclass", "label", "run", "source", "predicted", "correct", "below", "held_out",
             "versus", "outcome", "selection", "sort", "seed", "finding")
"""Query parameters that define a view of the images (the grid's filters and order), shared by the grid, the
image page (next / previous within the view), the exports and ``/v1/browse``."""


@dataclass(frozen=True)
class View:
    """A parsed view: the catalog filter and the canonical query parameters that reproduce it."""

    filter: q.ImageFilter
    params: dict[str, Any]

    @property
    def query(self) -> str:
        return query(self.params)


def parse_view(values: dict[str, str | None]) -> View:
    """The view named by query parameters (see VIEW_KEYS); bad values raise InvalidInputError naming them."""
    sort = text(values.get("sort")) or "id"
    seed = whole(values.get("seed"), "seed", 0, 10**9) or 0
    f = q.ImageFilter(dataset=text(values.get("dataset")), superclass=text(values.get("superclass")),
                      label=text(values.get("label")), run=whole(values.get("run"), "run"),
                      predicted=text(values.get("predicted")), correct=correct(values.get("correct")),
                      below=number(values.get("below"), "probability threshold"),
                      held_out=bool(text(values.get("held_out"))), source=source(values.get("source")),
                      sort=sort, seed=seed, versus=whole(values.get("versus"), "versus"),
                      outcome=text(values.get("outcome")), ids=selection_ids(text(values.get("selection"))),
                      finding=text(values.get("finding")))
    f.check()
    params = {"dataset": f.dataset, "superclass": f.superclass, "label": f.label, "run": f.run, "source": f.source,
              "predicted": f.predicted,
              "correct": {True: "yes", False: "no"}.get(f.correct) if f.correct is not None else None,
              "below": text(values.get("below")), "held_out": "1" if f.held_out else None, "versus": f.versus,
              "outcome": f.outcome, "selection": text(values.get("selection")),
              "sort": None if f.sort == "id" else f.sort,
              "seed": f.seed if f.sort == "random" and f.seed else None, "finding": f.finding}
    return View(f, {k: v for k, v in params.items() if v not in (None, "")})


_selections: OrderedDict[str, tuple[int, ...]] = OrderedDict()
_selections_lock = threading.Lock()


def keep_selection(ids: list[int]) -> str:
    """Hold a set of image ids (a lasso on the map) under a short key, for ``?selection=KEY`` views."""
    if not ids:
        raise InvalidInputError("the selection is empty: draw around some points")
    if len(ids) > MAX_SELECTION:
        raise InvalidInputError(f"a selection holds at most {MAX_SELECTION:,} images, not {len(ids):,}: draw a "
                                "smaller lasso or save the view as a dataset")
    chosen = tuple(sorted({int(i) for i in ids}))
    key = hashlib.sha256(",".join(map(str, chosen)).encode()).hexdigest()[:16]
    with _selections_lock:
        _selections[key] = chosen
        _selections.move_to_end(key)
        while len(_selections) > SELECTIONS_KEPT:
            _selections.popitem(last=False)
    return key


def selection_ids(key: str | None) -> tuple[int, ...] | None:
    """The ids held under ``key`` (None without a key)."""
    if key is None:
        return None
    with _selections_lock:
        found = _selections.get(key)
    if found is None:
        raise InvalidInputError("that map selection is no longer held by the server: draw it again on the map")
    return found
