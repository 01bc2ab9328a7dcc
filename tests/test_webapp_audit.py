"""The label review queue `/ui/audit`: pages and access rules (TestClient), keys in Chromium (browser marker)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from webapp_support import CHROMIUM, CHROMIUM_ARGS, build_store, serving

from featurestore.config import Settings
from featurestore.http.app import create_app
from featurestore.pipelines.labels import audit_labels
from featurestore.pipelines.train import TrainConfig, evaluate_many
from featurestore.store import Store

TOKEN = "audit-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _with_kfold_run(base: Path) -> Path:
    """The web-app test store (3 'odd' images whose label disagrees with their content) plus run 4:
    rp16, 3 folds, out-of-fold probabilities kept."""
    path = build_store(base)
    with Store.open(Settings(store=path, workers=2)) as store, store.writing():
        evaluate_many(store, [["rp16"]], TrainConfig(["rp16"], folds=3, classifier="logreg"))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_kfold_run(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def store_path(built: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy.fs"
    shutil.copytree(built, dest)
    return dest


@contextmanager
def _serving(path: Path, **settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=path, workers=2).replace(**settings)),
                    client=("127.0.0.1", 50000)) as c:
        yield c


def _flagged(path: Path) -> list[int]:
    with Store.open(Settings(store=path)) as store:
        return [r.image_id for r in audit_labels(store, 4).rows if r.flagged]


def test_queue_read_only_shows_evidence_and_refuses_writes(store_path: Path) -> None:
    flagged = _flagged(store_path)
    assert flagged, "the odd images should be flagged"
    with _serving(store_path) as c:
        page = c.get("/ui/audit")  # the newest K-fold run
        assert page.status_code == 200, page.text[:300]
        assert 'href="/ui/runs/4"' in page.text and f'data-image-id="{flagged[0]}"' in page.text
        assert 'id="audit-readonly"' in page.text and 'id="audit-form"' not in page.text
        assert "Typical" in page.text and "Nearest neighbours" in page.text
        assert "flagged from out-of-fold probabilities and neighbour votes" in page.text  # what was judged
        assert 'href="/ui/audit" aria-current="page"' in page.text  # the nav link
        resp = c.post("/ui/audit", data={"run": 4, "image_id": flagged[0], "action": "accept"})
        assert resp.status_code == 403 and "--allow-writes" in resp.text
        assert c.get("/ui/audit?run=1").status_code == 400  # a run without out-of-fold probabilities
        assert "--folds" in c.get("/ui/audit?run=1").text
    with Store.open(Settings(store=store_path)) as store:
        assert store.catalog.label_history() == []


def test_queue_without_kfold_run(tmp_path: Path) -> None:
    path = build_store(tmp_path)
    with _serving(path) as c:
        page = c.get("/ui/audit")
    assert page.status_code == 200 and 'id="audit-none"' in page.text and "--folds 5" in page.text


def test_queue_decisions_land_in_history(store_path: Path) -> None:
    flagged = _flagged(store_path)
    with _serving(store_path, api_token=TOKEN, allow_writes=True) as c:
        assert c.get("/ui/audit?run=4", follow_redirects=False).status_code == 303  # pages need the token
        page = c.get("/ui/audit?run=4", headers=AUTH)
        assert 'id="audit-form"' in page.text
        suggested = re.search(r'<td id="suggested">([^<]+)</td>', page.text).group(1)  # type: ignore[union-attr]
        resp = c.post("/ui/audit", data={"run": 4, "image_id": flagged[0], "action": "accept"}, headers=AUTH,
                      follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/audit?run=4&skip=0"
        resp = c.post("/ui/audit", data={"run": 4, "image_id": flagged[0], "action": "accept"}, headers=AUTH)
        assert resp.status_code == 422 and "not waiting for review" in resp.text  # decided already
        if len(flagged) > 1:
            resp = c.post("/ui/audit", data={"run": 4, "image_id": flagged[1], "action": "pick", "label": "boot"},
                          headers=AUTH)
            assert resp.status_code == 422 and "unknown label 'boot'" in unescape(resp.text)
            c.post("/ui/audit", data={"run": 4, "image_id": flagged[1], "action": "right"}, headers=AUTH)
            assert f'data-image-id="{flagged[1]}"' not in c.get("/ui/audit?run=4", headers=AUTH).text
    with Store.open(Settings(store=store_path)) as store:
        rows = store.catalog.label_history()
        assert [(r.image_id, r.new_label, r.source) for r in rows] == [(flagged[0], suggested, "http")]
        assert rows[0].changed_by == "http token holder (127.0.0.1)"
        assert rows[0].reason == "review of run 4: suggestion accepted"
        assert store.catalog.reviewed(4) == (set(flagged[1:2]))


@pytest.mark.browser
def test_review_keys_in_chromium(tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    path = _with_kfold_run(tmp_path)
    flagged = _flagged(path)
    assert len(flagged) >= 2
    problems: list[str] = []
    with serving(path, token=TOKEN, allow_writes=True, log=tmp_path / "serve.log") as url, \
            playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=url).new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto("/ui/audit?run=4")
        page.fill('input[name="token"]', TOKEN)
        page.click('form.login button[type="submit"]')
        page.wait_for_url("**/ui/audit?run=4")
        first = page.get_attribute("#audit-item", "data-image-id")
        page.keyboard.press("s")  # skip: the next flagged image
        page.wait_for_url("**/ui/audit?run=4&skip=1")
        second = page.get_attribute("#audit-item", "data-image-id")
        assert second != first
        suggested = page.inner_text("#suggested")
        with page.expect_navigation():  # the key posts a form; its answer redirects back to the same URL
            page.keyboard.press("a")  # accept the suggestion for the second image
        page.wait_for_url("**/ui/audit?run=4&skip=1")
        page.goto("/ui/audit?run=4")
        assert page.get_attribute("#audit-item", "data-image-id") == first
        with page.expect_navigation():
            page.keyboard.press("r")  # label is right: no longer offered
        page.wait_for_load_state()
        assert page.get_attribute("#audit-item", "data-image-id") not in (first, second) or \
            page.locator("#audit-done").count() == 1
        browser.close()
    assert problems == []
    with Store.open(Settings(store=path)) as store:
        rows = store.catalog.label_history()
        assert [(str(r.image_id), r.new_label, r.source) for r in rows] == [(second, suggested, "http")]
        assert {str(i) for i in store.catalog.reviewed(4)} == {first}
