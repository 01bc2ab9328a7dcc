from __future__ import annotations

import multiprocessing
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurestore.config import Settings
from featurestore.errors import (
    FeatureStoreError,
    MissingFeaturesError,
    NotFoundError,
    ParamsMismatchError,
    StoreBusyError,
)
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.ingest import ingest
from featurestore.store import Store
from helpers import raises_cli


def _ingested(store: Store, tree: Path) -> list[int]:
    with store.writing():
        ingest(store, tree)
    return [r[0] for r in store.select_images()]


def test_read_matrix_aligns_sets_across_shards(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    rng = np.random.default_rng(0)
    truth_a = {i: rng.normal(size=4).astype(np.float32) for i in ids}
    truth_b = {i: rng.normal(size=3).astype(np.float32) for i in ids}
    with store.writing():
        a = store.ensure_feature_set(FeatureSpec("a", "test", 4, {"p": 1}))
        b = store.ensure_feature_set(FeatureSpec("b", "test", 3, {}))
        # a in two shards written in shuffled order, b in one shard in reverse order
        first, second = ids[::2], ids[1::2]
        store.append_vectors(a, second[::-1], np.stack([truth_a[i] for i in second[::-1]]))
        store.append_vectors(a, first, np.stack([truth_a[i] for i in first]))
        store.append_vectors(b, ids[::-1], np.stack([truth_b[i] for i in ids[::-1]]))
    fm = store.read_matrix(["a", "b"])
    assert list(fm.image_ids) == sorted(ids)
    assert fm.blocks == {"a": (0, 4), "b": (4, 7)}
    expected = np.stack([np.r_[truth_a[i], truth_b[i]] for i in fm.image_ids])
    np.testing.assert_array_equal(fm.X, expected)
    assert set(fm.labels) == {"sneaker", "sandal", "shirt"}
    assert set(fm.superclasses) == {"footwear", "tops"}


def test_shards_that_are_runs_of_the_matrix_are_read_in_place(store: Store, image_tree: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from featurestore import shards

    ids = sorted(_ingested(store, image_tree))
    rng = np.random.default_rng(1)
    truth = {name: {i: rng.normal(size=dim).astype(np.float32) for i in ids} for name, dim in (("a", 4), ("b", 3))}
    with store.writing():
        for name, dim in (("a", 4), ("b", 3)):
            fs = store.ensure_feature_set(FeatureSpec(name, "test", dim, {}))
            for run in (ids[:5], ids[5:]):  # each shard a run of the matrix's rows
                store.append_vectors(fs, run, np.stack([truth[name][i] for i in run]))
    in_place: list[bool] = []
    real = shards.read_shard_placed

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        got = real(*args, **kwargs)
        in_place.append(got[1] is None)
        return got

    monkeypatch.setattr("featurestore.vectors.read_shard_placed", spy)
    fm = store.read_matrix(["a", "b"])
    assert in_place == [True] * 4 and list(fm.image_ids) == ids
    np.testing.assert_array_equal(fm.X, np.stack([np.r_[truth["a"][i], truth["b"][i]] for i in ids]))
    # A subset of the images (every other one): no shard is a run of it, so each is read and placed row by row.
    in_place.clear()
    some = ids[::2]
    fm = store.read_matrix(["b", "a"], image_ids=some)
    assert in_place == [False] * 4 and list(fm.image_ids) == some
    np.testing.assert_array_equal(fm.X, np.stack([np.r_[truth["b"][i], truth["a"][i]] for i in some]))


def test_missing_vectors_error_names_the_command(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("rp8", "random_projection", 2, {"k": 8}))
        store.append_vectors(fs, ids[:5], np.zeros((5, 2)))
    with raises_cli(MissingFeaturesError, match=r"7 image\(s\) lack rp8: run `fs extract --rp 8`"):
        store.read_matrix(["rp8"])
    fm = store.read_matrix(["rp8"], skip_missing=True)
    assert list(fm.image_ids) == ids[:5]


def test_unknown_feature_set_lists_available(store: Store, image_tree: Path) -> None:
    _ingested(store, image_tree)
    with store.writing():
        store.ensure_feature_set(FeatureSpec("known", "test", 2, {}))
    with pytest.raises(NotFoundError, match="unknown feature set 'nope'; available: known"):
        store.read_matrix(["nope"])


def test_params_mismatch_refused_and_replace_keeps_the_old_version(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 0}))
        store.append_vectors(fs, ids, np.ones((len(ids), 4)))
        with raises_cli(ParamsMismatchError, match="seed: stored 0 vs requested 1.*--replace"):
            store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 1}))
        assert store.read_matrix(["rp4"]).X.shape == (len(ids), 4)
        store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 1}), replace=True)
    assert store.images_lacking("rp4", ids) == ids
    # issue 26: the old vectors stay, as version 1 (`fs gc` deletes them)
    assert len(list((store.root / "features").glob("rp4/*.h5"))) == 1
    assert store.read_matrix(["rp4"], version=1).X.shape == (len(ids), 4)


def test_shard_is_self_describing(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("x", "test", 2, {"size": [8, 6]}))
        path = store.append_vectors(fs, ids, np.arange(len(ids) * 2).reshape(-1, 2))
    with h5py.File(path) as fh:
        assert fh.attrs["feature_set"] == "x"
        assert fh.attrs["dim"] == 2
        assert '"size": [8, 6]' in fh.attrs["params"]
        assert fh["vectors"].dtype == np.float32
        assert list(fh["image_ids"][...]) == ids


def test_compact_merges_and_keeps_values(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("c", "test", 2, {}))
        for i in ids:
            store.append_vectors(fs, [i], np.full((1, 2), i))
        before = store.read_matrix(["c"]).X.copy()
        done = store.compact("c")
    assert done == [("c", len(ids), len(ids))]
    assert len(list((store.root / "features" / "c").glob("*.h5"))) == 1
    np.testing.assert_array_equal(store.read_matrix(["c"]).X, before)
    assert store.coverage()[0][3:] == (len(ids), 1)


def test_orphans_removed_by_next_writer(store: Store) -> None:
    folder = store.root / "features" / "x"
    folder.mkdir(parents=True)
    (folder / ".tmp-123-abcd-x.h5").write_bytes(b"partial")
    (folder / "x-unregistered.h5").write_bytes(b"renamed but never registered")
    (store.root / "artifacts" / ".tmp-1-x1y2-abc.pkl").write_bytes(b"half an artifact")
    (store.root / "artifacts" / "lost.pkl").write_bytes(b"saved, but its run was never recorded")
    (store.root / "projections").mkdir(exist_ok=True)
    (store.root / "projections" / ".tmp-1-ab-rp8.npz").write_bytes(b"half a matrix")
    keep = store.root / "projections" / "rp8-0123.npz"
    keep.write_bytes(b"a finished matrix")
    with store.writing():
        pass
    assert list(folder.iterdir()) == []
    assert list((store.root / "artifacts").iterdir()) == []
    assert list((store.root / "projections").iterdir()) == [keep]


def _hold_lock(store_path: str, ready, release) -> None:  # type: ignore[no-untyped-def]
    s = Store.open(Settings.from_env(store=Path(store_path)), create=True)
    with s.writing():
        ready.set()
        release.wait(20)


def test_second_writer_gets_store_is_busy(tmp_path: Path) -> None:
    path = tmp_path / ".fs"
    Store.open(Settings.from_env(store=path), create=True).close()
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        s = Store.open(Settings.from_env(store=path, lock_timeout=0.3))
        with pytest.raises(StoreBusyError, match=rf"store is busy \(pid {proc.pid}"):
            with s.writing():
                pass
    finally:
        release.set()
        proc.join(30)
    with s.writing():  # released once the other writer is done
        pass


def test_reader_without_store_gets_clear_error(tmp_path: Path) -> None:
    with raises_cli(FeatureStoreError, match="no store at .*run `fs ingest PATH`"):
        Store.open(Settings.from_env(store=tmp_path / "nothing"))


def test_reader_replans_when_compaction_replaced_its_shards(store: Store, image_tree: Path) -> None:
    """A read planned before `fs compact` and executed after it re-plans instead of reporting corruption."""
    ids = _ingested(store, image_tree)
    with store.writing():
        for name in ("c", "d"):  # one shard per image: compaction has work to do
            fs = store.ensure_feature_set(FeatureSpec(name, "test", 2, {}))
            for i in ids:
                store.append_vectors(fs, [i], np.full((1, 2), i, dtype=np.float32))
    expected = np.repeat(np.array(ids, dtype=np.float32)[:, None], 2, axis=1)
    real_plan = Store._plan
    compacted: dict[str, object] = {}

    def plan_then_compact(self: Store, fs_handle):  # type: ignore[no-untyped-def]
        plan = real_plan(self, fs_handle)
        if fs_handle.name not in compacted:  # the first plan goes stale: compaction deletes its shards
            compacted[fs_handle.name] = "running"
            with self.writing():
                compacted[fs_handle.name] = self.compact(fs_handle.name)
        return plan

    Store._plan = plan_then_compact  # type: ignore[method-assign]
    try:
        np.testing.assert_array_equal(store.read_matrix(["c"]).X, expected)
        got_ids, got = store.read_set("d")
    finally:
        Store._plan = real_plan  # type: ignore[method-assign]
    assert compacted == {"c": [("c", len(ids), len(ids))], "d": [("d", len(ids), len(ids))]}
    assert sorted(got_ids.tolist()) == ids
    np.testing.assert_array_equal(got[np.argsort(got_ids)], expected)


def test_gc_deletes_old_files_after_the_commit(store: Store, image_tree: Path) -> None:
    """A replaced set's old version is deleted by `fs gc`: catalog first, files after it commits."""
    from featurestore.pipelines.versions import gc

    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("r", "test", 2, {"v": 1}))
        store.append_vectors(fs, ids, np.ones((len(ids), 2)))
        old = list((store.root / "features" / "r").glob("*.h5"))
        store.ensure_feature_set(FeatureSpec("r", "test", 2, {"v": 2}), replace=True)
        seen: list[bool] = []
        real = store.catalog.delete_feature_set

        def delete_then_check(s, row):  # type: ignore[no-untyped-def]
            paths = real(s, row)
            seen.append(all(p.exists() for p in old))  # still on disk while the transaction is open
            return paths

        store.catalog.delete_feature_set = delete_then_check  # type: ignore[method-assign]
    gc(store)
    assert seen == [True] and old and not any(p.exists() for p in old)
    assert store.images_lacking("r") == ids


def test_models_list_and_show_never_create_a_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    assert "efficientnet-lite0" in listed.stdout
    assert not (tmp_path / ".fs").exists()
    shown = runner.invoke(app, ["models", "show", "efficientnet-lite0", "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    assert "global_pool" in shown.stdout
    assert not (tmp_path / ".fs").exists()


@pytest.mark.postgres
def test_two_first_ingests_on_an_empty_postgres_catalog(tmp_path: Path, image_tree: Path) -> None:
    """Migrations run under the write lock: two first writers never race on alembic_version."""
    import os
    import subprocess
    import sys

    from conftest import PG_URL, _pg_database

    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    for url in _pg_database():
        env = {**os.environ, "FS_DATABASE_URL": url, "FS_STORE": str(tmp_path / ".fs"), "FS_LOCK_TIMEOUT": "60"}
        cmd = [sys.executable, "-m", "featurestore.cli.main", "ingest", str(image_tree)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all("Traceback" not in err for _, err in outs)
        with Store.open(Settings(store=tmp_path / ".fs", database_url=url)) as store:
            assert len(store.select_images()) == 12


def test_deleted_shard_is_lacking_and_a_plain_extract_repairs_it(tmp_path: Path, image_tree: Path) -> None:
    """A shard file deleted by hand no longer counts as coverage; the next `fs extract` recomputes its images."""
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    assert runner.invoke(app, ["extract", "--rp", "8", "--size", "16x12"]).exit_code == 0
    shards = list((tmp_path / ".fs" / "features" / "rp8").glob("*.h5"))
    assert len(shards) == 1
    shards[0].unlink()
    with Store.open(Settings(store=tmp_path / ".fs")) as store:
        assert store.coverage() == [("rp8", "random_projection", 8, 0, 0)]
    again = runner.invoke(app, ["extract", "--rp", "8", "--size", "16x12"])
    assert again.exit_code == 0, again.output
    assert "rp8: 12 vectors written" in again.output
    with Store.open(Settings(store=tmp_path / ".fs")) as store:
        assert store.coverage() == [("rp8", "random_projection", 8, 12, 1)]
        assert store.read_matrix(["rp8"]).X.shape == (12, 8)
