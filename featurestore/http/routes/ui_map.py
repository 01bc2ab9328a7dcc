"""The web app's embedding map, ``/ui/map``: a 2-D map of a feature set, drawn by ``/ui/map/plot`` (a
t-SNE runs in the background, with ``/ui/map/status`` and ``/ui/map/cancel``).
Pages follow the rules of :mod:`featurestore.http.routes.ui`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse

from featurestore.catalog import repository as q
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.http import charts
from featurestore.http.access import (
    require_page_access,
)
from featurestore.http.routes.ui import (
    FACETS_TTL,
    HEADERS,
    TEXT,
    PageRoute,
    Svc,
    _facets,
    _page,
    _run_labels,
)
from featurestore.http.templating import render
from featurestore.http.views import query as _query
from featurestore.http.views import text as _text
from featurestore.http.views import whole as _int
from featurestore.pipelines import map_jobs
from featurestore.pipelines.embedding_map import MAX_POINTS, METHODS, EmbeddingMap, embedding_map
from featurestore.pipelines.train import list_runs

router = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])


# -- embedding map --------------------------------------------------------------------------------


def _map_params(svc: Any, features: str | None, method: str | None, n: str | None, color: str | None,
                run: str | None, dataset: str | None = None, scope: str | None = None) -> dict[str, Any]:
    sets = [fs.name for fs in svc.store.feature_sets()]
    params = {"features": _text(features) or (sets[0] if sets else None), "method": _text(method) or "pca",
              "n": _int(n, "number of images", 2, MAX_POINTS) or 5000, "color": _text(color) or "label",
              "run": _int(run, "run"), "dataset": _text(dataset), "scope": _text(scope) or "all"}
    if params["method"] not in METHODS:
        raise InvalidInputError(f"method must be one of {', '.join(METHODS)}")
    if params["color"] not in ("label", "superclass", "correct"):
        raise InvalidInputError("colour by label, superclass or correct")
    if params["color"] == "correct" and params["run"] is None:
        raise InvalidInputError("colouring by correctness needs a run: pick one")
    if params["scope"] not in ("all", "run"):
        raise InvalidInputError("show all images or the run's (scope all or run)")
    if params["scope"] == "run" and params["run"] is None:
        raise InvalidInputError("showing only a run's images needs a run: pick one")
    return {**params, "sets": sets}


@router.get("/ui/map")
def map_page(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
             color: TEXT = None, run: TEXT = None, dataset: TEXT = None, scope: TEXT = None) -> HTMLResponse:
    """A 2-D map of a feature set; the plot itself is fetched from /ui/map/plot (a t-SNE runs in the background
    with its progress shown). Zoom, pan, legend toggles and a lasso that opens the selected images in the grid.

    A mistake in the form (colour by correctness without a run, say) shows the form again with the reason.
    """
    labels = _run_labels(svc)
    runs = [(r.id, labels[r.id]) for r in reversed(list_runs(svc.store))]
    datasets = _facets(svc.store.catalog, q.ImageFilter()).datasets
    try:
        params = _map_params(svc, features, method, n, color, run, dataset, scope)
    except InvalidInputError as exc:
        sets = [fs.name for fs in svc.store.feature_sets()]
        raw = {"features": _text(features) or (sets[0] if sets else None), "method": _text(method) or "pca",
               "n": _text(n) or 5000, "color": _text(color) or "label", "run": None, "sets": sets,
               "dataset": _text(dataset), "scope": "all"}
        return _page(request, "map.html", "map", status=422, params=raw, plot_url=None, runs=runs,
                     max_points=MAX_POINTS, error=str(exc), datasets=datasets)
    plot_url = "/ui/map/plot?" + _map_query(params)
    return _page(request, "map.html", "map", params=params, plot_url=plot_url if params["features"] else None,
                 runs=runs, max_points=MAX_POINTS, error=None, datasets=datasets)


METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
PLOTS_KEPT = 16  # drawn map fragments kept (a 20,000-point map is ~2 MB of SVG)
_plots: dict[tuple[Any, ...], tuple[float, str]] = {}
_plots_lock = threading.Lock()


def _map_query(params: dict[str, Any], **extra: Any) -> str:
    return _query({**{k: v for k, v in params.items() if k != "sets" and not (k == "scope" and v == "all")}, **extra})


_UNLABELLED = q.ImageLabels(None, None)  # an image deleted since the map was drawn


def _map_colours(svc: Any, ids: np.ndarray, color: str, run: int | None
                 ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    info = svc.store.catalog.labels_of(ids.tolist())
    if color in ("label", "superclass"):
        found = [info.get(int(i), _UNLABELLED) for i in ids]
        values = [f.label if color == "label" else f.superclass for f in found]
        colours, legend = charts.colour_for(values)
        return colours, legend, ["" if v is None else v for v in values]
    assert run is not None
    facts = svc.store.catalog.run_facts(run)
    source = facts.source()
    if source == "test":  # a fixed-test run: its test-set predictions (the predictions table may be empty)
        preds: dict[int, tuple[str, float | None]] = {}
        for part in range(0, len(ids), q.MAX_PAGE):
            chunk = tuple(int(i) for i in ids[part:part + q.MAX_PAGE])
            tiles = svc.store.catalog.browse_page(q.ImageFilter(run=run, ids=chunk), limit=q.MAX_PAGE)
            preds.update((t.id, (str(t.predicted), None)) for t in tiles.tiles)
    else:
        preds = dict(svc.store.catalog.run_predictions_of(run, ids.tolist()))
    kind = "test-set" if source == "test" else "stored"
    colours, captions = [], []
    for i in ids.tolist():
        image = info.get(i, _UNLABELLED)
        truth = image.superclass if facts.target == "superclass" else image.label
        pred = preds.get(i)
        if pred is None or truth is None:
            colours.append(charts.OTHER)
            captions.append(f"{truth or 'unlabelled'}; no {kind} prediction")
        else:
            predicted, probability = pred
            colours.append(charts.CORRECT if predicted == truth else charts.WRONG)
            sure = f" ({100 * probability:.0f}%)" if probability is not None else ""
            captions.append(f"{truth} \u2192 {predicted}{sure}")
    legend = [("correct", charts.CORRECT), ("wrong", charts.WRONG), (f"no {kind} prediction / unlabelled",
                                                                     charts.OTHER)]
    return colours, legend, captions


def _restrict(svc: Any, emap: Any, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The map's points, limited to a dataset's images and / or the run's predicted images."""
    ids, xy = emap.image_ids, emap.xy
    keep = np.ones(len(ids), dtype=bool)
    if params["dataset"] is not None:
        members = svc.store.catalog.image_ids_where(dataset=params["dataset"])
        keep &= np.isin(ids, members)
    if params["scope"] == "run":
        predicted = np.asarray(svc.store.catalog.matching_ids(q.ImageFilter(run=params["run"])), dtype=np.int64)
        keep &= np.isin(ids, predicted)
    return ids[keep], xy[keep]


@router.get("/ui/map/plot")
def map_plot(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
             color: TEXT = None, run: TEXT = None, dataset: TEXT = None, scope: TEXT = None,
             fresh: TEXT = None) -> Response:
    """The map as an SVG fragment, cached in the store under maps/.

    PCA is computed here. A t-SNE not in the cache is started in a background process: the answer is 202 with
    its progress, and the page asks again when it is done; meanwhile (unless ``fresh``) the newest map of an
    earlier version of the set is shown, so one write does not hide the map for a minute.
    """
    params = _map_params(svc, features, method, n, color, run, dataset, scope)
    if params["features"] is None:
        raise InvalidInputError("the store has no feature sets: run `fs extract` first")
    name, method_, size = params["features"], params["method"], params["n"]
    stale = False
    if method_ == "pca":
        emap: EmbeddingMap | None = embedding_map(svc.store, name, method_, size)
    else:
        emap = map_jobs.cached(svc.store, name, method_, size)
        if emap is None:
            job = map_jobs.state(svc.store, name, method_, size)
            if job is not None and job.state == "failed":
                raise FeatureStoreError(f"the map could not be computed: {job.message}")
            older = None if _text(fresh) else map_jobs.latest(svc.store, name, method_, size)
            if older is None:
                job = map_jobs.start(svc.store, name, method_, size)
                return HTMLResponse(render("map_progress.html", job=job, method=METHOD_NAMES[method_],
                                           status_url="/ui/map/status?" + _map_query(params)),
                                    status_code=202, headers=HEADERS)
            emap, stale = older, True
    assert emap is not None
    key = (id(svc.store.catalog), emap.feature_set, emap.method, len(emap.image_ids), emap.available, emap.seconds,
           stale, _map_query(params))
    now = time.monotonic()
    with _plots_lock:
        hit = _plots.get(key)
    if hit is not None and now - hit[0] < FACETS_TTL:  # colours follow labels and predictions: same lag as menus
        return HTMLResponse(hit[1], headers=HEADERS)
    ids, xy = _restrict(svc, emap, params)
    colours, legend, captions = _map_colours(svc, ids, params["color"], params["run"])
    title = f"{emap.feature_set}: {METHOD_NAMES.get(emap.method, emap.method)} of {len(ids):,} images"
    current = svc.store.feature_set(name)
    html = render("map_plot.html", emap=emap, legend=legend, shown=len(ids), stale=stale,
                  method=METHOD_NAMES.get(emap.method, emap.method), run=params["run"],
                  fresh_url="/ui/map?" + _map_query(params, fresh=1) if stale else None,
                  svg=charts.scatter(ids, xy, colours, title, captions, legend=legend), set_name=current.name)
    with _plots_lock:
        if len(_plots) >= PLOTS_KEPT:
            _plots.clear()
        _plots[key] = (now, html)
    return HTMLResponse(html, headers=HEADERS)


@router.get("/ui/map/status")
def map_status(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
               color: TEXT = None, run: TEXT = None, dataset: TEXT = None, scope: TEXT = None) -> Response:
    """How the background computation of a map is going (JSON: state, seconds, estimate, message)."""
    params = _map_params(svc, features, method, n, color, run, dataset, scope)
    job = map_jobs.state(svc.store, params["features"], params["method"], params["n"])
    body = {"state": "none"} if job is None else {"state": job.state, "seconds": round(job.seconds, 1),
                                                   "estimate": None if job.estimate is None else
                                                   round(job.estimate, 1), "message": job.message}
    return Response(json.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.post("/ui/map/cancel")
def map_cancel(request: Request, svc: Svc, features: Annotated[str, Form(max_length=200)] = "",
               method: Annotated[str, Form(max_length=20)] = "", n: Annotated[str, Form(max_length=10)] = ""
               ) -> Response:
    """Stop the background computation of a map (anyone who may see the map may stop it: it writes nothing)."""
    params = _map_params(svc, features, method, n, None, None)
    stopped = map_jobs.cancel(svc.store, params["features"], params["method"], params["n"])
    return Response(json.dumps({"cancelled": stopped}), media_type="application/json")
