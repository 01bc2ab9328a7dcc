"""ANN indexes (issue 14): exactness at high expansion, coverage of new shards, filters, duplicates,
crash safety of the build, memory mapping, CLI and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, insert, inspect, select
from typer.testing import CliRunner

from featurestore.catalog.schema import Dataset, DatasetMember, Image
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import IntegrityError, InvalidInputError, NotFoundError
from featurestore.features.base import FeatureSpec
from featurestore.io.atomic import sha256_file
from featurestore.search import index as ann
from featurestore.search import index_query
from featurestore.search.kernel import near_duplicate_groups
from featurestore.search.service import duplicates, search, where_ids
from featurestore.store import Store
from helpers import brute, count_hashing, raises_cli

runner = CliRunner()
DIM = 16
# High expansion: on a few thousand vectors HNSW then finds exactly the true neighbours. One insertion
# thread: usearch's parallel insertion can leave a few vectors unreachable (about 1 in 5,000 here).
EXACT_PARAMS = {"connectivity": 32, "expansion_add": 400, "expansion_search": 1000, "threads": 1}


def fs_cli(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def add_images(store: Store, n: int, labels: int = 10) -> np.ndarray:
    """``n`` catalog images without files (labels class0..), returning their ids."""
    with store.session() as s:
        ds = s.scalar(select(Dataset.id).where(Dataset.name == "t"))
        if ds is None:
            d = Dataset(name="t")
            s.add(d)
            s.flush()
            ds = d.id
        start = s.scalar(select(func.count(Image.id))) or 0
        s.execute(insert(Image), [
            {"sha256": f"{start + i:064x}", "source_path": f"/img/{start + i}.jpg", "width": 1, "height": 1,
             "format": "JPEG", "mode": "RGB", "bytes": 1, "label": f"class{(start + i) % labels}",
             "superclass": None, "dataset_id": ds} for i in range(n)])
        ids = s.scalars(select(Image.id).order_by(Image.id.desc()).limit(n)).all()
        s.execute(insert(DatasetMember), [{"dataset_id": ds, "image_id": i, "source_path": f"/img/{i}.jpg"}
                                          for i in ids])
    return np.array(sorted(ids), dtype=np.int64)


def clustered(n: int, dim: int = DIM, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """A Gaussian mixture (the structure real embeddings have), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def append(store: Store, name: str, ids: np.ndarray, vecs: np.ndarray, shard_rows: int) -> None:
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec(name, "test", vecs.shape[1], {}))
        for start in range(0, len(ids), shard_rows):
            store.append_vectors(fs, ids[start : start + shard_rows], vecs[start : start + shard_rows])


@pytest.fixture
def indexed(store: Store):  # type: ignore[no-untyped-def]
    """2,000 clustered vectors in 4 shards of feature set `v`, with an index at high expansion."""
    ids = add_images(store, 2000)
    mat = clustered(2000)
    append(store, "v", ids, mat, 500)
    report = ann.build_index(store, "v", **EXACT_PARAMS)
    assert report.action == "created" and report.vectors == 2000
    return store, ids, mat


def score(r):  # type: ignore[no-untyped-def]
    """What helpers.brute scores: the cosine similarity, or the l2 distance."""
    return r.similarity if r.similarity is not None else r.distance


def same(results, ref, atol: float = 1e-4) -> None:  # type: ignore[no-untyped-def]
    ref_ids, ref_scores = ref
    assert [r.image_id for r in results] == ref_ids
    assert np.allclose([score(r) for r in results], ref_scores, atol=atol)


# ---------------------------------------------------------------------------
# exactness, params


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_index_results_equal_exact_at_high_expansion(store: Store, metric: str) -> None:
    ids = add_images(store, 2000)
    mat = clustered(2000, seed=1)
    append(store, "v", ids, mat, 700)
    ann.build_index(store, "v", metric=metric, **EXACT_PARAMS)
    rng = np.random.default_rng(2)
    for q in rng.normal(size=(10, DIM)) * 3:
        for k in (1, 10, 50):
            got = search(store, "v", q, k=k, metric=metric)
            assert got.method == "index" and {r.method for r in got} == {"index"}
            same(got, brute(q, ids, mat, k, metric))
    qid = int(ids[17])  # a stored image: excluded from its own results
    got = search(store, "v", qid, k=10, metric=metric)
    same(got, brute(mat[17], ids, mat, 10, metric, exclude=[qid]))
    exact = search(store, "v", qid, k=10, metric=metric, exact=True)
    assert exact.method == "exact" and [r.image_id for r in exact] == [r.image_id for r in got]


@pytest.mark.parametrize("dtype", ["f16", "i8"])
def test_quantised_indexes_find_nearly_the_same(store: Store, dtype: str) -> None:
    ids = add_images(store, 2000)
    mat = clustered(2000, seed=3)
    append(store, "v", ids, mat, 2000)
    ann.build_index(store, "v", dtype=dtype, **EXACT_PARAMS)
    recall = []
    for q in np.random.default_rng(4).normal(size=(20, DIM)) * 3:
        got = search(store, "v", q, k=10)
        ref_ids, ref_scores = brute(q, ids, mat, 10, "cosine")
        recall.append(len({r.image_id for r in got} & set(ref_ids)) / 10)
        assert np.allclose([r.similarity for r in got][:1], ref_scores[:1], atol=0.02)  # scores of quantised vectors
    assert np.mean(recall) >= 0.9


def test_params_are_checked(store: Store) -> None:
    ids = add_images(store, 50)
    append(store, "v", ids, clustered(50), 50)
    with pytest.raises(InvalidInputError, match="i8 index .* only supports the cosine metric"):
        ann.build_index(store, "v", metric="l2", dtype="i8")
    with pytest.raises(InvalidInputError, match="connectivity must be an integer in \\[2, 256\\]"):
        ann.build_index(store, "v", connectivity=1)
    with pytest.raises(InvalidInputError, match="unknown index dtype 'f8'"):
        ann.build_index(store, "v", dtype="f8")
    with pytest.raises(NotFoundError, match="unknown feature set 'nope'"):
        ann.build_index(store, "nope")
    with store.writing():
        store.ensure_feature_set(FeatureSpec("empty", "test", 4, {}))
    with pytest.raises(InvalidInputError, match="'empty' has no vectors yet"):
        ann.build_index(store, "empty")
    assert store.catalog.list_indexes() == []


def test_schema_has_the_table(store: Store) -> None:
    assert "vector_indexes" in set(inspect(store.engine).get_table_names())


# ---------------------------------------------------------------------------
# coverage: shards written after the build, compaction, replacement


def test_new_shards_are_searched_exactly_then_added(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    q = mat[3] + 0.5  # not a stored vector
    new_ids = add_images(store, 300)
    new = clustered(300, seed=7)
    new[5] = q * 2  # same direction as the query: the best cosine match of all
    append(store, "v", new_ids, new, 150)
    all_ids, all_mat = np.concatenate([ids, new_ids]), np.concatenate([mat, new])
    got = search(store, "v", q, k=10)
    same(got, brute(q, all_ids, all_mat, 10, "cosine"))
    assert got.method == "index" and "300 vector(s) in 2 shard(s) written since the build" in got.note
    assert got[0].image_id == new_ids[5] and got[0].method == "exact"
    status = ann.index_status(store, "v")
    assert status is not None and (status.covered_shards, status.live_shards, status.uncovered_vectors) == (4, 6, 300)

    report = ann.build_index(store, "v", threads=1)
    assert (report.action, report.added, report.removed, report.vectors) == ("extended", 300, 0, 2300)
    got = search(store, "v", q, k=10)
    same(got, brute(q, all_ids, all_mat, 10, "cosine"))
    assert {r.method for r in got} == {"index"} and "written since" not in got.note
    assert ann.build_index(store, "v").action == "unchanged"
    # only the registered file is left
    files = list((store.root / "indexes" / "v").iterdir())
    assert [f.name for f in files] == [Path(store.catalog.get_index(1).path).name]  # type: ignore[union-attr]


def test_compaction_keeps_results_exact_and_rebuilds(store: Store) -> None:
    ids = add_images(store, 1200)
    mat = clustered(1200, seed=5)
    append(store, "v", ids[:1000], mat[:1000], 1000)   # one big shard
    append(store, "v", ids[1000:], mat[1000:], 50)     # four small ones
    ann.build_index(store, "v", **EXACT_PARAMS)
    with store.writing():
        assert store.compact("v", min_rows=100) == [("v", 4, 200)]
    status = ann.index_status(store, "v")
    assert status is not None and status.stale_shards == 4 and status.uncovered_vectors == 200
    for q in mat[990:1010]:  # queries near vectors that moved to the new shard
        same(search(store, "v", q, k=10), brute(q, ids, mat, 10, "cosine"))
    report = ann.build_index(store, "v", threads=1)  # 200 of 1,200 stale: under a fifth, so extended
    assert (report.action, report.removed, report.added, report.vectors) == ("extended", 200, 200, 1200)
    for q in mat[990:1010]:
        got = search(store, "v", q, k=10)
        assert {r.method for r in got} == {"index"}
        same(got, brute(q, ids, mat, 10, "cosine"))
    # most of the index stale: rebuilt
    append(store, "v", add_images(store, 1), clustered(1, seed=9), 1)
    with store.writing():
        store.compact("v", min_rows=10_000)
    assert ann.build_index(store, "v").action == "rebuilt"


def test_replaced_feature_set_loses_its_index(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    old = store.root / store.catalog.list_indexes()[0].path
    with store.writing():
        store.ensure_feature_set(FeatureSpec("v", "test", DIM, {}), replace=True)
    assert store.catalog.list_indexes() == []  # the row went with the feature set (ON DELETE CASCADE)
    append(store, "v", ids[:100], mat[:100] + 1, 100)
    got = search(store, "v", mat[0], k=5)
    assert got.method == "exact" and got.note == ""  # no index any more
    ann.build_index(store, "v")
    assert not old.exists()  # the next build swept the orphan


def test_parameter_changes(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    first = store.catalog.list_indexes()[0]
    r = ann.build_index(store, "v", expansion_search=64)
    assert r.action == "updated" and store.catalog.list_indexes()[0].path == first.path
    assert store.catalog.list_indexes()[0].params["expansion_search"] == 64
    r = ann.build_index(store, "v", metric="l2")
    assert r.action == "rebuilt" and "metric cosine -> l2" in r.reason
    assert not (store.root / first.path).exists()
    got = search(store, "v", mat[0], k=3)
    assert got.method == "exact" and "for l2, not cosine" in got.note
    assert search(store, "v", mat[0], k=3, metric="l2").method == "index"
    assert ann.build_index(store, "v", rebuild=True).action == "rebuilt"


def test_missing_or_damaged_file_is_an_error(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    path = store.root / store.catalog.list_indexes()[0].path
    store.ann_indexes.clear()
    path.rename(path.with_suffix(".moved"))
    with raises_cli(IntegrityError, match="index file .* is missing; rebuild it with `fs index build"):
        search(store, "v", mat[0], k=3)
    assert search(store, "v", mat[0], k=3, exact=True).method == "exact"
    path.with_suffix(".moved").rename(path)
    with open(path, "r+b") as fh:  # same size, other bytes
        fh.seek(path.stat().st_size // 2)
        data = fh.read(64)
        fh.seek(path.stat().st_size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    status = ann.list_indexes(store, verify=True)[0]
    assert status.sha256_ok is False
    new_ids = add_images(store, 10)
    append(store, "v", new_ids, clustered(10), 10)
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        ann.build_index(store, "v")
    assert ann.build_index(store, "v", rebuild=True).vectors == 2010


def test_index_digest_is_remembered_until_the_file_changes(indexed,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A later process does not hash an unchanged index file again, but a rewritten one always."""
    from featurestore.io import verified

    store, ids, mat = indexed
    path = store.root / store.catalog.list_indexes()[0].path
    monkeypatch.setattr(verified, "RACY_NS", 50_000_000)  # records need a ctime older than this
    time.sleep(0.1)
    store.ann_indexes.clear()
    verified.forget()
    assert search(store, "v", mat[0], k=3).method == "index"
    assert verified.record_path(store.root / verified.RECORDS_FOLDER, path).is_file()
    hashed = count_hashing(monkeypatch)
    store.ann_indexes.clear()
    verified.forget()  # as a new process would start
    assert search(store, "v", mat[0], k=3).method == "index"
    assert hashed == []
    before = path.stat()
    with open(path, "r+b") as fh:  # same size, other bytes in the graph, mtime put back
        fh.seek(before.st_size // 2)
        data = fh.read(64)
        fh.seek(before.st_size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    store.ann_indexes.clear()
    verified.forget()
    with pytest.raises(IntegrityError, match="does not match the sha256|do not match the sha256"):
        search(store, "v", mat[0], k=3)
    assert hashed == [path]


def test_damaged_header_is_a_one_line_error(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    path = store.root / store.catalog.list_indexes()[0].path
    store.ann_indexes.clear()
    with open(path, "r+b") as fh:  # same size, scrambled header: usearch's own ValueError before the fix
        fh.write(bytes(64))
    with raises_cli(IntegrityError, match=r"index file .* is damaged .*fs index build --features v --rebuild"):
        search(store, "v", mat[0], k=3)
    assert search(store, "v", mat[0], k=3, exact=True).method == "exact"
    out = fs_cli("search", "--features", "v", "--id", str(int(ids[0])))
    assert out.exit_code == 1 and "is damaged" in out.output and "Traceback" not in out.output
    assert ann.build_index(store, "v", rebuild=True).action == "rebuilt"
    assert search(store, "v", mat[0], k=3).method == "index"


def test_index_is_memory_mapped(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    path = (store.root / store.catalog.list_indexes()[0].path).resolve()
    search(store, "v", mat[0], k=3)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps  # opened with view=True: the file is mapped, not read into memory


# ---------------------------------------------------------------------------
# filters


def test_filters_with_the_index(indexed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    monkeypatch.setattr(index_query, "EXACT_ALLOWED_MAX", 20)  # small test sets: exercise the over-fetch path
    monkeypatch.setattr(index_query, "EXACT_ROWS_PER_CANDIDATE", 0)
    rng = np.random.default_rng(11)
    for selectivity in (0.5, 0.1, 0.02):
        allowed = np.sort(rng.choice(ids, int(len(ids) * selectivity), replace=False))
        for q in rng.normal(size=(5, DIM)) * 3:
            got = search(store, "v", q, k=10, allowed_ids=allowed)
            assert got.method == "index"
            same(got, brute(q, ids, mat, 10, "cosine", allowed=allowed))
    # a SQL filter (10 labels: 10%)
    q = mat[0]
    got = search(store, "v", q, k=10, where="label = 'class3'")
    assert got.method == "index" and {r.label for r in got} == {"class3"} and len(got) == 10
    same(got, brute(q, ids, mat, 10, "cosine", allowed=where_ids(store, "label = 'class3'")))
    # few allowed: searched exactly, still k results whenever k exist
    few = ids[[4, 400, 1400]]
    got = search(store, "v", q, k=10, allowed_ids=few)
    assert got.method == "exact" and "the filter allows 3 images" in got.note and len(got) == 3


def test_filter_the_over_fetch_cannot_satisfy_goes_exact(indexed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    monkeypatch.setattr(index_query, "EXACT_ALLOWED_MAX", 5)
    monkeypatch.setattr(index_query, "FETCH_MAX", 100)
    monkeypatch.setattr(index_query, "EXACT_ROWS_PER_CANDIDATE", 0)
    q = mat[0]
    # the 500 images farthest from q: the index's first 100 candidates include none of them
    far = ids[np.argsort(mat @ q / np.linalg.norm(mat, axis=1))[:500]]
    got = search(store, "v", q, k=10, allowed_ids=far)
    assert got.method == "exact" and "too few among the index's candidates" in got.note
    same(got, brute(q, ids, mat, 10, "cosine", allowed=far))


def test_small_filters_over_budget_read_only_their_rows(indexed,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids, mat = indexed
    lean = Store.open(Settings.from_env(store=store.root, database_url=store.settings.database_url,
                                        search_memory_mb=0))  # the set does not fit: nothing is loaded whole
    calls = []
    original = index_query._exact_subset
    monkeypatch.setattr(index_query, "_exact_subset", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        few = ids[[4, 400, 1400, 1900]]
        for q in mat[:3]:
            got = search(lean, "v", q, k=3, allowed_ids=few)
            assert got.method == "exact" and {r.method for r in got} == {"exact"}
            same(got, brute(q, ids, mat, 3, "cosine", allowed=few))
        assert len(calls) == 3
        got = search(lean, "v", int(ids[4]), k=10, allowed_ids=few)  # the query image itself is excluded
        assert sorted(r.image_id for r in got) == sorted(few[1:].tolist())
    finally:
        lean.close()


def test_concurrent_searches_share_one_index(indexed) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    store, ids, mat = indexed
    queries = mat[:40] + 0.3
    want = [[r.image_id for r in search(store, "v", q, k=5)] for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda q: [r.image_id for r in search(store, "v", q, k=5)], queries))
    assert got == want
    assert len(store.ann_indexes.opened) == 1


def test_filters_with_new_shards(indexed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    monkeypatch.setattr(index_query, "EXACT_ALLOWED_MAX", 20)
    monkeypatch.setattr(index_query, "EXACT_ROWS_PER_CANDIDATE", 0)
    new_ids = add_images(store, 200)
    new = clustered(200, seed=8)
    append(store, "v", new_ids, new, 200)
    all_ids, all_mat = np.concatenate([ids, new_ids]), np.concatenate([mat, new])
    allowed = all_ids[::4]
    for q in new[:5]:
        got = search(store, "v", q, k=10, allowed_ids=allowed)
        same(got, brute(q, all_ids, all_mat, 10, "cosine", allowed=allowed))


# ---------------------------------------------------------------------------
# duplicates


def _with_duplicates(n: int, seed: int) -> np.ndarray:
    mat = clustered(n, seed=seed)
    rng = np.random.default_rng(seed)
    for a in range(0, 200, 10):  # pairs and triples of near copies
        mat[a + 1] = mat[a] + rng.normal(scale=1e-3, size=DIM)
        if a % 20 == 0:
            mat[a + 2] = mat[a + 1] + rng.normal(scale=1e-3, size=DIM)
    mat[300:350] = mat[299]  # a dense group larger than the first neighbour count
    return mat.astype(np.float32)


def test_duplicates_through_the_index_equal_exact(store: Store) -> None:
    ids = add_images(store, 1500)
    mat = _with_duplicates(1500, 12)
    append(store, "v", ids, mat, 500)
    ann.build_index(store, "v", **EXACT_PARAMS)
    got = duplicates(store, "v", threshold=0.999)
    ref = duplicates(store, "v", threshold=0.999, exact=True)
    assert got.method == "index" and ref.method == "exact"
    assert [(d.group, d.image_id) for d in got] == [(d.group, d.image_id) for d in ref]
    groups = near_duplicate_groups(ids, mat, threshold=0.999)
    assert len({d.group for d in got}) == len(groups) and max(len(g) for g in groups) == 51
    # vectors written after the build take part (compared exactly among themselves, and against the index)
    new_ids = add_images(store, 3)
    append(store, "v", new_ids, np.stack([mat[700], mat[700], clustered(1, seed=99)[0]]), 3)
    got = duplicates(store, "v", threshold=0.999)
    group = next(d.group for d in got if d.image_id == ids[700])
    assert {d.image_id for d in got if d.group == group} == {int(ids[700]), int(new_ids[0]), int(new_ids[1])}
    # where: only allowed images take part
    got = duplicates(store, "v", threshold=0.999, where="label = 'class0'")
    ref = duplicates(store, "v", threshold=0.999, where="label = 'class0'", exact=True)
    assert got and {d.label for d in got} == {"class0"}
    assert [(d.group, d.image_id) for d in got] == [(d.group, d.image_id) for d in ref]


def test_l2_index_is_not_used_for_duplicates(store: Store) -> None:
    ids = add_images(store, 400)
    append(store, "v", ids, _with_duplicates(400, 1), 400)
    ann.build_index(store, "v", metric="l2")
    assert duplicates(store, "v", threshold=0.999).method == "exact"


# ---------------------------------------------------------------------------
# crash safety

BUILDER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from featurestore.config import Settings
    from featurestore.store import Store
    from featurestore.search import index as ann
    from featurestore.catalog.repository import Catalog
    mode = sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "during-add":
        progress = lambda done, total: die() if done >= 4096 else None
    else:
        progress = None
    if mode == "before-rename":  # temp file written (then hashed), not renamed
        ann.sha256_file = die
    elif mode == "after-rename":  # file in place, catalog not told
        Catalog.replace_index = die
    elif mode == "after-register":  # catalog points at the new file, the old one not yet deleted
        original = Catalog.replace_index
        Catalog.replace_index = lambda *a, **k: (original(*a, **k), die())
    store = Store.open(Settings.from_env(store=Path(sys.argv[1])))
    print("ready", flush=True)
    ann.build_index(store, "v", expansion_add=256, rebuild=True, progress=progress)
    print("done", flush=True)
    """
)


def _consistent(store: Store) -> None:
    """The registered index (if any) is complete and matches its sha256; search works."""
    for record in store.catalog.list_indexes():
        path = store.root / record.path
        assert path.is_file() and sha256_file(path) == record.sha256 and path.stat().st_size == record.bytes
    store.ann_indexes.clear()
    got = search(store, "v", np.ones(DIM), k=5)
    assert len(got) == 5


@pytest.mark.slow
def test_kill_9_during_build_leaves_store_consistent(tmp_path: Path) -> None:
    root = tmp_path / ".fs"
    settings = Settings.from_env(store=root)
    store = Store.open(settings, create=True)
    ids = add_images(store, 6_000)
    append(store, "v", ids, clustered(6_000, seed=4), 1500)
    store.close()
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    rng = np.random.default_rng(0)
    for mode in ["during-add", "before-rename", "after-rename", "none", "after-register", "random", "random"]:
        proc = subprocess.Popen([sys.executable, str(script), str(root), mode], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        if mode == "random":
            time.sleep(float(rng.uniform(0.2, 2.0)))
            proc.kill()
        code = proc.wait(120)
        if mode == "random" and code == 0:  # the build finished before the kill came: it must say so
            assert proc.stdout.read().strip() == b"done"
        else:
            assert code == (0 if mode == "none" else -signal.SIGKILL)
        store = Store.open(settings)
        try:
            before = store.catalog.list_indexes()
            _consistent(store)
            folder = root / "indexes" / "v"
            on_disk = {p.name for p in folder.iterdir()} if folder.exists() else set()
            registered = {Path(r.path).name for r in before}
            assert registered <= on_disk
            if mode in ("before-rename", "after-rename", "after-register"):
                assert len(on_disk - registered) == 1  # exactly the file the crash was placed to leave
            report = ann.build_index(store, "v", rebuild=True)  # the next build completes...
            assert report.vectors == 6_000
            left = {p.name for p in folder.iterdir()}
            assert left == {Path(r.path).name for r in store.catalog.list_indexes()}  # ...and sweeps
            _consistent(store)
        finally:
            store.close()


# ---------------------------------------------------------------------------
# CLI


def test_cli_index_build_list_search_drop(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    for cmd in (["index"], ["index", "build"], ["index", "list"], ["index", "drop"]):
        result = fs_cli(*cmd, "--help")
        assert result.exit_code == 0 and "Example: fs index" in result.output, result.output
    new_ids = add_images(store, 20)
    append(store, "v", new_ids, clustered(20, seed=3), 20)
    listed = fs_cli("index", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    row = json.loads(listed.stdout)[0]
    assert (row["feature_set"], row["vectors"], row["shards"], row["uncovered"]) == ("v", 2000, "4/5", 20)
    result = fs_cli("search", "-F", "v", "--id", str(ids[0]), "-k", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "search: HNSW index of v (usearch, cosine, f32, 2,000 vectors); 20 vector(s)" in result.stderr
    result = fs_cli("index", "build", "--features", "v", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["action"] == "extended"
    assert "v: added 20 vectors (1 new shard(s)); 2,020 in the index" in result.stderr
    result = fs_cli("search", "-F", "v", "--id", str(ids[0]), "-k", "3", "--format", "csv")
    assert result.stdout.splitlines()[0] == "rank,image_id,path,label,distance,similarity,method"
    assert all(line.endswith(",index") for line in result.stdout.splitlines()[1:])
    result = fs_cli("search", "-F", "v", "--id", str(ids[0]), "-k", "3", "--exact")
    assert "search: exact (--exact)" in result.stderr and "method" not in result.stdout
    result = fs_cli("duplicates", "-F", "v", "--threshold", "0.9999")
    assert result.exit_code == 0 and "via the HNSW index of v" in result.stderr, result.output
    result = fs_cli("index", "list", "--verify")
    assert result.exit_code == 0 and "True" in result.stdout, result.output
    result = fs_cli("index", "drop", "v")
    assert result.exit_code == 0 and "dropped the index of v" in result.stderr
    assert not list((store.root / "indexes").glob("*/*.usearch"))
    result = fs_cli("index", "list")
    assert "no indexes yet: build one with `fs index build --features NAME`" in result.stderr


def test_cli_errors(indexed) -> None:  # type: ignore[no-untyped-def]
    store, ids, mat = indexed
    result = fs_cli("index", "build", "-F", "nope")
    assert result.exit_code == 1 and "Error: unknown feature set 'nope'; available: v" in result.stderr
    result = fs_cli("index", "build", "-F", "v", "--connectivity", "1")
    assert result.exit_code == 2 and "must be between 2 and 256" in result.output
    result = fs_cli("index", "build", "-F", "v", "--dtype", "i8", "--metric", "l2")
    assert result.exit_code == 2 and "i8 index only supports --metric cosine" in result.output
    result = fs_cli("index", "build", "-F", "v", "--dtype", "f64")
    assert result.exit_code == 2
    result = fs_cli("index", "build", "-F", " , ")
    assert result.exit_code == 2 and "name at least one feature set" in result.output
    result = fs_cli("duplicates", "-F", "v", "--expansion", "0")
    assert result.exit_code == 2 and "must be between 1 and 65536" in result.output
    result = fs_cli("duplicates", "-F", "v", "--expansion", "64", "--threshold", "0.9999", "--format", "json")
    assert result.exit_code == 0 and "via the HNSW index of v" in result.stderr, result.output
    result = fs_cli("index", "drop", "nope")
    assert result.exit_code == 1 and "Error: unknown feature set 'nope'" in result.stderr
    assert fs_cli("index", "drop", "v").exit_code == 0
    result = fs_cli("index", "drop", "v")
    assert result.exit_code == 1, result.output
    assert "Error: feature set 'v' has no index (no feature set has one yet): build one with " \
           "`fs index build --features v`" in result.stderr
    ann.build_index(store, "v")
    path = store.root / store.catalog.list_indexes()[0].path
    with open(path, "r+b") as fh:
        fh.seek(100)
        data = fh.read(16)
        fh.seek(100)
        fh.write(bytes(b ^ 0xFF for b in data))
    result = fs_cli("index", "list", "--verify")
    assert result.exit_code == 1 and "do not match their sha256" in result.stderr
    path.unlink()
    result = fs_cli("search", "-F", "v", "--id", str(ids[0]))
    assert result.exit_code == 1 and "Error: index file" in result.stderr and "is missing" in result.stderr


# ---------------------------------------------------------------------------
# HTTP


def test_http_search_says_which_method(indexed) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    store, ids, mat = indexed
    with TestClient(create_app(Settings(store=store.root, database_url=store.settings.database_url))) as client:
        url = f"/v1/feature-sets/v/search?image_id={int(ids[0])}&k=5"
        body = client.get(url).json()
        assert body["method"] == "index" and {h["method"] for h in body["results"]} == {"index"}
        assert "HNSW index of v" in body["note"]
        exact = client.get(url + "&exact=true").json()
        assert exact["method"] == "exact" and [h["image_id"] for h in exact["results"]] == [
            h["image_id"] for h in body["results"]]
        labelled = client.get(url + "&label=class3").json()
        assert {h["label"] for h in labelled["results"]} == {"class3"} and len(labelled["results"]) == 5
