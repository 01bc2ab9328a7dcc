"""A fast path for the hottest request, ``GET /v1/feature-sets/{name}/search?image_id=...`` (issue 31).

FastAPI spends about half a millisecond of CPU on every such request before and
after the search itself: routing, five dependency solves, twenty parameter
groups validated, the response model checked and encoded. At a million vectors
the indexed search takes about that long, so the HTTP layer doubled it.

:class:`SearchFastPath` is a pure ASGI middleware, the innermost one (the host
check and the body limit still wrap it). It answers a search by id only when
the request is the plain, valid case, parsed here with exactly the limits of
:mod:`featurestore.http.params`; it runs the route's own function
(``feature_sets._search_by_id``, in one worker thread as the route does) and
encodes the same :class:`~featurestore.http.models.SearchOut`. Anything else (a
parameter it does not parse, a missing or wrong token, an error while searching)
goes to the FastAPI route unchanged, so every error answer, status and message
stays the route's own; so does every request while ``app.dependency_overrides``
is set. Tests check both give the same answers.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from featurestore.http.access import carries_token
from featurestore.http.params import MAX_ID, MAX_K, MAX_NAME

_PATH = re.compile(r"/v1/feature-sets/([^/]+)/search")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_KNOWN = {"image_id", "k", "label", "dataset", "metric", "exact"}


def _int(text: str, low: int, high: int) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or text.startswith("0"):
        return None
    value = int(text)
    return value if low <= value <= high else None


def _name(text: str | None) -> bool:
    return text is None or (len(text) <= MAX_NAME and "\x00" not in text)


def search_params(path: str, query: bytes) -> dict[str, Any] | None:
    """The route's arguments for a plain, valid search by id; None for anything the route itself should answer."""
    match = _PATH.fullmatch(path)
    if match is None or not _name(match.group(1)):
        return None
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return None
    given = dict(pairs)
    if len(given) != len(pairs) or not set(given) <= _KNOWN or "image_id" not in given or "" in given.values():
        return None  # repeated, unknown or blank parameters: the route's rules decide
    image_id = _int(given["image_id"], 1, MAX_ID)
    k = _int(given.get("k", "10"), 1, MAX_K)
    exact = _BOOLS.get(given.get("exact", "false"))
    metric = given.get("metric", "cosine")
    label, dataset = given.get("label"), given.get("dataset")
    if image_id is None or k is None or exact is None or metric not in ("cosine", "l2"):
        return None
    if not (_name(label) and _name(dataset)):
        return None
    return {"name": match.group(1), "image_id": image_id, "k": k, "label": label, "dataset": dataset,
            "metric": metric, "exact": exact}


class SearchFastPath:
    """ASGI middleware answering plain searches by id without FastAPI's per-request machinery (see module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].endswith("/search"):
            await self.app(scope, receive, send)
            return
        body = await self._answer(scope)
        if body is None:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope) -> bytes | None:
        from featurestore.http.routes.feature_sets import _search_by_id

        params = search_params(scope["path"], scope.get("query_string", b""))
        if params is None:
            return None
        request = Request(scope)
        if request.app.dependency_overrides:  # a test's stand-ins are FastAPI's to apply
            return None
        state = request.app.state
        store, settings = getattr(state, "store", None), getattr(state, "settings", None)
        if store is None or settings is None:
            return None
        if settings.api_token is not None and not carries_token(request, settings.api_token):
            return None  # the route answers 401 as always
        try:
            out = await run_in_threadpool(_search_by_id, request, params["name"], params["image_id"], store,
                                          params["k"], params["label"], params["dataset"], params["metric"],
                                          params["exact"])
        except Exception:  # an unknown set, a missing image...: the route runs again and answers as always
            return None
        return out.__pydantic_serializer__.to_json(out, by_alias=True)  # type: ignore[no-any-return]
