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
import csv
import hashlib
import io
import json
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
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
    hide_paths,
    is_authenticated,
    paths_visible,
    require_page_access,
    safe_next,
    session_value,
    settings_of,
    token_matches,
    writes_allowed,
)
from featurestore.http.deps import SettingsDep, StoreDep, Upload, decode_upload, decode_upload_bytes
from featurestore.http.errors import http_error, status_for, validation_message
from featurestore.http.report import render_report
from featurestore.http.routes.browse import tile_record
from featurestore.http.schemas import UploadInfo
from featurestore.http.templating import render
from featurestore.http.throttle import LoginThrottle
from featurestore.http.views import MAX_ID, VIEW_KEYS, View, keep_selection, parse_view
from featurestore.http.views import flag as _flag
from featurestore.http.views import query as _query
from featurestore.http.views import source as _source
from featurestore.http.views import text as _text
from featurestore.http.views import whole as _int
from featurestore.io.thumbnails import render_thumbnail
from featurestore.pipelines import map_jobs
from featurestore.pipelines.embedding_map import MAX_POINTS, METHODS, EmbeddingMap, embedding_map
from featurestore.pipelines.predict import predict_upload
from featurestore.pipelines.run_view import run_view
from featurestore.pipelines.train import check_features_unchanged, compare, get_run, list_runs
from featurestore.search.service import embedder_for, search, stored_vector
from featurestore.store import Store

PAGE_SIZES = (25, 50, 100, 200)
NEIGHBOURS = 12
LIVE_PREDICTIONS = 5  # runs whose model is applied on the fly on an image page, most recent first
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml", "audit.js": "text/javascript; charset=utf-8"}
TEXT = Annotated[str | None, Query(max_length=200)]
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}


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
            except RequestValidationError as exc:  # e.g. /ui/images/abc: a page, not FastAPI's JSON
                return _error_page(request, 422, validation_message(exc))

        return page


async def _http_error_or_page(request: Request, exc: Exception) -> Response:
    """Unknown paths under /ui get an HTML page; everything else keeps the JSON error of the API."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/ui/") and exc.status_code >= 400:
        detail = str(exc.detail) if exc.status_code != 404 else f"there is no page {request.url.path}"
        return _error_page(request, exc.status_code, detail)
    return await http_error(request, exc)


def install_error_pages(app: Any) -> None:
    """Answer unknown /ui paths with the app's HTML error page (after :func:`featurestore.http.errors.install`)."""
    app.add_exception_handler(HTTPException, _http_error_or_page)


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
    return _page(request, "error.html", "", status=status, status_code=status, message=hide_paths(request, message))


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
    """Check the token typed in and set the session cookie (HttpOnly, SameSite=Lax)."""
    configured = settings_of(request).api_token
    if not configured:
        return RedirectResponse(safe_next(next), status_code=303)
    throttle, client = _throttle(request), request.client.host if request.client else ""
    if wait := throttle.wait_for(client):  # token guessing: a few tries a minute per address
        raise HTTPException(429, f"too many wrong tokens: try again in {wait:.0f} s",
                            headers={"Retry-After": str(int(wait) + 1)})
    if not token_matches(token, configured):
        throttle.failed(client)
        return _page(request, "login.html", "login", status=401, next=safe_next(next), failed=True)
    throttle.succeeded(client)
    response = RedirectResponse(safe_next(next), status_code=303)
    # Lax, not Strict: a link from another site (chat, wiki, notebook) arrives logged in; the cookie still never
    # rides on another site's POST, sub-request or frame, and the forms check the token anyway.
    response.set_cookie(COOKIE, session_value(configured), max_age=COOKIE_MAX_AGE, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", path="/")
    return response


def _throttle(request: Request) -> LoginThrottle:
    state = request.app.state
    if getattr(state, "login_throttle", None) is None:
        state.login_throttle = LoginThrottle()
    throttle: LoginThrottle = state.login_throttle
    return throttle


@router.post("/ui/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- browse ---------------------------------------------------------------------------------------

FACETS_TTL = 10.0  # seconds the filter menus may lag the catalog (they cost ~0.1 s at 100k images)
FACETS_KEPT = 256  # views whose menus are remembered
_facets_cache: dict[tuple[int, q.ImageFilter], tuple[float, q.Facets]] = {}
_facets_lock = threading.Lock()


def _facets(catalog: Any, f: q.ImageFilter) -> q.Facets:
    """The grid's filter menus narrowed to the view, recomputed at most every FACETS_TTL seconds per view."""
    key = (id(catalog), q.ImageFilter(**{**f.__dict__, "sort": "id", "seed": 0}))
    now = time.monotonic()
    with _facets_lock:
        hit = _facets_cache.get(key)
    if hit is not None and now - hit[0] < FACETS_TTL:
        return hit[1]
    fresh = catalog.facets(f.run, key[1])
    with _facets_lock:
        if len(_facets_cache) >= FACETS_KEPT:
            _facets_cache.clear()
        _facets_cache[key] = (now, fresh)
    return fresh


def _view_of(request: Request) -> View:
    return parse_view({k: request.query_params.get(k) for k in VIEW_KEYS})


def _run_labels(svc: Any) -> dict[int, str]:
    """What the run menus say of each run: id, name, features, classifier and its datasets."""
    names = svc.store.catalog.run_names()
    out = {}
    for r in list_runs(svc.store):
        data = f" on {r.dataset}" if r.dataset else ""
        data += f" \u2192 test {r.test_dataset}" if r.test_dataset else ""
        name = names.get(r.id)
        out[r.id] = f"{r.id}{' ' + chr(0x201c) + name + chr(0x201d) if name else ''}: {','.join(r.features)} " \
                    f"{r.classifier}{data}"
    return out


@pages.get("/ui/browse")
def browse_page(request: Request, svc: Svc, after: TEXT = None, before: TEXT = None, at: TEXT = None,
                size: TEXT = None) -> HTMLResponse:
    """The thumbnail grid, filtered, sorted and keyset-paged (arrow keys move, Enter opens, n / p turn pages).

    Query parameters: those of :data:`VIEW_KEYS`, then ``after`` / ``before`` / ``at`` (an image id to page
    from) and ``size``.
    """
    view = _view_of(request)
    f = view.filter
    limit = _int(size, "page size", 1, 500) or 100
    catalog = svc.store.catalog
    page = catalog.browse_page(f, after=_int(after, "after"), before=_int(before, "before"), at=_int(at, "at"),
                         limit=limit)
    filters = {**{k: view.params.get(k) for k in VIEW_KEYS}, "size": limit if limit != 100 else None}
    prev_url = f"?{_query({**filters, 'before': page.first})}" if page.has_prev else None
    next_url = f"?{_query({**filters, 'after': page.last})}" if page.has_next else None
    run = catalog.run_facts(f.run) if f.run is not None else None
    return _page(request, "browse.html", "browse", page=page, filters=filters, count=catalog.count_images(f),
                 facets=_facets(catalog, f), prev_url=prev_url, next_url=next_url, page_sizes=PAGE_SIZES,
                 limit=limit, first_url=f"?{_query(filters)}" if page.has_prev else None, view=view,
                 run=run, source=run.source(f.source) if run else None, run_labels=_run_labels(svc),
                 focus=_int(at, "at"), sorts=q.SORTS, findings=q.FINDING_KINDS,
                 tested=catalog.prediction_counts(test=True),
                 saved=_int(request.query_params.get("saved"), "saved", 0), selection=f.ids,
                 unselected="?" + _query({k: v for k, v in view.params.items() if k != "selection"}))


# -- selections: exports, saved datasets, map lassos -------------------------------------------------


def _rows(svc: Any, request: Request, view: View) -> Iterator[dict[str, Any]]:
    """Every image of the view in its order, page by page (bounded memory), as export rows."""
    visible = paths_visible(request)
    after = None
    while True:
        page = svc.store.catalog.browse_page(view.filter, after=after, limit=q.MAX_PAGE)
        paths = svc.store.catalog.paths_of([t.id for t in page.tiles]) if visible else {}
        for t in page.tiles:
            yield tile_record(t, paths.get(t.id))
        if not page.has_next:
            return
        after = page.last


EXPORT_FIELDS = ("id", "label", "superclass", "predicted", "probability", "correct", "path")


@pages.get("/ui/export.csv")
def export_csv(request: Request, svc: Svc) -> Response:
    """The current view's images as CSV (ids, labels, the run's predictions; paths for those who may see them)."""
    view = _view_of(request)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in _rows(svc, request, view):
        writer.writerow(row)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="images.csv"', "Cache-Control": "no-store"})


@pages.get("/ui/export.json")
def export_json(request: Request, svc: Svc) -> Response:
    """The current view's images as JSON: ``{"view": {...}, "count": n, "images": [...]}``."""
    view = _view_of(request)
    images = list(_rows(svc, request, view))
    body = json.dumps({"view": view.params, "count": len(images), "images": images}, indent=1)
    return Response(body, media_type="application/json",
                    headers={"Content-Disposition": 'attachment; filename="images.json"', "Cache-Control": "no-store"})


@pages.post("/ui/selections")
async def save_selection(request: Request, svc: Svc) -> Response:
    """Save the view's images (the form carries the view and a name) as a new dataset; writes rule applies."""
    form = await request.form()
    if not writes_allowed(request):
        raise HTTPException(403, "this server does not save selections: it needs `fs serve --allow-writes`, "
                                 "FS_API_TOKEN, and you logged in")
    values = {k: str(form.get(k) or "") or None for k in VIEW_KEYS}
    view = parse_view(values)
    name = str(form.get("name") or "").strip()
    ids = svc.store.catalog.matching_ids(view.filter)
    with svc.store.writing():
        count = svc.store.catalog.save_as_dataset(name, ids)
    return RedirectResponse(f"/ui/browse?{_query({'dataset': name, 'saved': count})}", status_code=303)


@pages.post("/ui/selections/lasso")
async def lasso_selection(request: Request) -> Response:
    """A lasso drawn on the map (``ids``: image ids separated by commas) becomes a grid view of those images."""
    form = await request.form()
    raw = str(form.get("ids") or "")
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError("ids must be image ids separated by commas") from None
    key = keep_selection(ids)
    back = _text(str(form.get("run") or ""))
    return RedirectResponse(f"/ui/browse?{_query({'selection': key, 'run': back})}", status_code=303)


# -- one image ------------------------------------------------------------------------------------


def _top(entries: list[Any]) -> list[tuple[str, float]]:
    return [(str(e["label"]), float(e["probability"])) for e in entries][:5]


def _predictions(svc: Any, image_id: int, sets: list[str]) -> list[dict[str, Any]]:
    """Each run's top-5 for the image: its stored row, or its model applied to the stored vectors now."""
    stored = svc.store.catalog.image_predictions(image_id)
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


def _file_state(image: Any) -> str | None:
    """Why the image's file cannot be shown (None when it can): the server checks, the page says."""
    try:
        st = os.stat(image.source_path)
    except FileNotFoundError:
        return "the file is no longer at the path it was ingested from (moved or deleted)"
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or type(exc).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return "the path it was ingested from no longer holds a regular file"
    if st.st_size != image.bytes:
        return f"the file changed since it was ingested ({st.st_size:,} bytes now, {image.bytes:,} then)"
    return None


@pages.get("/ui/images/{image_id}/step")
def image_step(request: Request, svc: Svc, image_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
               to: TEXT = None) -> RedirectResponse:
    """The previous (``to=prev``) or next (``to=next``) image of the view this one was opened from.

    Found when asked for, so the image page does not pay for it; at either end of the view, back to this image
    with a note.
    """
    view = _view_of(request)
    if to not in ("prev", "next"):
        raise InvalidInputError("to must be prev or next")
    catalog = svc.store.catalog
    if to == "next":
        tiles = catalog.browse_page(view.filter, after=image_id, limit=1).tiles
    else:
        tiles = catalog.browse_page(view.filter, before=image_id, limit=1).tiles
    if not tiles:
        return RedirectResponse(f"/ui/images/{image_id}?{_query({**view.params, 'end': to})}", status_code=303)
    suffix = f"?{view.query}" if view.query else ""
    return RedirectResponse(f"/ui/images/{tiles[0].id}{suffix}", status_code=303)


@pages.get("/ui/images/{image_id}")
def image_page(request: Request, svc: Svc,
               image_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
    """One image: metadata, label, each run's top-5 prediction and its nearest neighbours in each feature set.

    Opened from the grid, the URL carries the grid's view (its filters and order): the page then links (and
    the arrow keys go) to the previous and next image of that view, and back to the grid at this image.
    """
    view = _view_of(request)
    found = svc.store.catalog.image_detail(image_id)
    if found is None:
        raise HTTPException(404, f"no image with id {image_id} in the catalog")
    image, datasets, sets = found
    truth = {"label": image.label, "superclass": image.superclass}
    step = f"/ui/images/{image_id}/step?{view.query}&to=" if view.params else None
    return _page(request, "image.html", "browse", image=image, datasets=datasets, sets=sets,
                 show_path=paths_visible(request), file_problem=_file_state(image), truth=truth,
                 predictions=_predictions(svc, image_id, sets), neighbours=_neighbours(svc, image_id, sets),
                 prev_url=f"{step}prev" if step else None, next_url=f"{step}next" if step else None,
                 end=_text(request.query_params.get("end")),
                 grid_url=f"/ui/browse?{_query({**view.params, 'at': image_id})}#t{image_id}" if view.params
                 else f"/ui/browse?at={image_id}#t{image_id}", in_view=bool(view.params))


# -- search by photo ------------------------------------------------------------------------------


def _search_choices(svc: Any) -> dict[str, Any]:
    facets = _facets(svc.store.catalog, q.ImageFilter())
    return {"feature_sets": [fs.name for fs in svc.store.feature_sets()],
            "model_runs": [r for r in reversed(list_runs(svc.store)) if r.artifact_path],
            "labels": [lb for lb, _ in facets.labels], "datasets": facets.datasets}


UPLOADS_KEPT = 32  # photos held in memory so a search result is a link (GET) that survives a reload
UPLOADS_BYTES = 64 * 2**20  # ... and at most this many bytes of them (the newest one always stays)
_uploads: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
_uploads_lock = threading.Lock()


def _keep_upload(data: bytes, filename: str) -> str:
    key = hashlib.sha256(data).hexdigest()[:24]
    with _uploads_lock:
        _uploads[key] = (data, filename)
        _uploads.move_to_end(key)
        while len(_uploads) > UPLOADS_KEPT or (len(_uploads) > 1 and
                                               sum(len(d) for d, _ in _uploads.values()) > UPLOADS_BYTES):
            _uploads.popitem(last=False)
    return key


def _kept_upload(key: str) -> tuple[bytes, str] | None:
    with _uploads_lock:
        return _uploads.get(key)


def _search_settings(svc: Any, values: dict[str, str | None]) -> dict[str, Any]:
    """The search form's settings, checked (InvalidInputError names the bad one)."""
    choices = _search_choices(svc)
    name = _text(values.get("features")) or (choices["feature_sets"][0] if choices["feature_sets"] else None)
    return {"features": name, "k": _int(values.get("k"), "k", 1, 100) or NEIGHBOURS,
            "run": _int(values.get("run"), "run"), "label": _text(values.get("label")),
            "dataset": _text(values.get("dataset")), "store": False}


def _settings_query(chosen: dict[str, Any]) -> dict[str, Any]:
    return {k: chosen[k] for k in ("features", "k", "run", "label", "dataset") if chosen[k] not in (None, "")}


def _search_form(request: Request, svc: Any, chosen: dict[str, Any], status: int = 200, error: str | None = None,
                 result: dict[str, Any] | None = None, current: dict[str, Any] | None = None) -> HTMLResponse:
    return _page(request, "search.html", "search", status=status, result=result, chosen=chosen, error=error,
                 current=current, **_search_choices(svc))


@pages.get("/ui/search")
def search_form(request: Request, svc: Svc, upload: TEXT = None, image: TEXT = None, stored: TEXT = None,
                features: TEXT = None, k: TEXT = None, run: TEXT = None, label: TEXT = None,
                dataset: TEXT = None) -> HTMLResponse:
    """Drop a photo: its nearest neighbours and a run's prediction.

    A search is a link: ``?upload=KEY`` (a photo the server holds in memory for a while) or ``?image=N`` (a
    stored image), with the settings (feature set, k, run, neighbours' label and dataset) as parameters, so it
    can be reloaded, bookmarked, and re-run with other settings without choosing the file again.
    """
    choices = _search_choices(svc)
    latest = choices["model_runs"][0].id if choices["model_runs"] else None
    values = {"features": features, "k": k, "run": run, "label": label, "dataset": dataset}
    try:
        chosen = _search_settings(svc, values)
    except InvalidInputError as exc:
        return _search_form(request, svc, {"features": None, "k": NEIGHBOURS, "run": latest, "label": None,
                                           "dataset": None, "store": False}, 422, str(exc))
    if upload is None and image is None:
        if run is None:
            chosen["run"] = latest
        return _search_form(request, svc, chosen)
    try:
        if image is not None:
            image_id = _int(image, "image")
            assert image_id is not None
            found = svc.store.catalog.image_file(image_id)
            if found is None:
                raise HTTPException(404, f"no image with id {image_id} in the catalog")
            try:
                data, filename = Path(found.source_path).read_bytes(), f"image {image_id}"
            except OSError:
                raise FeatureStoreError(f"the file of image {image_id} is unavailable (moved or deleted)") from None
            current: dict[str, Any] = {"image": image_id, "stored": bool(_text(stored)), "upload": None}
        else:
            kept = _kept_upload(upload or "")
            if kept is None:
                raise InvalidInputError("the server no longer holds that photo (it keeps the last "
                                        f"{UPLOADS_KEPT} for a while): choose or drop it again")
            data, filename = kept
            current = {"upload": upload, "image": None, "stored": False}
        result = _search_result(svc, data, filename, chosen)
    except FeatureStoreError as exc:
        return _search_form(request, svc, chosen, status_for(exc), str(exc))
    if image is None:
        result["same_as"] = svc.store.catalog.image_id_by_sha256(hashlib.sha256(data).hexdigest())
    return _search_form(request, svc, chosen, result=result, current=current)


def _search_result(svc: Any, data: bytes, filename: str, chosen: dict[str, Any]) -> dict[str, Any]:
    up = decode_upload_bytes(data, filename, svc.settings)
    name = chosen["features"]
    if name is None:
        raise InvalidInputError("the store has no feature sets to search: run `fs extract` first")
    allowed = None
    if chosen["label"] or chosen["dataset"]:
        allowed = svc.store.catalog.image_ids_where(label=chosen["label"], dataset=chosen["dataset"])
    hits = search(svc.store, name, embedder_for(svc.store, name)(up.image), k=chosen["k"], allowed_ids=allowed)
    prediction = None
    if chosen["run"] is not None:
        out = predict_upload(svc.store, chosen["run"], up.decoded, up.data, k=5, keep=False)
        prediction = {"run": get_run(svc.store, chosen["run"]), "top": [(t["label"], t["probability"])
                                                                        for t in out.top]}
    preview = base64.b64encode(render_thumbnail(up.data, 256, svc.settings.max_image_pixels)).decode()
    return {"feature_set": name, "hits": hits, "prediction": prediction, "stored_id": None, "same_as": None,
            "upload": UploadInfo.from_decoded(up.decoded), "preview": f"data:image/jpeg;base64,{preview}",
            "filename": filename}


@pages.post("/ui/search")
def search_upload(request: Request, svc: Svc, file: Annotated[UploadFile | None, File()] = None,
                  features: Annotated[str, Form(max_length=200)] = "", k: Annotated[str, Form(max_length=10)] = "",
                  run: Annotated[str, Form(max_length=30)] = "", label: Annotated[str, Form(max_length=200)] = "",
                  dataset: Annotated[str, Form(max_length=200)] = "",
                  upload: Annotated[str, Form(max_length=64)] = "", image: Annotated[str, Form(max_length=30)] = "",
                  store: Annotated[str, Form(max_length=10)] = "") -> Response:
    """Receive the photo, then send the browser to the search's link (GET), so a reload does not upload again.

    The upload is decoded here (a bad file re-shows the form with the reason); it is stored only if asked and
    allowed (then the link names the new image). Without a new file, the photo of the current search is kept.
    """
    values: dict[str, str | None] = {"features": features, "k": k, "run": run, "label": label, "dataset": dataset}
    want_store = bool(_text(store))
    chosen: dict[str, Any] = {"features": _text(features), "k": NEIGHBOURS, "run": None, "label": _text(label),
              "dataset": _text(dataset), "store": want_store}
    try:
        chosen = {**_search_settings(svc, values), "store": want_store}
        if want_store and not writes_allowed(request):
            raise HTTPException(403, "this server does not store uploads: it needs `fs serve --allow-writes`, "
                                     "FS_API_TOKEN, and you logged in")
        params = _settings_query(chosen)
        if file is None or not file.filename:
            if _text(upload) or _text(image):
                kept = {"upload": _text(upload)} if _text(upload) else {"image": _text(image)}
                return RedirectResponse(f"/ui/search?{_query({**kept, **params})}", status_code=303)
            raise InvalidInputError("choose or drop an image file to search with")
        up = svc.read_upload(file)
        if want_store:
            if chosen["run"] is None:
                raise InvalidInputError("storing an upload stores its prediction too: pick a run with a model")
            out = predict_upload(svc.store, chosen["run"], up.decoded, up.data, k=5, keep=True)
            return RedirectResponse(f"/ui/search?{_query({'image': out.image_id, 'stored': 1, **params})}",
                                    status_code=303)
        key = _keep_upload(up.data, file.filename)
        return RedirectResponse(f"/ui/search?{_query({'upload': key, **params})}", status_code=303)
    except HTTPException as exc:
        return _search_form(request, svc, chosen, exc.status_code, str(exc.detail))
    except FeatureStoreError as exc:
        return _search_form(request, svc, chosen, status_for(exc), str(exc))


# -- runs -----------------------------------------------------------------------------------------


@pages.get("/ui/runs")
def runs_page(request: Request, svc: Svc) -> HTMLResponse:
    """The runs table (as `fs runs`); tick two to compare them."""
    runs = list(reversed(list_runs(svc.store)))
    splits = {r.id: rows[0] for r in runs if r.test_dataset and (rows := svc.store.catalog.run_splits(r.id))}
    return _page(request, "runs.html", "runs", runs=runs, predictions=svc.store.catalog.prediction_counts(),
                 names=svc.store.catalog.run_names(), splits=splits)


@pages.get("/ui/runs/{run_id}")
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


@pages.post("/ui/runs/{run_id}/notes")
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


@pages.get("/ui/runs/{run_id}/report")
def run_report(request: Request, svc: Svc, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> Response:
    """The run's `fs report` (one self-contained HTML file) as a download."""
    html = render_report(svc.store, run_id)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="run{run_id}-report.html"',
                             "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


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
    labels = _run_labels(svc)
    series = [(f"A = run {a}", [s.test_accuracy for s in svc.store.catalog.run_splits(a)]),
              (f"B = run {b}", [s.test_accuracy for s in svc.store.catalog.run_splits(b)])]
    pairs = svc.store.catalog.per_class_pair(a, b, ra.target) if test is not None and test.kind == "mcnemar" else []

    def outcome(which: str) -> str:
        return "/ui/browse?" + _query({"run": a, "source": "test", "versus": b, "outcome": which})

    return _page(request, "compare.html", "runs", a=ra, b=rb, test=test, refusal=refusal, labels=labels,
                 pairs=pairs, outcome=outcome, swap_url=f"/ui/compare?run={b}&run={a}",
                 chart=charts.split_bars(series, f"test accuracy per split: A (run {a}) vs B (run {b})"))


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


@pages.get("/ui/map")
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


PLOTS_KEPT = 16  # drawn map fragments kept (a 20,000-point map is ~2 MB of SVG)
_plots: dict[tuple[Any, ...], tuple[float, str]] = {}


def _map_query(params: dict[str, Any], **extra: Any) -> str:
    return _query({**{k: v for k, v in params.items() if k != "sets" and not (k == "scope" and v == "all")}, **extra})


def _map_colours(svc: Any, ids: np.ndarray, color: str, run: int | None
                 ) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    info = svc.store.catalog.labels_of(ids.tolist())
    if color in ("label", "superclass"):
        k = 0 if color == "label" else 1
        values = [info.get(int(i), (None, None))[k] for i in ids]
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
        label, superclass = info.get(i, (None, None))
        truth = superclass if facts.target == "superclass" else label
        pred = preds.get(i)
        if pred is None or truth is None:
            colours.append(charts.OTHER)
            captions.append(f"{truth or 'unlabelled'}; no {kind} prediction")
        else:
            colours.append(charts.CORRECT if pred[0] == truth else charts.WRONG)
            sure = f" ({100 * pred[1]:.0f}%)" if pred[1] is not None else ""
            captions.append(f"{truth} \u2192 {pred[0]}{sure}")
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


@pages.get("/ui/map/plot")
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
    key = (id(svc.store.engine), emap.feature_set, emap.method, len(emap.image_ids), emap.available, emap.seconds,
           stale, _map_query(params))
    now = time.monotonic()
    with _facets_lock:
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
    with _facets_lock:
        if len(_plots) >= PLOTS_KEPT:
            _plots.clear()
        _plots[key] = (now, html)
    return HTMLResponse(html, headers=HEADERS)


@pages.get("/ui/map/status")
def map_status(request: Request, svc: Svc, features: TEXT = None, method: TEXT = None, n: TEXT = None,
               color: TEXT = None, run: TEXT = None, dataset: TEXT = None, scope: TEXT = None) -> Response:
    """How the background computation of a map is going (JSON: state, seconds, estimate, message)."""
    params = _map_params(svc, features, method, n, color, run, dataset, scope)
    job = map_jobs.state(svc.store, params["features"], params["method"], params["n"])
    body = {"state": "none"} if job is None else {"state": job.state, "seconds": round(job.seconds, 1),
                                                   "estimate": None if job.estimate is None else
                                                   round(job.estimate, 1), "message": job.message}
    return Response(json.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


@pages.post("/ui/map/cancel")
def map_cancel(request: Request, svc: Svc, features: Annotated[str, Form(max_length=200)] = "",
               method: Annotated[str, Form(max_length=20)] = "", n: Annotated[str, Form(max_length=10)] = ""
               ) -> Response:
    """Stop the background computation of a map (anyone who may see the map may stop it: it writes nothing)."""
    params = _map_params(svc, features, method, n, None, None)
    stopped = map_jobs.cancel(svc.store, params["features"], params["method"], params["n"])
    return Response(json.dumps({"cancelled": stopped}), media_type="application/json")


router.include_router(pages)
