"""Feature assembly from the store vs a raw h5py read of the same bytes (issue 5).

    python -m bench.bench_assemble [--images 100000]

Builds a temp store with N images and two feature sets (128 + 1,280 dims, like
rp128 + efficientnet-lite0) in shards of 10,000 rows, then times, alternating:
  (a) raw h5py: read every shard's `vectors` dataset fully (the same bytes),
  (b) store.read_matrix(["rp128", "efficientnet-lite0"]): catalog query + aligned matrix.
Target: (b) >= 50% of (a) in throughput.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py

from bench.common import fake_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fs-bench-assemble-"))
    try:
        t = time.perf_counter()
        store = fake_store(tmp / ".fs", args.images, {"rp128": 128, "efficientnet-lite0": 1280})
        print(f"built store with {args.images} images x (128 + 1280) dims in {time.perf_counter() - t:.1f}s")
        shards = sorted((tmp / ".fs" / "features").rglob("*.h5"))
        nbytes = args.images * (128 + 1280) * 4
        raw, ours = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for p in shards:
                with h5py.File(p, "r") as fh:
                    fh["vectors"][...]
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            fm = store.read_matrix(["rp128", "efficientnet-lite0"])
            ours.append(time.perf_counter() - t)
            assert fm.X.shape == (args.images, 1408)
            del fm
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r, o = min(raw), min(ours)
    mb = nbytes / 2**20
    print(f"(a) raw h5py read of all shards   {r:7.3f}s  {mb / r:8.0f} MB/s")
    print(f"(b) store.read_matrix (aligned)   {o:7.3f}s  {mb / o:8.0f} MB/s  {r / o:.2f}x of raw (target >= 0.50)")


if __name__ == "__main__":
    main()
