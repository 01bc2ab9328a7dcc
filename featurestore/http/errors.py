"""Exception handlers and the HTTP status of each library error (one mapping, for the JSON API and the web pages).

Every JSON error is ``{"detail": "<message>"}``, its status chosen by the error's type.

Library errors (:class:`~featurestore.errors.FeatureStoreError` subclasses)
map to a status through :data:`STATUS`, looked up along the exception's MRO so
the most specific class wins (``NotAnImageError`` is an ``InvalidInputError``
but answers 415). Messages are never inspected.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    IntegrityError,
    InvalidInputError,
    MissingFeaturesError,
    NotFoundError,
    ParamsMismatchError,
    PayloadTooLargeError,
    SchemaOutdatedError,
    StoreBusyError,
    UnsupportedMediaError,
)
from featurestore.http.access import hide_paths

log = logging.getLogger("featurestore.http")


class UnauthorizedError(FeatureStoreError, PermissionError):
    """The request lacks the server's bearer token (401)."""

    def __init__(self) -> None:
        super().__init__("missing or wrong bearer token: send `Authorization: Bearer <FS_API_TOKEN>` "
                         "(or log in at /ui/login)")


class WritesDisabledError(FeatureStoreError, PermissionError):
    """The request would write, and the server is read-only (403)."""

    def __init__(self) -> None:
        super().__init__(
            "this server is read-only: restart it with `fs serve --allow-writes` and FS_API_TOKEN set, "
            "then send `Authorization: Bearer <token>`"
        )


STATUS: dict[type[BaseException], int] = {
    UnauthorizedError: 401,
    WritesDisabledError: 403,
    NotFoundError: 404,
    MissingFeaturesError: 409,
    ParamsMismatchError: 409,
    PayloadTooLargeError: 413,
    UnsupportedMediaError: 415,
    InvalidInputError: 422,
    DimensionMismatchError: 422,
    IntegrityError: 500,
    SchemaOutdatedError: 500,
    StoreBusyError: 503,
}
DEFAULT_STATUS = 400  # any other FeatureStoreError: the request asked for something the store cannot do

# What a web page adds after a library error's facts, by the error's remedy key (the CLI words its own in
# featurestore.cli.hints); a key not listed shows the facts alone.
PAGE_REMEDIES: dict[str, str] = {
    "evaluate-folds": "; audit a run evaluated with --folds, e.g. `fs evaluate --features ... --folds 5`",
}


def page_message(exc: BaseException) -> str:
    """A library error as a web page words it: its facts, and the next step where the page has one."""
    return str(exc) + PAGE_REMEDIES.get(getattr(exc, "remedy", ""), "")


def status_for(exc: BaseException) -> int:
    """The HTTP status of a library error: that of the nearest class in its MRO listed in :data:`STATUS`."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return DEFAULT_STATUS


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The body of every error, in FastAPI's usual shape."""
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """One line naming each invalid parameter, e.g. ``invalid request: k: Input should be less than ...``."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body", "header")]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


async def store_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return error_response(status, hide_paths(request, str(exc)))


async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, validation_message(exc))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, hide_paths(request, str(exc.detail)), getattr(exc, "headers", None))


async def unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (also on an app that mounts a single router, in tests)."""
    app.add_exception_handler(FeatureStoreError, store_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
