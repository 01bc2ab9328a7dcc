"""Tests of the HTTP service end to end (featurestore.http: app, routes, deps, errors) on one built store.

Route modules alone: test_http_routes.py; `fs serve` and binding: test_http_serve.py."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from featurestore.config import Settings
from featurestore.features.projection import projection_extractor
from featurestore.http.app import create_app
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, train
from featurestore.store import Store
from helpers import make_image

TOKEN = "s3cret-token"
CLASSES = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]


def _png(seed: int = 99, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header announces width x height pixels (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with 2 datasets (24 labelled + 2 unlabelled images), rp16 and one trained run."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "shoes"
    seed = 0
    for sc, cls in CLASSES:
        for k in range(8):
            make_image(root / sc / cls / f"{cls}{k}.png", seed=seed)
            seed += 1
    extra = base / "extra"
    for k in range(2):
        make_image(extra / f"x{k}.png", seed=100 + k)
    settings = Settings(store=base / ".fs", workers=2)
    with Store.open(settings, create=True) as store:
        with store.writing():
            ingest(store, root, dataset="shoes")
            ingest(store, extra, dataset="extra", labels="none")
            extract(store, [projection_extractor(store, 16, (32, 24))])
            train(store, TrainConfig(["rp16"], n_splits=2, trees=10))
    return base / ".fs"


@pytest.fixture
def store_path(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built store (tests may write to it)."""
    dest = tmp_path / "copy.fs"
    shutil.copytree(built, dest)
    return dest


@contextmanager
def _serving(path: Path, **settings: Any) -> Iterator[TestClient]:
    app = create_app(Settings(store=path, workers=2).replace(**settings))
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client


@pytest.fixture
def client(built: Path) -> Iterator[TestClient]:
    with _serving(built) as c:
        yield c


@pytest.fixture
def writer(store_path: Path) -> Iterator[TestClient]:
    with _serving(store_path, api_token=TOKEN, allow_writes=True) as c:
        yield c


def _error(resp, status: int) -> str:  # type: ignore[no-untyped-def]
    """The message of an error response, checking its status and FastAPI's ``{"detail": "..."}`` shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


# --- read endpoints -----------------------------------------------------------------------


def test_health_and_openapi(client: TestClient) -> None:
    r = client.get("/v1/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["allow_writes"] is False
    spec = client.get("/openapi.json").json()
    for path in ["/v1/datasets", "/v1/feature-sets", "/v1/images/{image_id}", "/v1/feature-sets/{name}/search",
                 "/v1/feature-sets/{name}/vectors/{image_id}", "/v1/runs", "/v1/runs/{run_id}/predict"]:
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_datasets_and_feature_sets(client: TestClient) -> None:
    ds = {d["name"]: d["images"] for d in client.get("/v1/datasets").json()}
    assert ds == {"shoes": 24, "extra": 2}
    (fs,) = client.get("/v1/feature-sets").json()
    assert fs["name"] == "rp16" and fs["dim"] == 16 and fs["images"] == 26 and fs["coverage"] == 1.0


def test_image_metadata(client: TestClient) -> None:
    body = client.get("/v1/images/1").json()
    assert body["id"] == 1 and body["datasets"] == ["shoes"] and body["label"] in {"sneaker", "sandal", "shirt"}
    assert body["feature_sets"] == ["rp16"] and len(body["sha256"]) == 64
    assert "no image with id 999" in _error(client.get("/v1/images/999"), 404)
    _error(client.get("/v1/images/0"), 422)
    _error(client.get("/v1/images/abc"), 422)
    _error(client.get(f"/v1/images/{2**70}"), 422)


def test_vector_matches_read_matrix(client: TestClient, built: Path) -> None:
    body = client.get("/v1/feature-sets/rp16/vectors/3").json()
    with Store.open(Settings(store=built)) as store:
        expected = store.read_matrix(["rp16"], image_ids=[3]).X[0]
    assert body["dim"] == 16
    np.testing.assert_allclose(body["vector"], expected, rtol=1e-6)
    assert "unknown feature set 'nope'" in _error(client.get("/v1/feature-sets/nope/vectors/3"), 404)
    _error(client.get("/v1/feature-sets/rp16/vectors/999"), 404)


def test_search_by_id_with_filters(client: TestClient) -> None:
    r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_id"] == 1 and body["metric"] == "cosine"
    hits = body["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert 1 not in [h["image_id"] for h in hits]
    scores = [h["similarity"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)

    only = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "k": 50, "label": "shirt"}).json()
    assert len(only["results"]) == 8 and {h["label"] for h in only["results"]} == {"shirt"}
    extra = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "dataset": "extra"}).json()
    assert len(extra["results"]) == 2 and all(h["label"] is None for h in extra["results"])
    both = client.get("/v1/feature-sets/rp16/search",
                      params={"image_id": 1, "dataset": "extra", "label": "shirt"}).json()
    assert both["results"] == []
    l2 = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "metric": "l2"}).json()
    assert [h["distance"] for h in l2["results"]] == sorted(h["distance"] for h in l2["results"])


def test_search_filters_are_not_sql(client: TestClient) -> None:
    sneaky = "x' OR '1'='1"
    r = client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "label": sneaky})
    assert r.status_code == 200 and r.json()["results"] == []
    assert "unknown dataset" in _error(
        client.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "dataset": sneaky}), 404)


@pytest.mark.parametrize(("params", "status"), [
    ({"image_id": 1, "k": 0}, 422),
    ({"image_id": 1, "k": 100000}, 422),
    ({"image_id": 1, "k": "many"}, 422),
    ({"image_id": 1, "metric": "manhattan"}, 422),
    ({}, 422),
    ({"image_id": 999}, 404),
    ({"image_id": 1, "label": "a\x00b"}, 422),
])
def test_search_bad_params(client: TestClient, params: dict, status: int) -> None:
    _error(client.get("/v1/feature-sets/rp16/search", params=params), status)


def test_search_by_upload(client: TestClient, built: Path) -> None:
    with Store.open(Settings(store=built)) as store:
        path = store.select_images(image_ids=[4])[0][1]
    data = Path(path).read_bytes()
    r = client.post("/v1/feature-sets/rp16/search", files={"file": ("q.png", data, "image/png")},
                    data={"k": "3", "dataset": "shoes"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["upload"]["format"] == "PNG" and body["image_id"] is None
    # The same content as image 4 is its own nearest neighbour.
    assert body["results"][0]["image_id"] == 4 and body["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    _error(client.post("/v1/feature-sets/nope/search", files={"file": ("q.png", data)}), 404)
    _error(client.post("/v1/feature-sets/rp16/search"), 422)


def test_runs_and_run(client: TestClient) -> None:
    (run,) = client.get("/v1/runs").json()
    assert run["id"] == 1 and run["features"] == ["rp16"] and run["has_model"] is True
    assert 0 <= run["accuracy_mean"] <= 1
    detail = client.get("/v1/runs/1").json()
    assert len(detail["split_accuracies"]) == 2
    assert detail["feature_versions"] == {"rp16": 1}  # issue 26: the version of each set the run read
    assert "unknown run '7'" in _error(client.get("/v1/runs/7"), 404)


# --- predict ------------------------------------------------------------------------------


def test_predict_read_only(client: TestClient, built: Path) -> None:
    with Store.open(Settings(store=built)) as store:
        image_id, path, label, _ = store.select_images(image_ids=[5])[0]
    r = client.post("/v1/runs/1/predict", files={"file": ("a.png", Path(path).read_bytes(), "image/png")},
                    data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stored"] is False and body["image_id"] is None
    assert len(body["top"]) == 3 and {t["label"] for t in body["top"]} == {"sneaker", "sandal", "shirt"}
    assert sum(t["probability"] for t in body["top"]) == pytest.approx(1.0)
    assert body["label"] == body["top"][0]["label"]
    # Same as the library's prediction of the stored vector.
    from featurestore.pipelines.train import get_run

    with Store.open(Settings(store=built)) as store:
        model = store.run_model(get_run(store, 1))
        X = store.read_matrix(["rp16"], image_ids=[image_id]).X
        proba = model.predict_proba(X)[0]
    assert body["probability"] == pytest.approx(float(proba.max()), abs=1e-6)
    assert "unknown run '9'" in _error(
        client.post("/v1/runs/9/predict", files={"file": ("a.png", _png(), "image/png")}), 404)


def test_predict_store_needs_allow_writes(client: TestClient) -> None:
    msg = _error(client.post("/v1/runs/1/predict", files={"file": ("a.png", _png(), "image/png")},
                             data={"store": "true"}), 403)
    assert "--allow-writes" in msg


def test_predict_store_auth(writer: TestClient, store_path: Path) -> None:
    files = {"file": ("new.png", _png(7), "image/png")}
    _error(writer.post("/v1/runs/1/predict", files=files, data={"store": "true"}), 401)
    wrong = writer.post("/v1/runs/1/predict", files=files, data={"store": "true"},
                        headers={"Authorization": "Bearer nope"})
    assert "bearer token" in _error(wrong, 401)
    assert wrong.headers["www-authenticate"] == "Bearer"
    ok = writer.post("/v1/runs/1/predict", files=files, data={"store": "true"},
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["stored"] is True and body["image_id"] == 27
    sha = body["upload"]["sha256"]
    assert (store_path / "uploads" / f"{sha}.png").is_file()
    with Store.open(Settings(store=store_path)) as store:
        from sqlalchemy import select

        from featurestore.catalog.schema import Prediction

        with store.session() as s:
            rows = s.execute(select(Prediction.image_id, Prediction.label, Prediction.probability)).all()
        assert rows == [(27, body["label"], pytest.approx(body["probability"], abs=1e-6))]
        assert store.select_images(dataset="uploads")[0][0] == 27
    # The stored image is searchable right away (the index reloads when the shard list changes).
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = writer.get("/v1/feature-sets/rp16/search", params={"image_id": 1, "k": 100}, headers=auth).json()
    assert 27 in [h["image_id"] for h in before["results"]]
    again = writer.post("/v1/runs/1/predict", files=files, data={"store": "true"}, headers=auth)
    assert again.status_code == 200 and again.json()["image_id"] == 27


def test_token_guards_reads(store_path: Path) -> None:
    with _serving(store_path, api_token=TOKEN) as client:
        assert client.get("/v1/health").status_code == 200
        _error(client.get("/v1/datasets"), 401)
        _error(client.get("/v1/datasets", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # A token alone does not enable writes.
        r = client.post("/v1/runs/1/predict", files={"file": ("a.png", _png(), "image/png")},
                        data={"store": "true"}, headers={"Authorization": f"Bearer {TOKEN}"})
        _error(r, 403)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"])
def test_token_guards_docs(store_path: Path, path: str) -> None:
    """Issue 11: the API description and its viewers need the token too; only /v1/health stays open."""
    with _serving(store_path, api_token=TOKEN) as client:
        assert "bearer token" in _error(client.get(path), 401)
        assert "bearer token" in _error(client.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        ok = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        assert client.get("/v1/health").status_code == 200
    with _serving(store_path) as open_client:  # without a token everything is open, as before
        assert open_client.get(path).status_code == 200


def test_docs_pages_point_at_the_spec(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.headers["content-type"].startswith("text/html") and "/openapi.json" in r.text
        # offline: every script and style comes from this server, nothing from a CDN or Google Fonts
        assert "http://" not in r.text and "https://" not in r.text, r.text
    spec = client.get("/openapi.json").json()
    assert "/openapi.json" not in spec["paths"] and "/docs" not in spec["paths"]
    assert spec["components"]["schemas"]["ErrorOut"]["required"] == ["detail"]


def test_docs_assets_are_served_locally(client: TestClient) -> None:
    for name, kind, marker in [("swagger-ui-bundle.js", "text/javascript", "SwaggerUIBundle"),
                               ("swagger-ui.css", "text/css", ".swagger-ui"),
                               ("redoc.standalone.js", "text/javascript", "Redoc")]:
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert marker in r.text and "max-age" in r.headers["cache-control"]
    assert client.get("/docs/assets/..%2Fopenapi.json").status_code == 404  # only the listed files
    assert "unknown docs asset 'x.js'" in _error(client.get("/docs/assets/x.js"), 404)


def test_error_shape_per_status(store_path: Path, tmp_path: Path) -> None:
    """Every error status answers FastAPI's {"detail": "<message>"}, chosen by the error's type."""
    from featurestore.io.lock import write_lock

    make_image(tmp_path / "later" / "new.png", seed=500)
    with Store.open(Settings(store=store_path)) as other, other.writing():
        ingest(other, tmp_path / "later", dataset="later", labels="none")  # image 27: no vector yet
    auth = {"Authorization": f"Bearer {TOKEN}"}
    png = {"file": ("a.png", _png(), "image/png")}
    with _serving(store_path, api_token=TOKEN, allow_writes=True, max_upload_mb=1, lock_timeout=0.2) as client:
        _error(client.get("/v1/datasets"), 401)
        assert "no vector in rp16" in _error(client.get("/v1/feature-sets/rp16/vectors/27", headers=auth), 409)
        _error(client.get("/v1/images/999", headers=auth), 404)
        _error(client.put("/v1/images/1", headers=auth), 405)
        _error(client.post("/v1/runs/1/predict", headers=auth, files={"file": ("b.png", b"x" * 2**21)}), 413)
        _error(client.post("/v1/runs/1/predict", headers=auth, files={"file": ("t.txt", b"text")}), 415)
        _error(client.get("/v1/images/0", headers=auth), 422)
        with write_lock(store_path, 1):
            assert "store is busy" in _error(
                client.post("/v1/runs/1/predict", headers=auth, files=png, data={"store": "true"}), 503)
    with _serving(store_path) as client:
        _error(client.post("/v1/runs/1/predict", files=png, data={"store": "true"}), 403)
        for shard in (store_path / "features" / "rp16").glob("*.h5"):
            shard.unlink()
        _error(client.get("/v1/feature-sets/rp16/vectors/1"), 500)


# --- bad uploads --------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/v1/feature-sets/rp16/search", "/v1/runs/1/predict"])
def test_bad_uploads(client: TestClient, endpoint: str) -> None:
    text = client.post(endpoint, files={"file": ("notes.txt", b"hello, not an image", "text/plain")})
    assert "not an image" in _error(text, 415)
    _error(client.post(endpoint, files={"file": ("empty.png", b"", "image/png")}), 415)
    bomb = client.post(endpoint, files={"file": ("bomb.png", _bomb_png(), "image/png")})
    assert "decompression bomb" in _error(bomb, 413)
    truncated = _png()[:200]
    _error(client.post(endpoint, files={"file": ("cut.png", truncated, "image/png")}), 422)
    # A header Pillow recognises (IPTC) but fails to parse with OSError: was an unhandled 500.
    _error(client.post(endpoint, files={"file": ("iptc.jpg", b"\x1c\x01\x01\x90\x00\x00", "image/jpeg")}), 422)


def test_upload_size_limit(store_path: Path) -> None:
    with _serving(store_path, max_upload_mb=1) as client:
        big = _png(size=(1200, 1000))  # random pixels do not compress: about 3.6 MB
        assert len(big) > 2**20
        r = client.post("/v1/feature-sets/rp16/search", files={"file": ("big.png", big, "image/png")})
        assert "upload limit" in _error(r, 413)

        # A body without Content-Length is counted while it is received.
        def chunks() -> Iterator[bytes]:
            boundary = b"--xyz"
            yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="b.png"\r\n\r\n'
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]
            yield b"\r\n" + boundary + b"--\r\n"

        r = client.post("/v1/feature-sets/rp16/search", content=chunks(),
                        headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        _error(r, 413)
        ok = client.post("/v1/feature-sets/rp16/search", files={"file": ("ok.png", _png(), "image/png")})
        assert ok.status_code == 200, ok.text


def test_unknown_route_is_json(client: TestClient) -> None:
    _error(client.get("/v1/nothing"), 404)
    _error(client.delete("/v1/datasets"), 405)


# --- consistency with concurrent writers --------------------------------------------------


def test_sees_vectors_written_by_another_process(client_on_copy: TestClient, store_path: Path,
                                                  tmp_path: Path) -> None:
    params = {"image_id": 1, "k": 100}
    before = client_on_copy.get("/v1/feature-sets/rp16/search", params=params).json()["results"]
    assert len(before) == 25
    # Another Store object (as `fs ingest` + `fs extract` in another process) adds an image and its vector.
    make_image(tmp_path / "later" / "new.png", seed=500)
    with Store.open(Settings(store=store_path)) as other, other.writing():
        ingest(other, tmp_path / "later", dataset="later", labels="none")
        extract(other, [projection_extractor(other, 16, (32, 24))])
    after = client_on_copy.get("/v1/feature-sets/rp16/search", params=params).json()["results"]
    assert len(after) == 26 and 27 in [h["image_id"] for h in after]
    sets = client_on_copy.get("/v1/feature-sets").json()
    assert sets[0]["images"] == 27 and sets[0]["shards"] == 2


def test_broken_shard_is_a_500_with_message(client_on_copy: TestClient, store_path: Path) -> None:
    for shard in (store_path / "features" / "rp16").glob("*.h5"):
        shard.unlink()
    msg = _error(client_on_copy.get("/v1/feature-sets/rp16/vectors/1"), 500)
    assert "missing or unreadable" in msg


@pytest.fixture
def client_on_copy(store_path: Path) -> Iterator[TestClient]:
    with _serving(store_path) as c:
        yield c


def test_predict_store_known_content_is_not_copied(writer: TestClient, store_path: Path, built: Path) -> None:
    with Store.open(Settings(store=built)) as store:
        path = store.select_images(image_ids=[6])[0][1]
    r = writer.post("/v1/runs/1/predict", files={"file": ("dup.png", Path(path).read_bytes(), "image/png")},
                    data={"store": "true"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.json()["image_id"] == 6
    assert not (store_path / "uploads").exists()
