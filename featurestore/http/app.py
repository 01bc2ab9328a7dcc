"""The store as an HTTP service: :func:`create_app` assembles the FastAPI app from the route modules.

All resources live under ``/v1`` and speak JSON; every error is
``{"detail": "..."}`` with a status chosen by the error's type (4xx for the
request, 5xx only for a broken store; see :mod:`featurestore.http.errors`).
The OpenAPI description is at ``/openapi.json``, docs at ``/docs`` and ``/redoc``.

Safety (see :mod:`featurestore.http.access`): read-only unless
``allow_writes``; with ``FS_API_TOKEN`` every route but ``/v1/health`` needs
the bearer token; filters reach SQL only as bound parameters; request bodies
are limited to ``FS_MAX_UPLOAD_MB`` while received (:mod:`featurestore.http.limits`)
and uploads are decoded with the store's pixel limit.

Consistency: every catalog read is its own short transaction and new shards
become visible only once registered, so the service runs while ``fs extract``
or ``fs ingest`` write. The store's caches (search indexes keyed by the shard
list, extractors by params, run models by artifact sha256) reload what changed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from featurestore import __version__
from featurestore.config import Settings
from featurestore.http import errors
from featurestore.http.access import check_writes
from featurestore.http.fastpath import SearchFastPath
from featurestore.http.hosts import HostCheck
from featurestore.http.limits import BodyLimit, max_body_bytes
from featurestore.http.routes import (
    audit,
    audit_pages,
    browse,
    datasets,
    docs,
    feature_sets,
    health,
    images,
    media,
    runs,
    ui,
    ui_map,
    ui_runs,
    ui_search,
)
from featurestore.store import Store

DESCRIPTION = ("A feature store and embedding database for image classification: datasets, feature sets, "
               "similarity search and predictions of trained runs. The web app is at [/ui/browse](/ui/browse).")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store at startup, close it (and drop its caches) at shutdown."""
    app.state.store = Store.open(app.state.settings)
    try:
        yield
    finally:
        app.state.store.close()
        app.state.store = None


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app serving the store at ``settings.store`` (opened when the app starts).

    Raises
    ------
    InvalidInputError
        Writes are allowed without ``FS_API_TOKEN``.
    """
    check_writes(settings)
    app = FastAPI(title="featurestore", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)  # served by routes.docs, behind the token
    app.state.settings = settings
    app.add_middleware(SearchFastPath)  # innermost: plain searches by id skip FastAPI's machinery (issue 31)
    app.add_middleware(BodyLimit, limit=max_body_bytes(settings))
    app.add_middleware(HostCheck, settings=settings)  # outermost: a rebinding page's request ends here
    errors.install(app)
    ui.install_error_pages(app)  # unknown /ui paths: an HTML page, not JSON
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(datasets.router)
    app.include_router(feature_sets.router)
    app.include_router(images.router)
    app.include_router(browse.router)  # /v1/browse: the grid's views as JSON
    app.include_router(runs.router)
    app.include_router(media.router)  # thumbnails and files of catalogued images
    app.include_router(ui.router)  # the web app's pages under /ui (and / -> /ui/browse)
    app.include_router(ui_search.router)  # /ui/search
    app.include_router(ui_runs.router)  # /ui/runs, /ui/compare
    app.include_router(ui_map.router)  # /ui/map
    app.include_router(audit.router)  # the label review queue, /ui/audit
    app.include_router(audit_pages.router)  # /ui/leaks: pairs found by `fs audit leaks`
    return app
