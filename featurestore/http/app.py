"""The store as an HTTP service: a FastAPI app over one :class:`~featurestore.store.Store`.

``fs serve`` runs :func:`create_app` under uvicorn; the OpenAPI description is at
``/openapi.json`` and interactive docs at ``/docs``. All resources live under
``/v1`` and speak JSON; every error is ``{"error": "..."}`` with a 4xx status
saying what was wrong with the request (5xx only for a broken store).

Safety
------
* Read-only by default. Requests that write (``POST /v1/runs/{id}/predict``
  with ``store=true``) need the server started with ``allow_writes`` (``fs serve
  --allow-writes``) and the bearer token ``FS_API_TOKEN``; otherwise 403.
* When ``FS_API_TOKEN`` is set, every request except ``/v1/health`` must carry
  ``Authorization: Bearer <token>`` (compared in constant time); otherwise 401.
  :func:`check_bind` refuses to listen beyond loopback without a token.
* Filters (``label``, ``dataset``) reach SQL only as bound parameters.
* Uploads are limited to ``FS_MAX_UPLOAD_MB`` while the body is received, and
  decoded with the store's pixel limit (decompression bombs are refused).

Consistency: every catalog read is its own short transaction, and new shards
become visible only once registered, so the service can run while ``fs
extract`` or ``fs ingest`` write. The in-memory search indexes are keyed by the
feature set's shard list (see :mod:`featurestore.search.service`) and reload when it
changes. Extractors and fitted run models are cached per feature set / run
(keyed by params and artifact sha256, so a replaced set or run is reloaded).
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from featurestore import __version__
from featurestore.catalog.schema import FeatureRow, Image, Run
from featurestore.config import Settings
from featurestore.errors import (
    FeatureStoreError,
    InvalidInputError,
)
from featurestore.features.registry import extract_hint as _extract_hint
from featurestore.http.access import is_loopback, paths_visible
from featurestore.http.errors import status_for
from featurestore.http.routes import media, ui
from featurestore.io.images import DecodedImage, ImageDecodeError, decode_bytes
from featurestore.pipelines.predict import predict_upload
from featurestore.store import FeatureSet, Store

log = logging.getLogger("featurestore.http.app")

MAX_ID = 2**63 - 1  # SQL BIGINT; larger ids cannot exist and would overflow the driver
MAX_K = 1000
# Room for the multipart framing and the small form fields around one file.
MULTIPART_OVERHEAD = 64 * 1024
# Pillow format -> file extension that `fs ingest` accepts.
UPLOAD_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
ENABLE_WRITES = (
    "this server is read-only: restart it with `fs serve --allow-writes` and FS_API_TOKEN set, "
    "then send `Authorization: Bearer <token>`"
)

Metric = Literal["cosine", "l2"]


# -- response models (they also document the API in /openapi.json) ----------------------------
class ErrorOut(BaseModel):
    error: str


class HealthOut(BaseModel):
    status: str
    version: str
    allow_writes: bool


class DatasetOut(BaseModel):
    name: str
    images: int
    created_at: datetime | None


class FeatureSetOut(BaseModel):
    name: str
    kind: str
    dim: int
    images: int
    coverage: float
    shards: int


PATH_DOC = ("Absolute path of the image file on the server; null unless the caller is authenticated (or, on a "
            "server without FS_API_TOKEN, connects from loopback).")


class ImageOut(BaseModel):
    id: int
    sha256: str
    path: str | None = Field(description=PATH_DOC)
    datasets: list[str]
    label: str | None
    superclass: str | None
    width: int
    height: int
    format: str
    mode: str
    bytes: int
    ingested_at: datetime | None
    feature_sets: list[str]


class VectorOut(BaseModel):
    feature_set: str
    image_id: int
    dim: int
    vector: list[float | None]


class SearchHit(BaseModel):
    rank: int
    image_id: int
    path: str | None = Field(description=PATH_DOC)
    label: str | None
    distance: float
    similarity: float | None = None
    method: Literal["index", "exact"] = "exact"  # issue 14: how this hit was found


class UploadInfo(BaseModel):
    sha256: str
    width: int
    height: int
    format: str


class SearchOut(BaseModel):
    feature_set: str
    metric: str
    image_id: int | None = None
    upload: UploadInfo | None = None
    results: list[SearchHit]
    # issue 14: "index" when the feature set's ANN index answered, else "exact"; note says more
    method: Literal["index", "exact"] = "exact"
    note: str = ""


class RunOut(BaseModel):
    id: int
    created_at: datetime | None
    status: str
    features: list[str]
    classifier: str
    target: str
    n_images: int
    n_splits: int
    test_size: float
    accuracy_mean: float | None
    accuracy_std: float | None
    macro_f1_mean: float | None
    superclass_accuracy_mean: float | None
    has_model: bool
    comparison_group: str | None


class RunDetailOut(RunOut):
    split_accuracies: list[float]


class LabelProbability(BaseModel):
    label: str
    probability: float


class PredictOut(BaseModel):
    run_id: int
    label: str
    probability: float
    top: list[LabelProbability]
    upload: UploadInfo
    stored: bool
    image_id: int | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in [(401, "missing or wrong bearer token"), (404, "unknown feature set, image, run or dataset"),
                       (409, "the image lacks a vector in this feature set"), (422, "invalid parameters")]
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    413: {"model": ErrorOut, "description": "upload too large or decompression bomb"},
    415: {"model": ErrorOut, "description": "the upload is not an image"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **UPLOAD_ERRORS,
    403: {"model": ErrorOut, "description": "writes are disabled on this server"},
    503: {"model": ErrorOut, "description": "another process is writing to the store"},
}


# -- binding and error mapping -----------------------------------------------------------------
def check_bind(host: str, settings: Settings) -> None:
    """Refuse configurations that would expose the store without a token.

    Raises
    ------
    InvalidInputError
        ``host`` is not loopback and ``FS_API_TOKEN`` is unset, or writes are
        allowed without ``FS_API_TOKEN``.
    """
    if settings.allow_writes and not settings.api_token:
        raise InvalidInputError("--allow-writes needs FS_API_TOKEN: set it to a long random secret and restart")
    if not is_loopback(host) and not settings.api_token:
        raise InvalidInputError(
            f"refusing to listen on {host} without FS_API_TOKEN: set it to a long random secret "
            "(clients send `Authorization: Bearer <token>`) or bind to 127.0.0.1"
        )


class HTTPError(FeatureStoreError):
    """An error with an explicit HTTP status (raised by the endpoints themselves)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body", "header")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


# -- upload size limit -------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes while they are received.

    A declared ``Content-Length`` over the limit is answered with 413 before any
    byte is read; otherwise bytes are counted as they arrive and the request
    fails with 413 as soon as the count passes the limit, so nothing unbounded
    is buffered or spooled to disk.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _message(self) -> str:
        return f"request body larger than the upload limit of {self.limit - MULTIPART_OVERHEAD:,} bytes " \
               "(FS_MAX_UPLOAD_MB on the server)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await _error(413, self._message())(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


# -- the service -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    """A decoded upload: its bytes (for storing) and RGB pixels."""

    data: bytes
    decoded: DecodedImage

    @property
    def image(self) -> Any:
        return self.decoded.image

    def info(self) -> UploadInfo:
        d = self.decoded
        return UploadInfo(sha256=d.sha256, width=d.width, height=d.height, format=d.format)


class Service:
    """What the endpoints share: the store and the caches (thread-safe)."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.max_upload = max(0, int(settings.max_upload_mb)) * 2**20

    # -- lookups
    def feature_set(self, name: str) -> FeatureSet:
        _no_nul(name, "feature set name")
        return self.store.feature_set(name)

    def require_vector(self, fs: FeatureSet, image_id: int) -> None:
        """404 for an unknown image, 409 when it has no vector in ``fs``."""
        with self.store.engine.connect() as conn:
            known = conn.execute(select(Image.id).where(Image.id == image_id)).first() is not None
            has = known and conn.execute(select(FeatureRow.image_id).where(
                FeatureRow.feature_set_id == fs.id, FeatureRow.image_id == image_id)).first() is not None
        if not known:
            raise HTTPError(404, f"no image with id {image_id} in the catalog")
        if not has:
            raise HTTPError(409, f"image {image_id} has no vector in {fs.name}: run `{_extract_hint(fs)}` first")

    def allowed_ids(self, label: str | None, dataset: str | None) -> np.ndarray | None:
        """Ids passing the label/dataset filters (bound parameters only), or None without filters."""
        if label is None and dataset is None:
            return None
        for value, what in ((label, "label"), (dataset, "dataset")):
            if value is not None:
                _no_nul(value, what)
        return self.store.catalog.image_ids_where(label=label, dataset=dataset)

    def describe(self, ids: list[int]) -> dict[int, tuple[str, str | None]]:
        if not ids:
            return {}
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(Image.id, Image.source_path, Image.label).where(Image.id.in_(ids)))
            return {int(i): (str(p), lb) for i, p, lb in rows}

    # -- search
    def search(self, fs: FeatureSet, vec: np.ndarray, k: int, metric: str, exclude: set[int],
               allowed: np.ndarray | None, show_paths: bool, exact: bool = False) -> dict[str, Any]:
        """The ``results``, ``method`` and ``note`` fields of a :class:`SearchOut`."""
        from featurestore.search.service import search

        results = search(self.store, fs.name, vec, k, metric=metric, exclude_ids=exclude, allowed_ids=allowed,
                         exact=exact)
        hits = [SearchHit(**{**r.as_dict(), "path": r.path if show_paths else None}) for r in results]
        return {"results": hits, "method": results.method, "note": results.note}

    # -- uploads
    def read_upload(self, file: UploadFile) -> Upload:
        """Read at most the upload limit (413 beyond) and decode it (415/413/422 when it is no image)."""
        data = file.file.read(self.max_upload + 1)
        if len(data) > self.max_upload:
            raise HTTPError(413, f"upload larger than the limit of {self.settings.max_upload_mb} MiB "
                                 "(FS_MAX_UPLOAD_MB on the server)")
        try:
            decoded = decode_bytes(data, self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            msg = str(exc)
            if msg.startswith("decompression bomb"):
                status = 413
            elif msg.startswith(("not an image", "empty file")):
                status = 415
            else:
                status = 422
            name = f" {file.filename}" if file.filename else ""
            raise HTTPError(status, f"upload{name}: {msg}") from None
        return Upload(data, decoded)


def _no_nul(value: str, what: str) -> None:
    # NUL cannot be stored in PostgreSQL text and never occurs in names the store accepts.
    if "\x00" in value:
        raise InvalidInputError(f"{what} contains a NUL character")


def _run_out(run: Run) -> dict[str, Any]:
    return {"id": run.id, "created_at": run.created_at, "status": run.status, "features": list(run.features),
            "classifier": run.classifier, "target": run.target, "n_images": run.n_images,
            "n_splits": run.n_splits, "test_size": run.test_size, "accuracy_mean": run.accuracy_mean,
            "accuracy_std": run.accuracy_std, "macro_f1_mean": run.macro_f1_mean,
            "superclass_accuracy_mean": run.superclass_accuracy_mean, "has_model": bool(run.artifact_path),
            "comparison_group": run.comparison_group}


# -- the app -----------------------------------------------------------------------------------
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="Image id (see GET /v1/images/{id}).")]
RunId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="Run id (see GET /v1/runs).")]
SetName = Annotated[str, PathParam(max_length=200, description="Feature set name (see GET /v1/feature-sets).")]
Label = Annotated[str | None, Query(max_length=200, description="Only images with this label.")]
DatasetName = Annotated[str | None, Query(max_length=200, description="Only images of this dataset.")]
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")]

_bearer = HTTPBearer(auto_error=False, description="FS_API_TOKEN of the server, when it has one.")


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app serving the store at ``settings.store`` (opened now, closed on shutdown).

    Parameters
    ----------
    settings : Settings
        Store location, ``api_token`` (FS_API_TOKEN), ``max_upload_mb``
        (FS_MAX_UPLOAD_MB), ``allow_writes`` and ``max_image_pixels``.

    Returns
    -------
    FastAPI

    Raises
    ------
    FeatureStoreError
        There is no store at ``settings.store`` (or its schema is outdated), or
        writes are allowed without a token.
    """
    if settings.allow_writes and not settings.api_token:
        raise InvalidInputError("--allow-writes needs FS_API_TOKEN: set it to a long random secret and restart")
    store = Store.open(settings)
    svc = Service(settings, store)
    token = settings.api_token.encode() if settings.api_token else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    def authenticate(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if token is None:
            return
        given = creds.credentials.encode("utf-8", "surrogateescape") if creds else b""
        if not hmac.compare_digest(given, token):
            raise HTTPError(401, "missing or wrong bearer token: send `Authorization: Bearer <FS_API_TOKEN>`")

    def require_writes() -> None:
        if not settings.allow_writes:
            raise HTTPError(403, ENABLE_WRITES)

    app = FastAPI(
        title="featurestore",
        version=__version__,
        description="A feature store and embedding database for image classification: datasets, feature sets, "
                    "similarity search and predictions of trained runs.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=svc.max_upload + MULTIPART_OVERHEAD)

    @app.exception_handler(FeatureStoreError)
    async def _store_error(_: Request, exc: FeatureStoreError) -> JSONResponse:
        status = exc.status if isinstance(exc, HTTPError) else status_for(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _error(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    auth = [Depends(authenticate)]
    get = _route(app.get, auth)
    post = _route(app.post, auth)

    @app.get("/v1/health", tags=["service"])
    def health() -> HealthOut:
        """Liveness, version and whether writes are enabled (no token needed)."""
        return HealthOut(status="ok", version=__version__, allow_writes=settings.allow_writes)

    @get("/v1/datasets", tags=["catalog"])
    def datasets() -> list[DatasetOut]:
        """Datasets with their image counts."""
        return [DatasetOut(name=n, images=c, created_at=t) for n, c, t in store.catalog.dataset_counts()]

    @get("/v1/feature-sets", tags=["catalog"])
    def feature_sets() -> list[FeatureSetOut]:
        """Feature sets with their coverage (images with a vector / all images) and shard counts."""
        with store.session() as s:
            total = s.scalar(select(func.count(Image.id))) or 0
        return [FeatureSetOut(name=n, kind=kd, dim=d, images=c, coverage=c / total if total else 0.0, shards=sh)
                for n, kd, d, c, sh in store.coverage()]

    @get("/v1/images/{image_id}", tags=["catalog"], responses=ERRORS)
    def image(image_id: ImageId, request: Request) -> ImageOut:
        """One image's catalog row and the feature sets it has a vector in."""
        found = store.catalog.image_detail(image_id)
        if found is None:
            raise HTTPError(404, f"no image with id {image_id} in the catalog")
        img, datasets, sets = found
        path = img.source_path if paths_visible(request) else None
        return ImageOut(id=img.id, sha256=img.sha256, path=path, datasets=datasets, label=img.label,
                        superclass=img.superclass, width=img.width, height=img.height, format=img.format,
                        mode=img.mode, bytes=img.bytes, ingested_at=img.ingested_at, feature_sets=sets)

    @get("/v1/feature-sets/{name}/vectors/{image_id}", tags=["feature sets"], responses=ERRORS)
    def vector(name: SetName, image_id: ImageId) -> VectorOut:
        """One image's stored vector in a feature set (non-finite values are null)."""
        from featurestore.search.service import stored_vector

        fs = svc.feature_set(name)
        svc.require_vector(fs, image_id)
        vec = stored_vector(store, fs.name, image_id)
        raw: list[float] = vec.astype(float).tolist()
        values: list[float | None] = [v if math.isfinite(v) else None for v in raw]
        return VectorOut(feature_set=fs.name, image_id=image_id, dim=int(fs.dim), vector=values)

    @get("/v1/feature-sets/{name}/search", tags=["feature sets"], responses=ERRORS)
    def search_by_id(
        request: Request,
        name: SetName,
        image_id: Annotated[int, Query(ge=1, le=MAX_ID, description="Query image (excluded from the results).")],
        k: TopK = 10,
        label: Label = None,
        dataset: DatasetName = None,
        metric: Annotated[Metric, Query(description="cosine: similarity, higher is better; l2: distance, "
                                                    "lower is better.")] = "cosine",
        exact: Annotated[bool, Query(description="Score every vector even if the feature set has an ANN "
                                                 "index.")] = False,
    ) -> SearchOut:
        """Images nearest to a stored image (through the set's ANN index if it has one, else exact), optionally
        only those with a label / in a dataset."""
        from featurestore.search.service import stored_vector

        fs = svc.feature_set(name)
        svc.require_vector(fs, image_id)
        allowed = svc.allowed_ids(label, dataset)
        vec = stored_vector(store, fs.name, image_id)
        found = svc.search(fs, vec, k, metric, {image_id}, allowed, paths_visible(request), exact)
        return SearchOut(feature_set=fs.name, metric=metric, image_id=image_id, **found)

    @post("/v1/feature-sets/{name}/search", tags=["feature sets"], responses=UPLOAD_ERRORS)
    def search_by_upload(
        request: Request,
        name: SetName,
        file: Annotated[UploadFile, File(description="Query image (any size and mode; not stored).")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        label: Annotated[str | None, Form(max_length=200)] = None,
        dataset: Annotated[str | None, Form(max_length=200)] = None,
        metric: Annotated[Metric, Form()] = "cosine",
        exact: Annotated[bool, Form(description="Score every vector even if the set has an ANN index.")] = False,
    ) -> SearchOut:
        """Images nearest to an uploaded image, embedded like the feature set's stored vectors."""
        from featurestore.search.service import embedder_for

        fs = svc.feature_set(name)
        allowed = svc.allowed_ids(label, dataset)
        up = svc.read_upload(file)
        vec = embedder_for(store, fs.name)(up.image)
        found = svc.search(fs, vec, k, metric, set(), allowed, paths_visible(request), exact)
        return SearchOut(feature_set=fs.name, metric=metric, upload=up.info(), **found)

    @get("/v1/runs", tags=["runs"])
    def runs() -> list[RunOut]:
        """Training and evaluation runs with their mean scores over the splits."""
        from featurestore.pipelines.train import list_runs

        return [RunOut(**_run_out(r)) for r in list_runs(store)]

    @get("/v1/runs/{run_id}", tags=["runs"], responses=ERRORS)
    def run(run_id: RunId) -> RunDetailOut:
        """One run with its per-split test accuracy."""
        r = store.catalog.run(run_id)
        return RunDetailOut(**_run_out(r), split_accuracies=store.catalog.split_scores(run_id))

    @post("/v1/runs/{run_id}/predict", tags=["runs"], responses=WRITE_ERRORS)
    def predict(
        run_id: RunId,
        file: Annotated[UploadFile, File(description="Image to classify.")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="Number of labels returned.")] = 5,
        store_prediction: Annotated[bool, Form(alias="store", description="Also ingest the image (dataset "
                                               "'uploads') and store the prediction row; needs writes.")] = False,
    ) -> PredictOut:
        """Classify an uploaded image with a run's final model (top-k labels with probabilities)."""
        if store_prediction:
            require_writes()
        up = svc.read_upload(file)
        try:
            out = predict_upload(store, run_id, up.decoded, up.data, k=k, keep=store_prediction)
        except InvalidInputError as exc:
            raise HTTPError(415 if "cannot be stored" in str(exc) else 422, str(exc)) from None
        top = [LabelProbability(**t) for t in out.top]
        return PredictOut(run_id=out.run_id, label=top[0].label, probability=top[0].probability, top=top,
                          upload=up.info(), stored=store_prediction, image_id=out.image_id)

    app.include_router(media.router)  # issue 15: thumbnails and files of catalogued images (JSON API rules)
    app.include_router(ui.router)  # issue 15: the web app's pages under /ui (and / -> /ui/browse)
    return app


def _route(method: Callable[..., Any], dependencies: list[Any]) -> Callable[..., Any]:
    def decorator(path: str, **kwargs: Any) -> Any:
        return method(path, dependencies=dependencies, **kwargs)

    return decorator


def create_app_from_env() -> FastAPI:
    """App factory for uvicorn workers: ``Settings.from_env()`` (``fs serve`` exports its options)."""
    settings = Settings.from_env()
    return create_app(settings)

