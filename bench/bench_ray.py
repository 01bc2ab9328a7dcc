"""Extraction on Ray vs the local path, on the same real images (issue 13).

    python -m bench.bench_ray [--images 2000] [--model efficientnet-lite0]

Prints, side by side in one run, for `fs extract --model efficientnet-lite0` on
the same Fashion-MNIST JPEGs (224x224, batch 32):
  (a) the local path (one process: decode threads + the network on every core),
  (b) the same extraction on a Ray cluster started on this machine (`--ray local`)
      with 1 worker and (c) with 2 workers (1 CPU each),
each in images/s, and what the cluster adds: a fixed start-up per job (measured as a
16-image job: the actors start and build their network, one task runs) and the wall
time it adds per image beyond that, at 2 workers. The local path runs first and last
(its two runs bound the noise of a shared machine); the cluster is started once, its
start-up reported apart (a long-running cluster pays it once), and each Ray run counts
everything from the call on: starting the actors, cutting, featurizing, writing and
registering the shards.
Target: (c) >= 0.85x (a).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import fashion_images, row, temp_store
from featurestore.features.cnn.registry import cnn_extractor, model_record
from featurestore.pipelines.cluster import extract_on_ray, ray_session
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest


def _prepared(store: Any, root: Path, model: str) -> None:
    """Ingest the images and convert the built-in model into the store (not timed)."""
    with store.writing():
        ingest(store, root)
        model_record(store, model)


def part_local(root: Path, model: str, batch: int) -> dict[str, float]:
    with temp_store("ray-local") as store:
        _prepared(store, root, model)
        with store.writing():
            t = time.perf_counter()
            summary = extract(store, [cnn_extractor(store, model, batch_size=batch)], batch_size=batch)
            seconds = time.perf_counter() - t
    assert summary.processed > 0 and not summary.failed, summary
    return {"seconds": seconds, "n": summary.processed}


def part_ray(root: Path, model: str, batch: int, workers: list[int]) -> dict[str, Any]:
    t = time.perf_counter()
    out: dict[str, Any] = {}
    with ray_session("local"):
        out["cluster_start"] = time.perf_counter() - t
        for key, w, limit in [("fixed", 2, 16)] + [(str(w), w, None) for w in workers]:
            with temp_store("ray") as store:
                _prepared(store, root, model)
                ids = [r.id for r in store.select_images()][:limit] if limit else None
                with store.writing():
                    t = time.perf_counter()
                    summary = extract_on_ray(store, [cnn_extractor(store, model, batch_size=batch)], address="local",
                                             workers=w, batch_size=batch, image_ids=ids)
                    seconds = time.perf_counter() - t
                    shards = store.coverage()[0].shards
            assert summary.processed > 0 and not summary.failed, summary
            out[key] = {"seconds": seconds, "n": summary.processed, "shards": shards}
    return out


def _run(part: str, args: argparse.Namespace) -> Any:
    cmd = [sys.executable, "-m", "bench.bench_ray", "--part", part, "--images", str(args.images), "--model",
           args.model, "--batch", str(args.batch)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--part", choices=["local", "ray"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = fashion_images(args.images, (224, 224))
    if args.part == "local":
        print(json.dumps(part_local(root, args.model, args.batch)))
        return
    if args.part == "ray":
        print(json.dumps(part_ray(root, args.model, args.batch, [1, 2])))
        return
    cores = os.cpu_count() or 2
    print(f"{args.images} Fashion-MNIST JPEGs (224x224), {args.model}, batch {args.batch}, {cores} cores; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    before = _run("local", args)
    ray = _run("ray", args)
    after = _run("local", args)
    n = before["n"]
    local_s = (before["seconds"] + after["seconds"]) / 2
    base = n / local_s
    print(row("(a) local path, run before the cluster ones", n, before["seconds"]))
    print(row("(a) local path, run after the cluster ones", n, after["seconds"]))
    print(row("(a) local path, mean of the two (the baseline)", n, local_s))
    for w, label in (("1", "(b) Ray, 1 worker"), ("2", "(c) Ray, 2 workers")):
        r = ray[w]
        print(row(label, r["n"], r["seconds"], base) + f"   {r['shards']} tasks/shards")
    fixed = ray["fixed"]["seconds"]
    per_image = 1000 * (ray["2"]["seconds"] - fixed - local_s) / n
    print(f"Ray job start-up: {fixed:.1f}s (a {ray['fixed']['n']}-image job, 2 workers); beyond it the cluster "
          f"adds {per_image:+.2f} ms per image at 2 workers (local path: {1000 * local_s / n:.2f} ms per image)")
    print(f"cluster start-up (once per cluster, not counted above): {ray['cluster_start']:.1f}s")
    ratio = (ray["2"]["n"] / ray["2"]["seconds"]) / base
    print(f"Ray 2 workers / local = {ratio:.2f} (target >= 0.85); load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
