"""The web app without a browser: pages, thumbnails and files, access rules, path hiding, `fs report`.

The browser tests (real Chromium) are in test_webapp_browser.py.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner
from webapp_support import build_store, class_image

from featurestore.catalog.repository import ImageFilter
from featurestore.cli.main import app as cli_app
from featurestore.config import Settings
from featurestore.features.pixels import PixelsExtractor
from featurestore.http.app import create_app
from featurestore.io.thumbnails import render_thumbnail, thumbnail_path
from featurestore.pipelines.embedding_map import embedding_map
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, evaluate_many
from featurestore.store import Store
from featurestore.training.confusion import Confusion

TOKEN = "web-token-0123456789"
LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("webapp"))


@pytest.fixture
def store_path(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built store (tests may write thumbnails, maps or uploads to it)."""
    dest = tmp_path / "copy.fs"
    shutil.copytree(built, dest)
    return dest


@contextmanager
def _serving(path: Path, client: tuple[str, int] = LOOPBACK, **settings: Any) -> Iterator[TestClient]:
    app = create_app(Settings(store=path, workers=2).replace(**settings))
    with TestClient(app, client=client) as c:
        yield c


@pytest.fixture
def client(store_path: Path) -> Iterator[TestClient]:
    with _serving(store_path) as c:
        yield c


def _html_error(resp: Any, status: int) -> str:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("text/html")
    found = re.search(r'id="error-message">(.*?)<', resp.text, re.S)
    assert found, resp.text[:500]
    return found.group(1)


def _tile_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="tile[^"]*" href="/ui/images/(\d+)[?"]', html)]


def _ids_by_label(store_path: Path) -> dict[str, list[int]]:
    with Store.open(Settings(store=store_path)) as store:
        out: dict[str, list[int]] = {}
        for i, _, label, _ in store.select_images():
            out.setdefault(label, []).append(i)
    return out


# -- pages ---------------------------------------------------------------------------------------


def test_root_redirects_to_the_grid(client: TestClient) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/browse"


def test_pages_render_with_strict_csp(client: TestClient) -> None:
    for url in ["/ui/browse", "/ui/images/1", "/ui/search", "/ui/runs", "/ui/runs/1", "/ui/compare?run=2&run=3",
                "/ui/map", "/ui/login"]:
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:300])
        assert "script-src 'self'" in r.headers["content-security-policy"]
        # Nothing is loaded from another host: no absolute URLs in src/href attributes.
        assert not re.search(r'(src|href)="(https?:)?//', r.text), url


def test_static_files_are_public_and_whitelisted(store_path: Path) -> None:
    with _serving(store_path, api_token=TOKEN) as c:
        assert c.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/static/app.css").status_code == 200
        assert c.get("/ui/static/..%2Fapp.py").status_code == 404
        assert c.get("/ui/static/templating.py").status_code == 404


def test_grid_filters_by_label_and_pages_by_keyset(client: TestClient, store_path: Path) -> None:
    by_label = _ids_by_label(store_path)
    r = client.get("/ui/browse", params={"label": "shirt"})
    assert _tile_ids(r.text) == sorted(by_label["shirt"])
    # Pages of 4 walk every image once, forwards and backwards.
    seen, url = [], "/ui/browse?size=4"
    while url:
        html = client.get(url).text
        seen += _tile_ids(html)
        nxt = re.search(r'href="\?([^"]+)" id="next-page"', html)
        url = "/ui/browse?" + nxt.group(1).replace("&amp;", "&") if nxt else ""
    assert seen == sorted(i for ids in by_label.values() for i in ids)
    last = client.get("/ui/browse", params={"size": 4, "before": seen[-1] + 1}).text
    assert _tile_ids(last) == seen[-4:]


def test_grid_run_filters(client: TestClient, store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        catalog = store.catalog
        wrong = catalog.browse_page(ImageFilter(run=1, correct=False)).tiles
        assert {t.id for t in wrong} == {27, 30, 33}  # the three "odd" images of dataset later
        assert all(t.correct is False and t.predicted != t.label for t in wrong)
        assert catalog.count_images(ImageFilter(run=1, correct=True)) == 30
        assert catalog.count_images(ImageFilter(run=1, held_out=True)) == 9
        low = catalog.browse_page(ImageFilter(run=1, below=0.999)).tiles
        assert all(t.probability is not None and t.probability < 0.999 for t in low)
        assert catalog.count_images(ImageFilter(dataset="later", label="shirt", run=1, predicted="sneaker")) == 1
    html = client.get("/ui/browse", params={"run": 1, "correct": "no"}).text
    assert _tile_ids(html) == [27, 30, 33] and html.count('class="tile bad"') == 3
    assert "pick one" in _html_error(client.get("/ui/browse", params={"correct": "no"}), 422)
    assert "whole number" in _html_error(client.get("/ui/browse", params={"run": "x"}), 422)
    assert "unknown run" in _html_error(client.get("/ui/browse", params={"run": 99}), 404)


def test_image_page(client: TestClient) -> None:
    html = client.get("/ui/images/27").text
    assert "Run <" not in html and 'href="/ui/runs/1"' in html
    assert re.search(r"stored \d{4}-\d\d-\d\d", html)  # run 1's stored top-5
    assert "Runs 3, 2: no final model" in html
    for name in ("rp16", "pixels8x6"):
        section = html.split(f'data-feature-set="{name}"')[1].split("</section>")[0]
        hops = re.findall(r'class="nb" href="/ui/images/(\d+)"', section)
        assert len(hops) == 12 and "27" not in hops
    assert "no image with id 999" in _html_error(client.get("/ui/images/999"), 404)


def test_image_page_predicts_live_when_nothing_is_stored(store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store, store.session() as s:
        s.execute(text("DELETE FROM predictions WHERE image_id = 5"))
    with _serving(store_path) as c:
        html = c.get("/ui/images/5").text
    assert "computed now from the stored vectors (not stored)" in html
    assert re.search(r'<span class="lb">sandal</span>', html)


def test_run_page_confusion_from_stored_predictions(client: TestClient) -> None:
    # held_out=0: every stored prediction (the page opens on the held-out ones; see test_webapp_views.py)
    html = unescape(client.get("/ui/runs/1", params={"held_out": 0}).text)
    assert "Computed from this run's stored predictions" in html
    assert "24 of those the run's training selection may have held" in html
    cells = {(t, p): n for t, p, n in re.findall(
        r'data-true="([^"]+)" data-pred="([^"]+)">.*?class="cell[^"]*"[^>]*>(\d+)<', html)}
    assert cells[("shirt", "sneaker")] == "1" and cells[("sneaker", "sneaker")] == "10"
    held = client.get("/ui/runs/1", params={"held_out": 1}).text
    assert "Shown: only the other (held-out) images" in held
    assert "held_out=1" in re.search(r'<a href="(/ui/browse[^"]+)" class="cm-cell"', held).group(1)
    # A cell links to the grid of its images.
    link = re.search(r'<a href="(/ui/browse\?[^"]+)" class="cm-cell" data-true="shirt" data-pred="sneaker"', html)
    grid = client.get(link.group(1)).text
    assert _tile_ids(grid) == [33]


def test_run_page_without_predictions(client: TestClient) -> None:
    html = client.get("/ui/runs/2").text
    assert 'id="no-predictions"' in html and "fs predict --run 2" in html


def test_compare_page(client: TestClient) -> None:
    html = client.get("/ui/compare", params=[("run", 2), ("run", 3)]).text
    assert 'id="ttest"' in html and "p-value" in html
    refused = client.get("/ui/compare", params=[("run", 2), ("run", 2)]).text
    assert 'id="refusal"' in refused and "two different runs" in refused
    assert "exactly two" in _html_error(client.get("/ui/compare", params={"run": 1}), 422)


def test_map_plot_is_cached(client: TestClient, store_path: Path) -> None:
    r = client.get("/ui/map/plot", params={"features": "rp16", "method": "pca", "n": 20, "color": "correct",
                                           "run": 1})
    assert r.status_code == 200, r.text[:300]
    assert r.text.count("<circle") == 20 and "computed" in r.text
    cached = list((store_path / "maps" / "rp16").glob("pca-n20-s0-*.npz"))
    assert len(cached) == 1
    again = client.get("/ui/map/plot", params={"features": "rp16", "n": 20, "color": "label"})
    assert "from the cache" in again.text
    assert "needs a run" in _html_error(client.get("/ui/map/plot", params={"color": "correct"}), 422)
    assert "method must be" in _html_error(client.get("/ui/map/plot", params={"method": "umap"}), 422)


def test_embedding_map_methods_and_refresh(store_path: Path, tmp_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        pca = embedding_map(store, "pixels8x6", "pca", n=30)
        assert pca.xy.shape == (30, 2) and not pca.cached and pca.available == 33
        X = store.read_matrix(["pixels8x6"], image_ids=pca.image_ids.tolist()).X
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        # The first axis is the direction of largest variance: it separates the three colour classes.
        corr = abs(np.corrcoef(pca.xy[:, 0], (X - X.mean(0)) @ np.linalg.svd(X - X.mean(0))[2][0])[0, 1])
        assert corr > 0.999
        assert embedding_map(store, "pixels8x6", "pca", n=30).cached
        tsne = embedding_map(store, "pixels8x6", "tsne", n=30)
        assert tsne.xy.shape == (30, 2) and np.isfinite(tsne.xy).all()
        # New vectors make a new map (the cache key covers the shard list).
        class_image(tmp_path / "more" / "x.png", 0, 777)
        with store.writing():
            ingest(store, tmp_path / "more", dataset="more", labels="none")
            extract(store, [PixelsExtractor((8, 6))])
        assert embedding_map(store, "pixels8x6", "pca", n=30).available == 34


# -- thumbnails and files ----------------------------------------------------------------------


def _exif_rotated_jpeg(path: Path) -> Path:
    """A 60x20 JPEG (red left half, blue right half) with EXIF orientation 6 (display rotated 90° clockwise)."""
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def test_thumbnail_applies_exif_orientation(tmp_path: Path) -> None:
    data = _exif_rotated_jpeg(tmp_path / "r.jpg").read_bytes()
    thumb = Image.open(io.BytesIO(render_thumbnail(data, 128, 10**8)))
    assert thumb.size == (20, 60)  # upright: taller than wide, never enlarged
    top, bottom = np.asarray(thumb)[5, 10], np.asarray(thumb)[55, 10]
    assert top[0] > 200 and top[2] < 60  # rotated clockwise: the red (left) half is on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_thumbnail_endpoint_caches_and_revalidates(store_path: Path, tmp_path: Path) -> None:
    _exif_rotated_jpeg(tmp_path / "rot" / "r.jpg")
    crashed = store_path / "thumbnails" / "256" / "ab" / ".tmp-1-dead-x.jpg"  # a writer killed mid-write
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"half")
    os.utime(crashed, (1, 1))
    with Store.open(Settings(store=store_path)) as store, store.writing():
        (image_id,) = ingest(store, tmp_path / "rot", dataset="rot", labels="none").image_ids
        sha = store.select_images(image_ids=[image_id])[0]
    with _serving(store_path) as c:
        r = c.get(f"/v1/images/{image_id}/thumbnail", params={"size": 128})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (20, 60)
        with Store.open(Settings(store=store_path)) as store:
            found = store.catalog.image_file(image_id)
        assert found is not None and sha
        cached = thumbnail_path(store_path, found.sha256, 128)
        assert cached.read_bytes() == r.content
        assert not list(cached.parent.glob(".tmp-*")) and not crashed.exists()
        again = c.get(f"/v1/images/{image_id}/thumbnail", params={"size": 128},
                      headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        assert c.get(f"/v1/images/{image_id}/thumbnail", params={"size": 100}).status_code == 422


def test_file_endpoint_serves_only_unchanged_catalogued_files(client: TestClient, store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        _, path, _, _ = store.select_images(image_ids=[3])[0]
    r = client.get("/v1/images/3/file")
    assert r.status_code == 200 and r.content == Path(path).read_bytes()
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert "missing or" not in client.get("/v1/images/999/file").text
    assert client.get("/v1/images/999/file").json() == {"detail": "no image with id 999 in the catalog"}
    assert client.get("/v1/images/0/file").status_code == 422
    # The file was replaced since ingest (here by a symlink to another file): refused, nothing sent.
    other = Path(path).with_name("elsewhere.txt")
    other.write_text("secret")
    os.replace(path, str(path) + ".bak")
    os.symlink(other, path)
    changed = client.get("/v1/images/3/file")
    assert changed.status_code == 409 and "changed since it was ingested" in changed.json()["detail"]
    assert "secret" not in changed.text
    os.unlink(path)
    os.mkfifo(path)  # a FIFO must not hang the server
    assert client.get("/v1/images/3/thumbnail").status_code == 404
    os.unlink(path)
    gone = client.get("/v1/images/3/file")
    assert gone.status_code == 404 and "missing" in gone.json()["detail"]


# -- access: token, cookie, writes, path hiding ------------------------------------------------


def test_token_server_sends_browsers_to_login(store_path: Path) -> None:
    with _serving(store_path, api_token=TOKEN) as c:
        r = c.get("/ui/runs/1", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fruns%2F1"
        assert c.get("/v1/images/1/thumbnail").status_code == 401
        bad = c.post("/ui/login", data={"token": "nope", "next": "/ui/runs/1"}, follow_redirects=False)
        assert bad.status_code == 401 and "not the server's token" in unescape(bad.text)
        ok = c.post("/ui/login", data={"token": TOKEN, "next": "/ui/runs/1"}, follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/ui/runs/1"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and TOKEN not in cookie  # issue 30 item 7
        assert c.get("/ui/runs/1").status_code == 200  # the client keeps the cookie
        assert c.get("/v1/images/1/thumbnail").status_code == 200
        # Offsite "next" targets are not followed.
        evil = c.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/x"}, follow_redirects=False)
        assert evil.headers["location"] == "/ui/browse"
        c.post("/ui/logout")
        assert c.get("/ui/runs/1", follow_redirects=False).status_code == 303


def test_paths_hidden_unless_loopback_or_authenticated(store_path: Path) -> None:
    remote = ("203.0.113.9", 40000)
    for client_addr, settings, headers, visible in [
        (LOOPBACK, {}, {}, True),
        (remote, {}, {}, False),
        (remote, {"api_token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}, True),
        (LOOPBACK, {"api_token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}, True),
    ]:
        with _serving(store_path, client=client_addr, **settings) as c:
            body = c.get("/v1/images/2", headers=headers).json()
            hits = c.get("/v1/feature-sets/rp16/search", params={"image_id": 2, "k": 3}, headers=headers).json()
            c.cookies.set("fs_session", "x")
            page = c.get("/ui/images/2", headers=headers).text
        assert (body["path"] is not None) is visible, (client_addr, settings)
        assert all((h["path"] is not None) is visible for h in hits["results"])
        assert ('id="source-path"' in page) is visible
        if not visible:
            assert str(store_path.parent) not in page and str(store_path.parent) not in str(body)


def test_search_by_photo_stores_only_when_allowed_and_asked(store_path: Path) -> None:
    with Store.open(Settings(store=store_path)) as store:
        data = Path(store.select_images(image_ids=[4])[0][1]).read_bytes()
    files = {"file": ("q.png", data, "image/png")}
    with _serving(store_path) as c:  # read-only
        r = c.post("/ui/search", files=files, data={"features": "rp16", "k": "5", "run": "1"})
        assert r.status_code == 200, r.text[:300]
        assert re.findall(r'class="nb" href="/ui/images/(\d+)"', r.text)[0] == "4"
        assert 'id="prediction"' in r.text and "data:image/jpeg;base64," in r.text
        assert "this server is read-only" in r.text
        denied = c.post("/ui/search", files=files, data={"features": "rp16", "run": "1", "store": "1"})
        assert "does not store uploads" in _html_error(denied, 403)
    new = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(new, "PNG")
    upload = {"file": ("new.png", new.getvalue(), "image/png")}
    with _serving(store_path, api_token=TOKEN, allow_writes=True) as c:
        c.post("/ui/login", data={"token": TOKEN})
        plain = c.post("/ui/search", files=upload, data={"features": "rp16", "run": "1"})
        assert 'id="stored"' not in plain.text
        stored = c.post("/ui/search", files=upload, data={"features": "rp16", "run": "1", "store": "1"})
        assert stored.status_code == 200, stored.text[:300]
        image_id = int(re.search(r'id="stored">Stored as <a href="/ui/images/(\d+)"', stored.text).group(1))
    with Store.open(Settings(store=store_path)) as store:
        assert store.select_images(dataset="uploads")[0][0] == image_id


def test_bad_upload_is_an_html_error(client: TestClient) -> None:
    r = client.post("/ui/search", files={"file": ("x.txt", b"not an image", "text/plain")}, data={"run": ""})
    assert "not an image" in _html_error(r, 415)
    assert "choose or drop" in _html_error(client.post("/ui/search", data={"k": "3"}), 422)


# -- confusion math ----------------------------------------------------------------------------


def test_confusion_scores_match_scikit_learn() -> None:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y_true = rng.choice(["a", "b", "c", "d"], 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.choice(["a", "b", "c", "e"], 300))
    pairs: dict[tuple[str, str], int] = {}
    for t, p in zip(y_true, y_pred, strict=True):
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    conf = Confusion.from_counts((t, p, n) for (t, p), n in pairs.items())
    labels = conf.labels
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per = conf.per_class()
    assert [c.label for c in per] == labels
    for c, p, r, f, s in zip(per, precision, recall, f1, support, strict=True):
        assert c.support == s
        assert (c.precision or 0.0) == pytest.approx(p) and (c.recall or 0.0) == pytest.approx(r)
        assert (c.f1 or 0.0) == pytest.approx(f)
    assert conf.macro_f1() == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert conf.accuracy == pytest.approx(float(np.mean(y_true == y_pred)))


# -- fs report ---------------------------------------------------------------------------------


def test_report_is_self_contained(store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "run1.html"
    result = CliRunner().invoke(cli_app, ["--store", str(store_path), "report", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # every image is embedded
    assert html.count("data:image/jpeg;base64,") == 3  # the three confident mistakes
    assert "<svg" in html and "Computed from this run's stored predictions" in unescape(html)
    assert str(store_path.parent) not in html
    assert "default-src 'none'" in unescape(html)


def test_report_errors(store_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["--store", str(store_path), "report", "9", "--out", str(tmp_path / "r.html")])
    assert missing.exit_code == 1 and "unknown run '9'" in missing.output
    assert runner.invoke(cli_app, ["--store", str(store_path), "report", "1"]).exit_code == 2
    assert "Example: fs report 3 --out run3.html" in runner.invoke(cli_app, ["report", "--help"]).output


def test_compare_page_fixed_test_runs_use_mcnemar(store_path: Path, client: TestClient) -> None:
    with Store.open(Settings(store=store_path)) as store, store.writing():
        cfg = TrainConfig(["rp16"], trees=10, dataset="shoes", test_dataset="later")
        a, b = (o.run_id for o in evaluate_many(store, [["rp16"], ["pixels8x6"]], cfg))
    html = client.get("/ui/compare", params=[("run", a), ("run", b)]).text
    assert 'id="mcnemar"' in html and 'id="ttest"' not in html and "test dataset later" in html
    assert "only A right" in html and "test images" in html
    mixed = client.get("/ui/compare", params=[("run", a), ("run", 2)]).text
    assert 'id="refusal"' in mixed and "repeated random splits" in mixed
