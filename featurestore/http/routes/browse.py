"""``GET /v1/browse``: the images of a view (the web app grid's filters and order), paged, as JSON.

The same query parameters as ``/ui/browse`` (dataset, superclass, label, run, source, predicted, correct,
below, held_out, versus, outcome, sort, seed), then ``after`` (the last id of the previous page) and
``limit``. Paths are given only to callers that may see them (see :mod:`featurestore.http.access`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from featurestore.catalog import repository as q
from featurestore.http.access import paths_visible
from featurestore.http.deps import Authenticated, StoreDep
from featurestore.http.views import VIEW_KEYS, parse_view, query, whole

router = APIRouter(prefix="/v1", tags=["images"], dependencies=[Authenticated])


def tile_record(t: q.Tile, path: str | None) -> dict[str, Any]:
    """One image of a view as JSON (the field names of the grid's tiles)."""
    return {"id": t.id, "label": t.label, "superclass": t.superclass, "predicted": t.predicted,
            "probability": t.probability, "correct": t.correct, "path": path,
            "thumbnail": f"/v1/images/{t.id}/thumbnail", "page": f"/ui/images/{t.id}"}


@router.get("/browse")
def browse(request: Request, store: StoreDep,
           after: Annotated[int | None, Query(ge=1, description="The last id of the previous page.")] = None,
           limit: Annotated[int, Query(ge=1, le=q.MAX_PAGE, description="Images per page.")] = 100,
           ) -> dict[str, Any]:
    """Images matching the grid's filters, in its order, one page at a time (follow ``next`` for the rest)."""
    view = parse_view({k: request.query_params.get(k) for k in VIEW_KEYS})
    page = store.catalog.browse_page(view.filter, after=whole(str(after) if after else None, "after"),
                         limit=limit)
    paths = store.catalog.paths_of([t.id for t in page.tiles]) if paths_visible(request) else {}
    nxt = f"/v1/browse?{query({**view.params, 'limit': limit, 'after': page.last})}" if page.has_next else None
    return {"count": store.catalog.count_images(view.filter), "view": view.params,
            "images": [tile_record(t, paths.get(t.id)) for t in page.tiles], "next": nxt}
