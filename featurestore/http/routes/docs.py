"""The API description (``/openapi.json``) and its viewers (``/docs``, ``/redoc``), behind the token.

FastAPI's built-in routes for these cannot take dependencies, so the app turns
them off and this router serves them with :func:`~featurestore.http.deps.authenticate`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from featurestore.http.deps import Authenticated

router = APIRouter(dependencies=[Authenticated], include_in_schema=False)


def _spec_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + "/openapi.json"


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    """The OpenAPI description of every route."""
    spec: dict[str, Any] = request.app.openapi()
    return spec


@router.get("/docs")
def swagger(request: Request) -> HTMLResponse:
    """Interactive docs (Swagger UI)."""
    return get_swagger_ui_html(openapi_url=_spec_url(request), title=f"{request.app.title} - Swagger UI")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """Reference docs (ReDoc)."""
    return get_redoc_html(openapi_url=_spec_url(request), title=f"{request.app.title} - ReDoc")
