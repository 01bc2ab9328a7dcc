"""The web app in a real browser: Debian's headless Chromium driven by Playwright against a live `fs serve`.

One server for the session (loopback port, FS_API_TOKEN set, --allow-writes), one logged-in browser
context; each test opens its own page, and fails on any console error, page error, failed request or
HTTP error answer. Screenshots go to test-artefacts/browser/ (gitignored; CI keeps them as artefacts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webapp_support import CHROMIUM, CHROMIUM_ARGS, build_store, class_image, serving

pytestmark = pytest.mark.browser

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)", allow_module_level=True)

TOKEN = "browser-test-token-0123456789"
ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artefacts" / "browser"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("browser")
    store = build_store(base)
    with serving(store, token=TOKEN, allow_writes=True, log=base / "serve.log") as url:
        yield url


@pytest.fixture(scope="session")
def context(server: str) -> Iterator[Any]:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        ctx = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(30_000)
        page = ctx.new_page()
        page.goto("/ui/browse")
        assert "/ui/login" in page.url  # the token server sends a browser without the cookie to log in
        page.fill('input[name="token"]', TOKEN)
        page.click('form.login button[type="submit"]')
        page.wait_for_url("**/ui/browse")
        page.close()
        yield ctx
        browser.close()


@pytest.fixture
def page(context: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page that records every console error, page error, failed request and HTTP error."""
    problems: list[str] = []
    pg = context.new_page()
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    pg.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    yield pg
    pg.screenshot(path=str(ARTEFACTS / f"{request.node.name}.png"), full_page=True)
    pg.close()
    assert not problems, "\n".join(problems)


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


ALL_IMAGES = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


def _wait_until(page: Any, expression: str, timeout: float = 30.0) -> None:
    """Poll a JS expression from the test side (page.wait_for_function would need the CSP to allow eval)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_grid_filter_keyboard_open_and_hop(page: Any) -> None:
    page.goto("/ui/browse")
    assert page.locator("a.tile").count() == 33
    _wait_until(page, ALL_IMAGES)
    page.select_option('select[name="label"]', "shirt")  # applies on change
    page.wait_for_url(re.compile(r"label=shirt"))
    captions = page.locator("a.tile .cap").all_inner_texts()
    assert len(captions) == 11 and set(captions) == {"shirt"}
    _shot(page, "grid-filtered")
    # Keyboard: the first arrow focuses the first tile, the next moves right, Enter opens it.
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    second = page.locator("a.tile").nth(1).get_attribute("data-id")
    assert page.evaluate("document.activeElement.dataset.id") == second
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ui/images/{second}")
    assert page.locator("h1").inner_text().startswith(f"Image {second}")
    neighbours = page.locator('section[data-feature-set="rp16"] a.nb')
    assert neighbours.count() == 12
    _wait_until(page, ALL_IMAGES)
    _shot(page, "image-page")
    target = neighbours.first.get_attribute("data-id")
    neighbours.first.click()
    page.wait_for_url(f"**/ui/images/{target}")
    assert target != second and page.locator('section[data-feature-set="pixels8x6"] a.nb').count() == 12


def test_confusion_matrix_cell_opens_its_images(page: Any) -> None:
    page.goto("/ui/runs")
    page.click('a[href="/ui/runs/1"]')
    page.wait_for_url("**/ui/runs/1")
    assert "stored predictions" in page.locator("#confusion-source").inner_text()
    cell = page.locator('#matrix a.cm-cell[data-true="shirt"][data-pred="sneaker"]')
    assert cell.count() == 1
    _shot(page, "run-page")
    cell.click()
    page.wait_for_url(re.compile(r"/ui/browse\?.*predicted=sneaker"))
    tiles = page.locator("a.tile")
    assert tiles.count() == 1
    assert tiles.first.locator(".cap").inner_text() == "shirt"
    assert "sneaker" in tiles.first.locator(".pred").inner_text()
    assert "bad" in (tiles.first.get_attribute("class") or "")


def test_compare_two_runs(page: Any) -> None:
    page.goto("/ui/runs")
    button = page.locator("#compare-button")
    assert button.is_disabled()
    page.check('input[name="run"][value="2"]')
    page.check('input[name="run"][value="3"]')
    assert button.is_enabled() and page.locator('input[name="run"][value="1"]').is_disabled()
    button.click()
    page.wait_for_url(re.compile(r"/ui/compare\?run=3&run=2"))  # in table order, newest first
    assert "p-value" in page.locator("#ttest").inner_text()


def test_upload_a_photo(page: Any, tmp_path: Path) -> None:
    photo = class_image(tmp_path / "query.png", 2, 4242)  # a new picture of the third class (shirt)
    page.goto("/ui/search")
    page.set_input_files("#file", str(photo))
    page.select_option('select[name="features"]', "rp16")
    page.select_option('select[name="run"]', "1")
    page.check('input[name="store"]')
    page.click('#search-form button[type="submit"]')
    page.wait_for_selector("#result")
    assert page.locator("#result a.nb").count() == 12
    labels = page.locator("#result a.nb .cap").all_inner_texts()
    # Its 10 stored look-alikes: the 8 + 2 shirts (one "sandal" of dataset later is a mislabelled shirt).
    assert labels[:12].count("shirt") >= 10
    assert page.locator("#prediction li .lb").first.inner_text() == "shirt"
    stored = page.locator("#stored a")
    assert stored.count() == 1
    _wait_until(page, ALL_IMAGES)
    _shot(page, "search-by-photo")
    stored.click()
    page.wait_for_url(re.compile(r"/ui/images/\d+"))
    assert "uploads" in page.locator("table.meta").inner_text()


def test_embedding_map_hover_and_click(page: Any) -> None:
    page.goto("/ui/map?features=rp16&method=pca&n=40&color=label")
    page.wait_for_selector("#map svg.map circle")
    points = page.locator("#map circle")
    caption = page.locator("#map-caption").inner_text()
    shown, available = (int(x) for x in re.match(r"(\d+) of (\d+) images with a vector in rp16", caption).groups())
    assert points.count() == shown == available >= 33  # every image with an rp16 vector (fewer than n)
    target = points.last  # painted last, so nothing covers it
    image_id = target.get_attribute("data-id")
    target.hover(force=True)
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    assert tip.locator("span").inner_text().startswith(f"#{image_id}")
    _wait_until(page, "document.querySelector('#tip img').complete && "
                      "document.querySelector('#tip img').naturalWidth > 0")
    _shot(page, "embedding-map")
    target.click(force=True)
    page.wait_for_url(f"**/ui/images/{image_id}")


def test_api_docs_render_offline(page: Any, context: Any) -> None:
    """/docs and /redoc draw the API from this server's files alone (the page fixture fails on any
    request that cannot be served, such as a CDN script on a machine without internet access)."""
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "featurestore" in page.locator(".swagger-ui .info .title").inner_text().lower()
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/health']")
    _shot(page, "api-docs-swagger")
    # ReDoc's sidebar credit always asks cdn.redoc.ly for Redocly's logo and hides it when that
    # fails; that one request is allowed to fail, nothing else.
    redoc, failed = context.new_page(), []
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    redoc.on("requestfailed", lambda r: failed.append(r.url) if r.url != logo else None)
    redoc.on("pageerror", lambda e: failed.append(f"page error: {e}"))
    redoc.on("response", lambda r: failed.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    try:
        redoc.goto("/redoc")
        redoc.wait_for_selector("h2:has-text('Health')")
        assert "featurestore" in redoc.locator("h1").first.inner_text().lower()
        _shot(redoc, "api-docs-redoc")
    finally:
        redoc.close()
    assert not failed, failed
