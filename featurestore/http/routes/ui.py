"""The web app: HTML pages under ``/ui`` rendered on the server (Jinja2, inline SVG, a little vanilla JS).

Pages: ``/ui/browse`` (filtered, keyset-paged thumbnail grid), ``/ui/images/{id}``
(metadata, each run's top-5, nearest neighbours per feature set), ``/ui/search``
(search by photo, and a run's prediction), ``/ui/runs``, ``/ui/runs/{id}``
(per-split chart, confusion matrix, per-class scores), ``/ui/compare`` (paired
test of two runs: t-test over splits, McNemar on one test set) and ``/ui/map``
(2-D embedding map). ``/`` sends the browser to the grid.

This module holds what every page shares (the error pages, the access rules, the
page renderer) and the grid, selections and image pages; the search, run and map
pages are in ``ui_search``, ``ui_runs`` and ``ui_map``.

Same rules as the JSON API: read-only unless the server allows writes (then the
upload of a search can be stored, by an authenticated user who asks for it);
with ``FS_API_TOKEN`` set, pages need the session cookie set by ``/ui/login``
(the login page and the static files are public). Pages carry a strict Content
Security Policy: scripts, styles and images only from this server (and data: images).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from featurestore import __version__
from featurestore.catalog import repository as q
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, InvalidInputError
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
from featurestore.http.deps import SettingsDep, StoreDep, Upload, decode_upload
from featurestore.http.errors import http_error, page_message, status_for, validation_message
from featurestore.http.routes.browse import tile_record
from featurestore.http.templating import render
from featurestore.http.throttle import LoginThrottle
from featurestore.http.views import MAX_ID, VIEW_KEYS, View, keep_selection, parse_view
from featurestore.http.views import query as _query
from featurestore.http.views import text as _text
from featurestore.http.views import whole as _int
from featurestore.pipelines.train import check_features_unchanged, list_runs
from featurestore.search.service import search, stored_vector
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


class PageRoute(APIRoute):
    """A route whose library errors (and 4xx/5xx HTTP errors) become an HTML error page, not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except FeatureStoreError as exc:
                # The status follows the error's type, as in the JSON API (e.g. 413/415 for uploads).
                return _error_page(request, status_for(exc), page_message(exc))
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


async def service(store: StoreDep, settings: SettingsDep) -> Service:  # async: no thread-pool hop
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
            found = stored[run.id]
            item.update(top=_top(found.top5) or [(found.label, found.probability)],
                        source=f"stored {found.predicted_at:%Y-%m-%d %H:%M}")
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


router.include_router(pages)
