"""Who may see and do what over HTTP: the bearer token, the web app's session cookie, and server paths.

* With ``FS_API_TOKEN`` set, a request is authenticated by ``Authorization: Bearer
  <token>`` or, for the web app's pages, thumbnails and files, by the session cookie
  that ``/ui/login`` sets after the token was typed in. The cookie holds an HMAC of
  the token (not the token itself), is ``HttpOnly`` and ``SameSite=Lax`` (a link
  from another site opens the page logged in; another site's forms, scripts and
  frames never carry it), and stops working when the token changes.
* Absolute server paths (``source_path``) are shown only to callers that may know
  the server's file layout: with a token, authenticated callers; without one (the
  server then listens on loopback only), clients whose address is loopback. Behind a
  reverse proxy on the same machine, uvicorn takes the client's address from
  ``X-Forwarded-For`` (it trusts proxy headers from 127.0.0.1), so remote users of
  the proxy do not see paths.
* Binding (:func:`check_bind`): read-only by default, writes need ``allow_writes``
  and ``FS_API_TOKEN``; listening beyond loopback needs ``FS_API_TOKEN``. With a
  token, every route but ``/v1/health`` (``/docs``, ``/redoc`` and
  ``/openapi.json`` included) needs it; tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from typing import Any
from urllib.parse import quote

from fastapi import Request
from starlette.exceptions import HTTPException

from featurestore.config import Settings
from featurestore.errors import InvalidInputError

COOKIE = "fs_session"
COOKIE_MAX_AGE = 12 * 3600
_SESSION_CONTEXT = b"featurestore web app session v1"


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_writes(settings: Settings) -> None:
    """Refuse ``allow_writes`` without a token (:class:`InvalidInputError`)."""
    if settings.allow_writes and not settings.api_token:
        raise InvalidInputError("--allow-writes needs FS_API_TOKEN: set it to a long random secret and restart")


def check_bind(host: str, settings: Settings) -> None:
    """Refuse configurations that would expose the store without a token.

    Raises
    ------
    InvalidInputError
        ``host`` is not loopback and ``FS_API_TOKEN`` is unset, or writes are
        allowed without ``FS_API_TOKEN``.
    """
    check_writes(settings)
    if not is_loopback(host) and not settings.api_token:
        raise InvalidInputError(
            f"refusing to listen on {host} without FS_API_TOKEN: set it to a long random secret "
            "(clients send `Authorization: Bearer <token>`) or bind to 127.0.0.1"
        )


def settings_of(request: Request) -> Any:
    """The server's :class:`~featurestore.config.Settings` (kept in ``app.state`` by ``create_app``)."""
    return request.app.state.settings


def session_value(token: str) -> str:
    """What the session cookie holds for ``token`` (an HMAC, so the cookie never reveals the token)."""
    return hmac.new(token.encode("utf-8", "surrogateescape"), _SESSION_CONTEXT, hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))


def is_authenticated(request: Request) -> bool:
    """True when the server has a token and the request carries it (bearer header or session cookie)."""
    token = settings_of(request).api_token
    return bool(token) and carries_token(request, token)


def carries_token(request: Request, token: str) -> bool:
    """Whether the request carries ``token``: ``Authorization: Bearer`` or the web app's session cookie."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token_matches(given.strip(), token):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode("ascii", "replace"), session_value(token).encode())


def paths_visible(request: Request) -> bool:
    """Whether responses to this request may contain absolute server paths (see the module docstring)."""
    if settings_of(request).api_token:
        return is_authenticated(request)
    client = request.client
    return client is not None and is_loopback(client.host)


# An absolute file path in a message: two or more segments from the root ("/srv/photos/a.jpg"), not
# one of the service's own URL paths ("/ui/login", "/v1/health") that messages point callers to.
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?!(?:v1|ui|docs|redoc|openapi\.json|static)\b)[^\s'\"`<>]+(?:/[^\s'\"`<>,;]+)+")
HIDDEN_PATH = "[server path hidden]"


def hide_paths(request: Request, message: str) -> str:
    """``message`` for this caller: absolute server paths replaced unless it may see them (:func:`paths_visible`).

    Error messages name files to help whoever runs the server; a remote caller
    without the token otherwise gets ``"path": null`` and must not learn the
    layout from an error either.
    """
    if paths_visible(request):
        return message
    return _ABS_PATH.sub(HIDDEN_PATH, message)


def writes_allowed(request: Request) -> bool:
    """The server accepts writes (``--allow-writes``, which needs a token) and this request is authenticated."""
    return bool(settings_of(request).allow_writes) and is_authenticated(request)


async def require_page_access(request: Request) -> None:
    """Dependency of the web pages: without the token, send the browser to the login page (303).

    ``async`` so that FastAPI does not run it in its thread pool (see :mod:`featurestore.http.deps`).
    """
    if settings_of(request).api_token and not is_authenticated(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first", headers={"Location": f"/ui/login?next={quote(target, safe='')}"})


def safe_next(target: str | None) -> str:
    """A same-site path to go to after logging in (anything else goes to the grid)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/ui/browse"
    return target
