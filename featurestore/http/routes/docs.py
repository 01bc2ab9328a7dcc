"""The API description (``/openapi.json``) and its viewers (``/docs``, ``/redoc``), behind the token.

FastAPI's built-in routes for these cannot take dependencies, so the app turns
them off and this router serves them with :func:`~featurestore.http.deps.authenticate`.

The viewers work offline: their scripts and styles (Swagger UI 5, ReDoc 2) come from the
``fastapi-offline`` distribution's static files and are served here under ``/docs/assets/``,
not from a CDN, and ReDoc does not load Google Fonts. On a machine without internet access
FastAPI's default pages stay blank. ReDoc's sidebar credit would ask cdn.redoc.ly for a logo: the
bundle is served with that address replaced by the app's own icon, so the viewers request nothing
from another host.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from featurestore.errors import NotFoundError
from featurestore.http.deps import Authenticated

router = APIRouter(dependencies=[Authenticated], include_in_schema=False)

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript"}
"""The viewer files served under ``/docs/assets/`` (name -> media type)."""
_ASSET_DIR = Path(str(resources.files("fastapi_offline") / "static"))


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


def _spec_url(request: Request) -> str:
    return _root(request) + "/openapi.json"


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    """The OpenAPI description of every route."""
    spec: dict[str, Any] = request.app.openapi()
    return spec


@router.get("/docs")
def swagger(request: Request) -> HTMLResponse:
    """Interactive docs (Swagger UI)."""
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=_spec_url(request), title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js", swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/ui/static/favicon.svg",
        # no badge image from the online validator (validator.swagger.io)
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """Reference docs (ReDoc)."""
    root = _root(request)
    return get_redoc_html(openapi_url=_spec_url(request), title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
                          redoc_favicon_url=f"{root}/ui/static/favicon.svg", with_google_fonts=False)


REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
"""The one address ReDoc's bundle fetches from another host (the logo of its sidebar credit)."""
_patched: dict[str, bytes] = {}


def _redoc_bundle() -> bytes:
    if "redoc" not in _patched:
        _patched["redoc"] = (_ASSET_DIR / "redoc.standalone.js").read_bytes().replace(
            REDOC_LOGO, b"/ui/static/favicon.svg")
    return _patched["redoc"]


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> Response:
    """A script or style sheet of the docs viewers (cached by the browser for a day)."""
    if name not in ASSETS:
        raise NotFoundError("docs asset", name, ASSETS)
    headers = {"Cache-Control": "private, max-age=86400"}
    if name == "redoc.standalone.js":
        return Response(_redoc_bundle(), media_type=ASSETS[name], headers=headers)
    return FileResponse(_ASSET_DIR / name, media_type=ASSETS[name], headers=headers)
