"""The web app: HTML pages under ``/ui`` rendered on the server (Jinja2, inline SVG, a little vanilla JS).

Pages: ``/ui/browse`` (filtered, keyset-paged thumbnail grid), ``/ui/images/{id}``
(metadata, each run's top-5, nearest neighbours per feature set), ``/ui/search``
(search by photo, and a run's prediction), ``/ui/runs``, ``/ui/runs/{id}``
(per-split chart, confusion matrix, per-class scores), ``/ui/compare`` (paired
test of two runs: t-test over splits, McNemar on one test set) and ``/ui/map``
(2-D embedding map). ``/`` sends the browser to the grid.

Same rules as the JSON API: read-only unless the server allows writes (then the
upload of a search can be stored, by an authenticated user who asks for it);
with ``FS_API_TOKEN`` set, pages need the session cookie set by ``/ui/login``
(the login page and the static files are public). Pages carry a strict Content
Security Policy: scripts, styles and images only from this server (and data: images).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from featurestore import __version__
from featurestore.catalog import repository as q
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.http import charts
from featurestore.http.access import (
    COOKIE,
    COOKIE_MAX_AGE,
    is_authenticated,
    paths_visible,
    require_page_access,
    safe_next,
    session_value,
    settings_of,
    token_matches,
    writes_allowed,
)
from featurestore.http.deps import SettingsDep, StoreDep, Upload, decode_upload
from featurestore.http.errors import status_for
from featurestore.http.schemas import UploadInfo
from featurestore.http.templating import render
from featurestore.io.thumbnails import render_thumbnail
from featurestore.pipelines.embedding_map import MAX_POINTS, METHODS, embedding_map
from featurestore.pipelines.predict import predict_upload
from featurestore.pipelines.run_view import run_view
from featurestore.pipelines.train import check_features_unchanged, compare, get_run, list_runs
from featurestore.search.service import embedder_for, search, stored_vector
from featurestore.store import Store

MAX_ID = 2**63 - 1
PAGE_SIZES = (25, 50, 100, 200)
NEIGHBOURS = 12
LIVE_PREDICTIONS = 5  # runs whose model is applied on the fly on an image page, most recent first
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
TEXT = Annotated[str | None, Query(max_length=200)]


class PageRoute(APIRoute):
    """A route whose library errors (and 4xx/5xx HTTP errors) become an HTML error page, not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except FeatureStoreError as exc:
                # The status follows the error's type, as in the JSON API (e.g. 413/415 for uploads).
                return _error_page(request, status_for(exc), str(exc))
            except HTTPException as exc:
                if exc.status_code < 400:
                    raise
                return _error_page(request, exc.status_code, str(exc.detail))

        return page


router = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])


@dataclass(frozen=True)
class Service:
    """What the pages use: the store (its caches), the settings, and upload decoding (as the JSON API)."""

    store: Store
    settings: Settings

    def read_upload(self, file: UploadFile) -> Upload:
        return decode_upload(file, self.settings)


def service(store: StoreDep, settings: SettingsDep) -> Service:
    return Service(store, settings)


Svc = Annotated[Service, Depends(service)]


# -- helpers ----------------------------------------------------------------------------------------


def _context(request: Request, active: str) -> dict[str, Any]:
    settings = settings_of(request)
    return {"active": active, "version": __version__, "token_set": bool(settings.api_token),
            "logged_in": is_authenticated(request), "writes": writes_allowed(request),
            "server_writes": bool(settings.allow_writes)}


def _page(request: Request, template: str, active: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(render(template, **_context(request, active), **context), status_code=status,
                        headers=HEADERS)


def _error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return _page(request, "error.html", "", status=status, status_code=status, message=message)


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _int(value: str | None, what: str, low: int = 1, high: int = MAX_ID) -> int | None:
    text = _text(value)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        raise InvalidInputError(f"{what} must be a whole number, not {text!r}") from None
    if not low <= number <= high:
        raise InvalidInputError(f"{what} must be between {low} and {high:,}, not {number:,}")
    return number


def _float(value: str | None, what: str) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"{what} must be a number such as 0.5, not {text!r}") from None


def _correct(value: str | None) -> bool | None:
    text = _text(value)
    if text in (None, "any"):
        return None
    if text in ("yes", "no"):
        return text == "yes"
    raise InvalidInputError(f"correct must be yes, no or any, not {text!r}")


def _query(params: dict[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "", False)})


# -- public: static files, login --------------------------------------------------------------------


def _static_files() -> dict[str, bytes]:
    folder = resources.files("featurestore.http") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


_STATIC_BYTES = _static_files()


@router.get("/ui/static/{name}")
def static_file(name: str) -> Response:
    """The web app's CSS, script and icon (shipped in the package; nothing comes from elsewhere)."""
    if name not in _STATIC_BYTES:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_STATIC_BYTES[name], media_type=STATIC[name],
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/browse", status_code=307)


@router.get("/ui/login")
def login_form(request: Request, next: TEXT = None) -> HTMLResponse:
    return _page(request, "login.html", "login", next=safe_next(next), failed=False)


@router.post("/ui/login")
def login(request: Request, token: Annotated[str, Form(max_length=1000)] = "",
          next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Check the token typed in and set the session cookie (HttpOnly, SameSite=Strict)."""
    configured = settings_of(request).api_token
    if not configured:
        return RedirectResponse(safe_next(next), status_code=303)
    if not token_matches(token, configured):
        return _page(request, "login.html", "login", status=401, next=safe_next(next), failed=True)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(COOKIE, session_value(configured), max_age=COOKIE_MAX_AGE, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/ui/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- browse ---------------------------------------------------------------------------------------

FACETS_TTL = 10.0  # seconds the filter menus may lag the catalog (they cost ~0.1 s at 100k images)
_facets_cache: dict[tuple[int, int | None], tuple[float, q.Facets]] = {}
_facets_lock = threading.Lock()


def _facets(engine: Any, run: int | None) -> q.Facets:
    """The grid's filter menus, recomputed at most every FACETS_TTL seconds per run (counts stay exact)."""
    key = (id(engine), run)
    now = time.monotonic()
    with _facets_lock:
        hit = _facets_cache.get(key)
    if hit is not None and now - hit[0] < FACETS_TTL:
        return hit[1]
    fresh = q.facets(engine, run)
    with _facets_lock:
        _facets_cache[key] = (now, fresh)
    return fresh



@pages.get("/ui/browse")
def browse_page(request: Request, svc: Svc, dataset: TEXT = None, superclass: TEXT = None, label: TEXT = None,
                run: TEXT = None, predicted: TEXT = None, correct: TEXT = None, below: TEXT = None,
                held_out: TEXT = None, after: TEXT = None, before: TEXT = None, size: TEXT = None,
                finding: TEXT = None) -> HTMLResponse:
    """The thumbnail grid, filtered and keyset-paged (arrow keys move, Enter opens, n / p turn pages)."""
    f = q.ImageFilter(dataset=_text(dataset), superclass=_text(superclass), label=_text(label),
                      run=_int(run, "run"), predicted=_text(predicted), correct=_correct(correct),
                      below=_float(below, "probability threshold"), held_out=bool(_text(held_out)),
                      finding=_text(finding))
    limit = _int(size, "page size", 1, 500) or 100
    engine = svc.store.engine
    page = q.browse_page(engine, f, after=_int(after, "after"), before=_int(before, "before"), limit=limit)
    filters = {"dataset": f.dataset, "superclass": f.superclass, "label": f.label, "run": f.run,
               "predicted": f.predicted, "correct": {True: "yes", False: "no"}.get(f.correct) if f.correct is not None
               else None, "below": _text(below), "held_out": "1" if f.held_out else None,
               "size": limit if limit != 100 else None, "finding": f.finding}
    prev_url = f"?{_query({**filters, 'before': page.first})}" if page.has_prev else None
    next_url = f"?{_query({**filters, 'after': page.last})}" if page.has_next else None
    return _page(request, "browse.html", "browse", page=page, filters=filters, count=q.count_images(engine, f),
                 facets=_facets(engine, f.run), prev_url=prev_url, next_url=next_url, page_sizes=PAGE_SIZES,
                 findings=q.FINDING_KINDS,
                 limit=limit, first_url=f"?{_query(filters)}" if page.has_prev else None)


# -- one image ------------------------------------------------------------------------------------


def _top(entries: list[Any]) -> list[tuple[str, float]]:
    return [(str(e["label"]), float(e["probability"])) for e in entries][:5]


def _predictions(svc: Any, image_id: int, sets: list[str]) -> list[dict[str, Any]]:
    """Each run's top-5 for the image: its stored row, or its model applied to the stored vectors now."""
    stored = q.image_predictions(svc.store.engine, image_id)
    out, live = [], 0
    for run in reversed(list_runs(svc.store)):
        item: dict[str, Any] = {"run": run, "top": [], "source": "", "note": ""}
        if run.id in stored:
            label, prob, top5, at = stored[run.id]
            item.update(top=_top(top5) or [(label, prob)], source=f"stored {at:%Y-%m-%d %H:%M}")
        elif not run.artifact_path:
            item["note"] = "no final model"  # listed together on the page
        elif not set(run.features) <= set(sets):
            item["note"] = f"no stored prediction; the image lacks {', '.join(sorted(set(run.features) - set(sets)))}"
        elif live >= LIVE_PREDICTIONS:
            item["note"] = f"no stored prediction; store one with `fs predict --run {run.id}`"
        else:
            live += 1
            try:
                check_features_unchanged(svc.store, run)
                model = svc.store.run_model(run)
                x = np.hstack([stored_vector(svc.store, name, image_id) for name in run.features]).reshape(1, -1)
                proba = np.asarray(model.predict_proba(x))[0]
                classes = np.asarray(model.classes_)
                order = np.argsort(-proba, kind="stable")[:5]
                item.update(top=[(str(classes[j]), float(proba[j])) for j in order],
                            source="computed now from the stored vectors (not stored)")
            except FeatureStoreError as exc:
                item["note"] = str(exc)
        out.append(item)
    return out


def _neighbours(svc: Any, image_id: int, sets: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in sets:
        entry: dict[str, Any] = {"feature_set": name, "hits": [], "note": ""}
        try:
            entry["hits"] = search(svc.store, name, image_id, k=NEIGHBOURS)
        except FeatureStoreError as exc:
            entry["note"] = str(exc)
        out.append(entry)
    return out


@pages.get("/ui/images/{image_id}")
def image_page(request: Request, svc: Svc,
               image_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
    """One image: metadata, label, each run's top-5 prediction and its nearest neighbours in each feature set."""
    found = svc.store.catalog.image_detail(image_id)
    if found is None:
        raise HTTPException(404, f"no image with id {image_id} in the catalog")
    image, datasets, sets = found
    return _page(request, "image.html", "browse", image=image, datasets=datasets, sets=sets,
                 show_path=paths_visible(request),
                 predictions=_predictions(svc, image_id, sets), neighbours=_neighbours(svc, image_id, sets))


# -- search by photo ------------------------------------------------------------------------------


def _search_choices(svc: Any) -> dict[str, Any]:
    return {"feature_sets": [fs.name for fs in svc.store.feature_sets()],
            "model_runs": [r for r in reversed(list_runs(svc.store)) if r.artifact_path]}


@pages.get("/ui/search")
def search_form(request: Request, svc: Svc) -> HTMLResponse:
    """Drop a photo: its nearest neighbours and a run's prediction."""
    choices = _search_choices(svc)
    latest = choices["model_runs"][0].id if choices["model_runs"] else None
    chosen = {"features": None, "k": NEIGHBOURS, "run": latest, "store": False}
    return _page(request, "search.html", "search", result=None, chosen=chosen, **choices)


@pages.post("/ui/search")
def search_upload(request: Request, svc: Svc, file: Annotated[UploadFile | None, File()] = None,
                  features: Annotated[str, Form(max_length=200)] = "", k: Annotated[str, Form(max_length=10)] = "",
                  run: Annotated[str, Form(max_length=30)] = "",
                  store: Annotated[str, Form(max_length=10)] = "") -> HTMLResponse:
    """The upload is decoded once, embedded once per feature set, and stored only if asked and allowed."""
    choices = _search_choices(svc)
    k_value = _int(k, "k", 1, 100) or NEIGHBOURS
    run_id = _int(run, "run")
    want_store = bool(_text(store))
    if file is None or not file.filename:
        raise InvalidInputError("choose or drop an image file to search with")
    if want_store and not writes_allowed(request):
        raise HTTPException(403, "this server does not store uploads: it needs `fs serve --allow-writes`, "
                                 "FS_API_TOKEN, and you logged in")
    name = _text(features) or (choices["feature_sets"][0] if choices["feature_sets"] else None)
    if name is None:
        raise InvalidInputError("the store has no feature sets to search: run `fs extract` first")
    up = svc.read_upload(file)  # decoded once; the run's prediction reuses the decoded image
    hits = search(svc.store, name, embedder_for(svc.store, name)(up.image), k=k_value)
    prediction, stored_id = None, None
    if run_id is not None:
        out = predict_upload(svc.store, run_id, up.decoded, up.data, k=5, keep=want_store)
        prediction = {"run": get_run(svc.store, run_id), "top": [(t["label"], t["probability"]) for t in out.top]}
        stored_id = out.image_id
    elif want_store:
        raise InvalidInputError("storing an upload stores its prediction too: pick a run with a model")
    chosen = {"features": name, "k": k_value, "run": run_id, "store": want_store}
    preview = base64.b64encode(render_thumbnail(up.data, 256, svc.settings.max_image_pixels)).decode()
    result = {"feature_set": name, "hits": hits, "prediction": prediction, "stored_id": stored_id,
              "upload": UploadInfo.from_decoded(up.decoded), "preview": f"data:image/jpeg;base64,{preview}",
              "filename": file.filename}
    return _page(request, "search.html", "search", result=result, chosen=chosen, **choices)


# -- runs -----------------------------------------------------------------------------------------


@pages.get("/ui/runs")
def runs_page(request: Request, svc: Svc) -> HTMLResponse:
    """The runs table (as `fs runs`); tick two to compare them."""
    return _page(request, "runs.html", "runs", runs=list(reversed(list_runs(svc.store))),
                 predictions=q.prediction_counts(svc.store.engine))


@pages.get("/ui/runs/{run_id}")
def run_page(request: Request, svc: Svc, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
             held_out: TEXT = None) -> HTMLResponse:
    """Per-split accuracy, the confusion matrix of the run's stored predictions, per-class scores."""
    view = run_view(svc.store, run_id, held_out_only=bool(_text(held_out)), mistakes=12)
    truth_param = "superclass" if view.truth == "superclass" else "label"

    def link(truth: str, predicted: str) -> str:
        return "/ui/browse?" + _query({"run": run_id, truth_param: truth, "predicted": predicted,
                                       "held_out": "1" if view.held_out_only else None})

    return _page(request, "run.html", "runs", view=view,
                 split_chart=charts.split_bars([("test accuracy", [s.test_accuracy for s in view.splits])],
                                               f"run {run_id}: test accuracy per split"),
                 matrix=charts.confusion_matrix(view.confusion, link),
                 scores_chart=charts.class_scores(view.confusion.per_class()),
                 wrong_url="/ui/browse?" + _query({"run": run_id, "correct": "no",
                                                   "held_out": "1" if view.held_out_only else None}))


@pages.get("/ui/compare")
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
    series = [(f"run {a}", [s.test_accuracy for s in q.run_splits(svc.store.engine, a)]),
              (f"run {b}", [s.test_accuracy for s in q.run_splits(svc.store.engine, b)])]
    return _page(request, "compare.html", "runs", a=ra, b=rb, test=test, refusal=refusal,
                 chart=charts.split_bars(series, f"test accuracy per split: run {a} vs run {b}"))


# -- embedding map --------------------------------------------------------------------------------


def _map_params(svc: Any, features: str | None, method: str | None, n: str | None, color: str | None,
                run: str | None) -> dict[str, Any]:
    sets = [fs.name for fs in svc.store.feature_sets()]
    params = {"features": _text(features) or (sets[0] if sets else None), "method": _text(method) or "pca",
              "n": _int(n, "number of images", 2, MAX_POINTS) or 5000, "color": _text(color) or "label",
              "run": _int(run, "run")}
    if params["method"] not in METHODS:
        raise InvalidInputError(f"method must be one of {', '.join(METHODS)}")
    if params["color"] not in ("label", "superclass", "correct"):
        raise InvalidInputError("colour by label, superclass or correct")
    if params["color"] == "correct" and params["run"] is None:
        raise InvalidInputError("colouring by correctness needs a run: pick one")
    return {**params, "sets": sets}


@pages.get("/ui/map")
def map_page(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
             color: TEXT = None, run: TEXT = None) -> HTMLResponse:
    """A 2-D map of a feature set; the plot itself is fetched from /ui/map/plot (it may take a while)."""
    params = _map_params(svc, features, method, n, color, run)
    plot_url = "/ui/map/plot?" + _query({k: v for k, v in params.items() if k != "sets"})
    return _page(request, "map.html", "map", params=params, plot_url=plot_url if params["features"] else None,
                 runs=[(r.id, ",".join(r.features)) for r in reversed(list_runs(svc.store))], max_points=MAX_POINTS)


def _map_colours(svc: Any, ids: np.ndarray, color: str, run: int | None
                 ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    info = q.labels_of(svc.store.engine, ids.tolist())
    if color in ("label", "superclass"):
        k = 0 if color == "label" else 1
        values = [info.get(int(i), (None, None))[k] for i in ids]
        colours, legend = charts.colour_for(values)
        return colours, legend, ["" if v is None else v for v in values]
    assert run is not None
    facts = q.run_facts(svc.store.engine, run)
    preds = q.run_predictions_of(svc.store.engine, run, ids.tolist())
    colours, captions = [], []
    for i in ids.tolist():
        label, superclass = info.get(i, (None, None))
        truth = superclass if facts.target == "superclass" else label
        pred = preds.get(i)
        if pred is None or truth is None:
            colours.append(charts.OTHER)
            captions.append(f"{truth or 'unlabelled'}; no stored prediction")
        else:
            colours.append(charts.CORRECT if pred[0] == truth else charts.WRONG)
            captions.append(f"{truth} \u2192 {pred[0]} ({100 * pred[1]:.0f}%)")
    legend = [("correct", charts.CORRECT), ("wrong", charts.WRONG), ("no prediction / unlabelled", charts.OTHER)]
    return colours, legend, captions


@pages.get("/ui/map/plot")
def map_plot(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
             color: TEXT = None, run: TEXT = None) -> HTMLResponse:
    """The map as an SVG fragment (computed on demand, cached in the store under maps/)."""
    params = _map_params(svc, features, method, n, color, run)
    if params["features"] is None:
        raise InvalidInputError("the store has no feature sets: run `fs extract` first")
    emap = embedding_map(svc.store, params["features"], params["method"], params["n"])
    colours, legend, captions = _map_colours(svc, emap.image_ids, params["color"], params["run"])
    title = f"{emap.feature_set}: {emap.method.upper()} of {len(emap.image_ids):,} images"
    return HTMLResponse(render("map_plot.html", emap=emap, legend=legend,
                               svg=charts.scatter(emap.image_ids, emap.xy, colours, title, captions)),
                        headers=HEADERS)


router.include_router(pages)
