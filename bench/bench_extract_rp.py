"""Left-flow extraction speed and memory on real 640x480 JPEGs (issue 3).

    python -m bench.bench_extract_rp [--images 5000]

Prints, side by side in one run (each part in its own process so peak memory
is its own):
  (a) a bare multi-threaded Pillow decode + resize-to-640x480 loop (the ceiling),
  (b) `fs extract --rp 128` through the library (decode, resize, project, write shards),
  (c) scikit-learn's SparseRandomProjection fitted on the same dims, applied image by image
      after the same threaded decode + resize.
Targets: (b) >= 60% of (a) in images/s, and (b)'s peak memory < 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import fashion_images, image_files, peak_rss_mb, row, temp_store

SIZE = (640, 480)


def _decode_resize(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB").resize(SIZE, Image.BILINEAR))


def part_bare(files: list[Path], workers: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(_decode_resize, files, chunksize=8):
            pass
    return time.perf_counter() - t


def part_sklearn(files: list[Path], workers: int, k: int) -> float:
    from sklearn.random_projection import SparseRandomProjection

    d = SIZE[0] * SIZE[1] * 3
    srp = SparseRandomProjection(n_components=k, density=1 / np.sqrt(d), dense_output=True, random_state=0)
    srp.fit(np.zeros((1, d), dtype=np.float32))
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for arr in pool.map(_decode_resize, files, chunksize=8):
            srp.transform(arr.reshape(1, -1).astype(np.float32))
    return time.perf_counter() - t


def part_fs(root: Path, workers: int, k: int) -> float:
    from featurestore.features.projection import projection_extractor
    from featurestore.pipelines.extract import extract
    from featurestore.pipelines.ingest import ingest

    with temp_store("rp", workers=workers) as store, store.writing():
        ingest(store, root)
        ex = projection_extractor(store, k, SIZE)
        t = time.perf_counter()
        summary = extract(store, [ex])
        elapsed = time.perf_counter() - t
    assert summary.written.get(f"rp{k}") == summary.processed > 0, summary
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part", choices=["bare", "fs", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = fashion_images(args.images, SIZE)
    files = image_files(root)
    if args.part:
        for p in files:
            p.read_bytes()
        fn = {"bare": lambda: part_bare(files, args.workers), "fs": lambda: part_fs(root, args.workers, args.k),
              "sklearn": lambda: part_sklearn(files, args.workers, args.k)}[args.part]
        seconds = fn()
        print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "n": len(files)}))
        return
    print(f"{len(files)} JPEGs at {SIZE[0]}x{SIZE[1]}, k={args.k}, {args.workers} threads, {os.cpu_count()} cores")
    results = {}
    for part in ("bare", "fs", "sklearn"):
        out = subprocess.run([sys.executable, "-m", "bench.bench_extract_rp", "--part", part, "--images",
                              str(args.images), "--k", str(args.k), "--workers", str(args.workers)],
                             check=True, capture_output=True, text=True)
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(files)
    base = n / results["bare"]["seconds"]
    print(row("(a) bare Pillow decode+resize (ceiling)", n, results["bare"]["seconds"]))
    print(row("(b) fs extract --rp 128", n, results["fs"]["seconds"], base))
    print(row("(c) sklearn SparseRandomProjection per image", n, results["sklearn"]["seconds"], base))
    for part in ("bare", "fs", "sklearn"):
        print(f"peak memory ({part}): {results[part]['peak_mb']:.0f} MB")
    print(f"fs/bare = {results['bare']['seconds'] / results['fs']['seconds']:.2f} (target >= 0.60); "
          f"fs peak {results['fs']['peak_mb']:.0f} MB (target < 2048)")


if __name__ == "__main__":
    main()
