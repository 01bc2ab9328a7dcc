"""Exact search and near-duplicate grouping against brute-force references."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from featurestore.errors import DimensionMismatchError, InvalidInputError
from featurestore.search.kernel import Hit, VectorIndex, near_duplicate_groups, top_k
from helpers import brute


def split_chunks(ids, mat, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((ids[start : start + size], mat[start : start + size]))
        start += size
    out.append((ids[start:], mat[start:]))
    return out


def assert_same(hits, ref):
    ref_ids, ref_scores = ref
    assert [h.image_id for h in hits] == ref_ids
    assert np.allclose([h.score for h in hits], ref_scores, atol=1e-5)


@pytest.fixture
def data():
    rng = np.random.default_rng(42)
    n, d = 503, 24
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    mat = rng.normal(size=(n, d)).astype(np.float32)
    mat[7] = 0.0  # a zero row must not break cosine
    queries = rng.normal(size=(6, d)).astype(np.float32)
    return ids, mat, queries


SPLITS = [[], [1], [100, 0, 250], [17] * 29, [502]]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("sizes", SPLITS)
def test_top_k_matches_brute_force(data, metric, sizes):
    ids, mat, queries = data
    for q in queries:
        for k in (1, 10, 600):
            hits = top_k(q, split_chunks(ids, mat, sizes), k=k, metric=metric)
            assert_same(hits, brute(q, ids, mat, k, metric))
            assert all(isinstance(h, Hit) for h in hits)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vector_index_matches_brute_force(data, metric):
    ids, mat, queries = data
    index = VectorIndex(ids, mat, metric)
    assert len(index) == len(ids)
    for q in queries:
        assert_same(index.search(q, k=10), brute(q, ids, mat, 10, metric))
    many = index.search_many(queries, k=5)
    assert len(many) == len(queries)
    for q, hits in zip(queries, many, strict=True):
        assert_same(hits, brute(q, ids, mat, 5, metric))


def test_scores_follow_convention(data):
    ids, mat, _ = data
    q = mat[3]
    cos = top_k(q, [(ids, mat)], k=3, metric="cosine")
    assert cos[0].image_id == ids[3] and cos[0].score == pytest.approx(1.0, abs=1e-6)
    assert cos[0].score >= cos[1].score >= cos[2].score
    l2 = top_k(q, [(ids, mat)], k=3, metric="l2")
    assert l2[0].image_id == ids[3] and l2[0].score == 0.0  # exact recomputation, no float noise
    assert l2[0].score <= l2[1].score <= l2[2].score
    assert VectorIndex(ids, mat, "l2").search(q, k=1)[0].score == 0.0


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exclude_and_allowed(data, metric):
    ids, mat, queries = data
    q = queries[0]
    index = VectorIndex(ids, mat, metric)
    first = brute(q, ids, mat, 5, metric)[0]
    exclude = set(first[:3])
    ref = brute(q, ids, mat, 5, metric, exclude=exclude)
    assert_same(top_k(q, split_chunks(ids, mat, [50, 50]), k=5, metric=metric, exclude_ids=exclude), ref)
    assert_same(index.search(q, k=5, exclude_ids=exclude), ref)

    # a large exclusion set takes the pre-filter path
    big = set(ids[::2].tolist())
    ref = brute(q, ids, mat, 5, metric, exclude=big)
    assert_same(top_k(q, [(ids, mat)], k=5, metric=metric, exclude_ids=big), ref)
    assert_same(index.search(q, k=5, exclude_ids=big), ref)

    for allowed in (ids[::50], ids[: len(ids) - 3], np.array([ids[4], 999_999])):
        ref = brute(q, ids, mat, 8, metric, allowed=allowed)
        assert_same(top_k(q, split_chunks(ids, mat, [60]), k=8, metric=metric, allowed_ids=allowed), ref)
        assert_same(index.search(q, k=8, allowed_ids=allowed), ref)
        assert_same(index.search_many(q[None, :], k=8, allowed_ids=allowed)[0], ref)

    assert top_k(q, [(ids, mat)], k=3, metric=metric, allowed_ids=np.array([], dtype=np.int64)) == []

    per_query = [[int(ids[0])], None]
    got = index.search_many(queries[:2], k=4, exclude_ids=per_query)
    assert_same(got[0], brute(queries[0], ids, mat, 4, metric, exclude={int(ids[0])}))
    assert_same(got[1], brute(queries[1], ids, mat, 4, metric))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ties_are_broken_by_id_whatever_the_chunking(metric):
    # integer-valued unit vectors: every score is exact, so ties are real ties
    d = 4
    eye = np.eye(d, dtype=np.float32)
    mat = np.concatenate([eye[[0, 1, 0, 2, 0, 3, 1, 0]], np.zeros((1, d), np.float32)])
    ids = np.array([50, 40, 30, 20, 10, 60, 5, 70, 1], dtype=np.int64)
    q = eye[0]
    expected = [10, 30, 50, 70]  # the four copies of e0, ascending id
    rng = np.random.default_rng(0)
    for _ in range(10):
        perm = rng.permutation(len(ids))
        pids, pmat = ids[perm], mat[perm]
        for sizes in ([], [1, 1, 1], [4], [2, 5]):
            hits = top_k(q, split_chunks(pids, pmat, sizes), k=4, metric=metric)
            assert [h.image_id for h in hits] == expected
        assert [h.image_id for h in VectorIndex(pids, pmat, metric).search(q, k=4)] == expected
    # the boundary tie: k=2 must take the two smallest ids of the four equal rows
    assert [h.image_id for h in top_k(q, split_chunks(ids, mat, [3]), k=2, metric=metric)] == [10, 30]


def test_validation_errors(data):
    ids, mat, queries = data
    with pytest.raises(DimensionMismatchError, match="dimension 5 but the vectors have dimension 24"):
        top_k(np.ones(5), [(ids, mat)])
    with pytest.raises(DimensionMismatchError, match="dimension 5 but the vectors have dimension 24"):
        VectorIndex(ids, mat).search(np.ones(5))
    with pytest.raises(DimensionMismatchError):
        VectorIndex(ids, mat).search_many(np.ones((2, 5)))
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        top_k(queries[0], [(ids, mat)], k=0)
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        VectorIndex(ids, mat).search(queries[0], k=-1)
    with pytest.raises(InvalidInputError, match="available: cosine, l2"):
        top_k(queries[0], [(ids, mat)], metric="dot")
    with pytest.raises(InvalidInputError, match="available: cosine, l2"):
        VectorIndex(ids, mat, metric="manhattan")
    with pytest.raises(InvalidInputError, match="zero norm"):
        top_k(np.zeros(24), [(ids, mat)])
    bad = mat.copy()
    bad[2, 0] = np.nan
    with pytest.raises(InvalidInputError, match=str(ids[2])):
        top_k(queries[0], [(ids, bad)])
    with pytest.raises(InvalidInputError, match=str(ids[2])):
        VectorIndex(ids, bad)
    # errors are also the matching builtins
    with pytest.raises(ValueError):
        top_k(np.ones(3), [(ids, mat)])


def test_near_duplicates_found_for_planted_copies():
    rng = np.random.default_rng(7)
    n, d = 1000, 64
    mat = rng.normal(size=(n, d)).astype(np.float32)
    ids = np.arange(10_000, 10_000 + n, dtype=np.int64)
    # plant: 5 -> 900 (pair), 20 -> 300, 301 (triple), 999 -> 0 (pair across blocks)
    for src, dsts in ((5, [900]), (20, [300, 301]), (999, [0])):
        for dst in dsts:
            mat[dst] = mat[src] + rng.normal(scale=1e-3, size=d).astype(np.float32)
    expected = [[10_000, 10_999], [10_005, 10_900], [10_020, 10_300, 10_301]]
    for block in (64, 333, 4096):
        assert near_duplicate_groups(ids, mat, threshold=0.97, block=block) == expected


def test_near_duplicates_none_for_random_vectors_and_zero_rows():
    rng = np.random.default_rng(8)
    mat = rng.normal(size=(500, 64)).astype(np.float32)
    mat[10] = 0.0
    mat[11] = 0.0  # two zero rows are not "duplicates": cosine is undefined for them
    assert near_duplicate_groups(np.arange(500), mat, block=128) == []


def test_near_duplicates_dense_group_and_chain():
    rng = np.random.default_rng(9)
    base = rng.normal(size=32).astype(np.float32)
    mat = rng.normal(size=(300, 32)).astype(np.float32)
    mat[100:250] = base  # 150 identical vectors: thousands of edges in one tile
    ids = np.arange(300)[::-1].copy()
    groups = near_duplicate_groups(ids, mat, threshold=0.99, block=64)
    assert groups == [sorted(ids[100:250].tolist())]


def test_near_duplicates_validation():
    with pytest.raises(InvalidInputError, match="threshold"):
        near_duplicate_groups(np.arange(3), np.ones((3, 2)), threshold=1.5)
    with pytest.raises(DimensionMismatchError):
        near_duplicate_groups(np.arange(4), np.ones((3, 2)))
    assert near_duplicate_groups(np.arange(1), np.ones((1, 2))) == []


# --- concurrent searches share the cores through the product gate (fs serve's thread pool) ---


def test_product_gate_size_follows_the_blas_threads():
    from threadpoolctl import threadpool_limits

    from featurestore.search.blas import ProductGate as _ProductGate

    cores = len(os.sched_getaffinity(0))
    with threadpool_limits(limits=1, user_api="blas"):
        assert _ProductGate().size() == cores  # single-threaded BLAS: one product per core
    with threadpool_limits(limits=cores, user_api="blas"):
        assert _ProductGate().size() == 1  # each product takes every core


@pytest.mark.parametrize("slots", [1, 2])
def test_product_gate_admits_at_most_its_slots(slots):
    from featurestore.search.blas import ProductGate as _ProductGate

    class Gate(_ProductGate):
        def size(self) -> int:
            return slots

    gate, lock = Gate(), threading.Lock()
    inside, most, start = [0], [0], threading.Barrier(6)

    def enter() -> None:
        start.wait()
        for _ in range(50):
            with gate:
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0005)  # hold the slot so the other threads pile up at the gate
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=enter) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert most[0] == slots


def test_concurrent_searches_return_what_sequential_ones_do(data):
    ids, mat, queries = data
    index = VectorIndex(ids, mat, "cosine")
    allowed = ids[::3]
    expected = [(index.search(q, k=5), index.search(q, k=5, allowed_ids=allowed)) for q in queries]
    expected_many = index.search_many(queries, k=5)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda q: (index.search(q, k=5), index.search(q, k=5, allowed_ids=allowed)),
                            list(queries) * 8))
        got_many = list(pool.map(lambda _: index.search_many(queries, k=5), range(8)))
        got_stream = list(pool.map(lambda q: top_k(q, split_chunks(ids, mat, [100, 250]), k=5), queries))
    assert got == expected * 8
    assert all(g == expected_many for g in got_many)
    # top_k normalises chunk by chunk, so its scores may differ in the last float bit: compare the ids
    assert [[h.image_id for h in g] for g in got_stream] == [[h.image_id for h in e[0]] for e in expected]
