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


def test_missing_vectors_error_names_the_command(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("rp8", "random_projection", 2, {"k": 8}))
        store.append_vectors(fs, ids[:5], np.zeros((5, 2)))
    with pytest.raises(MissingFeaturesError, match=r"7 image\(s\) lack rp8: run `fs extract --rp 8`"):
        store.read_matrix(["rp8"])
    fm = store.read_matrix(["rp8"], skip_missing=True)
    assert list(fm.image_ids) == ids[:5]


def test_unknown_feature_set_lists_available(store: Store, image_tree: Path) -> None:
    _ingested(store, image_tree)
    with store.writing():
        store.ensure_feature_set(FeatureSpec("known", "test", 2, {}))
    with pytest.raises(NotFoundError, match="unknown feature set 'nope'; available: known"):
        store.read_matrix(["nope"])


def test_params_mismatch_refused_and_replace_drops(store: Store, image_tree: Path) -> None:
    ids = _ingested(store, image_tree)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 0}))
        store.append_vectors(fs, ids, np.ones((len(ids), 4)))
        with pytest.raises(ParamsMismatchError, match="seed: stored 0 vs requested 1.*--replace"):
            store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 1}))
        assert store.read_matrix(["rp4"]).X.shape == (len(ids), 4)
        store.ensure_feature_set(FeatureSpec("rp4", "random_projection", 4, {"seed": 1}), replace=True)
    assert store.images_lacking("rp4", ids) == ids
    assert not list((store.root / "features").glob("rp4/*.h5"))


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
    with pytest.raises(FeatureStoreError, match="no store at .*run `fs ingest PATH`"):
        Store.open(Settings.from_env(store=tmp_path / "nothing"))
