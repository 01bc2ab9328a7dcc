"""Benchmark: `fs serve` search-by-id latency and throughput vs the in-process Python API.

Builds a temporary store of N fake images with one feature set of random
vectors (rows inserted with SQLAlchemy Core, vectors appended in shards),
starts `fs serve` on a free loopback port in a subprocess, and drives
``GET /v1/feature-sets/<set>/search?image_id=..&k=10`` from Python threads
over keep-alive connections at concurrency 1 and 8 (a bounded number of
requests; it stops by itself). Printed next to the p50 of the same query
through ``featurestore.search.service.search`` in this process.

Target: service p50 at concurrency 1 within 2x in-process p50 + 2 ms.

Run: python -m bench.bench_serve [--n 100000] [--dim 256] [--requests 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from featurestore.catalog.schema import Dataset, Image, utcnow
from featurestore.config import Settings
from featurestore.features.base import FeatureSpec
from featurestore.search.service import search
from featurestore.store import Store

SET = "bench"


def build(root: Path, n: int, dim: int, shard_rows: int = 10_000) -> None:
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    with Store.open(Settings(store=root), create=True) as store, store.writing():
        now = utcnow()
        with store.session() as s:
            ds = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "bench", "created_at": now}]).scalar_one()
            for start in range(0, n, 20_000):
                s.execute(insert(Image), [
                    {"sha256": hashlib.sha256(f"fake-{i}".encode()).hexdigest(), "source_path": f"/fake/{i}.jpg",
                     "width": 64, "height": 64, "format": "JPEG", "mode": "RGB", "bytes": 1000,
                     "label": f"class{i % 10}", "superclass": None, "dataset_id": ds, "ingested_at": now}
                    for i in range(start, min(n, start + 20_000))])
        fs = store.ensure_feature_set(FeatureSpec(SET, "synthetic", dim, {"note": "random normal vectors"}))
        for start in range(0, n, shard_rows):
            ids = np.arange(start + 1, min(n, start + shard_rows) + 1)
            store.append_vectors(fs, ids, rng.standard_normal((len(ids), dim), dtype=np.float32))
    print(f"built {n:,} images x {dim} dims in {time.perf_counter() - t:.1f}s")


def in_process(root: Path, queries: list[int]) -> float:
    with Store.open(Settings(store=root)) as store:
        search(store, SET, queries[0], k=10)  # loads and caches the index, like the server's first request
        times = []
        for q in queries:
            t = time.perf_counter()
            search(store, SET, q, k=10)
            times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")}
    cmd = [sys.executable, "-m", "featurestore.cli.main", "--store", str(root), "serve", "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fs serve exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("fs serve did not answer /v1/health within 60s")


def load(port: int, paths: list[str], concurrency: int) -> tuple[float, float, float]:
    """Send every path once, spread over ``concurrency`` keep-alive connections: (req/s, p50, p99)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local = []
        for path in mine:
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            local.append(time.perf_counter() - t)
            if resp.status != 200:
                errors.append(f"{resp.status} {body[:200]!r}")
        conn.close()
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=(paths[i::concurrency],)) for i in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return len(latencies) / wall, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=256, help="vector dimension")
    ap.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    queries = [int(i) for i in rng.integers(1, args.n + 1, size=args.requests)]
    with tempfile.TemporaryDirectory(prefix="fs-bench-serve-") as tmp:
        root = Path(tmp) / ".fs"
        build(root, args.n, args.dim)
        local_p50 = in_process(root, queries[:300])
        port = free_port()
        proc = start_server(root, port)
        try:
            paths = [f"/v1/feature-sets/{SET}/search?image_id={q}&k=10" for q in queries]
            load(port, paths[:20], 1)  # warm-up: the first request loads the index
            print(f"\nsearch by id, k=10, {args.n:,} vectors x {args.dim} (cosine), {args.requests} requests per row")
            print(f"{'':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
            print(f"{'in-process search() p50':<34}{'':>9}{1000 * local_p50:9.2f}")
            rows = {}
            for c in (1, 8):
                rate, p50, p99 = load(port, paths, c)
                rows[c] = p50
                print(f"{f'fs serve, concurrency {c}':<34}{rate:9.1f}{1000 * p50:9.2f}{1000 * p99:9.2f}")
            filtered = [p + "&label=class3" for p in paths[:300]]
            rate, p50, p99 = load(port, filtered, 1)
            print(f"{'fs serve, label filter (10%), c=1':<34}{rate:9.1f}{1000 * p50:9.2f}{1000 * p99:9.2f}")
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", paths[0])
            hits = json.loads(conn.getresponse().read())["results"]
            with Store.open(Settings(store=root)) as store:
                local = search(store, SET, queries[0], k=10)
            assert [h["image_id"] for h in hits] == [r.image_id for r in local], "service and API disagree"
            target = 2 * local_p50 + 0.002
            verdict = "met" if rows[1] <= target else "MISSED"
            print(f"\ntarget p50(c=1) <= 2 x in-process + 2 ms = {1000 * target:.2f} ms: {verdict}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
