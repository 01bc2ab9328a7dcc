"""Ray without a shared file system: with a store in a bucket, the workers write shards straight to the bucket
and only the driver registers them (`--ray local` against the real S3 server and PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore.config import Settings
from featurestore.io import objects
from featurestore.store import Store
from helpers import make_image

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.postgres]


def test_ray_workers_write_shards_to_the_bucket(s3_prefix: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import PG_URL, _pg_database

    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    for i in range(40):
        make_image(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png", size=(32, 24), seed=i)
    gen = _pg_database()
    url = s3_prefix + "store"
    monkeypatch.setenv("FS_DATABASE_URL", next(gen))
    monkeypatch.setenv("FS_STORE", url)
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "driver-cache"))
    try:
        env = {**os.environ}
        cmd = [sys.executable, "-m", "featurestore.cli.main"]
        done = subprocess.run([*cmd, "ingest", str(tmp_path / "imgs")], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        done = subprocess.run([*cmd, "extract", "--rp", "16", "--size", "16x12", "--ray", "local"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        shards = [str(o.url) for o in objects.list_objects(url + "/features/rp16/")]
        assert shards and all(k.endswith(".h5") for k in shards), shards  # no check object or temp left
        with Store.open(Settings.from_env()) as store:
            assert sorted(url + "/" + p for p in store.catalog.shard_refs().values()) == sorted(shards)
            fm = store.read_matrix(["rp16"])
            assert fm.X.shape == (40, 16)
        # The same vectors as a plain extraction into a folder store.
        monkeypatch.setenv("FS_STORE", str(tmp_path / "folder"))
        monkeypatch.delenv("FS_DATABASE_URL")
        from typer.testing import CliRunner

        from featurestore.cli.main import app

        runner = CliRunner()
        assert runner.invoke(app, ["ingest", str(tmp_path / "imgs")]).exit_code == 0
        assert runner.invoke(app, ["extract", "--rp", "16", "--size", "16x12"]).exit_code == 0
        with Store.open(Settings.from_env()) as store:
            local = store.read_matrix(["rp16"])
        assert np.allclose(local.X, fm.X, atol=1e-6) and np.array_equal(local.image_ids, fm.image_ids)
    finally:
        monkeypatch.setenv("FS_STORE", str(tmp_path / ".fs"))
        gen.close()
