"""Issue 30 without a browser: views (filters + order) shared by the grid, the image page, the exports and
/v1/browse; saved selections; run names and notes; fixed-test runs; the run report download.

The browser-level tests of the same issue are in test_webapp_browser.py.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner
from webapp_support import add_fixed_test_runs, build_store

from featurestore.catalog.repository import ImageFilter
from featurestore.cli.main import app as cli_app
from featurestore.config import Settings
from featurestore.http.app import create_app
from featurestore.store import Store

TOKEN = "views-token-0123456789"
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.9", 40000)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build_store plus runs 4 (trained, stored predictions of all 33 images) and 5 (evaluated) on the fixed test
    dataset "later"; run 5's prediction of image 25 is turned wrong so the two runs differ on one image."""
    store = build_store(tmp_path_factory.mktemp("views"))
    assert add_fixed_test_runs(store) == (4, 5)
    with Store.open(Settings(store=store)) as st, st.session() as s:
        s.execute(text("UPDATE run_test_predictions SET predicted = 'sneaker', correct = false "
                       "WHERE run_id = 5 AND image_id = 25"))
    return store


@pytest.fixture
def store_path(built: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy.fs"
    shutil.copytree(built, dest)
    return dest


@contextmanager
def _serving(path: Path, client: tuple[str, int] = LOOPBACK, **settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=path, workers=2).replace(**settings)), client=client) as c:
        yield c


@pytest.fixture
def client(store_path: Path) -> Iterator[TestClient]:
    with _serving(store_path) as c:
        yield c


def _tiles(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="tile[^"]*" href="/ui/images/(\d+)[?"]', html)]


def _walk(client: TestClient, url: str) -> list[int]:
    seen = []
    while url:
        html = client.get(url).text
        seen += _tiles(html)
        nxt = re.search(r'href="\?([^"]+)" id="next-page"', html)
        url = "/ui/browse?" + unescape(nxt.group(1)) if nxt else ""
    return seen


def test_fixed_test_run_views_read_the_test_predictions(store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        catalog = store.catalog
        wrong = catalog.browse_page(ImageFilter(run=4, correct=False)).tiles
        assert [t.id for t in wrong] == [27, 30, 33] and all(t.probability is None for t in wrong)
        stored = catalog.browse_page(ImageFilter(run=4, source="stored", correct=False, held_out=True)).tiles
        assert [t.id for t in stored] == [27, 30, 33] and all(t.probability is not None for t in stored)
        # Only A right / only B right: the McNemar counts' images.
        assert catalog.matching_ids(ImageFilter(run=4, versus=5, outcome="a_only")) == [25]
        assert catalog.matching_ids(ImageFilter(run=4, versus=5, outcome="b_only")) == []
        assert catalog.matching_ids(ImageFilter(run=5, versus=4, outcome="b_only")) == [25]
        assert catalog.matching_ids(ImageFilter(run=4, versus=5, outcome="neither")) == [27, 30, 33]


def test_compare_page_links_mcnemar_counts_and_pairs_classes(client: TestClient) -> None:
    html = client.get("/ui/compare", params=[("run", 4), ("run", 5)]).text
    link = unescape(re.search(r'<a href="([^"]+)" id="a-only">1</a>', html).group(1))
    assert _tiles(client.get(link).text) == [25]
    rows = re.findall(r"<tr><td>(\w+)</td><td class=\"num\">(\d+)</td><td class=\"num\">([\d.]+)%</td>"
                      r"<td class=\"num\">([\d.]+)%</td>", html)
    by_class = {r[0]: (int(r[1]), float(r[2]), float(r[3])) for r in rows}
    assert by_class["sandal"] == (3, pytest.approx(66.7), pytest.approx(33.3))
    assert by_class["shirt"] == (3, pytest.approx(66.7), pytest.approx(66.7))


def test_sorted_views_page_through_every_image_once(client: TestClient, store_path: Path) -> None:
    every = list(range(1, 34))
    for sort in ("confidence", "margin", "random"):
        seen = _walk(client, f"/ui/browse?run=1&sort={sort}&size=4")
        assert sorted(seen) == every and len(seen) == 33, sort
    with Store.open(Settings(store=store_path)) as store:
        tiles = store.catalog.browse_page(ImageFilter(run=1, sort="confidence"), limit=33).tiles
        probs = [t.probability for t in tiles]
        assert probs == sorted(probs, reverse=True)
        margins = [t.margin for t in store.catalog.browse_page(ImageFilter(run=1, sort="margin"), limit=33).tiles]
        assert margins == sorted(margins)
    shuffled = _walk(client, "/ui/browse?sort=random&seed=1&size=10")
    assert shuffled != every and sorted(shuffled) == every
    assert _walk(client, "/ui/browse?sort=random&seed=2&size=10") != shuffled
    assert "needs a run" in client.get("/ui/browse", params={"sort": "confidence"}).text
    assert "keep no probabilities" in client.get("/ui/browse", params={"run": 4, "sort": "confidence"}).text


def test_image_page_walks_its_view(client: TestClient) -> None:
    html = client.get("/ui/images/30", params={"run": 1, "correct": "no"}).text
    assert 'href="/ui/browse?run=1&amp;correct=no&amp;at=30#t30" id="back-to-grid"' in html
    for to, target in (("prev", "27"), ("next", "33")):
        link = unescape(re.search(rf'href="([^"]+)" id="{to}-image"', html).group(1))
        hop = client.get(link, follow_redirects=False)
        assert hop.status_code == 303 and hop.headers["location"] == f"/ui/images/{target}?run=1&correct=no"
    last = client.get("/ui/images/33/step", params={"run": 1, "correct": "no", "to": "next"})
    assert last.url.path == "/ui/images/33" and 'id="view-end"' in last.text and "last image" in last.text
    grid = client.get("/ui/browse", params={"run": 1, "correct": "no", "at": 30}).text
    assert _tiles(grid) == [30, 33] and 'data-id="30" id="t30" data-focus="1"' in grid
    plain = client.get("/ui/images/30").text
    assert 'id="next-image"' not in plain and 'id="back-to-grid"' in plain


def test_image_page_says_why_the_file_is_unavailable(client: TestClient, store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        path = Path(store.select_images(image_ids=[3])[0][1])
    os.replace(path, path.with_suffix(".moved"))
    html = client.get("/ui/images/3").text
    assert "moved or deleted" in re.search(r'id="file-problem"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert "/v1/images/3/thumbnail" not in html  # no broken image on the page
    path.write_bytes(b"different bytes")
    assert "changed since it was ingested" in client.get("/ui/images/3").text


def test_filter_menus_count_within_the_view(client: TestClient) -> None:
    html = client.get("/ui/browse", params={"dataset": "later", "superclass": "footwear"}).text
    labels = re.findall(r'<option value="(\w+)"[^>]*>\w+ \((\d+)\)</option>', html.split('name="label"')[1]
                        .split("</select>")[0])
    assert labels == [("sandal", "3"), ("sneaker", "3")]
    run = client.get("/ui/browse", params={"run": 1, "correct": "no"}).text
    predicted = re.findall(r'<option value="(\w+)"[^>]*>\w+ \((\d+)\)', run.split('name="predicted"')[1]
                           .split("</select>")[0])
    assert sum(int(n) for _, n in predicted) == 3


def test_v1_browse_pages_the_view_and_hides_paths_from_remote_callers(store_path: Path) -> None:
    with _serving(store_path) as c:
        first = c.get("/v1/browse", params={"run": 1, "correct": "no", "limit": 2}).json()
        assert first["count"] == 3 and [i["id"] for i in first["images"]] == [27, 30]
        assert first["images"][0]["path"].endswith(".png") and first["images"][0]["correct"] is False
        rest = c.get(first["next"]).json()
        assert [i["id"] for i in rest["images"]] == [33] and rest["next"] is None
        assert c.get("/v1/browse", params={"correct": "no"}).status_code == 422
    with _serving(store_path, client=REMOTE, api_token=TOKEN) as c:
        assert c.get("/v1/browse").status_code == 401
        body = c.get("/v1/browse", params={"dataset": "later"}, headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert body["count"] == 9 and all(i["path"] is not None for i in body["images"])
    with _serving(store_path, client=REMOTE) as c:
        body = c.get("/v1/browse", params={"dataset": "later"}).json()
        assert body["count"] == 9 and all(i["path"] is None for i in body["images"])
        assert str(store_path.parent) not in str(body)


def test_exports_of_the_view(store_path: Path) -> None:
    with _serving(store_path) as c:
        r = c.get("/ui/export.csv", params={"run": 1, "correct": "no"})
        assert r.headers["content-disposition"].startswith("attachment")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [int(row["id"]) for row in rows] == [27, 30, 33] and all(row["path"] for row in rows)
        j = c.get("/ui/export.json", params={"dataset": "later", "sort": "random", "seed": 3}).json()
        assert j["count"] == 9 and sorted(i["id"] for i in j["images"]) == list(range(25, 34))
    with _serving(store_path, client=REMOTE) as c:
        rows = list(csv.DictReader(io.StringIO(c.get("/ui/export.csv", params={"dataset": "later"}).text)))
        assert len(rows) == 9 and not any(row["path"] for row in rows)


def test_saving_a_view_as_a_dataset_follows_the_writes_rule(store_path: Path) -> None:
    form = {"run": "1", "correct": "no", "name": "mistakes-1"}
    with _serving(store_path) as c:  # read-only
        assert c.post("/ui/selections", data=form).status_code == 403
    with _serving(store_path, api_token=TOKEN, allow_writes=True) as c:
        c.post("/ui/login", data={"token": TOKEN})
        r = c.post("/ui/selections", data=form)
        assert r.status_code == 200 and "Saved 3 images as dataset mistakes-1" in r.text
        assert _tiles(r.text) == [27, 30, 33]
        again = c.post("/ui/selections", data=form)
        assert again.status_code == 422 and "already exists" in again.text
        bad = c.post("/ui/selections", data={**form, "name": "no spaces"})
        assert bad.status_code == 422 and "invalid dataset name" in bad.text
        # A lasso on the map: ids -> a grid view of them, which can be saved too.
        lasso = c.post("/ui/selections/lasso", data={"ids": "3,5,7"})
        assert _tiles(lasso.text) == [3, 5, 7] and "Your selection on the map: 3 images" in lasso.text
    with Store.open(Settings(store=store_path)) as store:
        assert sorted(r[0] for r in store.select_images(dataset="mistakes-1")) == [27, 30, 33]


def test_run_names_and_notes_from_the_cli_and_the_app(store_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli_app, ["--store", str(store_path), "runs", "name", "4", "rp16 on a fixed test set",
                                "--notes", "baseline"])
    assert r.exit_code == 0, r.output
    listed = runner.invoke(cli_app, ["--store", str(store_path), "runs", "--format", "csv"])
    assert "rp16 on a fixed test set" in listed.stdout
    assert runner.invoke(cli_app, ["--store", str(store_path), "runs", "name", "99", "x"]).exit_code == 1
    assert "Example: fs runs name" in runner.invoke(cli_app, ["runs", "name", "--help"]).output
    renamed = runner.invoke(cli_app, ["--store", str(store_path), "runs", "name", "4", "renamed"])
    assert renamed.exit_code == 0
    shown = runner.invoke(cli_app, ["--store", str(store_path), "runs", "show-notes", "4"])
    assert "name: renamed" in shown.stdout and "baseline" in shown.stdout  # notes kept without --notes
    with _serving(store_path) as c:
        page = c.get("/ui/runs/4").text
        assert "&ldquo;renamed&rdquo;" in page or "\u201crenamed\u201d" in page
        assert 'id="notes-form"' not in page and "fs runs name 4" in page
        assert c.post("/ui/runs/4/notes", data={"name": "x"}).status_code == 403
        assert "renamed" in c.get("/ui/browse").text  # run menus carry names
    with _serving(store_path, api_token=TOKEN, allow_writes=True) as c:
        c.post("/ui/login", data={"token": TOKEN})
        saved = c.post("/ui/runs/4/notes", data={"name": "from the app", "notes": "line one\nline two"})
        assert saved.status_code == 200 and 'id="notes-saved"' in saved.text
        assert "line one\nline two" in saved.text and "from the app" in saved.text
        assert c.post("/ui/runs/4/notes", data={"name": "x" * 201}).status_code == 422


def test_run_report_download_and_redoc_bundle(client: TestClient) -> None:
    r = client.get("/ui/runs/4/report")
    assert r.status_code == 200 and 'attachment; filename="run4-report.html"' == r.headers["content-disposition"]
    assert "<svg" in r.text and "test dataset later" in unescape(r.text)
    bundle = client.get("/docs/assets/redoc.standalone.js")
    assert b"cdn.redoc.ly" not in bundle.content and b"/ui/static/favicon.svg" in bundle.content


def test_unknown_pages_and_bad_ids_are_html(client: TestClient) -> None:
    for url, status in (("/ui/nope", 404), ("/ui/images/abc", 422), ("/ui/runs/x", 422)):
        r = client.get(url)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html"), url
        assert 'id="error-message"' in r.text
    assert client.get("/v1/nope").headers["content-type"].startswith("application/json")


def test_tsne_runs_in_the_background_and_one_write_does_not_hide_the_map(store_path: Path, tmp_path: Path) -> None:
    from webapp_support import class_image

    from featurestore.features.pixels import PixelsExtractor
    from featurestore.pipelines.extract import extract
    from featurestore.pipelines.ingest import ingest

    params = {"features": "pixels8x6", "method": "tsne", "n": 40, "color": "label"}
    with _serving(store_path) as c:
        first = c.get("/ui/map/plot", params=params)
        assert first.status_code == 202 and 'id="map-progress"' in first.text
        deadline = time.monotonic() + 120
        while (st := c.get("/ui/map/status", params=params).json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert st["state"] == "done", st
        drawn = c.get("/ui/map/plot", params=params)
        assert drawn.status_code == 200 and drawn.text.count("<circle") == 33 and "t-SNE" in drawn.text
        class_image(tmp_path / "more" / "x.png", 0, 4242)
        with Store.open(Settings(store=store_path)) as store, store.writing():
            ingest(store, tmp_path / "more", dataset="more", labels="none")
            extract(store, [PixelsExtractor((8, 6))])
        stale = c.get("/ui/map/plot", params=params)
        assert stale.status_code == 200 and 'id="map-stale"' in stale.text and stale.text.count("<circle") == 33
        fresh = c.get("/ui/map/plot", params={**params, "fresh": 1})
        assert fresh.status_code == 202
        assert c.post("/ui/map/cancel", data={"features": "pixels8x6", "method": "tsne", "n": "40"}).json() == {
            "cancelled": True}
        assert c.get("/ui/map/status", params=params).json()["state"] == "cancelled"


def test_view_queries_on_each_catalog_backend(backend_url: str | None, tmp_path: Path) -> None:
    """The new SQL (JSON margin, the seeded hash order, test-set sources, outcomes, narrowed menus, saved
    selections, run notes) on SQLite and PostgreSQL alike."""

    store_path = build_store(tmp_path)
    add_fixed_test_runs(store_path)
    with Store.open(Settings(store=store_path)) as store:
        catalog = store.catalog
        for sort in ("confidence", "margin", "random"):
            ids, after = [], None
            while True:
                page = catalog.browse_page(ImageFilter(run=1, sort=sort, seed=5), after=after, limit=7)
                ids += [t.id for t in page.tiles]
                if not page.has_next:
                    break
                after = page.last
            assert sorted(ids) == list(range(1, 34)), sort
        assert catalog.count_images(ImageFilter(run=4, correct=False)) == 3
        assert catalog.matching_ids(ImageFilter(run=4, versus=5, outcome="neither")) == [27, 30, 33]
        assert [(c.label, c.images) for c in catalog.per_class_pair(4, 5)] == [("sandal", 3), ("shirt", 3),
                                                                               ("sneaker", 3)]
        menus = catalog.facets(None, ImageFilter(dataset="later", superclass="footwear"))
        assert menus.labels == [("sandal", 3), ("sneaker", 3)]
        with store.writing():
            assert catalog.save_as_dataset("picked", [3, 1, 2]) == 3
            catalog.set_run_note(4, "named", "notes")
        assert sorted(r[0] for r in store.select_images(dataset="picked")) == [1, 2, 3]
        assert catalog.run_names() == {4: "named"}
