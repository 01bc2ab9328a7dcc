"""Search state cached per set against the catalog's change counter (issue 31): what it saves, and that a
write between two searches is seen by the second, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, insert, select, update

from featurestore.catalog.readonly import ReadOnlyCatalog, where_is_cacheable
from featurestore.catalog.schema import Dataset, DatasetMember, Image, IngestError
from featurestore.config import Settings
from featurestore.errors import NotFoundError
from featurestore.features.base import FeatureSpec
from featurestore.search import index as ann
from featurestore.search.cache import CompiledFilter, IdFilter
from featurestore.search.service import search, where_ids
from featurestore.store import Store
from helpers import brute

DIM = 16
EXACT_PARAMS = {"connectivity": 32, "expansion_add": 400, "expansion_search": 1000, "threads": 1}


def add_images(store: Store, n: int) -> np.ndarray:
    """``n`` catalog images without files, labelled class0..class9 in turn, in dataset `t`."""
    with store.session() as s:
        ds = s.scalar(select(Dataset.id).where(Dataset.name == "t"))
        if ds is None:
            ds = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "t"}]).scalar_one()
        start = s.scalar(select(func.count(Image.id))) or 0
        ids = s.scalars(insert(Image).returning(Image.id), [
            {"sha256": f"{start + i:064x}", "source_path": f"/img/{start + i}.jpg", "width": 1, "height": 1,
             "format": "JPEG", "mode": "RGB", "bytes": 1, "label": f"class{(start + i) % 10}",
             "superclass": None, "dataset_id": ds} for i in range(n)]).all()
        s.execute(insert(DatasetMember), [{"dataset_id": ds, "image_id": i, "source_path": f"/img/{i}.jpg"}
                                          for i in ids])
    return np.array(sorted(ids), dtype=np.int64)


def append(store: Store, ids: np.ndarray, vecs: np.ndarray, shard_rows: int = 500) -> None:
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("v", "test", DIM, {}))
        for start in range(0, len(ids), shard_rows):
            store.append_vectors(fs, ids[start : start + shard_rows], vecs[start : start + shard_rows])


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM)) * 3
    return (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.fixture(params=["exact", "index"])
def vset(request: pytest.FixtureRequest, store: Store):  # type: ignore[no-untyped-def]
    """1,000 clustered vectors of set `v` in 2 shards; with an index (high expansion) for "index"."""
    ids = add_images(store, 1000)
    mat = clustered(1000)
    append(store, ids, mat)
    if request.param == "index":
        ann.build_index(store, "v", **EXACT_PARAMS)
    return store, ids, mat, request.param


def same(results: list[Any], ref: tuple[list[int], list[float]]) -> None:
    assert [r.image_id for r in results] == ref[0]
    assert np.allclose([r.similarity for r in results], ref[1], atol=1e-4)


def counting(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], owner: Any, name: str) -> None:
    real: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# ---------------------------------------------------------------------------
# the counter


def test_counter_moves_with_every_write_a_search_reads(store: Store) -> None:
    def moved(write: Callable[[], object]) -> bool:
        before = store.catalog.catalog_version()
        write()
        return store.catalog.catalog_version() > before

    ids = np.empty(0, dtype=np.int64)

    def ingest() -> None:
        nonlocal ids
        ids = add_images(store, 20)

    def relabel() -> None:
        with store.session() as s:
            s.execute(update(Image).where(Image.id == int(ids[0])).values(label="relabelled"))

    def join_dataset() -> None:
        with store.session() as s:
            other = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "other"}]).scalar_one()
            s.execute(insert(DatasetMember), [{"dataset_id": other, "image_id": int(ids[1]), "source_path": "x"}])

    def ingest_error() -> None:  # a table no search reads
        with store.session() as s:
            s.add(IngestError(path="/x.jpg", reason="unreadable"))

    assert moved(ingest) and moved(relabel) and moved(join_dataset)
    assert moved(lambda: append(store, ids, clustered(20)))
    assert moved(lambda: ann.build_index(store, "v"))
    assert moved(lambda: ann.build_index(store, "v", expansion_search=77))  # params only: same file
    assert moved(lambda: ann.drop_index(store, "v"))
    append(store, add_images(store, 5), clustered(5))

    def compact() -> None:
        with store.writing():
            assert store.compact("v", min_rows=10_000)

    assert moved(compact)
    assert not moved(ingest_error)


def test_where_is_cacheable_only_without_other_tables_clock_or_randomness() -> None:
    for dialect in ("sqlite", "postgres"):
        assert where_is_cacheable("label = 'a' AND dataset = 'spring'", dialect)
        assert where_is_cacheable("id % 100 = 0 OR date(ingested_at) > '2020-01-01'", dialect)
        assert where_is_cacheable("id IN (SELECT image_id FROM dataset_members WHERE dataset_id = 2)", dialect)
        assert not where_is_cacheable("id IN (SELECT image_id FROM predictions WHERE label = 'a')", dialect)
        assert not where_is_cacheable("random() < 0.5", dialect)
        assert not where_is_cacheable("ingested_at > CURRENT_TIMESTAMP", dialect)
        assert not where_is_cacheable("ingested_at > date('now', '-1 day')", dialect)
        assert not where_is_cacheable("ingested_at > now()", dialect)
        assert not where_is_cacheable("julianday() > 0", dialect)


def test_compiled_filter_bitmap() -> None:
    f = CompiledFilter.of(np.array([7, 3, 3, 10]))
    assert f.ids.tolist() == [3, 7, 10] and f.size == 3
    assert f.allows(np.array([0, 3, 4, 10, 11, 10**12, -1])).tolist() == [False, True, False, True, False, False,
                                                                          False]
    assert f.intersect(np.array([10, 11, 1])).ids.tolist() == [10]
    assert CompiledFilter.of(np.empty(0, dtype=np.int64)).allows(np.array([1])).tolist() == [False]


# ---------------------------------------------------------------------------
# what a cached search asks the catalog


def test_second_search_asks_the_catalog_once(vset, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    calls: Counter[str] = Counter()
    cat = type(store.catalog)
    for owner, name in ((cat, "set_snapshot"), (cat, "rows_at_version"), (cat, "index_state"),
                        (cat, "get_index"), (cat, "live_shards"), (ReadOnlyCatalog, "image_ids_where"),
                        (type(store.catalog), "feature_set"), (type(store.catalog), "image_paths_labels")):
        counting(monkeypatch, calls, owner, name)
    where = "label IN ('class1', 'class2', 'class3')"
    first = search(store, "v", mat[3], k=10, where=where)
    calls.clear()
    second = search(store, "v", mat[3], k=10, where=where)
    assert [r.image_id for r in second] == [r.image_id for r in first]
    # one statement: the hits' paths and labels with the change counter; the set, its index and
    # shards and the filter's ids come from the cache
    assert calls == Counter({"rows_at_version": 1})
    same(second, brute(mat[3], ids, mat, 10, "cosine", allowed=where_ids(store, where)))


def test_uncacheable_filter_runs_every_time(vset, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    calls: Counter[str] = Counter()
    counting(monkeypatch, calls, ReadOnlyCatalog, "image_ids_where")
    where = "id NOT IN (SELECT image_id FROM run_test_predictions)"  # a table the counter does not cover
    for _ in range(2):
        assert len(search(store, "v", mat[0], k=5, where=where)) == 5
    assert calls["image_ids_where"] == 2
    for _ in range(2):
        search(store, "v", mat[0], k=5, where="label = 'class1'")
    assert calls["image_ids_where"] == 3


# ---------------------------------------------------------------------------
# writes between two searches


def test_relabel_between_two_searches_is_seen(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    first = search(store, "v", mat[0], k=5)
    assert search(store, "v", mat[0], k=5, where="label = 'sneaker'") == []
    top = first[0].image_id
    with store.session() as s:
        s.execute(update(Image).where(Image.id == top).values(label="sneaker", source_path="/new/path.jpg"))
    second = search(store, "v", mat[0], k=5)
    assert (second[0].image_id, second[0].label, second[0].path) == (top, "sneaker", "/new/path.jpg")
    assert [r.image_id for r in search(store, "v", mat[0], k=5, where="label = 'sneaker'")] == [top]


def test_dataset_membership_between_two_searches_is_seen(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    where = "dataset = 'picked'"
    assert search(store, "v", mat[0], k=5, where=where) == []
    with store.session() as s:
        ds = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "picked"}]).scalar_one()
        s.execute(insert(DatasetMember), [{"dataset_id": ds, "image_id": int(i), "source_path": "x"}
                                          for i in ids[:300]])
    same(search(store, "v", mat[0], k=5, where=where), brute(mat[0], ids[:300], mat[:300], 5, "cosine"))


def test_new_vectors_between_two_searches_are_seen(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, how = vset
    q = mat[0] + 0.01
    search(store, "v", q, k=5, where="label = 'class3'")
    new_ids = add_images(store, 10)
    new = np.repeat(q[None, :], 10, axis=0).astype(np.float32)
    append(store, new_ids, new)
    got = search(store, "v", q, k=5)
    assert {r.image_id for r in got} <= set(new_ids.tolist()) and len(got) == 5
    filtered = search(store, "v", q, k=3, where="label = 'class3'")
    allowed = where_ids(store, "label = 'class3'")
    all_ids, all_mat = np.concatenate([ids, new_ids]), np.concatenate([mat, new])
    same(filtered, brute(q, all_ids, all_mat, 3, "cosine", allowed=allowed))
    assert set(new_ids.tolist()) & set(allowed.tolist())  # the new images include class3 ones


def test_write_by_another_store_object_is_seen(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, how = vset
    search(store, "v", mat[0], k=5)
    other = Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url))
    try:  # another process's writer: only the catalog's counter tells this one
        if how == "index":
            ann.drop_index(other, "v")
        with other.session() as s:
            s.execute(update(Image).where(Image.id == int(ids[0])).values(label="moved"))
    finally:
        other.close()
    got = search(store, "v", mat[0], k=5)
    assert got[0].label == "moved" and got.method == "exact"


def test_dropped_set_between_two_searches_is_not_found(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    search(store, "v", mat[0], k=5)
    other = Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url))
    try:
        with other.writing(), other.session() as s:
            row = other.catalog.find_feature_set(s, "v")
            assert row is not None
            other.catalog.delete_feature_set(s, row)
    finally:
        other.close()
    with pytest.raises(NotFoundError):
        search(store, "v", mat[0], k=5)


def test_id_filter_is_fetched_once_per_catalog_version(vset) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat, _ = vset
    fetched: list[int] = []

    def fetch() -> np.ndarray:  # what the HTTP label= filter runs, with bound parameters
        fetched.append(1)
        return store.catalog.image_ids_where(label="class3")

    chosen = IdFilter(("label", "class3"), fetch)
    first = search(store, "v", mat[0], k=5, id_filter=chosen)
    again = search(store, "v", mat[0], k=5, id_filter=chosen)
    assert [r.image_id for r in again] == [r.image_id for r in first] and len(fetched) == 1
    assert {r.label for r in first} == {"class3"}
    outside = next(int(i) for i in ids if int(i) not in {r.image_id for r in first}
                   and store.catalog.image_paths_labels([int(i)])[int(i)][1] != "class3")
    with store.session() as s:  # relabelled into the filter between two searches: seen by the second
        s.execute(update(Image).where(Image.id == outside).values(label="class3"))
    got = search(store, "v", mat[int(np.flatnonzero(ids == outside)[0])], k=1, id_filter=chosen)
    assert [r.image_id for r in got] == [outside] and len(fetched) == 2
