"""Latency of exact in-memory search next to a bare numpy baseline.

The baseline is the least a single exact query can cost: one BLAS
matrix-vector product over the same in-memory float32 matrix plus an
``argpartition`` for the top k (and a sort of those k). ``VectorIndex.search``
adds validation, the query normalisation, id tie-breaking and Hit objects; the
target is a p50 at most 2x the baseline.

Store mode (``--store``) writes the same matrix into a temporary store (fake
image rows bulk-inserted into the catalog, vectors appended in shards) and
prints, side by side in one run:

* p50/p95 of ``featurestore.search.service.search(store, ...)`` for single warm queries
  (the feature set loaded once into the cached index) next to the bare
  baseline on the same in-memory matrix; target p50 <= 2x bare;
* the first (cold) query, which loads the set from HDF5 and builds the index,
  next to a raw h5py read of every shard's ``vectors``; target <= 5x.

Run::

    python bench/bench_search.py --n 100000 --dim 1280
    python bench/bench_search.py --store --n 100000 --dim 1280
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from sqlalchemy import insert

from featurestore.catalog.schema import Dataset, Image, utcnow
from featurestore.config import Settings
from featurestore.features.base import FeatureSpec
from featurestore.search.kernel import VectorIndex, near_duplicate_groups
from featurestore.search.service import clear_cache, search
from featurestore.store import Store


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and an ``(n, dim)`` float32 matrix (non-negative, like CNN pooled features)."""
    rng = np.random.default_rng(seed)
    mat = rng.random((n, dim), dtype=np.float32)
    ids = np.arange(1, n + 1, dtype=np.int64)
    return ids, mat


def make_queries(mat: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Stored rows plus a little noise, so each query has a clear nearest neighbour."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, mat.shape[0], size=count)
    noise = rng.normal(scale=0.01, size=(count, mat.shape[1])).astype(np.float32)
    return mat[rows] + noise


def bare_search(mat: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The baseline: ``mat @ q`` + ``argpartition``, best k sorted."""
    scores = mat @ q
    top = np.argpartition(scores, -k)[-k:]
    return top[np.argsort(-scores[top])]


def time_pair(
    fa: Callable[[np.ndarray], object],
    fb: Callable[[np.ndarray], object],
    queries: np.ndarray,
    warmup: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per call of ``fa(q)`` and ``fb(q)``, interleaved query by query.

    Interleaving (and alternating which goes first) keeps drift from other load
    on the machine and cache state from favouring one side.
    """
    for q in queries[:warmup]:
        fa(q)
        fb(q)
    ta, tb = np.empty(len(queries)), np.empty(len(queries))
    for i, q in enumerate(queries):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for fn, out in order:
            t0 = time.perf_counter()
            fn(q)
            out[i] = time.perf_counter() - t0
    return ta, tb


def percentiles(times: np.ndarray) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    p50, p95 = np.percentile(times, [50, 95]) * 1e3
    return float(p50), float(p95)


def bench_single(
    ids: np.ndarray, mat: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> dict[str, tuple[float, float]]:
    """p50/p95 (ms) of the bare baseline and of ``VectorIndex.search`` for one metric."""
    t0 = time.perf_counter()
    index = VectorIndex(ids, mat, metric)
    build = time.perf_counter() - t0
    qs = queries.astype(np.float32)
    bare, idx = time_pair(lambda q: bare_search(mat, q, k), lambda q: index.search(q, k), qs)
    return {"bare": percentiles(bare), "index": percentiles(idx), "build_s": (build, build)}


def bench_batch(ids: np.ndarray, mat: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Milliseconds per query of ``VectorIndex.search_many`` (cosine)."""
    index = VectorIndex(ids, mat, "cosine")
    t0 = time.perf_counter()
    index.search_many(queries, k)
    return (time.perf_counter() - t0) * 1e3 / len(queries)


def bench_duplicates(n: int, dim: int, block: int, seed: int = 0) -> float:
    """Seconds for :func:`near_duplicate_groups` on ``n`` random vectors."""
    ids, mat = make_data(n, dim, seed)
    t0 = time.perf_counter()
    near_duplicate_groups(ids, mat, block=block)
    return time.perf_counter() - t0


def build_store(root: Path, mat: np.ndarray, shard_rows: int) -> tuple[Store, np.ndarray]:
    """A store at ``root`` with ``len(mat)`` fake images and their vectors in feature set ``bench``."""
    n = mat.shape[0]
    store = Store.open(Settings(store=root, search_memory_mb=1 << 20), create=True)
    now = utcnow()
    with store.writing():
        with store.session() as s:
            ds_id = s.scalars(insert(Dataset).returning(Dataset.id), [{"name": "bench", "created_at": now}]).one()
            rows = [
                {"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "source_path": f"/fake/{i}.jpg",
                 "width": 224, "height": 224, "format": "JPEG", "mode": "RGB", "bytes": 1000,
                 "label": f"class{i % 10}", "superclass": None, "dataset_id": ds_id, "ingested_at": now}
                for i in range(n)
            ]
            ids = np.array(s.scalars(insert(Image).returning(Image.id), rows).all(), dtype=np.int64)
        fs = store.ensure_feature_set(FeatureSpec(name="bench", kind="test", dim=mat.shape[1]))
        for start in range(0, n, shard_rows):
            store.append_vectors(fs, ids[start : start + shard_rows], mat[start : start + shard_rows])
    return store, ids


def raw_h5py_read(store: Store) -> float:
    """Seconds to read every shard's ``vectors`` dataset fully with h5py."""
    paths = sorted((store.root / "features" / "bench").glob("*.h5"))
    t0 = time.perf_counter()
    total = 0
    for path in paths:
        with h5py.File(path, "r") as fh:
            total += fh["vectors"][...].nbytes
    return time.perf_counter() - t0


def bench_store(mat: np.ndarray, queries: np.ndarray, k: int, shard_rows: int) -> None:
    """Print warm p50/p95 of ``search(store, ...)`` vs bare, and cold first query vs raw h5py, per metric.

    Both cold sides read shard files that are in the OS page cache (they were
    just written), so the comparison is of the work done, not of the disk.
    """
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        t0 = time.perf_counter()
        store, _ = build_store(Path(tmp) / "store", mat, shard_rows)
        print(f"store built in {time.perf_counter() - t0:.1f}s ({-(-mat.shape[0] // shard_rows)} shards)")
        try:
            qs = queries.astype(np.float32)
            print(f"{'metric':<8}{'bare p50':>10}{'search p50':>12}{'ratio':>7}"
                  f"{'bare p95':>10}{'search p95':>12}{'ratio':>7}{'raw h5py':>10}{'cold':>8}{'ratio':>7}")
            for metric in ("cosine", "l2"):
                raw = min(raw_h5py_read(store) for _ in range(3))
                colds = []
                for q in qs[:3]:
                    clear_cache(store)
                    t0 = time.perf_counter()
                    search(store, "bench", q, k=k, metric=metric)
                    colds.append(time.perf_counter() - t0)
                cold = float(np.median(colds))
                bare, ours = time_pair(lambda q: bare_search(mat, q, k),
                                       lambda q, m=metric: search(store, "bench", q, k=k, metric=m), qs)
                (b50, b95), (s50, s95) = percentiles(bare), percentiles(ours)
                print(f"{metric:<8}{b50:>8.2f}ms{s50:>10.2f}ms{s50 / b50:>6.2f}x"
                      f"{b95:>8.2f}ms{s95:>10.2f}ms{s95 / b95:>6.2f}x"
                      f"{raw:>9.2f}s{cold:>7.2f}s{cold / raw:>6.2f}x")
            print("targets: search p50 <= 2x bare; cold (median of 3 first queries) <= 5x raw h5py read")
        finally:
            store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="stored vectors")
    parser.add_argument("--dim", type=int, default=1280, help="vector dimension")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed")
    parser.add_argument("-k", type=int, default=10, help="hits per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dup-n", type=int, default=0, help="also time near_duplicate_groups on this many vectors"
    )
    parser.add_argument("--store", action="store_true",
                        help="also time search(store, ...) on a temporary store against the baselines")
    parser.add_argument("--shard-rows", type=int, default=10_000, help="rows per shard in --store mode")
    args = parser.parse_args(argv)

    ids, mat = make_data(args.n, args.dim, args.seed)
    queries = make_queries(mat, args.queries, args.seed + 1)
    mb = mat.nbytes / 2**20
    print(f"n={args.n} dim={args.dim} ({mb:.0f} MiB float32), {args.queries} queries, k={args.k}")
    if args.store:
        bench_store(mat, queries, args.k, args.shard_rows)
        return
    print(
        f"{'metric':<8}{'bare p50':>10}{'index p50':>11}{'ratio':>7}"
        f"{'bare p95':>10}{'index p95':>11}{'ratio':>7}"
    )
    for metric in ("cosine", "l2"):
        r = bench_single(ids, mat, queries, args.k, metric)
        (b50, b95), (i50, i95) = r["bare"], r["index"]
        print(
            f"{metric:<8}{b50:>8.2f}ms{i50:>9.2f}ms{i50 / b50:>6.2f}x"
            f"{b95:>8.2f}ms{i95:>9.2f}ms{i95 / b95:>6.2f}x   (index build {r['build_s'][0]:.2f}s)"
        )
    per_q = bench_batch(ids, mat, queries, args.k)
    print(f"search_many (cosine, {args.queries} queries): {per_q:.2f} ms/query")
    if args.dup_n:
        secs = bench_duplicates(args.dup_n, args.dim, 4096, args.seed)
        print(f"near_duplicate_groups n={args.dup_n} dim={args.dim}: {secs:.1f}s")


if __name__ == "__main__":
    main()
