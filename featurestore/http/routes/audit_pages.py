"""The web app's page of near-duplicate leaks found by ``fs audit leaks`` (issue 25): pairs side by side."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from featurestore.http.access import require_page_access
from featurestore.http.routes.ui import PageRoute, Svc, _page

router = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])


@router.get("/ui/leaks")
def leaks_page(request: Request, svc: Svc, size: Annotated[int, Query(ge=1, le=500)] = 100) -> HTMLResponse:
    """The most similar near-duplicate pairs of the last `fs audit leaks`, with both thumbnails."""
    catalog = svc.store.catalog
    pairs = catalog.findings(kind="leak", limit=size, highest_first=True)
    labels = catalog.labels_of([i for f in pairs for i in (f.image_id, f.other_image_id) if i is not None])
    rows = [{"a": f.image_id, "b": f.other_image_id, "similarity": f.score, "where": f.detail.get("where", ""),
             "a_label": labels[f.image_id].label if f.image_id in labels else None,
             "b_label": labels[f.other_image_id].label if f.other_image_id in labels else None} for f in pairs]
    return _page(request, "leaks.html", "browse", rows=rows, size=size)
