"""The web app's label review queue: ``/ui/audit?run=R`` (issue 24).

Shows the images that ``fs audit labels`` flags for a K-fold run, worst first,
one at a time: the given and the suggested label, typical images of both
classes (the run's most confident out-of-fold images of each) and the image's
nearest neighbours in the run's first feature set. Keys (``audit.js``): ``a``
accepts the suggestion, ``p`` picks another label, ``r`` marks the label right
(kept, no longer offered for this run), ``s`` skips. Writes follow the server's
rule (``--allow-writes`` and the token); every change lands in ``label_changes``
with ``source = "http"``.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException

from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.http.access import require_page_access, writes_allowed
from featurestore.http.routes.ui import MAX_ID, PageRoute, Svc, _page
from featurestore.pipelines.labels import AuditRow, audit_labels, set_labels
from featurestore.search.service import search

router = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])
TYPICAL = 4
NEIGHBOURS = 6
RunId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


def caller(request: Request) -> str:
    """Who changes a label over HTTP: the holder of the server's token, and from where."""
    host = request.client.host if request.client else "unknown"
    return f"http token holder ({host})"


def _queue(svc: Any, run: int) -> tuple[list[AuditRow], Any]:
    audit = audit_labels(svc.store, run)
    done = svc.store.catalog.reviewed(run)
    current = svc.store.catalog.labels_of([r.image_id for r in audit.rows if r.flagged])
    # flagged, not marked right, and not relabelled since the run (its label is still the one judged)
    todo = [r for r in audit.rows if r.flagged and r.image_id not in done
            and (current[r.image_id].label if r.image_id in current else None) == r.label]
    return todo, audit


def _typical(audit: Any, label: str, exclude: int) -> list[int]:
    """The run's images given ``label`` that it judged most surely right (highest label quality)."""
    rows = [r for r in audit.rows if r.label == label and not r.flagged and r.image_id != exclude]
    return [r.image_id for r in sorted(rows, key=lambda r: (-r.quality, r.image_id))[:TYPICAL]]


@router.get("/ui/audit")
def audit_page(request: Request, svc: Svc, run: RunId | None = None,
               skip: Annotated[int, Query(ge=0, le=10**6)] = 0) -> HTMLResponse:
    """The next flagged image of ``run`` (after ``skip`` skipped ones), with its evidence and the review keys.
    Without ``run``: the newest run that kept out-of-fold probabilities."""
    if run is None:
        runs = svc.store.catalog.oof_runs()
        if not runs:
            return _page(request, "audit.html", "audit", run=None, item=None)
        run = runs[0]
    todo, audit = _queue(svc, run)
    item = todo[skip] if skip < len(todo) else None
    neighbours: list[Any] = []
    typical: dict[str, list[int]] = {}
    if item is not None:
        feature = svc.store.catalog.run(run).features[0]
        try:
            neighbours = list(search(svc.store, feature, item.image_id, k=NEIGHBOURS))
        except FeatureStoreError:
            neighbours = []  # the image has no vector any more in that set
        typical = {item.label: _typical(audit, item.label, item.image_id),
                   item.suggested: _typical(audit, item.suggested, item.image_id)}
    return _page(request, "audit.html", "audit", run=run, item=item, todo=len(todo), skip=skip,
                 flagged=audit.n_flagged, estimated=audit.estimated_issues, classes=audit.classes,
                 with_votes=audit.neighbour_weight > 0,
                 neighbours=neighbours, typical=typical,
                 next_url=f"/ui/audit?{urlencode({'run': run, 'skip': skip + 1})}")


@router.post("/ui/audit")
def audit_decide(request: Request, svc: Svc, run: Annotated[int, Form(ge=1, le=MAX_ID)],
                 image_id: Annotated[int, Form(ge=1, le=MAX_ID)], action: Annotated[str, Form(max_length=20)],
                 label: Annotated[str | None, Form(max_length=200)] = None,
                 skip: Annotated[int, Form(ge=0, le=10**6)] = 0) -> RedirectResponse:
    """Apply one review decision: accept (the suggestion), pick (``label``) or right (keep the label)."""
    if not writes_allowed(request):
        raise HTTPException(403, "this server is read-only for you: start it with --allow-writes and log in with "
                                 "the token to change labels")
    todo, audit = _queue(svc, run)
    if audit.target != "label":
        raise InvalidInputError(f"run {run} predicted the {audit.target}, not the label: review it with "
                                "`fs audit labels` and change superclasses by hand")
    item = next((r for r in todo if r.image_id == image_id), None)
    if item is None:
        raise InvalidInputError(f"image {image_id} is not waiting for review in run {run} (already decided?)")
    who = caller(request)
    with svc.store.writing(sweep=False):
        if action == "accept":
            set_labels(svc.store, [image_id], item.suggested, reason=f"review of run {run}: suggestion accepted",
                       changed_by=who, source="http")
        elif action == "pick":
            set_labels(svc.store, [image_id], (label or "").strip(), reason=f"review of run {run}: picked",
                       changed_by=who, source="http")
        elif action == "right":
            svc.store.catalog.mark_reviewed(run, image_id, item.label, who)
        else:
            raise InvalidInputError(f"action must be accept, pick or right, not {action!r}")
    return RedirectResponse(f"/ui/audit?{urlencode({'run': run, 'skip': skip})}", status_code=303)
