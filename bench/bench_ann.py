"""Benchmark: ANN indexes (usearch f32 / i8 through the store, faiss HNSW) against exact search, in one run.

For each size (default 1,000,000 x 256 and 100,000 x 1,280) the script

1. generates a clustered data set: a Gaussian mixture whose clusters are spread
   along their own random 16-dimensional subspaces plus a little isotropic noise
   (the low intrinsic dimension real embeddings have; not uniform noise), with
   1 % of the vectors planted as near copies of others (cosine > 0.999);
2. writes it into a temporary store (fake catalog images labelled ``class0`` ..
   ``class9`` at random, so ``label = 'class3'`` selects 10 %; shards of 10,000),
   cached under ``$FS_BENCH_DIR/ann-<n>x<dim>`` for reruns;
3. computes the exact top-10 of 1,000 held-out queries (same mixture) with numpy,
   unfiltered and filtered to ``label = 'class3'``;
4. runs each method in its own subprocess (so peak RSS is its own):

   * ``exact``: ``search(store, ..., exact=True)`` (the set held in memory, the
     existing exact path);
   * ``usearch-f32`` / ``usearch-i8``: ``fs index build`` (``build_index``), then
     ``search(store, ...)`` through the index, unfiltered and with the filter;
     the bare ``usearch`` query on the same memory-mapped file is timed beside it;
   * ``faiss-hnsw``: ``faiss.IndexHNSWFlat`` (inner product on normalised vectors,
     the same M / efConstruction / efSearch), bare library, no store;
   * ``duplicates``: ``fs duplicates --threshold 0.99`` through the f32 index
     (recall of the planted pairs, time, peak RSS).

Single-query latencies are p50/p95 over the 1,000 queries, one at a time (exact search:
the first 200; it is slow at 1M). Recall@10 is against the exact top-10. Peak RSS is each
worker's own high-water mark (VmHWM); for usearch the build and the queries are separate
processes (the query figure counts the memory-mapped pages the queries touched).

Targets at 1M: recall@10 >= 0.95 with p50 <= 1/20 of exact's p50; build <= 15 min on
2 cores; filtered recall@10 >= 0.95; duplicates within 4 GB RSS.

faiss is only needed here: ``pip install "featurestore[bench]"`` (faiss-cpu 1.8).

Run::

    python -m bench.bench_ann              # the full run (about an hour on 2 cores)
    python -m bench.bench_ann --quick      # 50,000 x 256 and 10,000 x 1,280, 200 queries
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BENCH_DIR

SET = "bench"
K = 10
RANK = 16
THRESHOLD = 0.99
FILTER = "label = 'class3'"
# --where filters timed through the store (issue 31), by the share of images they allow; each has its
# own exact ground truth (truth_filtered_<share>.npy), made once from the labels (image id = row + 1).
FILTERS = {"1%": "id % 100 = 0", "10%": FILTER,
           "50%": "label IN ('class0', 'class1', 'class2', 'class3', 'class4')"}
DATA_VERSION = 2  # 2: dataset memberships (issue 17)


def filter_mask(share: str, labels: np.ndarray) -> np.ndarray:
    """Which rows the filter ``FILTERS[share]`` allows."""
    if share == "1%":
        return (np.arange(1, labels.size + 1) % 100) == 0
    return labels == 3 if share == "10%" else labels < 5


# ---------------------------------------------------------------------------
# data


def mixture(n: int, dim: int, seed: int, clusters: int) -> np.ndarray:
    """``n`` vectors of a Gaussian mixture with low-rank (RANK) cluster covariances, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    labels = rng.choice(clusters, size=n, p=weights)
    out = np.empty((n, dim), dtype=np.float32)
    for c in range(clusters):
        idx = np.flatnonzero(labels == c)
        if not idx.size:
            continue
        # per-dimension variance 0.36 along the cluster's own RANK-dimensional subspace
        basis = rng.standard_normal((RANK, dim)).astype(np.float32) * np.float32(0.6 / np.sqrt(RANK))
        z = rng.standard_normal((idx.size, RANK)).astype(np.float32)
        out[idx] = centres[c] + z @ basis + np.float32(0.15) * rng.standard_normal((idx.size, dim), dtype=np.float32)
    return out


def plant_duplicates(mat: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Overwrite ``fraction`` of the rows with near copies of other rows; returns the (copy, source) pairs."""
    rng = np.random.default_rng(seed)
    n = mat.shape[0]
    m = int(n * fraction)
    rows = rng.choice(n, size=2 * m, replace=False)
    copies, sources = rows[:m], rows[m:]
    scale = np.float32(0.002) * np.linalg.norm(mat[sources], axis=1, keepdims=True) / np.float32(np.sqrt(mat.shape[1]))
    mat[copies] = mat[sources] + scale * rng.standard_normal((m, mat.shape[1]), dtype=np.float32)
    return np.stack([copies, sources], axis=1)


def exact_top(mat: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
              block: int = 100_000) -> np.ndarray:
    """Row numbers of the exact cosine top-``k`` of each query (blockwise, float32)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), k), dtype=np.int64)
    for start in range(0, mat.shape[0], block):
        part = np.asarray(mat[start : start + block], dtype=np.float32)
        part = part / np.linalg.norm(part, axis=1, keepdims=True)
        s = q @ part.T
        if allowed is not None:
            s[:, ~allowed[start : start + block]] = -np.inf
        idx = np.concatenate([best_i, np.arange(start, start + part.shape[0])[None, :].repeat(len(q), 0)], axis=1)
        sc = np.concatenate([best_s, s], axis=1)
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(sc, top, 1), np.take_along_axis(idx, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def prepare(work: Path, n: int, dim: int, n_queries: int, seed: int = 0) -> None:
    """Data, queries and ground truth, then the store, each once per (n, dim, queries) in ``work``."""
    marker, store_marker = work / "data.json", work / "store.json"
    want = {"n": n, "dim": dim, "queries": n_queries, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want:
        print(f"  reusing the data in {work}")  # delete the folder to regenerate
    else:
        _make_data(work, n, dim, n_queries, seed)
        marker.write_text(json.dumps(want))
        store_marker.unlink(missing_ok=True)
    for share in FILTERS:
        truth = work / f"truth_filtered_{share.rstrip('%')}.npy"
        if not truth.exists():
            t = time.perf_counter()
            allowed = filter_mask(share, np.load(work / "labels.npy"))
            np.save(truth, exact_top(np.load(work / "data.npy", mmap_mode="r"), np.load(work / "queries.npy"), K,
                                     allowed=allowed))
            print(f"  exact ground truth of the {share} filter in {time.perf_counter() - t:.1f}s")
    from featurestore.catalog.database import head_revision

    # a store written by another catalog schema is rebuilt, not opened (it may not migrate)
    want_store = {**want, "version": DATA_VERSION, "schema": head_revision("sqlite://")}
    if store_marker.exists() and json.loads(store_marker.read_text()) == want_store:
        print("  reusing the store")
        return
    shutil.rmtree(work / "store", ignore_errors=True)
    t = time.perf_counter()
    build_store(work / "store", np.load(work / "data.npy", mmap_mode="r"), np.load(work / "labels.npy"))
    print(f"  store written in {time.perf_counter() - t:.1f}s")
    store_marker.write_text(json.dumps(want_store))


def _make_data(work: Path, n: int, dim: int, n_queries: int, seed: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    clusters = max(20, n // 1000)
    both = mixture(n + n_queries, dim, seed, clusters)
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(n + n_queries)
    data, queries = both[perm[:n]], both[perm[n:]]
    del both
    pairs = plant_duplicates(data, 0.01, seed + 2)
    labels = rng.integers(0, 10, size=n)  # class of image row i (ids are i + 1)
    np.save(work / "data.npy", data)
    np.save(work / "queries.npy", queries)
    np.save(work / "pairs.npy", pairs)
    np.save(work / "labels.npy", labels)
    print(f"  generated {n:,} x {dim} ({data.nbytes / 2**20:,.0f} MiB) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    np.save(work / "truth.npy", exact_top(data, queries, K))
    np.save(work / "truth_filtered.npy", exact_top(data, queries, K, allowed=labels == 3))
    print(f"  exact ground truth in {time.perf_counter() - t:.1f}s")


def build_store(root: Path, data: np.ndarray, labels: np.ndarray, shard_rows: int = 10_000) -> None:
    from sqlalchemy import insert

    from featurestore.catalog.schema import Dataset, DatasetMember, Image, utcnow
    from featurestore.config import Settings
    from featurestore.features.base import FeatureSpec
    from featurestore.store import Store

    n, dim = data.shape
    with Store.open(Settings(store=root), create=True) as store, store.writing():
        now = utcnow()
        with store.session() as s:
            ds = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "bench", "created_at": now}]).scalar_one()
        for start in range(0, n, 50_000):
            with store.session() as s:
                s.execute(insert(Image), [
                    {"sha256": hashlib.sha256(f"ann-{i}".encode()).hexdigest(), "source_path": f"/fake/{i}.jpg",
                     "width": 64, "height": 64, "format": "JPEG", "mode": "RGB", "bytes": 1000,
                     "label": f"class{labels[i]}", "superclass": None, "dataset_id": ds, "ingested_at": now}
                    for i in range(start, min(n, start + 50_000))])
                s.execute(insert(DatasetMember), [{"dataset_id": ds, "image_id": i + 1, "source_path": f"/fake/{i}.jpg"}
                                                  for i in range(start, min(n, start + 50_000))])
        fs = store.ensure_feature_set(FeatureSpec(SET, "synthetic", dim, {"note": "gaussian mixture"}))
        for start in range(0, n, shard_rows):
            ids = np.arange(start + 1, min(n, start + shard_rows) + 1)
            store.append_vectors(fs, ids, np.asarray(data[start : start + shard_rows]))


# ---------------------------------------------------------------------------
# workers (each in its own process)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that over from the
    parent across fork and exec, so every worker would report the parent's peak (the data generation)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean recall@k; ``found`` holds image ids, ``truth`` row numbers (id = row + 1)."""
    return float(np.mean([len(set(f) & set((t + 1).tolist())) / truth.shape[1] for f, t in zip(found, truth,
                                                                                                  strict=True)]))


def latencies(fn: Any, queries: np.ndarray) -> tuple[list[Any], np.ndarray]:
    for q in queries[:5]:
        fn(q)
    out, times = [], np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        out.append(fn(q))
        times[i] = time.perf_counter() - t
    return out, times


def ms(times: np.ndarray) -> dict[str, float]:
    p50, p95 = np.percentile(times, [50, 95]) * 1e3
    return {"p50_ms": float(p50), "p95_ms": float(p95)}


def open_store(work: Path, **settings: Any) -> Any:
    from featurestore.config import Settings
    from featurestore.store import Store

    return Store.open(Settings(store=work / "store", **settings))


def worker_exact(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    from featurestore.search.service import search

    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    queries, truth = queries[: params["exact_queries"]], truth[: params["exact_queries"]]
    store = open_store(work, search_memory_mb=1 << 20)
    t = time.perf_counter()
    search(store, SET, queries[0], k=K, exact=True)  # loads the set into memory
    load = time.perf_counter() - t
    found, times = latencies(lambda q: [r.image_id for r in search(store, SET, q, k=K, exact=True)], queries)
    nf = min(len(queries), 50)  # each takes seconds at 1M (the filter's ids, then the gather)
    _, times_f = latencies(lambda q: search(store, SET, q, k=K, exact=True, where=FILTER), queries[:nf])
    return {"method": "exact", "load_s": load, **ms(times), "recall": recall(found, truth),
            "filtered_p50_ms": ms(times_f)["p50_ms"], "rss_mb": peak_rss_mb()}


def worker_usearch_build(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """``fs index build`` (rebuild) with the given dtype: time, file size, peak RSS of the build."""
    from featurestore.search import index as ann

    store = open_store(work, workers=params["threads"])
    t = time.perf_counter()
    # --reuse-index keeps an index built with the same params by an earlier run (an hour at 1M on 2 cores)
    report = ann.build_index(store, SET, dtype=params["dtype"], connectivity=params["M"],
                             expansion_add=params["ef_add"], expansion_search=params["ef_search"],
                             rebuild=not params.get("reuse_index"))
    return {"method": f"usearch-{params['dtype']}", "build_s": time.perf_counter() - t, "action": report.action,
            "index_mib": report.bytes / 2**20, "build_rss_mb": peak_rss_mb()}


def paired(fns: dict[str, Any], queries: np.ndarray) -> tuple[dict[str, list[Any]], dict[str, np.ndarray]]:
    """Each query through every function in turn (so load changes hit all alike): results and seconds."""
    for q in queries[:5]:
        for fn in fns.values():
            fn(q)
    out: dict[str, list[Any]] = {name: [] for name in fns}
    times = {name: np.empty(len(queries)) for name in fns}
    for i, q in enumerate(queries):
        for name, fn in fns.items():
            t = time.perf_counter()
            out[name].append(fn(q))
            times[name][i] = time.perf_counter() - t
    return out, times


def worker_usearch_query(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """``search(store, ...)`` (index memory-mapped) paired with the bare usearch query on the same file,
    unfiltered and with each filter of FILTERS."""
    from featurestore.search.service import search

    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    store = open_store(work)
    methods = {r.method for r in search(store, SET, queries[0], k=K)}  # opens the index
    index = store.ann_indexes.opened[store.feature_set(SET).id].index

    def bare(q: np.ndarray) -> list[int]:
        return np.asarray(index.search(q.astype(np.float32), K, threads=1).keys).astype(np.int64).tolist()

    def through_store(where: str | None) -> Any:
        return lambda q: [r.image_id for r in search(store, SET, q, k=K, where=where)]

    found, times = paired({"bare": bare, "store": through_store(None)}, queries)
    out: dict[str, Any] = {**ms(times["store"]), "recall": recall(found["store"], truth),
                           "bare_p50_ms": ms(times["bare"])["p50_ms"], "bare_p95_ms": ms(times["bare"])["p95_ms"],
                           "bare_recall": recall(found["bare"], truth), "used": sorted(methods)}
    nf = min(len(queries), params["filtered_queries"])
    for share, where in FILTERS.items():
        truth_f = np.load(work / f"truth_filtered_{share.rstrip('%')}.npy")[:nf]
        found_f, times_f = paired({"bare": bare, "store": through_store(where)}, queries[:nf])
        out[f"filtered_{share}"] = {**ms(times_f["store"]), "recall": recall(found_f["store"], truth_f),
                                    "bare_p50_ms": ms(times_f["bare"])["p50_ms"]}
    out["filtered_p50_ms"], out["filtered_recall"] = out["filtered_10%"]["p50_ms"], out["filtered_10%"]["recall"]
    out["rss_mb"] = peak_rss_mb()
    return out


def worker_faiss(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    import faiss

    data = np.load(work / "data.npy", mmap_mode="r")
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    faiss.omp_set_num_threads(params["threads"])
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(data.shape[1], params["M"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params["ef_add"]
    for start in range(0, data.shape[0], 100_000):
        part = np.array(data[start : start + 100_000], dtype=np.float32)  # a copy: normalised in place
        faiss.normalize_L2(part)
        index.add(part)
    build_s = time.perf_counter() - t
    path = work / "faiss.index"
    faiss.write_index(index, str(path))
    size = path.stat().st_size / 2**20
    path.unlink()
    index.hnsw.efSearch = params["ef_search"]
    faiss.omp_set_num_threads(1)

    def one(q: np.ndarray) -> list[int]:
        x = (q / np.linalg.norm(q)).astype(np.float32)[None, :]
        _, idx = index.search(x, K)
        return (idx[0] + 1).tolist()

    found, times = latencies(one, queries)
    return {"method": "faiss-hnsw", "build_s": build_s, "index_mib": size, **ms(times),
            "recall": recall(found, truth), "rss_mb": peak_rss_mb()}


def worker_duplicates(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    from featurestore.search.service import duplicates

    pairs = np.load(work / "pairs.npy")
    store = open_store(work, workers=params["threads"])
    t = time.perf_counter()
    found = duplicates(store, SET, threshold=THRESHOLD)
    secs = time.perf_counter() - t
    group = {d.image_id: d.group for d in found}
    hit = [group.get(int(a) + 1) is not None and group.get(int(a) + 1) == group.get(int(b) + 1) for a, b in pairs]
    return {"method": f"duplicates ({found.method})", "seconds": secs, "groups": len(set(group.values())),
            "images": len(found), "planted_pair_recall": float(np.mean(hit)), "rss_mb": peak_rss_mb()}


WORKERS = {"exact": worker_exact, "usearch_build": worker_usearch_build, "usearch_query": worker_usearch_query,
           "faiss": worker_faiss, "duplicates": worker_duplicates}


def run_worker(kind: str, work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a subprocess; its last stdout line is its JSON result."""
    cmd = [sys.executable, "-m", "bench.bench_ann", "--worker", kind, "--workdir", str(work),
           "--params", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {kind} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# report


def report(n: int, dim: int, rows: list[dict[str, Any]]) -> None:
    exact = next((r for r in rows if r["method"] == "exact"), None)
    print(f"\n{n:,} x {dim}: {'method':<14}{'recall@10':>10}{'p50 ms':>9}{'p95 ms':>9}{'exact/p50':>10}"
          f"{'build s':>9}{'index MiB':>10}{'peak RSS MiB':>13}")
    for r in rows:
        if r["method"].startswith("duplicates"):
            continue
        speed = f"{exact['p50_ms'] / r['p50_ms']:9.1f}x" if exact is not None else f"{'-':>10}"
        build = f"{r['build_s']:9.1f}" if "build_s" in r else f"{'-':>9}"
        size = f"{r['index_mib']:10.1f}" if "index_mib" in r else f"{'-':>10}"
        print(f"{'':>{len(f'{n:,} x {dim}: ')}}{r['method']:<14}{r['recall']:>10.4f}{r['p50_ms']:>9.3f}"
              f"{r['p95_ms']:>9.3f}{speed}{build}{size}{r['rss_mb']:>13,.0f}")
    if exact is not None:
        print(f"  exact: filtered ({FILTER}) p50 {exact['filtered_p50_ms']:.2f} ms (the filter's SQL included, as "
              "in the indexed rows below); set loaded into memory in {:.1f} s".format(exact["load_s"]))
    for r in rows:
        if r["method"].startswith("usearch"):
            print(f"  {r['method']} ({r['action']}): search() p50 {r['p50_ms']:.3f} / p95 {r['p95_ms']:.3f} ms beside "
                  f"bare usearch p50 {r['bare_p50_ms']:.3f} / p95 {r['bare_p95_ms']:.3f} ms in the same run "
                  f"({r['p50_ms'] / r['bare_p50_ms']:.2f}x; bare recall {r['bare_recall']:.4f}); "
                  f"build peak RSS {r['build_rss_mb']:,.0f} MiB; hits via {r['used']}")
            for share in FILTERS:
                f = r[f"filtered_{share}"]
                print(f"    filtered {share:>3} ({FILTERS[share]}): recall@10 {f['recall']:.4f}, "
                      f"p50 {f['p50_ms']:.2f} / p95 {f['p95_ms']:.2f} ms "
                      f"(bare unfiltered p50 {f['bare_p50_ms']:.3f} ms beside it)")
        if r["method"].startswith("duplicates"):
            print(f"  {r['method']} threshold {THRESHOLD}: {r['groups']:,} groups, {r['images']:,} images, planted "
                  f"pairs found {r['planted_pair_recall']:.4f}, {r['seconds']:.1f} s, peak RSS {r['rss_mb']:,.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 200 queries (a few minutes)")
    parser.add_argument("--sizes", default=None, help="comma-separated NxDIM, e.g. 1000000x256,100000x1280")
    parser.add_argument("--queries", type=int, default=None, help="held-out queries (default 1000; quick 200)")
    parser.add_argument("--filtered-queries", type=int, default=200, help="queries of the filtered search")
    parser.add_argument("--exact-queries", type=int, default=200,
                        help="queries timed for exact search (its recall is 1 by definition; it is slow at 1M)")
    parser.add_argument("-M", type=int, default=16, help="HNSW connectivity (usearch and faiss)")
    parser.add_argument("--ef-add", type=int, default=128, help="expansion while building (both)")
    parser.add_argument("--ef-search", type=int, default=128, help="expansion while searching (both)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="build threads")
    parser.add_argument("--methods", default="exact,usearch-i8,usearch-f32,faiss,duplicates")
    parser.add_argument("--reuse-index", action="store_true",
                        help="keep an index an earlier run built with the same params instead of rebuilding it")
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.workdir, json.loads(args.params))))
        return
    sizes = args.sizes or ("50000x256,10000x1280" if args.quick else "1000000x256,100000x1280")
    n_queries = args.queries or (200 if args.quick else 1000)
    params = {"M": args.M, "ef_add": args.ef_add, "ef_search": args.ef_search, "threads": args.threads,
              "filtered_queries": args.filtered_queries, "exact_queries": args.exact_queries,
              "reuse_index": args.reuse_index}
    print(f"params: {params}; machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for size in sizes.split(","):
        n, dim = (int(v) for v in size.lower().split("x"))
        work = BENCH_DIR / f"ann-{n}x{dim}"
        print(f"{n:,} x {dim}:")
        prepare(work, n, dim, n_queries)
        rows = []
        for method in args.methods.split(","):
            if method == "faiss" and importlib.util.find_spec("faiss") is None:
                print("  faiss: not installed (pip install 'featurestore[bench]'), skipped")
                continue
            t = time.perf_counter()
            if method.startswith("usearch-"):
                r = run_worker("usearch_build", work, {**params, "dtype": method.split("-", 1)[1]})
                r.update(run_worker("usearch_query", work, params))
            else:
                r = run_worker(method, work, params)
            print(f"  {method} done in {time.perf_counter() - t:.0f}s: {json.dumps(r)}", flush=True)
            rows.append(r)
        report(n, dim, rows)


if __name__ == "__main__":
    main()
