"""A store in a bucket (FS_STORE=s3://bucket/prefix) with a PostgreSQL catalog, on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.io import objects
from featurestore.store import Store
from helpers import count_hashing

pytestmark = [pytest.mark.s3, pytest.mark.postgres]
runner = CliRunner()


def fs(*args: str) -> Any:
    return runner.invoke(app, list(args))


@pytest.fixture
def bucket_store(s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """FS_STORE=<a fresh prefix>/store, a fresh PostgreSQL catalog and a private read cache."""
    from conftest import PG_URL, _pg_database

    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    gen = _pg_database()
    monkeypatch.setenv("FS_DATABASE_URL", next(gen))
    url = s3_prefix + "store"
    monkeypatch.setenv("FS_STORE", url)
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-a"))
    yield url
    gen.close()


def _keys(url: str) -> list[str]:
    return [str(o.url) for o in objects.list_objects(url + "/")]


def test_sqlite_catalog_is_refused_and_a_postgres_one_accepted() -> None:
    with pytest.raises(InvalidInputError, match=r"FS_STORE=s3://b/p: .*set FS_DATABASE_URL="):
        Settings(store="s3://b/p", database_url="sqlite:///x.db")
    settings = Settings(store="s3://b/p", database_url="postgresql+psycopg2://u@h/db")
    assert settings.store_url == "s3://b/p"
    with pytest.raises(InvalidInputError, match="names no bucket; set FS_STORE=s3://BUCKET/PREFIX"):
        Settings(store="s3://", database_url="postgresql+psycopg2://u@h/db")


def test_shards_live_in_the_bucket_and_another_machine_reads_them(bucket_store: str, image_tree: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    out = fs("extract", "--rp", "16", "--size", "32x24")
    assert out.exit_code == 0, out.output
    keys = _keys(bucket_store)
    shards = [k for k in keys if k.startswith(bucket_store + "/features/rp16/") and k.endswith(".h5")]
    assert len(shards) == 1 and any("/projections/rp16-" in k for k in keys), keys
    assert not (Path.cwd() / "s3:").exists()
    with Store.open(Settings.from_env()) as store:
        first = store.read_matrix(["rp16"])
        rel = store.catalog.shard_refs()
        [path] = rel.values()
        assert (bucket_store + "/" + path) in shards
    # Another machine: nothing local but the catalog URL, the bucket and an empty cache.
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-b"))
    with Store.open(Settings.from_env()) as store:
        second = store.read_matrix(["rp16"])
        assert np.array_equal(first.X, second.X) and np.array_equal(first.image_ids, second.image_ids)
        assert first.X.shape == (12, 16)
    assert list((tmp_path / "cache-b" / "objects").rglob("*"))  # read through the cache
    # ...and extends the set: the projection matrix comes from the bucket, so a copy of an image projects
    # exactly like the stored one.
    copy = tmp_path / "more" / "again.png"
    copy.parent.mkdir()
    from PIL import Image

    Image.open(first.paths[0]).save(copy)  # lossless: the same pixels as the stored image decodes to
    assert fs("ingest", str(copy.parent), "--dataset", "more").exit_code == 0
    out = fs("extract", "--rp", "16", "--size", "32x24")
    assert out.exit_code == 0, out.output
    out = fs("search", "--features", "rp16", "--id", str(int(first.image_ids[0])), "-k", "1", "--format", "json")
    assert out.exit_code == 0, out.output
    [hit] = json.loads(out.stdout)
    assert hit["path"].endswith("again.png") and hit["distance"] < 1e-4, hit


def test_an_object_that_no_longer_matches_its_sha256_is_an_integrity_error(bucket_store: str, image_tree: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    assert fs("extract", "--rp", "8", "--size", "32x24").exit_code == 0
    [key] = [k for k in _keys(bucket_store) if k.endswith(".h5")]
    data = bytearray(objects.read_object(key))
    data[-100] ^= 0xFF
    objects.write_object(key, bytes(data))
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-fresh"))  # no good copy cached
    with Store.open(Settings.from_env()) as store, pytest.raises(IntegrityError, match="does not match the sha256"):
        store.read_matrix(["rp8"])
    out = fs("train", "--features", "rp8")
    assert out.exit_code == 1 and "does not match the sha256" in out.stderr and "Traceback" not in out.output


def test_the_orphan_sweep_deletes_old_unregistered_objects_only(bucket_store: str, image_tree: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    assert fs("extract", "--rp", "8", "--size", "32x24").exit_code == 0
    orphan = bucket_store + "/features/rp8/rp8-20200101T000000-deadbeef.h5"
    objects.write_object(orphan, b"left by a writer killed before it registered this")
    with Store.open(Settings.from_env()) as store:
        with store.writing():
            pass
        assert orphan in _keys(bucket_store)  # younger than the grace period: maybe a live writer's
    monkeypatch.setenv("FS_ORPHAN_GRACE", "0")
    with Store.open(Settings.from_env()) as store:
        with store.writing():
            pass
        assert orphan not in _keys(bucket_store)
        assert store.read_matrix(["rp8"]).X.shape == (12, 8)  # the registered shard stays


def test_the_write_lock_is_the_catalogs_advisory_lock(bucket_store: str) -> None:
    from featurestore.errors import StoreBusyError

    with Store.open(Settings.from_env(lock_timeout=0.3), create=True) as a, \
            Store.open(Settings.from_env(lock_timeout=0.3)) as b:
        with a.writing(), pytest.raises(StoreBusyError, match="advisory lock"):
            with b.writing():
                pass
        with b.writing():  # released
            pass


def test_bad_bucket_settings_are_one_line(s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import PG_URL

    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    monkeypatch.setenv("FS_DATABASE_URL", PG_URL)
    monkeypatch.setenv("FS_STORE", "s3://no-such-bucket-" + hashlib.sha1(s3_prefix.encode()).hexdigest()[:8] + "/s")
    out = fs("status")
    assert out.exit_code == 1 and "does not exist" in out.stderr and "FS_S3_ENDPOINT" in out.stderr, out.output
    assert len(out.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("FS_S3_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("FS_S3_TIMEOUT", "2")
    monkeypatch.setenv("FS_STORE", s3_prefix + "store")
    out = fs("status")
    assert out.exit_code == 1 and "cannot reach" in out.stderr and "FS_S3_ENDPOINT" in out.stderr, out.output
    assert len(out.stderr.strip().splitlines()) == 1
    monkeypatch.delenv("FS_DATABASE_URL")
    out = fs("status")
    assert out.exit_code == 1 and "FS_DATABASE_URL" in out.stderr and "Traceback" not in out.output, out.output
    monkeypatch.delenv("FS_STORE")  # the prefix fixture's clean-up reads the settings


def test_an_index_built_on_one_machine_is_used_on_another(bucket_store: str, image_tree: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    assert fs("extract", "--rp", "8", "--size", "32x24").exit_code == 0
    out = fs("index", "build", "--features", "rp8")
    assert out.exit_code == 0, out.output
    assert [k for k in _keys(bucket_store) if "/indexes/rp8/" in k and k.endswith(".usearch")]
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-b"))
    out = fs("search", "--features", "rp8", "--id", "1", "-k", "3", "--format", "json")
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)
    assert len(hits) == 3 and {h["method"] for h in hits} == {"index"}, hits
    assert fs("index", "drop", "rp8").exit_code == 0
    assert not [k for k in _keys(bucket_store) if "/indexes/" in k]


@pytest.mark.parametrize("backend", ["folder", "bucket"])
def test_both_storage_backends_do_the_same(backend: str, s3_prefix: str, tmp_path: Path) -> None:
    from featurestore.io.objects import ObjectNotFoundError
    from featurestore.io.storage import BucketStorage, FolderStorage, Storage

    storage: Storage = FolderStorage(tmp_path / "root") if backend == "folder" else \
        BucketStorage(s3_prefix + "root", Settings.from_env())
    storage.put("features/a/x.h5", b"0123456789")
    storage.put("features/b.h5", b"abc")
    storage.put("models/m.onnx", b"m")
    assert storage.get("features/a/x.h5") == b"0123456789"
    assert storage.get_range("features/a/x.h5", 2, 5) == b"234"
    assert [(o.key, o.size) for o in storage.list("features/")] == [("features/a/x.h5", 10), ("features/b.h5", 3)]
    assert storage.exists("models/m.onnx") and not storage.exists("models/none")
    storage.delete("features/b.h5")
    storage.delete("features/b.h5")  # already gone: no error
    assert [o.key for o in storage.list("")] == ["features/a/x.h5", "models/m.onnx"]
    with pytest.raises(ObjectNotFoundError):
        storage.get("features/b.h5")


def test_the_web_app_serves_thumbnails_of_a_bucket_store(bucket_store: str, image_tree: Path) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    assert fs("ingest", str(image_tree)).exit_code == 0
    with TestClient(create_app(Settings.from_env())) as client:
        got = client.get("/v1/images/1/thumbnail?size=128")
        assert got.status_code == 200 and got.content[:2] == b"\xff\xd8", got.text[:200]
    assert not (Path.cwd() / "s3:").exists()  # in the working folder, not a local folder named after the URL


def test_thumbnails_of_a_bucket_store_are_made_once_and_kept_in_the_bucket(bucket_store: str, image_tree: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    assert fs("ingest", str(image_tree)).exit_code == 0
    with Store.open(Settings.from_env()) as store:
        found = store.catalog.image_file(1)
    assert found is not None
    key = f"{bucket_store}/thumbnails/128/{found.sha256[:2]}/{found.sha256}.jpg"

    def get_thumbnail() -> bytes:
        with TestClient(create_app(Settings.from_env())) as client:
            got = client.get("/v1/images/1/thumbnail?size=128")
            assert got.status_code == 200 and got.content[:2] == b"\xff\xd8", got.text[:200]
            return got.content

    made = get_thumbnail()
    assert objects.read_object(key) == made  # PUT once for the store
    # Another machine, the original image gone: the thumbnail comes from the bucket, not from the image.
    original = Path(found.source_path)
    hidden = original.rename(tmp_path / "hidden")
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-b"))
    assert get_thumbnail() == made
    # A damaged thumbnail object is not served: a third machine makes it again from the original and PUTs it.
    hidden.rename(original)
    objects.write_object(key, b"not a jpeg")
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-c"))
    assert get_thumbnail() == made and objects.read_object(key) == made


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    """A loopback server answering every request as S3 does a wrong key (SeaweedFS in tests accepts any)."""
    import http.server
    import threading

    from test_objects import _Refusing

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_refused_credentials_of_a_bucket_store_are_one_line(refusing_endpoint: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_DATABASE_URL", "postgresql+psycopg2://u@127.0.0.1:1/never-reached")
    monkeypatch.setenv("FS_STORE", "s3://photos/store")
    monkeypatch.setenv("FS_S3_ENDPOINT", refusing_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    out = fs("status")
    err = out.stderr.strip()
    assert out.exit_code == 1 and "refused access to s3://photos/store/" in err, out.output
    assert "AWS_ACCESS_KEY_ID" in err and len(err.splitlines()) == 1


def test_shards_stream_through_a_small_cache_and_a_later_process_does_not_hash_them(
        bucket_store: str, image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featurestore.features.base import FeatureSpec
    from featurestore.io import verified
    from featurestore.pipelines.ingest import ingest

    rng = np.random.default_rng(0)
    with Store.open(Settings.from_env(), create=True) as store, store.writing():
        ingest(store, image_tree)
        ids = np.array([r[0] for r in store.select_images()], dtype=np.int64)
        fs_ = store.ensure_feature_set(FeatureSpec("emb", "bench", 256, {"dim": 256}))
        vecs = rng.standard_normal((len(ids), 256), dtype=np.float32)
        for start in range(0, len(ids), 2):  # six shards
            store.append_vectors(fs_, ids[start:start + 2], vecs[start:start + 2])
    want = dict(zip(ids.tolist(), vecs, strict=True))

    def rows(of: np.ndarray) -> np.ndarray:
        return np.stack([want[int(i)] for i in of])

    shard = max(o.size for o in objects.list_objects(bucket_store + "/features/"))
    # Another machine whose cache holds two shards: every shard is streamed in (the rest served from memory
    # while pinned copies wait for their reader), the matrix is whole and the cap holds.
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-small"))
    monkeypatch.setenv("FS_CACHE_BYTES", str(2 * shard + shard // 2))
    verified.forget()
    with Store.open(Settings.from_env()) as store:
        got = store.read_matrix(["emb"])
        assert sorted(got.image_ids.tolist()) == sorted(want) and np.array_equal(got.X, rows(got.image_ids))
        assert store.files.read_cache is not None and 0 < store.files.read_cache.size() <= 2 * shard + shard // 2
        got_ids, got_vecs = store.read_set("emb")
        assert sorted(got_ids.tolist()) == sorted(want) and np.array_equal(got_vecs, rows(got_ids))
    # A roomy cache, filled once; a later process (nothing remembered in memory) reads every shard from it
    # without hashing a copy again or downloading.
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache-big"))
    monkeypatch.delenv("FS_CACHE_BYTES")
    with Store.open(Settings.from_env()) as store:
        first = store.read_matrix(["emb"])
    verified.forget()
    hashed = count_hashing(monkeypatch)  # copies read back to hash them, by any route
    gets: list[str] = []
    real_stream = objects.Bucket.stream
    monkeypatch.setattr(objects.Bucket, "stream",
                        lambda self, key, *a: (gets.append(key), real_stream(self, key, *a))[1])
    with Store.open(Settings.from_env()) as store:
        again = store.read_matrix(["emb"])
    assert np.array_equal(first.X, again.X) and hashed == [] and gets == []
