"""The ``Host`` header check of a server without a token (DNS rebinding).

Without ``FS_API_TOKEN`` the service listens on loopback only and trusts every
local client. A web page the user visits cannot reach it directly, but it can
through DNS rebinding: ``evil.example`` first resolves to the attacker's server,
then to 127.0.0.1, and the browser sends ``Host: evil.example`` to our port as a
same-origin request that may read the answer. Browsers always send the name
they resolved, so answering only ``Host`` values that name this machine
(``localhost``, a loopback address, or one given with ``--allowed-host`` /
``FS_ALLOWED_HOSTS``) closes that path. With a token every request needs the
token (a rebinding page does not have it), so the check is off.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from featurestore.config import Settings
from featurestore.http.access import is_loopback

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed_names(settings: Settings) -> frozenset[str]:
    """Host names (lower case, without port) accepted besides loopback ones."""
    extra = (settings.allowed_hosts or "").split(",")
    return frozenset(h.strip().strip("[]").lower().rstrip(".") for h in extra if h.strip())


def host_name(header: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``Localhost.:80`` -> ``localhost``."""
    h = header.strip().lower()
    if h.startswith("["):
        name = h[1:].partition("]")[0]
    else:
        name = h.rpartition(":")[0] if h.count(":") == 1 else h
    return name.rstrip(".")


def host_allowed(header: str | None, extra: frozenset[str]) -> bool:
    """Whether a token-less server may answer a request with this ``Host`` header."""
    if not header:
        return False
    name = host_name(header)
    return is_loopback(name) or name in extra


class HostCheck:
    """ASGI middleware: without a token, a request whose ``Host`` is not this machine gets a 400."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], settings: Settings):
        self.app = app
        self.enabled = not settings.api_token
        self.extra = allowed_names(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.enabled and scope["type"] in ("http", "websocket"):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
            if not host_allowed(header, self.extra):
                await _refuse(scope, send, header)
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, header: str | None) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})
        return
    shown = (header or "")[:100].encode("ascii", "replace").decode()
    body = json.dumps({"detail": f"Host {shown!r} is not this server: a server without FS_API_TOKEN answers only "
                                 "localhost, 127.0.0.1 and [::1] (add names with `fs serve --allowed-host NAME`)"}
                      ).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
