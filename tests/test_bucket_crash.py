"""kill -9 of writers of a store in a bucket (real S3 server, PostgreSQL catalog): whatever the point the signal
lands at, the store stays consistent and the next run completes the work (issue 26, item 4)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from featurestore.config import Settings
from featurestore.io import objects
from featurestore.pipelines.verify import verify
from featurestore.store import Store
from helpers import make_image

pytestmark = [pytest.mark.s3, pytest.mark.postgres, pytest.mark.slow]
CMD = [sys.executable, "-m", "featurestore.cli.main"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], env=dict(os.environ), capture_output=True, text=True, timeout=180)


def _killed(delay: float, *args: str) -> None:
    """Start ``fs ARGS`` and kill -9 it after ``delay`` seconds (or let it end first)."""
    proc = subprocess.Popen([*CMD, *args], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    threading.Event().wait(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _check_consistent(url: str, images: int) -> None:
    with Store.open(Settings.from_env()) as store:
        with store.writing():  # the sweep a next writer runs (FS_ORPHAN_GRACE=0: the killed writer is gone)
            pass
        report = verify(store)
        assert not report.problems and not report.file_problems, (report.problems, report.file_problems)
        registered = {url + "/" + p for p in store.catalog.shard_refs().values()}
        listed = {str(o.url) for o in objects.list_objects(url + "/features/")}
        assert listed == registered  # no orphan object, no registered shard without its object
        assert store.read_matrix(["rp16"]).X.shape == (images, 16)


def test_kill_9_at_random_points_leaves_a_store_the_next_run_completes(s3_prefix: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import PG_URL, _pg_database

    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"kill delays seeded with {seed}")
    for part in range(3):
        for i in range(20):
            make_image(tmp_path / f"part{part}" / f"c{i % 2}" / f"{i}.png", size=(32, 24), seed=100 * part + i)
    gen = _pg_database()
    url = s3_prefix + "store"
    monkeypatch.setenv("FS_DATABASE_URL", next(gen))
    monkeypatch.setenv("FS_STORE", url)
    monkeypatch.setenv("FS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FS_ORPHAN_GRACE", "0")
    try:
        for part in range(3):  # three small shards for compact to merge
            ingest = ("ingest", str(tmp_path / f"part{part}"), "--dataset", f"part{part}")
            extract = ("extract", "--rp", "16", "--size", "16x12", "--batch", "1")
            _killed(rng.uniform(0.5, 4.0), *ingest)
            assert _run(*ingest).returncode == 0
            _killed(rng.uniform(0.5, 4.0), *extract)
            done = _run(*extract)
            assert done.returncode == 0, done.stderr
            _check_consistent(url, 20 * (part + 1))
        _killed(rng.uniform(0.5, 4.0), "compact", "--min-rows", "1000")
        done = _run("compact", "--min-rows", "1000")
        assert done.returncode == 0, done.stderr
        _check_consistent(url, 60)
        with Store.open(Settings.from_env()) as store:
            assert len(store.catalog.shard_refs()) == 1
        _killed(rng.uniform(0.5, 4.0), "index", "build", "--features", "rp16")
        done = _run("index", "build", "--features", "rp16")
        assert done.returncode == 0, done.stderr
        _check_consistent(url, 60)
        listed = [str(o.url) for o in objects.list_objects(url + "/indexes/")]
        assert len(listed) == 1 and listed[0].endswith(".usearch"), listed
    finally:
        monkeypatch.setenv("FS_STORE", str(tmp_path / ".fs"))
        gen.close()
