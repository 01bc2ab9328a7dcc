"""Extraction and evaluation on Ray (issue 13).

The tests marked ``ray`` run on a simulated multi-node cluster on this machine
(``ray.cluster_utils.Cluster``: a head without CPUs and two nodes of 1 CPU
each, loopback only, no dashboard, its own temp folder), started once per
session, with the catalog in PostgreSQL (``FS_TEST_POSTGRES_URL``; `.ci/run`
starts it). Run them alone with ``pytest -m ray``. The others check the
cluster path's pieces without Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PG_URL, _pg_database
from sqlalchemy import func, select
from typer.testing import CliRunner

from featurestore.catalog.schema import FeatureRow
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import ClusterError
from featurestore.features.base import FeatureSpec
from featurestore.features.cnn.registration import add_model
from featurestore.features.cnn.registry import cnn_extractor
from featurestore.features.cnn.testing import build_tiny_inception_checkpoint
from featurestore.features.projection import projection_extractor
from featurestore.pipelines import cluster
from featurestore.pipelines.extract import ExtractSummary, extract, plan_extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, evaluate_many, train
from featurestore.shards import write_shard
from featurestore.store import Store
from helpers import make_image

runner = CliRunner()
SMALL = (32, 24)
CNN = ["inception21k", "inception21k.ch_concat_4e_chconcat"]


# -- the simulated cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A head (0 CPUs) and two 1-CPU nodes on loopback, and this process connected to them as the driver."""
    temp = tempfile.mkdtemp(prefix="fs-ray-")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as env:
        # Read by Ray when it is imported and inherited by its processes: loopback addresses only,
        # no usage reporting, every file under `temp`.
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_TMPDIR", temp)
        ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' brings it")
        from ray.cluster_utils import Cluster

        node = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
        sim = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                sim.add_node(num_cpus=1, **node)
            ray.init(address=sim.address, logging_level="WARNING", log_to_driver=False)
            yield sim
        finally:
            ray.shutdown()
            sim.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def pg_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it); a multi-node "
                    "cluster needs a PostgreSQL catalog")
    for url in _pg_database():
        monkeypatch.setenv("FS_DATABASE_URL", url)
        yield url


def _images(root: Path, n: int, first: int = 0) -> Path:
    for k in range(first, first + n):
        sc, cls = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")][k % 3]
        make_image(root / sc / cls / f"{cls}{k}.{'jpg' if k % 2 else 'png'}", seed=k)
    return root


def _by_path(store: Store, name: str) -> dict[str, np.ndarray]:
    fm = store.read_matrix([name], skip_missing=True)
    return dict(zip(fm.paths, fm.X, strict=True))


def _rows_per_image(store: Store, name: str) -> list[int]:
    fs = store.feature_set(name)
    with store.session() as s:
        return list(s.scalars(select(func.count()).select_from(FeatureRow).where(FeatureRow.feature_set_id == fs.id)
                              .group_by(FeatureRow.image_id)))


def _sqlite_store(root: Path) -> Store:
    """A store with its own SQLite catalog, whatever FS_DATABASE_URL says."""
    return Store.open(Settings(store=root, database_url=f"sqlite:///{root.resolve() / 'catalog.db'}"), create=True)


def _local_reference(tmp_path: Path, images: Path, checkpoint: tuple[Path, Path]) -> Store:
    """The same images extracted by the local path, in a SQLite store of their own."""
    ref = _sqlite_store(tmp_path / "local")
    with ref.writing():
        ingest(ref, images)
        add_model(ref, "inception21k", checkpoint[0], checkpoint[1])
        extract(ref, [projection_extractor(ref, 16, SMALL),
                      cnn_extractor(ref, "inception21k", ["global_pool", "ch_concat_4e_chconcat"], batch_size=5)],
                batch_size=5)
    return ref


# -- on the cluster -------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_cluster_extract_equals_local_and_is_incremental(ray_cluster: Any, pg_url: str, tmp_path: Path) -> None:
    images = _images(tmp_path / "imgs", 30)
    checkpoint = build_tiny_inception_checkpoint(tmp_path / "ckpt" / "Inception")
    assert runner.invoke(app, ["ingest", str(images)]).exit_code == 0
    added = runner.invoke(app, ["models", "add", "inception21k", "--symbol", str(checkpoint[0]),
                                "--params", str(checkpoint[1])])
    assert added.exit_code == 0, added.output
    args = ["extract", "--rp", "16", "--size", "32x24", "--model", "inception21k", "--layers",
            "global_pool,ch_concat_4e_chconcat", "--batch", "5", "--ray", ray_cluster.address]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "rp16: 30 vectors written" in first.output and "inception21k: 30 vectors written" in first.output
    # More images later: only those are processed; then nothing is left to do.
    _images(tmp_path / "imgs", 6, first=30)
    assert runner.invoke(app, ["ingest", str(images)]).exit_code == 0
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "rp16: 6 vectors written" in second.output and "6 images in" in second.output
    third = runner.invoke(app, args)
    assert third.exit_code == 0 and "rp16: up to date, nothing to do" in third.output

    ref = _local_reference(tmp_path, images, checkpoint)
    with Store.open(Settings()) as store:
        assert store.settings.database_url == pg_url
        for name in ["rp16", *CNN]:
            assert store.feature_set(name).params == ref.feature_set(name).params
            ours, theirs = _by_path(store, name), _by_path(ref, name)
            assert sorted(ours) == sorted(theirs) and len(ours) == 36
            for path, vec in ours.items():
                if name == "rp16":
                    np.testing.assert_array_equal(vec, theirs[path])
                else:
                    np.testing.assert_allclose(vec, theirs[path], rtol=0, atol=1e-5)
            assert _rows_per_image(store, name) == [1] * 36
        # One shard per task and feature set: 30 images in 4 tasks for the 2 workers, then 6 in 1.
        assert [row[4] for row in store.coverage()] == [5, 5, 5]
    ref.close()


@pytest.mark.ray
@pytest.mark.mxnet
def test_workers_run_the_drivers_cnn_runtime(ray_cluster: Any, pg_url: str, tmp_path: Path) -> None:
    checkpoint = build_tiny_inception_checkpoint(tmp_path / "ckpt" / "Inception")
    store = Store.open(Settings(), create=True)
    with store.writing():
        ingest(store, _images(tmp_path / "imgs", 6))
        add_model(store, "inception21k", checkpoint[0], checkpoint[1])
        assert store.settings.cnn_runtime == "onnxruntime"  # the default: mxnet must travel to the workers
        summary = cluster.extract_on_ray(store, [cnn_extractor(store, "inception21k", batch_size=3, runtime="mxnet")],
                                         address=ray_cluster.address, task_rows=3)
    assert summary.written == {"inception21k": 6}
    shards = store.catalog.shards(store.feature_set("inception21k").id)
    assert len(shards) == 2 and {sh.runtime for sh in shards} == {"mxnet"}  # as the workers report it
    store.close()


def _worker_pids(name: str = "ray::Featurizer") -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(name.encode()):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.ray
def test_killed_worker_is_retried_exactly_one_vector_per_image(ray_cluster: Any, pg_url: str,
                                                               tmp_path: Path) -> None:
    images = _images(tmp_path / "imgs", 40)
    store = Store.open(Settings(), create=True)
    with store.writing():
        ingest(store, images)
    lost = sorted(images.rglob("*.png"))[0]
    lost.unlink()  # a path the workers cannot read: reported, the job goes on
    killed: list[int] = []

    def kill_one(done: int, total: int) -> None:
        if not killed:
            pids = _worker_pids()
            assert pids, "no Featurizer worker process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    with store.writing():
        summary = cluster.extract_on_ray(store, [projection_extractor(store, 16, SMALL)], address=ray_cluster.address,
                                         task_rows=3, progress=kill_one)
        registered = {Path(p).name for p in store.catalog.shard_paths()}
    assert killed
    assert summary.processed == 39 and summary.written == {"rp16": 39}
    assert [(p, r.split(" (on node")[0]) for p, r in summary.failed] == [
        (str(lost.resolve()), "file not found (moved or deleted since it was listed)")]
    assert "(on node 127.0.0.1)" in summary.failed[0][1]
    assert _rows_per_image(store, "rp16") == [1] * 39
    # Shards of replayed tasks were never registered and are gone; no temp files are left.
    assert {p.name for p in (store.root / "features" / "rp16").iterdir()} == registered
    local = _sqlite_store(tmp_path / "local")
    with local.writing():
        ingest(local, images)
        extract(local, [projection_extractor(local, 16, SMALL)])
    ours, theirs = _by_path(store, "rp16"), _by_path(local, "rp16")
    assert ours.keys() == theirs.keys()
    for path, vec in ours.items():
        np.testing.assert_array_equal(vec, theirs[path])
    local.close()
    store.close()


@pytest.mark.ray
def test_ctrl_c_stops_the_workers_and_leaves_the_store_consistent(ray_cluster: Any, pg_url: str,
                                                                  tmp_path: Path) -> None:
    store = Store.open(Settings(), create=True)
    with store.writing():
        ingest(store, _images(tmp_path / "imgs", 30))

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with store.writing(), pytest.raises(KeyboardInterrupt):
        cluster.extract_on_ray(store, [projection_extractor(store, 16, SMALL)], address=ray_cluster.address,
                               task_rows=3, progress=interrupt)
    deadline = time.monotonic() + 30
    while _worker_pids() and time.monotonic() < deadline:  # the workers were killed, not left running
        time.sleep(0.2)
    assert not _worker_pids()
    # What is registered is complete and every file in the folder is registered (the rest was swept).
    registered = {Path(p).name for p in store.catalog.shard_paths()}
    assert {p.name for p in (store.root / "features" / "rp16").iterdir()} == registered
    assert 1 <= len(registered) < 10 and store.read_matrix(["rp16"], skip_missing=True).X.shape[0] == 3
    with store.writing():
        rest = cluster.extract_on_ray(store, [projection_extractor(store, 16, SMALL)], address=ray_cluster.address)
    assert rest.written == {"rp16": 27}
    assert _rows_per_image(store, "rp16") == [1] * 30
    store.close()


@pytest.mark.ray
def test_sqlite_catalog_refused_on_several_nodes(ray_cluster: Any, tmp_path: Path) -> None:
    assert runner.invoke(app, ["ingest", str(_images(tmp_path / "imgs", 3))]).exit_code == 0
    r = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--ray", ray_cluster.address])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the catalog is SQLite")
    assert "3 nodes" in lines[0] and "unsafe" in lines[0] and "FS_DATABASE_URL=postgresql" in lines[0]
    with Store.open(Settings()) as store:
        assert store.feature_sets() == []  # refused before anything was registered


def _labelled_store(tmp_path: Path) -> Store:
    """30 labelled images with two synthetic feature sets ('a' informative, 'b' noise)."""
    store = Store.open(Settings(), create=True)
    with store.writing():
        ingest(store, _images(tmp_path / "imgs", 30))
    rows = store.select_images()
    rng = np.random.default_rng(0)
    centers = {cls: rng.normal(scale=3, size=6) for cls in ("sneaker", "sandal", "shirt")}
    ids = [r[0] for r in rows]
    with store.writing():
        for name, vecs in (("a", np.stack([centers[r[2]] + rng.normal(size=6) for r in rows])),
                           ("b", rng.normal(size=(len(rows), 5)))):
            fs = store.ensure_feature_set(FeatureSpec(name, "test", vecs.shape[1], {}))
            store.append_vectors(fs, ids, vecs.astype(np.float32))
    return store


SCORES = ("index", "n_train", "n_test", "accuracy", "train_accuracy", "macro_f1", "superclass_accuracy")


def _scores(ev: Any) -> list[tuple[Any, ...]]:
    return [tuple(getattr(s, k) for k in SCORES) for s in ev.splits]


@pytest.mark.ray
def test_cluster_evaluate_and_train_equal_local(ray_cluster: Any, tmp_path: Path) -> None:
    store = _labelled_store(tmp_path)
    cfg = TrainConfig(["a"], n_splits=3, trees=10, seed=3)
    with store.writing():
        local = evaluate_many(store, [["a"], ["a", "b"], ["b"]], cfg)
        seen: list[tuple[str, int, int]] = []
        remote = evaluate_many(store, [["a"], ["a", "b"], ["b"]], cfg, ray_address=ray_cluster.address,
                               progress=lambda label, d, t: seen.append((label, d, t)))
        assert seen[-1] == ("all", 9, 9) and len(seen) == 9
        for lo, re in zip(local, remote, strict=True):
            assert _scores(lo.evaluation) == _scores(re.evaluation)
        assert local[1].evaluation.summary["accuracy"].mean > local[2].evaluation.summary["accuracy"].mean
        tl = train(store, TrainConfig(["a", "b"], n_splits=2, trees=10, select="a=3,b=2"), fit_final=False)
        tr = train(store, TrainConfig(["a", "b"], n_splits=2, trees=10, select="a=3,b=2"), fit_final=False,
                   ray_address=ray_cluster.address)
        assert _scores(tl.evaluation) == _scores(tr.evaluation)
    assert store.catalog.split_scores(remote[0].run_id) == store.catalog.split_scores(local[0].run_id)
    store.close()
    r = runner.invoke(app, ["evaluate", "--features", "a", "--features", "a,b", "--splits", "3", "--trees", "10",
                            "--ray", ray_cluster.address])
    assert r.exit_code == 0, r.output
    assert "30 images, 3 classes, 3 x 0.1 splits" in r.output


@pytest.mark.ray
@pytest.mark.slow
def test_ray_local_starts_a_private_cluster(tmp_path: Path) -> None:
    """`--ray local` in a fresh process: a one-machine cluster of its own, gone afterwards."""
    images = _images(tmp_path / "imgs", 8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FS_", "RAY_"))}
    env.update(FS_STORE=str(tmp_path / ".fs"), TMPDIR=str(tmp_path))
    fs = [sys.executable, "-m", "featurestore.cli.main"]
    assert subprocess.run([*fs, "ingest", str(images)], env=env, capture_output=True).returncode == 0
    before = set(Path("/tmp").glob("fs-ray-*"))
    r = subprocess.run([*fs, "extract", "--rp", "16", "--size", "32x24", "--ray", "local"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "rp16: 8 vectors written" in r.stderr
    assert set(Path("/tmp").glob("fs-ray-*")) == before  # its temp folder was removed
    with Store.open(Settings(store=tmp_path / ".fs")) as store:
        assert _rows_per_image(store, "rp16") == [1] * 8


# -- the pieces, without Ray --------------------------------------------------------------------------------
def test_registrar_registers_each_task_and_image_once(store: Store, tmp_path: Path) -> None:
    with store.writing():
        ingest(store, _images(tmp_path / "imgs", 6))
        summary = ExtractSummary()
        plan = plan_extract(store, [projection_extractor(store, 16, SMALL)], replace=False, dataset=None,
                            image_ids=None, summary=summary)
        tasks = cluster.cut_tasks(plan, actors=1, task_rows=3)
        assert [len(t.images) for t in tasks] == [3, 3]
        fs = plan.sets["rp16"]
        reg = cluster.Registrar(store, plan, summary)

        def answer(task: cluster.Task, index: int) -> cluster.TaskResult:
            ids = np.array(task.lacking["rp16"])
            path = write_shard(store.root / "features" / "rp16", "rp16", fs.kind, fs.params, ids,
                               np.ones((len(ids), 16), np.float32))
            return cluster.TaskResult(index, {"rp16": (str(path.relative_to(store.root)), len(ids))}, [], len(ids),
                                      "node-a")

        reg.accept(answer(tasks[0], 0), tasks[0])
        reg.accept(answer(tasks[0], 0), tasks[0])  # the same task answered twice
        reg.accept(answer(tasks[0], 2), tasks[0])  # a replay under another number: same images
        reg.accept(answer(tasks[1], 1), tasks[1])
        assert summary.written == {"rp16": 6} and summary.processed == 6
        assert _rows_per_image(store, "rp16") == [1] * 6
        assert len(list((store.root / "features" / "rp16").glob("*.h5"))) == 4
        cluster.sweep_orphans(store, plan)
        assert len(list((store.root / "features" / "rp16").glob("*.h5"))) == 2
    assert store.read_matrix(["rp16"]).X.shape == (6, 16)


def test_cut_tasks_bounds_images_and_bytes(store: Store, tmp_path: Path) -> None:
    from featurestore.features.pixels import PixelsExtractor

    with store.writing():
        ingest(store, _images(tmp_path / "imgs", 50))
        plan = plan_extract(store, [PixelsExtractor((8, 6))], replace=False, dataset=None, image_ids=None,
                            summary=ExtractSummary())
    tasks = cluster.cut_tasks(plan, actors=2)
    assert [len(t.images) for t in tasks] == [8] * 6 + [2]  # about 8 tasks per actor, at least 8 images each
    assert sorted(i for t in tasks for i in t.lacking["pixels8x6"]) == sorted(i for i, _ in plan.todo)
    assert max(len(t.images) for t in cluster.cut_tasks(plan, actors=2, task_rows=7)) == 7


def test_catalog_and_pool_checks() -> None:
    one, two = [cluster.Node("127.0.0.1", 4)], [cluster.Node("10.0.0.1", 4), cluster.Node("10.0.0.2", 2)]
    cluster.check_catalog(Settings(store=Path("/srv/fs")), one)  # SQLite on one node is fine
    with pytest.raises(ClusterError, match="SQLite on a network filesystem .* FS_DATABASE_URL=postgresql"):
        cluster.check_catalog(Settings(store=Path("/srv/fs")), two)
    with pytest.raises(ClusterError, match="names 127.0.0.1, which the other nodes"):
        cluster.check_catalog(Settings(database_url="postgresql+psycopg2://u@127.0.0.1/fs"), two)
    cluster.check_catalog(Settings(database_url="postgresql+psycopg2://u@db.internal/fs"), two)
    cluster.check_catalog(Settings(database_url="postgresql+psycopg2://u@localhost/fs"), two[:1])  # one node
    assert cluster.pool_size(two, threads=1, workers=None) == 6
    assert cluster.pool_size(two, threads=2, workers=None) == 3  # actors x threads <= each node's cores
    assert cluster.pool_size(two, threads=4, workers=None) == 1
    with pytest.raises(ClusterError, match="3 workers of 4 thread"):
        cluster.pool_size(two, threads=4, workers=3)
    with pytest.raises(ClusterError, match="no node .* 8 CPU"):
        cluster.pool_size(two, threads=8, workers=None)


def test_worker_that_cannot_see_the_store_says_so(store: Store, tmp_path: Path) -> None:
    settings = {"store": str(store.root.resolve()), "database_url": None, "max_image_pixels": 10**6, "max_file_mb": 1}
    worker = cluster.Featurizer(settings, [], 1, 4, (str(tmp_path / "nowhere" / ".tmp-check"), "token"))
    error = worker.ready()
    assert error and "is not visible here" in error and "mounts at the same path" in error
    with pytest.raises(ClusterError, match="is not visible here"):
        worker.run(cluster.Task(0, [], {}))


def test_ray_missing_is_a_one_line_error(image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--ray", "auto"])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: --ray needs Ray, which is not installed: pip install 'featurestore[ray]'"
    monkeypatch.setenv("FS_RAY_ADDRESS", "auto")  # the same from the environment
    r = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24"])
    assert r.exit_code == 1 and "pip install 'featurestore[ray]'" in r.output
    monkeypatch.delenv("FS_RAY_ADDRESS")
    bad = runner.invoke(app, ["extract", "--rp", "16", "--ray-workers", "2"])
    assert bad.exit_code == 2 and "need --ray ADDRESS" in bad.output


def test_kill_waits_for_the_killed_actors_tasks_before_the_sweep() -> None:
    # ray.kill returns before the worker is gone; a task still writing its shard left a temp file
    # behind the orphan sweep (seen once in the Ctrl-C test above). kill() now waits on the tasks.
    calls: list[tuple[str, Any]] = []

    class FakeRay:
        def kill(self, actor: Any, no_restart: bool) -> None:
            calls.append(("kill", actor))

        def wait(self, refs: list[Any], num_returns: int, timeout: float) -> tuple[list[Any], list[Any]]:
            calls.append(("wait", (sorted(refs), num_returns, timeout)))
            return refs, []

    pool = object.__new__(cluster._Pool)  # no cluster: only kill() is under test
    pool.ray, pool.actors = FakeRay(), ["a0", "a1"]
    pool.inflight = {"t1": (0, None), "t2": (1, None)}
    pool.kill()
    assert calls == [("kill", "a0"), ("kill", "a1"), ("wait", (["t1", "t2"], 2, cluster.KILL_WAIT_S))]
    pool.inflight, calls[:] = {}, []
    pool.kill()  # nothing in flight: nothing to wait for
    assert calls == [("kill", "a0"), ("kill", "a1")]
