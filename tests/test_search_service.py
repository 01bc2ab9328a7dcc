"""Search over a store's feature sets: exactness, filters, new images, duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, InvalidInputError, NotFoundError
from featurestore.features.base import FeatureSpec
from featurestore.features.projection import projection_extractor
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.search.service import (
    SearchResult,
    duplicates,
    embedder_for,
    search,
    stored_vector,
    where_ids,
)
from featurestore.store import Store
from helpers import brute, make_image, raises_cli

DIM = 12


@pytest.fixture
def vec_store(store: Store, image_tree: Path):
    """The 12-image tree ingested, plus a random feature set `emb` written in 3 shards."""
    with store.writing():
        ingest(store, image_tree, dataset="spring")
        ids = np.array([r[0] for r in store.select_images()], dtype=np.int64)
        fs = store.ensure_feature_set(FeatureSpec(name="emb", kind="test", dim=DIM, params={"seed": 3}))
        mat = np.random.default_rng(3).normal(size=(len(ids), DIM)).astype(np.float32)
        for part in np.array_split(np.arange(len(ids)), 3):
            store.append_vectors(fs, ids[part], mat[part])
    return store, ids, mat


def assert_same(results, ref):
    ref_ids, ref_scores = ref
    assert [r.image_id for r in results] == ref_ids
    # cosine results carry the similarity (and distance = 1 - similarity); l2 results the distance
    got = [r.similarity if r.similarity is not None else r.distance for r in results]
    assert np.allclose(got, ref_scores, atol=1e-5)
    assert all(r.similarity is None or abs(r.distance - (1 - r.similarity)) < 1e-9 for r in results)
    assert [r.rank for r in results] == list(range(1, len(ref_ids) + 1))


def _streaming(store: Store) -> Store:
    return Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url,
                                       search_memory_mb=0))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_results_equal_brute_force_in_memory_and_streaming(vec_store, metric):
    store, ids, mat = vec_store
    q = np.random.default_rng(9).normal(size=DIM).astype(np.float32)
    for k in (1, 5, 50):
        res = search(store, "emb", q, k=k, metric=metric)
        assert_same(res, brute(q, ids, mat, k, metric))
    assert store._indexes  # loaded once and kept for the next call
    streaming = _streaming(store)
    try:
        for k in (1, 5, 50):
            res = search(streaming, "emb", q, k=k, metric=metric)
            assert_same(res, brute(q, ids, mat, k, metric))
        assert not streaming._indexes  # over budget: nothing loaded
    finally:
        streaming.close()


def test_results_carry_path_and_label(vec_store):
    store, ids, mat = vec_store
    res = search(store, "emb", mat[0], k=1)
    assert isinstance(res[0], SearchResult)
    path, label = {r[0]: (r[1], r[2]) for r in store.select_images()}[int(ids[0])]
    assert res[0] == SearchResult(1, int(ids[0]), path, label, distance=pytest.approx(0.0, abs=1e-6),
                                  similarity=pytest.approx(1.0))


@pytest.mark.parametrize("memory_mb", [None, 0])
def test_id_query_excludes_itself(vec_store, memory_mb):
    store, ids, mat = vec_store
    s = store if memory_mb is None else _streaming(store)
    try:
        qid = int(ids[4])
        res = search(s, "emb", qid, k=5)
        assert qid not in [r.image_id for r in res]
        assert_same(res, brute(mat[4], ids, mat, 5, "cosine", exclude=[qid]))
        assert np.array_equal(stored_vector(s, "emb", qid), mat[4])
    finally:
        if s is not store:
            s.close()


@pytest.mark.parametrize("memory_mb", [None, 0])
def test_where_filters_before_ranking(vec_store, memory_mb):
    store, ids, mat = vec_store
    s = store if memory_mb is None else _streaming(store)
    try:
        sandals = [r[0] for r in store.select_images() if r[2] == "sandal"]
        assert sorted(where_ids(s, "label = 'sandal'").tolist()) == sorted(sandals)
        q = mat[0]
        res = search(s, "emb", q, k=10, where="label = 'sandal'")
        assert len(res) == 4 and all(r.label == "sandal" for r in res)
        assert_same(res, brute(q, ids, mat, 10, "cosine", allowed=sandals))
        # the dataset name is a column too; nothing matches an unknown one
        assert len(search(s, "emb", q, k=20, where="dataset = 'spring'")) == 12
        assert search(s, "emb", q, k=5, where="dataset = 'autumn'") == []
    finally:
        if s is not store:
            s.close()


@pytest.mark.parametrize(
    "cond",
    [
        "1=1; DELETE FROM images",
        "id IN (SELECT id FROM images); DROP TABLE images",
        "1=1) AS x; UPDATE images SET label = 'x' --",
    ],
)
def test_where_cannot_write(vec_store, cond):
    store, _, mat = vec_store
    with pytest.raises(InvalidInputError) as info:
        search(store, "emb", mat[0], where=cond)
    assert "\n" not in str(info.value)
    assert len(store.select_images()) == 12
    assert {r[2] for r in store.select_images()} == {"sandal", "sneaker", "shirt"}


def test_where_bad_sql_is_one_line_error(vec_store):
    store, _, mat = vec_store
    with pytest.raises(InvalidInputError, match="colour") as info:
        search(store, "emb", mat[0], where="colour = 'red'")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInputError, match="needs a SQL condition"):
        search(store, "emb", mat[0], where="  ")


def test_unknown_feature_set_lists_the_sets(vec_store):
    store, _, mat = vec_store
    with pytest.raises(NotFoundError, match="unknown feature set 'nope'; available: emb"):
        search(store, "nope", mat[0])


def test_id_errors(vec_store):
    store, ids, _ = vec_store
    with pytest.raises(InvalidInputError, match="no image with id 9999"):
        search(store, "emb", 9999)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec(name="partial", kind="test", dim=DIM))
        store.append_vectors(fs, ids[:2], np.ones((2, DIM), np.float32))
    with raises_cli(InvalidInputError, match=rf"image {int(ids[5])} has no vector in partial: run `fs extract"):
        search(store, "partial", int(ids[5]))
    with pytest.raises(InvalidInputError, match="cannot featurize new images"):
        embedder_for(store, "emb")


def test_cache_reloads_when_shards_change(vec_store):
    store, ids, mat = vec_store
    search(store, "emb", mat[0], k=1)
    before = next(iter(store._indexes.values()))[1]
    assert search(store, "emb", mat[1], k=1)[0].image_id == int(ids[1])
    assert next(iter(store._indexes.values()))[1] is before  # reused
    with store.writing():
        store.compact("emb", min_rows=100)  # same rows, one new shard
    assert_same(search(store, "emb", mat[3], k=3), brute(mat[3], ids, mat, 3, "cosine"))
    assert len(store._indexes) == 1
    assert next(iter(store._indexes.values()))[1] is not before


@pytest.fixture
def rp_store(store: Store, tmp_path: Path):
    root = tmp_path / "imgs"
    for i in range(6):
        make_image(root / "a" / f"img{i}.png", size=(40, 30), seed=100 + i)
    with store.writing():
        ingest(store, root, dataset="d")
        extract(store, [projection_extractor(store, 16, (32, 24))])
    return store, root


def test_new_image_of_other_size_and_mode_is_embedded_like_stored(rp_store, tmp_path: Path):
    store, root = rp_store
    src = root / "a" / "img2.png"
    img_id = next(r[0] for r in store.select_images() if r[1] == str(src.resolve()))
    stored = stored_vector(store, "rp16", img_id)
    # the same file as a path and as a PIL image gives exactly the stored vector
    assert np.allclose(embedder_for(store, "rp16")(Image.open(src)), stored, atol=1e-6)
    res = search(store, "rp16", src, k=1)
    assert res[0].image_id == img_id and res[0].similarity == pytest.approx(1.0, abs=1e-6)
    # bigger, grayscale-with-alpha, different format: still works and finds the original first
    other = tmp_path / "query.webp"
    Image.open(src).resize((200, 150)).convert("LA").save(other)
    res = search(store, "rp16", other, k=3)
    assert len(res) == 3
    res_pil = search(store, "rp16", Image.open(src).convert("P"), k=1)
    assert res_pil[0].image_id == img_id
    # nothing was stored
    assert len(store.select_images()) == 6


def test_embedder_refuses_changed_params(rp_store):
    store, _ = rp_store
    with store.session() as s:
        from featurestore.catalog.schema import FeatureSet

        row = s.get(FeatureSet, store.feature_set("rp16").id)
        row.params = {**row.params, "generator": "something-else"}
    with pytest.raises(FeatureStoreError, match="different parameters .*generator"):
        embedder_for(store, "rp16")


def test_duplicates_finds_a_reencoded_copy(store: Store, tmp_path: Path):
    root = tmp_path / "dups"
    make_image(root / "x" / "orig.png", size=(32, 24), seed=7)
    for i in range(4):
        make_image(root / "x" / f"other{i}.png", size=(32, 24), seed=20 + i)
    # same pixels re-saved as JPEG: different bytes (not deduplicated by ingest), near-identical vectors
    # (no chroma subsampling: it would blur the random test pattern far more than a photo)
    Image.open(root / "x" / "orig.png").save(root / "x" / "copy.jpg", quality=95, subsampling=0)
    with store.writing():
        summary = ingest(store, root, dataset="d")
        assert summary.new == 6
        extract(store, [projection_extractor(store, 32, (32, 24))])
    by_name = {Path(r[1]).name: r[0] for r in store.select_images()}
    found = duplicates(store, "rp32", threshold=0.97)
    assert [(d.group, d.image_id) for d in found] == [
        (1, min(by_name["orig.png"], by_name["copy.jpg"])),
        (1, max(by_name["orig.png"], by_name["copy.jpg"])),
    ]
    assert {Path(d.path).name for d in found} == {"orig.png", "copy.jpg"}
    assert duplicates(store, "rp32", threshold=0.97, where="format = 'PNG'") == []
    tight = Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url,
                                         search_memory_mb=0))
    try:
        with pytest.raises(FeatureStoreError, match="does not stream"):
            duplicates(tight, "rp32")
    finally:
        tight.close()


def test_duplicates_where_reads_only_the_rows_it_keeps(store: Store, image_tree: Path, monkeypatch):
    """`--where` under a budget the whole set exceeds: the budget is checked on, and only, the kept rows are read.

    Duplicate search once checked the budget on the filtered rows and then loaded the whole set.
    """
    import h5py

    dim = 40_000  # 160 KB a vector: the 12 images need 1.9 MB, over a 1 MiB budget; the 4 kept ones 640 KB
    with store.writing():
        ingest(store, image_tree, dataset="d")
        ids = np.array([r.id for r in store.select_images()], dtype=np.int64)
        fs = store.ensure_feature_set(FeatureSpec(name="wide", kind="test", dim=dim, params={}))
        mat = np.random.default_rng(5).normal(size=(len(ids), dim)).astype(np.float32)
        mat[1] = mat[0]  # a duplicate pair among the kept images
        mat[11] = mat[0]  # and a copy outside them, which the filter must not bring in
        store.append_vectors(fs, ids, mat)
    read = [0]  # bytes of vectors read from shards
    real_getitem, real_read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def getitem(self, key):  # type: ignore[no-untyped-def]
        out = real_getitem(self, key)
        if self.name == "/vectors":
            read[0] += np.asarray(out).nbytes
        return out

    def read_direct(self, dest, source_sel=None, dest_sel=None):  # type: ignore[no-untyped-def]
        real_read_direct(self, dest, source_sel, dest_sel)
        if self.name == "/vectors":
            read[0] += dest[dest_sel].nbytes if dest_sel is not None else dest.nbytes

    tight = Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url,
                                         search_memory_mb=1))
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    monkeypatch.setattr(h5py.Dataset, "read_direct", read_direct)
    try:
        found = duplicates(tight, "wide", threshold=0.99, where=f"id <= {int(ids[3])}")
        assert [(d.group, d.image_id) for d in found] == [(1, int(ids[0])), (1, int(ids[1]))]
        assert read[0] == 4 * dim * 4  # the 4 kept rows, not the 12 of the set
        with pytest.raises(FeatureStoreError, match="does not stream"):
            duplicates(tight, "wide", threshold=0.99)  # the whole set is over the budget
    finally:
        tight.close()


@pytest.mark.realmodel
def test_cnn_embedder_matches_extract(store: Store, tmp_path: Path):
    from featurestore.features.cnn.registry import cnn_extractor

    root = tmp_path / "imgs"
    for i in range(3):
        make_image(root / "a" / f"img{i}.jpg", size=(80, 60), seed=i)
    with store.writing():
        ingest(store, root, dataset="d")
        extract(store, [cnn_extractor(store, "efficientnet-lite0", batch_size=4)])
    img_id, path = store.select_images()[1][:2]
    vec = embedder_for(store, "efficientnet-lite0")(Image.open(path))
    assert np.allclose(vec, stored_vector(store, "efficientnet-lite0", img_id), atol=1e-4)
    assert search(store, "efficientnet-lite0", path, k=1)[0].image_id == img_id


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_rows_no_longer_live_are_skipped(vec_store, metric):
    """An image deleted from the catalog leaves its row in the shard file; search must not return it."""
    from sqlalchemy import delete

    from featurestore.catalog.schema import FeatureRow
    from featurestore.catalog.schema import Image as ImageRow

    store, ids, mat = vec_store
    gone = [int(ids[1]), int(ids[6])]
    with store.session() as s:
        s.execute(delete(FeatureRow).where(FeatureRow.image_id.in_(gone)))
        s.execute(delete(ImageRow).where(ImageRow.id.in_(gone)))
    keep = ~np.isin(ids, gone)
    for s in (store, _streaming(store)):
        res = search(s, "emb", mat[1], k=20, metric=metric)
        assert_same(res, brute(mat[1], ids[keep], mat[keep], 20, metric))
        if s is not store:
            s.close()


def test_feature_set_handle_search_matches_function(store, image_tree) -> None:  # type: ignore[no-untyped-def]
    from featurestore.pipelines.ingest import ingest

    with store.writing():
        ingest(store, image_tree)
        extract(store, [projection_extractor(store, 8, (16, 12))])
    first = store.select_images()[0][0]
    handle = store.feature_set("rp8")
    assert handle.search(first, k=3, where="label = 'sandal'") == search(
        store, "rp8", first, 3, where="label = 'sandal'")
    assert all(r.label == "sandal" for r in handle.search(first, k=3, where="label = 'sandal'"))
