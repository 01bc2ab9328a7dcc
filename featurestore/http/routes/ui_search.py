"""The web app's search page, ``/ui/search``: a dropped photo's (or a stored image's) nearest
neighbours and a run's prediction. Pages follow the rules of :mod:`featurestore.http.routes.ui`.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException

from featurestore.catalog import repository as q
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.http.access import (
    require_page_access,
    writes_allowed,
)
from featurestore.http.deps import decode_upload_bytes
from featurestore.http.errors import status_for
from featurestore.http.routes.ui import (
    NEIGHBOURS,
    TEXT,
    PageRoute,
    Svc,
    _facets,
    _page,
)
from featurestore.http.schemas import UploadInfo
from featurestore.http.views import query as _query
from featurestore.http.views import text as _text
from featurestore.http.views import whole as _int
from featurestore.io.thumbnails import render_thumbnail
from featurestore.pipelines.predict import predict_upload
from featurestore.pipelines.train import get_run, list_runs
from featurestore.search.service import embedder_for, search

router = APIRouter(include_in_schema=False, route_class=PageRoute, dependencies=[Depends(require_page_access)])


# -- search by photo ------------------------------------------------------------------------------


def _search_choices(svc: Any) -> dict[str, Any]:
    facets = _facets(svc.store.catalog, q.ImageFilter())
    return {"feature_sets": [fs.name for fs in svc.store.feature_sets()],
            "model_runs": [r for r in reversed(list_runs(svc.store)) if r.artifact_path],
            "labels": [c.value for c in facets.labels], "datasets": facets.datasets}


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


@router.get("/ui/search")
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


@router.post("/ui/search")
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
