"""Images in object storage: `fs ingest s3://...`, extraction, thumbnails and the file endpoint read the bucket."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.http.app import create_app
from featurestore.io import objects
from featurestore.store import Store
from helpers import make_image

pytestmark = pytest.mark.s3
runner = CliRunner()


def fs(*args: str) -> Any:
    return runner.invoke(app, list(args))


def _upload(tmp_path: Path, url: str, key: str, seed: int, fmt: str = "PNG") -> bytes:
    path = make_image(tmp_path / "src" / f"{seed}.{fmt.lower()}", seed=seed, fmt=fmt)
    data = path.read_bytes()
    objects.write_object(url + key, data)
    return data


@pytest.fixture
def photos(s3_prefix: str, tmp_path: Path) -> dict[str, bytes]:
    """Under the prefix: three good images in class folders, a corrupt one, a truncated one, a text file."""
    good = {
        "shoes/boot/a.png": _upload(tmp_path, s3_prefix, "shoes/boot/a.png", 1),
        "shoes/sandal/b.jpg": _upload(tmp_path, s3_prefix, "shoes/sandal/b.jpg", 2, "JPEG"),
        "top.png": _upload(tmp_path, s3_prefix, "top.png", 3),
    }
    objects.write_object(s3_prefix + "shoes/boot/corrupt.png", b"\x89PNG\r\n\x1a\nnot really")
    jpeg = good["shoes/sandal/b.jpg"]
    objects.write_object(s3_prefix + "shoes/boot/cut.jpg", jpeg[:len(jpeg) // 2])
    objects.write_object(s3_prefix + "notes.txt", b"not an image")
    objects.write_object(s3_prefix + ".hidden/x.png", good["top.png"])
    return good


def _images() -> dict[str, dict]:
    out = fs("sql", "SELECT id, source_path, label, superclass FROM images", "--format", "json")
    assert out.exit_code == 0, out.output
    return {r["source_path"]: r for r in json.loads(out.stdout)}


def test_ingest_lists_and_validates_objects(s3_prefix: str, photos: dict[str, bytes]) -> None:
    result = fs("ingest", s3_prefix, "--dataset", "shoes")
    assert result.exit_code == 0, result.output
    assert "shoes: 5 files: 3 new, 0 duplicates, 2 failed" in result.stderr
    assert f"failed: {s3_prefix}shoes/boot/corrupt.png: " in result.stderr
    assert f"failed: {s3_prefix}shoes/boot/cut.jpg: corrupt or truncated JPEG" in result.stderr
    rows = _images()
    assert set(rows) == {s3_prefix + k for k in photos}  # the source URL is recorded
    assert (rows[s3_prefix + "shoes/boot/a.png"]["label"], rows[s3_prefix + "shoes/boot/a.png"]["superclass"]) == (
        "boot", "shoes")
    assert rows[s3_prefix + "top.png"]["label"] is None
    again = fs("ingest", s3_prefix, "--dataset", "shoes")  # same objects: nothing new
    assert again.exit_code == 0 and "0 new, 3 duplicates" in again.stderr


def test_ingest_applies_the_size_cap(s3_prefix: str, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    big = make_image(tmp_path / "big.png", size=(600, 600), seed=9)
    objects.write_object(s3_prefix + "big/huge.png", big.read_bytes())
    monkeypatch.setenv("FS_MAX_FILE_MB", str(big.stat().st_size / 2 / 2**20))
    result = fs("ingest", s3_prefix + "big/", "--dataset", "big")
    assert result.exit_code == 1, result.output
    assert f"failed: {s3_prefix}big/huge.png: file is larger than the" in result.stderr
    assert "FS_MAX_FILE_MB" in result.stderr


def test_ingest_errors_are_one_line(s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = fs("ingest", "s3://no-such-bucket-here/photos/", "--dataset", "d")
    assert missing.exit_code == 1
    err = missing.stderr.strip()
    assert err.startswith("Error: bucket 'no-such-bucket-here' does not exist") and "\n" not in err, err
    empty = fs("ingest", s3_prefix + "nothing-here/", "--dataset", "d")
    assert empty.exit_code == 1 and "no image files under" in empty.stderr
    csv_labels = fs("ingest", s3_prefix, "--dataset", "d", "--labels", "csv:x.csv")
    assert csv_labels.exit_code == 1 and "label objects by their key" in csv_labels.stderr
    monkeypatch.setenv("FS_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("FS_S3_TIMEOUT", "2")
    down = fs("ingest", s3_prefix, "--dataset", "d")
    assert down.exit_code == 1 and "set FS_S3_ENDPOINT" in down.stderr and "Traceback" not in down.output


def test_extract_thumbnail_and_file_read_the_bucket(s3_prefix: str, photos: dict[str, bytes],
                                                    tmp_path: Path) -> None:
    assert fs("ingest", s3_prefix, "--dataset", "shoes").exit_code == 0
    extracted = fs("extract", "--rp", "16", "--size", "32x24")
    assert extracted.exit_code == 0, extracted.output
    rows = _images()
    store_path = tmp_path / ".fs"
    with Store.open(Settings(store=store_path)) as store:
        m = store.read_matrix(["rp16"])
    assert len(m.image_ids) == 3 and m.X.shape == (3, 16) and np.isfinite(m.X).all() and m.X.std() > 0
    assert sorted(m.paths) == sorted(s3_prefix + k for k in photos)
    boot = rows[s3_prefix + "shoes/boot/a.png"]["id"]
    with TestClient(create_app(Settings(store=store_path, workers=2)), client=("127.0.0.1", 50000)) as c:
        got = c.get(f"/v1/images/{boot}/file")
        assert got.status_code == 200 and got.content == photos["shoes/boot/a.png"]
        thumb = c.get(f"/v1/images/{boot}/thumbnail", params={"size": 128})
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (64, 48)
        # The object is replaced by other bytes: refused as changed; deleted: not found.
        objects.write_object(s3_prefix + "shoes/boot/a.png", photos["top.png"])
        changed = c.get(f"/v1/images/{boot}/file")
        assert changed.status_code == 409 and "changed since it was ingested" in changed.json()["detail"]
        objects.delete_object(s3_prefix + "shoes/boot/a.png")
        assert c.get(f"/v1/images/{boot}/file").status_code == 404


def test_one_object_is_ingested_and_searched_by_url(s3_prefix: str, photos: dict[str, bytes]) -> None:
    assert fs("ingest", s3_prefix, "--dataset", "shoes").exit_code == 0
    assert fs("extract", "--rp", "16", "--size", "32x24").exit_code == 0
    found = fs("search", "--features", "rp16", "--image", s3_prefix + "top.png", "-k", "1", "--format", "json")
    assert found.exit_code == 0, found.output
    (hit,) = json.loads(found.stdout)
    assert hit["path"] == s3_prefix + "top.png" and hit["distance"] < 1e-6  # the same bytes as the stored image
    objects.write_object(s3_prefix + "more/new.png", make_image_bytes(7))
    one = fs("ingest", s3_prefix + "more/new.png")  # one object, like one file: dataset = its "folder"
    assert one.exit_code == 0, one.output
    assert "more: 1 files: 1 new" in one.stderr
    assert s3_prefix + "more/new.png" in _images()
    gone = fs("search", "--features", "rp16", "--image", s3_prefix + "gone.png")
    assert gone.exit_code == 1 and "gone.png: object not found" in gone.stderr


def make_image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
