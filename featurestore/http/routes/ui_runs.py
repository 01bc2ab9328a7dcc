"""The web app's run pages: ``/ui/runs``, ``/ui/runs/{id}`` (per-split chart, confusion matrix,
per-class scores, notes, report download) and ``/ui/compare`` (the paired test of two runs).
Pages follow the rules of :mod:`featurestore.http.routes.ui`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException

from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.http import charts
from featurestore.http.access import (
    require_page_access,
    writes_allowed,
)
from featurestore.http.report import render_report
from featurestore.http.routes.ui import (
    TEXT,
    PageRoute,
    Svc,
    _page,
    _run_labels,
)
from featurestore.http.views import MAX_ID
from featurestore.http.views import flag as _flag
from featurestore.http.views import query as _query
from featurestore.http.views import source as _source
from featurestore.http.views import text as _text
from featurestore.http.views import whole as _int
from featurestore.pipelines.compare import compare
from featurestore.pipelines.run_view import run_view
from featurestore.pipelines.train import get_run, list_runs

router = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])


# -- runs -----------------------------------------------------------------------------------------


@router.get("/ui/runs")
def runs_page(request: Request, svc: Svc) -> HTMLResponse:
    """The runs table (as `fs runs`); tick two to compare them."""
    runs = list(reversed(list_runs(svc.store)))
    splits = {r.id: rows[0] for r in runs if r.test_dataset and (rows := svc.store.catalog.run_splits(r.id))}
    return _page(request, "runs.html", "runs", runs=runs, predictions=svc.store.catalog.prediction_counts(),
                 names=svc.store.catalog.run_names(), splits=splits)


@router.get("/ui/runs/{run_id}")
def run_page(request: Request, svc: Svc, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
             held_out: TEXT = None, source: TEXT = None) -> HTMLResponse:
    """Per-split accuracy, the confusion matrix of the run's test-set or stored predictions, per-class scores.

    It opens on the honest figure: a fixed-test run's test-set predictions, else the stored predictions of
    images its training selection cannot have held (``held_out=0`` shows all of them, optimistic).
    """
    view = run_view(svc.store, run_id, held_out_only=_flag(held_out, "held_out", True), mistakes=12,
                    source=_source(source))
    truth_param = "superclass" if view.truth == "superclass" else "label"
    base = {"run": run_id, "source": view.source_kind if view.facts.test_predictions else None,
            "held_out": "1" if view.held_out_only else None}

    def link(truth: str, predicted: str) -> str:
        return "/ui/browse?" + _query({**base, truth_param: truth, "predicted": predicted})

    sort = "confidence" if view.source_kind == "stored" else None
    return _page(request, "run.html", "runs", view=view, note=svc.store.catalog.run_note(run_id),
                 saved=bool(_text(request.query_params.get("saved"))),
                 split_chart=charts.split_bars([("test accuracy", [s.test_accuracy for s in view.splits])],
                                               f"run {run_id}: test accuracy per split"),
                 matrix=charts.confusion_matrix(view.confusion, link),
                 scores_chart=charts.class_scores(view.confusion.per_class()),
                 wrong_url="/ui/browse?" + _query({**base, "correct": "no"}),
                 mistakes_url="/ui/browse?" + _query({**base, "correct": "no", "sort": sort}))


@router.post("/ui/runs/{run_id}/notes")
def save_run_notes(request: Request, svc: Svc, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
                   name: Annotated[str, Form(max_length=200)] = "",
                   notes: Annotated[str, Form(max_length=20_000)] = "") -> Response:
    """Name a run and set its notes (as `fs runs name`); needs writes allowed and a logged-in user."""
    if not writes_allowed(request):
        raise HTTPException(403, "this server does not accept edits: it needs `fs serve --allow-writes`, "
                                 "FS_API_TOKEN, and you logged in; or use `fs runs name`")
    with svc.store.writing():
        svc.store.catalog.set_run_note(run_id, name, notes)
    return RedirectResponse(f"/ui/runs/{run_id}?saved=1#run-notes", status_code=303)


@router.get("/ui/runs/{run_id}/report")
def run_report(request: Request, svc: Svc, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> Response:
    """The run's `fs report` (one self-contained HTML file) as a download."""
    html = render_report(svc.store, run_id)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="run{run_id}-report.html"',
                             "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@router.get("/ui/compare")
def compare_page(request: Request, svc: Svc, run: Annotated[list[str] | None, Query(max_length=30)] = None
                 ) -> HTMLResponse:
    """The paired test of two runs (as `fs compare A B`): t-test over the same splits, McNemar on one test set."""
    ids = [i for i in (_int(r, "run") for r in (run or [])) if i is not None]
    if len(ids) != 2:
        raise InvalidInputError(f"pick exactly two runs to compare (got {len(ids)})")
    a, b = ids
    ra, rb = get_run(svc.store, a), get_run(svc.store, b)
    try:
        test, refusal = compare(svc.store, a, b).test, None
    except FeatureStoreError as exc:
        test, refusal = None, str(exc)
    labels = _run_labels(svc)
    series = [(f"A = run {a}", [s.test_accuracy for s in svc.store.catalog.run_splits(a)]),
              (f"B = run {b}", [s.test_accuracy for s in svc.store.catalog.run_splits(b)])]
    pairs = svc.store.catalog.per_class_pair(a, b, ra.target) if test is not None and test.kind == "mcnemar" else []

    def outcome(which: str) -> str:
        return "/ui/browse?" + _query({"run": a, "source": "test", "versus": b, "outcome": which})

    return _page(request, "compare.html", "runs", a=ra, b=rb, test=test, refusal=refusal, labels=labels,
                 pairs=pairs, outcome=outcome, swap_url=f"/ui/compare?run={b}&run={a}",
                 chart=charts.split_bars(series, f"test accuracy per split: A (run {a}) vs B (run {b})"))
