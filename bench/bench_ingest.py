"""Ingest speed: `fs ingest` vs a bare multi-threaded Pillow decode loop over the same files.

    python bench/bench_ingest.py [--images 5000] [--size 640x480]

Target (issue 2): ingest >= 70% of the bare decode loop's images/s. Both run
with the same number of threads over the same JPEGs (page-cached by a warm-up
read), alternating bare/ingest twice so machine noise hits both.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from bench.common import fashion_images, image_files, row, temp_store
from featurestore.io.fashion_mnist import parse_size
from featurestore.pipelines.ingest import ingest


def bare_decode(files: list[Path], workers: int) -> float:
    def work(p: Path) -> tuple[int, int]:
        with Image.open(p) as im:
            im.load()
            return im.size

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, files, chunksize=16):
            pass
    return time.perf_counter() - t


def fs_ingest(root: Path, workers: int) -> float:
    with temp_store("ingest", workers=workers) as store:
        t = time.perf_counter()
        with store.writing():
            summary = ingest(store, root)
        elapsed = time.perf_counter() - t
    assert summary.new == summary.found, summary.line()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    root = fashion_images(args.images, parse_size(args.size))
    files = image_files(root)
    for p in files:  # warm the page cache so both sides read from memory
        p.read_bytes()
    n = len(files)
    print(f"{n} JPEGs at {args.size}, {args.workers} threads, {os.cpu_count()} cores")
    bare, ours = [], []
    for _ in range(2):
        bare.append(bare_decode(files, args.workers))
        ours.append(fs_ingest(root, args.workers))
    b, o = min(bare), min(ours)
    print(row("(a) bare Pillow decode loop (ceiling)", n, b))
    print(row("(b) fs ingest (decode+sha256+catalog)", n, o, baseline=n / b))
    print(f"ratio ingest/bare = {b / o:.2f} (target >= 0.70)")


if __name__ == "__main__":
    main()
