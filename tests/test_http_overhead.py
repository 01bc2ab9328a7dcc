"""What the HTTP layer adds to a search (issue 31): uvicorn's C parser and loop, and one thread-pool hop per search.

Latency itself is measured by ``python -m bench.bench_serve --index`` (no timing asserts here); these tests
pin the causes: the protocol options ``fs serve`` gives uvicorn, and how often a search request leaves
the event loop for FastAPI's thread pool (a plain-``def`` dependency or route costs one hop each).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from featurestore.config import Settings
from featurestore.features.projection import projection_extractor
from featurestore.http import server
from featurestore.http.app import create_app
from featurestore.http.deps import get_store
from featurestore.http.routes import feature_sets
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.search.service import search
from featurestore.store import Store
from helpers import make_image

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 12 labelled images with rp16 vectors."""
    base = tmp_path_factory.mktemp("overhead")
    for k in range(12):
        make_image(base / "photos" / ("shirt" if k % 2 else "shoe") / f"{k}.png", seed=k)
    settings = Settings(store=base / ".fs", workers=1)
    with Store.open(settings, create=True) as store, store.writing():
        ingest(store, base / "photos", dataset="photos")
        extract(store, [projection_extractor(store, 16, (32, 24))])
    return base / ".fs"


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the functions run in the thread pool, in order (every hop goes through anyio.to_thread)."""
    seen: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        inner = func
        while isinstance(inner, functools.partial):  # starlette's run_in_threadpool binds the arguments
            inner = inner.func
        seen.append(getattr(inner, "__name__", repr(inner)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    yield seen


@pytest.mark.parametrize("token", [None, TOKEN])
def test_search_by_id_hops_to_the_thread_pool_once(built: Path, hops: list[str], token: str | None) -> None:
    """Was five hops (get_settings, authenticate, get_store, the route, the response check); now the search only."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with TestClient(create_app(Settings(store=built, workers=1, api_token=token))) as client:
        hops.clear()  # the lifespan's own work is not a request's
        r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "k": 5}, headers=headers)
        assert r.status_code == 200, r.text
        assert hops == ["_search_by_id"]
        if token:
            hops.clear()
            refused = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "k": 5})
            assert refused.status_code == 401  # the async authenticate still guards the route
            assert hops == []
    with Store.open(Settings(store=built, workers=1)) as store:
        expected = search(store, "rp16", 1, k=5)
    body = r.json()
    assert [h["image_id"] for h in body["results"]] == [h.image_id for h in expected]
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert body["feature_set"] == "rp16" and body["image_id"] == 1 and body["method"] == expected.method


def test_search_by_id_runs_off_the_event_loop(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search itself stays in a worker thread, so concurrent requests are parsed and answered meanwhile."""
    threads: dict[str, threading.Thread] = {}
    real_search = feature_sets.search

    def spying_search(*args: Any, **kwargs: Any) -> Any:
        threads["search"] = threading.current_thread()
        return real_search(*args, **kwargs)

    async def spying_get_store(request: Request) -> Any:
        threads["loop"] = threading.current_thread()
        return await get_store(request)

    monkeypatch.setattr(feature_sets, "search", spying_search)
    app = create_app(Settings(store=built, workers=1))
    app.dependency_overrides[get_store] = spying_get_store
    with TestClient(app) as client:
        r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 2, "k": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3
    assert threads["search"] is not threads["loop"]


def test_web_page_dependencies_do_not_hop(built: Path, hops: list[str]) -> None:
    """The web pages' access check and service dependency are async too: a page hops only for its own work."""
    with TestClient(create_app(Settings(store=built, workers=1))) as client:
        hops.clear()
        r = client.get("/ui/search")
        assert r.status_code == 200, r.text
    assert not {"require_page_access", "service", "get_store", "get_settings"} & set(hops), hops


def test_protocol_options_prefer_the_c_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert importlib.util.find_spec("httptools") and importlib.util.find_spec("uvloop")  # dependencies
    assert server.protocol_options() == server.Protocols(http="httptools", loop="uvloop")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("httptools", "uvloop") else real(name, *a))
    assert server.protocol_options() == server.Protocols(http="h11", loop="asyncio")


def test_protocol_options_fall_back_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop has no Windows build: without it, httptools is still used."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert server.protocol_options() == server.Protocols(http="httptools", loop="asyncio")


def test_serve_gives_uvicorn_the_protocol_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setattr(server, "protocol_options", lambda: server.Protocols(http="h11", loop="asyncio"))
    server.serve(Settings(store=tmp_path / "s.fs", port=8124))
    assert (seen["http"], seen["loop"], seen["port"]) == ("h11", "asyncio", 8124)


def test_worker_gives_uvicorn_the_protocol_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fs serve --workers N``: each worker's uvicorn.Config gets the same options."""
    seen: dict[str, Any] = {}

    class FakeServer:
        started = True

        def __init__(self, config: Any) -> None:
            seen["config"] = config

        def run(self, sockets: list[Any]) -> None:
            seen["sockets"] = sockets

    monkeypatch.setattr(server, "_WorkerServer", FakeServer)
    sock = object()
    server._worker(Settings(store=tmp_path / "s.fs"), "warning", sock)  # type: ignore[arg-type]
    config = seen["config"]
    assert (config.http, config.loop) == server.protocol_options() == ("httptools", "uvloop")
    assert seen["sockets"] == [sock]


# ---------------------------------------------------------------- the fast path for a search by id

QUERIES = [{"image_id": 1, "k": 5}, {"image_id": 2}, {"image_id": 3, "k": 4, "label": "shirt"},
           {"image_id": 4, "k": 3, "metric": "l2", "exact": "true"}, {"image_id": 5, "dataset": "photos"},
           {"image_id": 6, "k": 2, "label": "shoe", "exact": "1"}]


def _answers(client: TestClient, queries: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    out = []
    for q in queries:
        r = client.get("/v1/feature-sets/rp16/search", params=q)
        out.append((r.status_code, r.content))
    return out


def test_fast_path_answers_exactly_as_the_route(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte for byte the route's answers for plain queries, without FastAPI's machinery (the route's function
    not entered through FastAPI: `search_by_id` unused); anything else is the route's to answer."""
    from featurestore.http import fastpath
    from featurestore.http.deps import get_settings

    seen: list[dict[str, Any] | None] = []
    real_params = fastpath.search_params
    monkeypatch.setattr(fastpath, "search_params", lambda *a: seen.append(real_params(*a)) or seen[-1])
    fast_app = create_app(Settings(store=built, workers=1))
    route_app = create_app(Settings(store=built, workers=1))
    route_app.dependency_overrides[get_settings] = get_settings  # any override: the fast path stands aside
    odd = [{"image_id": 0}, {"image_id": 1, "k": 1001}, {"image_id": 1, "metric": "dot"}, {"image_id": "x"},
           {"image_id": 10**20}, {"image_id": 1, "label": ""}, {"image_id": 1, "exact": "maybe"}, {"k": 3},
           {"image_id": 99999}, {"image_id": "01"}]
    with TestClient(fast_app) as fast, TestClient(route_app) as route:
        assert _answers(fast, QUERIES) == _answers(route, QUERIES)
        assert all(p is not None for p in seen[: len(QUERIES)]), seen  # all answered by the fast path
        seen.clear()
        assert _answers(fast, odd) == _answers(route, odd)
        # refused by its parser, FastAPI validated them; a valid id of no image and "01" (which the route reads
        # as 1) go to the route too: the first after the search fails, the second unparsed
        assert all(p is None for p in seen[:8]) and seen[8] is not None and seen[9] is None, seen
        statuses = [status for status, _ in _answers(fast, odd)]
        assert statuses == [422] * 5 + [200, 422, 422, 404, 200], statuses  # "label=" is no filter to the route
        r = fast.get("/v1/feature-sets/nosuchset/search", params={"image_id": 1})
        assert r.status_code == 404 and r.json() == route.get("/v1/feature-sets/nosuchset/search",
                                                              params={"image_id": 1}).json()


def test_fast_path_keeps_the_token_and_runs_off_the_loop(built: Path, monkeypatch: pytest.MonkeyPatch,
                                                        hops: list[str]) -> None:
    """No token, a wrong one: the route's 401; the right one (header or none needed): answered in one worker
    thread, never on the event loop."""
    import asyncio

    off_loop: list[bool] = []
    real_search = feature_sets.search

    def spying_search(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            off_loop.append(False)
        except RuntimeError:
            off_loop.append(True)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(feature_sets, "search", spying_search)
    with TestClient(create_app(Settings(store=built, workers=1, api_token=TOKEN))) as client:
        hops.clear()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
            r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1}, headers=headers)
            assert r.status_code == 401, (headers, r.text)
        assert hops == [] and off_loop == []
        r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and len(r.json()["results"]) == 10  # 12 images but the query, k = 10
        assert hops == ["_search_by_id"] and off_loop == [True]


def test_fast_path_parser_limits() -> None:
    """Exactly the route's limits (featurestore.http.params); anything unusual is left to the route."""
    from featurestore.http.fastpath import search_params
    from featurestore.http.params import MAX_ID, MAX_K, MAX_NAME

    path = "/v1/feature-sets/rp16/search"
    assert search_params(path, b"image_id=7") == {"name": "rp16", "image_id": 7, "k": 10, "label": None,
                                                  "dataset": None, "metric": "cosine", "exact": False}
    assert search_params(path, f"image_id={MAX_ID}&k={MAX_K}&exact=false&metric=l2".encode()) is not None
    assert search_params(path, b"image_id=7&label=t%2Dshirt")["label"] == "t-shirt"  # type: ignore[index]
    for query in [f"image_id={MAX_ID + 1}", f"image_id=1&k={MAX_K + 1}", "image_id=1&k=0", "image_id=-1",
                  "image_id=1&image_id=2", "image_id=1&sort=x", "image_id=1&label=" + "a" * (MAX_NAME + 1),
                  "image_id=1&label=%00", "image_id=1&exact=yes", "image_id=1&metric=COSINE", "k=3", "image_id=+1"]:
        assert search_params(path, query.encode()) is None, query
    assert search_params("/v1/feature-sets/a/b/search", b"image_id=1") is None
    assert search_params("/v1/feature-sets/" + "n" * (MAX_NAME + 1) + "/search", b"image_id=1") is None
    assert search_params("/ui/search", b"image_id=1") is None
