"""Route modules of featurestore.http tested alone: each router on a bare FastAPI app, its
dependencies replaced with ``app.dependency_overrides``; and the error-type -> status table."""

from __future__ import annotations

import io
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from featurestore.catalog.repository import DatasetCount, ImageDetail
from featurestore.config import Settings
from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    ImageNotFoundError,
    IntegrityError,
    InvalidInputError,
    MissingFeaturesError,
    NotFoundError,
    NoVectorError,
    PayloadTooLargeError,
    StoreBusyError,
    UnsupportedMediaError,
)
from featurestore.http import errors
from featurestore.http.deps import Upload, authenticate, get_settings, get_store, read_upload
from featurestore.http.errors import UnauthorizedError, WritesDisabledError, status_for
from featurestore.http.routes import datasets, health, images, runs
from featurestore.io.images import ImageDecodeError, ImageTooLargeError, NotAnImageError, decode_bytes

TOKEN = "t0ken"


class FakeCatalog:
    """The few catalog queries the routes under test make, answered from memory."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def dataset_counts(self) -> list[DatasetCount]:
        self.calls.append("dataset_counts")
        return [DatasetCount("a", 3, datetime(2024, 1, 2)), DatasetCount("b", 0, None)]

    def image_detail(self, image_id: int) -> Any:
        self.calls.append(f"image_detail({image_id})")
        if image_id != 7:
            return None
        img = SimpleNamespace(id=7, sha256="ab" * 32, source_path="/x/7.png", label="shirt", superclass="tops",
                              width=4, height=3, format="PNG", mode="RGB", bytes=99, ingested_at=None)
        return ImageDetail(img, ["a"], ["rp16"])

    def run(self, run_id: int) -> Any:
        raise NotFoundError("run", str(run_id), ["1"], "See `fs runs`")

    def runs(self) -> list[Any]:
        return []


def _app(router: APIRouter, settings: Settings | None = None,
         overrides: dict[Any, Any] | None = None) -> tuple[FastAPI, FakeCatalog]:
    """One router on a bare app with the error handlers; the store is a fake, the settings given."""
    catalog = FakeCatalog()
    settings = settings or Settings()
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.settings = settings  # read by featurestore.http.access (who may see server paths)
    app.dependency_overrides[get_store] = lambda: SimpleNamespace(catalog=catalog)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides.update(overrides or {})
    return app, catalog


def test_datasets_route_alone() -> None:
    app, catalog = _app(datasets.router)
    body = TestClient(app).get("/v1/datasets").json()
    assert body == [{"name": "a", "images": 3, "created_at": "2024-01-02T00:00:00"},
                    {"name": "b", "images": 0, "created_at": None}]
    assert catalog.calls == ["dataset_counts"]


def test_router_carries_its_authentication() -> None:
    """A route module guards itself: with a token in the settings it answers 401 until authenticate is satisfied."""
    app, catalog = _app(datasets.router, Settings(api_token=TOKEN))
    client = TestClient(app)
    r = client.get("/v1/datasets")
    assert r.status_code == 401 and r.json() == {"detail": str(UnauthorizedError())}
    assert r.headers["www-authenticate"] == "Bearer"
    assert catalog.calls == []
    assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    app.dependency_overrides[authenticate] = lambda: None
    assert client.get("/v1/datasets").status_code == 200


def test_health_route_alone_needs_no_token() -> None:
    app, _ = _app(health.router, Settings(api_token=TOKEN, allow_writes=True))
    body = TestClient(app).get("/v1/health").json()
    assert body["status"] == "ok" and body["allow_writes"] is True


def test_images_route_alone() -> None:
    app, catalog = _app(images.router)
    client = TestClient(app)
    body = client.get("/v1/images/7").json()
    assert body["id"] == 7 and body["datasets"] == ["a"] and body["feature_sets"] == ["rp16"]
    missing = client.get("/v1/images/8")
    assert missing.status_code == 404 and missing.json() == {"detail": "no image with id 8 in the catalog"}
    assert catalog.calls == ["image_detail(7)", "image_detail(8)"]


def test_runs_route_alone() -> None:
    app, _ = _app(runs.router)
    client = TestClient(app)
    assert client.get("/v1/runs").json() == []
    r = client.get("/v1/runs/3")
    assert r.status_code == 404 and "unknown run '3'" in r.json()["detail"]


def test_predict_refuses_to_store_before_reading_the_upload() -> None:
    """store=true on a read-only server is a 403 before the upload is read (read_upload overridden to tell)."""
    read: list[int] = []

    def fake_read_upload() -> Upload:
        read.append(1)
        raise AssertionError("the upload must not be read")

    app, _ = _app(runs.router, overrides={read_upload: fake_read_upload})
    r = TestClient(app).post("/v1/runs/1/predict", files={"file": ("a.png", b"whatever", "image/png")},
                             data={"store": "true"})
    assert r.status_code == 403 and r.json() == {"detail": str(WritesDisabledError())}
    assert read == []


# --- the status of an error follows its type, never its message ---------------------------


@pytest.mark.parametrize(("exc", "status"), [
    (UnauthorizedError(), 401),
    (WritesDisabledError(), 403),
    (NotFoundError("run", "9"), 404),
    (ImageNotFoundError(9), 404),
    (MissingFeaturesError("rp16", 3, "fs extract --rp 16"), 409),
    (NoVectorError(9, "rp16", "fs extract --rp 16"), 409),
    (PayloadTooLargeError("x"), 413),
    (ImageTooLargeError("x"), 413),
    (UnsupportedMediaError("x"), 415),
    (NotAnImageError("x"), 415),
    (ImageDecodeError("x"), 422),
    (InvalidInputError("x"), 422),
    (DimensionMismatchError("x"), 422),
    (IntegrityError("x"), 500),
    (StoreBusyError(12, "/s/write.lock"), 503),
    (FeatureStoreError("x"), 400),
])
def test_status_by_type(exc: Exception, status: int) -> None:
    assert status_for(exc) == status


def test_status_ignores_the_message() -> None:
    same = "decompression bomb: not an image; cannot be stored"
    assert [status_for(cls(same)) for cls in (InvalidInputError, UnsupportedMediaError, PayloadTooLargeError)] == [
        422, 415, 413]


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("data", "kind"), [
    (b"", NotAnImageError),
    (b"hello, not an image", NotAnImageError),
    (b"\x1c\x01\x01\x90\x00\x00", ImageDecodeError),  # an IPTC header Pillow rejects with OSError (was a 500)
    (_png()[:200], ImageDecodeError),  # truncated
])
def test_decode_errors_carry_their_kind(data: bytes, kind: type) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_bytes(data)
    assert type(info.value) is kind


def test_decode_bomb_is_too_large() -> None:
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_bytes(_png((100, 100)), max_pixels=99)
