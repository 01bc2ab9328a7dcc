"""Right-flow extraction speed on real images (issues 4 and 12).

    python -m bench.bench_extract_cnn [--images 2000] [--gluon-images 0]

Prints, side by side in one run on the same Fashion-MNIST photos, for
efficientnet-lite0 (batch 32, FS_WORKERS threads, default all cores):
  (a) forward only on onnxruntime (the model's stored ONNX export), on
      pre-decoded, pre-normalised tensors of the real images,
  (b) end-to-end `fs extract --model efficientnet-lite0` on onnxruntime (the default):
      read, decode, resize, normalise, infer, write shards, register in the catalog,
  (c) end-to-end `fs extract --model efficientnet-lite0 --runtime mxnet`,
  (d) forward only on MXNet's symbolic executor (mx.mod.Module + MKLDNN fusion),
  (e) optionally (--gluon-images N) the same network as a hybridized Gluon block.
Targets: (b) >= 0.85x (a) and >= 1.7x (c) (issue 12); (c) >= 0.80x (d) (issue 4).
Also printed per row: the process CPU time per image (all threads; on a shared
machine steadier than wall time) and the cores busy (CPU time / wall time); and
the largest difference between the vectors of (b) and (c).

The rows are measured in turn, --repeat times (default 2), and each row reports
its best pass (and its lowest CPU per image), so a burst of load from other
processes on a shared machine does not land on one row only. End-to-end times
exclude building the extractor (loading the model, about a second on either
runtime), as in a long extract.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from bench.bench_cnn_forward import bench_gluon
from bench.common import fashion_images, image_files, row, temp_store
from featurestore.features.cnn.registry import cnn_extractor, load_model, load_onnx_model
from featurestore.io.images import load_rgb
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Best:
    """The best pass of one row: lowest wall time (with its cores busy) and lowest CPU time."""

    def __init__(self) -> None:
        self.seconds = self.cpu = float("inf")
        self.cores = 0.0

    def add(self, seconds: float, cpu: float) -> None:
        if seconds < self.seconds:
            self.seconds, self.cores = seconds, cpu / seconds
        self.cpu = min(self.cpu, cpu)


def _forward(model, batches: list[np.ndarray], best: Best) -> None:  # type: ignore[no-untyped-def]
    model.forward(batches[0])  # warm-up: memory planning, kernel selection
    t, c = time.perf_counter(), _cpu()
    for b in batches:
        model.forward(b)
    best.add(time.perf_counter() - t, _cpu() - c)


def _end_to_end(store, runtime: str, batch: int, n: int, best: Best) -> np.ndarray:  # type: ignore[no-untyped-def]
    """One `fs extract` pass (a fresh feature set) timed into ``best``; returns its vectors."""
    with store.writing():
        ex = cnn_extractor(store, "efficientnet-lite0", batch_size=batch, runtime=runtime)
        t, c = time.perf_counter(), _cpu()
        summary = extract(store, [ex], batch_size=batch, replace=True)
        best.add(time.perf_counter() - t, _cpu() - c)
    assert summary.processed == n and not summary.failed, summary
    return store.read_matrix(["efficientnet-lite0"]).X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2, help="passes over every row; each row reports its best")
    ap.add_argument("--gluon-images", type=int, default=0, help="also time hybridized Gluon on N images")
    ap.add_argument("--size", default="224x224", help="size of the exported JPEGs")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    root = fashion_images(args.images, (w, h))
    files = image_files(root)
    n = len(files)
    with temp_store("cnn") as store:
        with store.writing():
            ingest(store, root)
            onnx_model, _ = load_onnx_model(store, "efficientnet-lite0", batch_size=args.batch)
            mx_model, row_ = load_model(store, "efficientnet-lite0", batch_size=args.batch)
        tensors = np.stack([onnx_model.prepare(load_rgb(p)) for p in files])
        batches = [tensors[i : i + args.batch] for i in range(0, n, args.batch)]
        ort_fwd, ort_e2e, mx_e2e, mx_fwd = Best(), Best(), Best(), Best()
        diff = 0.0
        for _ in range(max(1, args.repeat)):
            _forward(onnx_model, batches, ort_fwd)
            ort_vecs = _end_to_end(store, "onnxruntime", args.batch, n, ort_e2e)
            mx_vecs = _end_to_end(store, "mxnet", args.batch, n, mx_e2e)
            diff = max(diff, float(np.abs(ort_vecs - mx_vecs).max()))
            _forward(mx_model, batches, mx_fwd)
        del onnx_model, mx_model
        g = min(args.gluon_images, n)
        gluon_rate = None
        if g:
            symbol, params = store.root / row_.symbol_path, store.root / row_.params_path
            gluon_rate = bench_gluon(symbol, params, "global_pool", batches[: -(-g // args.batch)], args.batch)
    base = n / ort_fwd.seconds
    print(f"{n} real images ({args.size} JPEG), batch {args.batch}, {os.cpu_count()} cores, "
          f"FS_WORKERS={os.environ.get('FS_WORKERS', '(all cores)')}, best of {max(1, args.repeat)}")
    for name, best in [("(a) forward only, onnxruntime", ort_fwd), ("(b) fs extract --model efficientnet-lite0",
                       ort_e2e), ("(c) fs extract ... --runtime mxnet", mx_e2e),
                       ("(d) forward only, MXNet Module (MKLDNN)", mx_fwd)]:
        print(f"{row(name, n, best.seconds, None if best is ort_fwd else base)}  "
              f"{1000 * best.cpu / n:5.1f} ms CPU/img, {best.cores:.2f} cores busy")
    if gluon_rate:
        print(row("(e) forward only, hybridized Gluon", g, g / gluon_rate, base))
    print(f"max |(b) - (c)| over {n} vectors: {diff:.2e}")
    print(f"wall: (b)/(a) = {ort_fwd.seconds / ort_e2e.seconds:.2f} (target >= 0.85); (b)/(c) = "
          f"{mx_e2e.seconds / ort_e2e.seconds:.2f} (target >= 1.7); (c)/(d) = {mx_fwd.seconds / mx_e2e.seconds:.2f} "
          f"(target >= 0.80)")
    print(f"CPU per image: (b)/(a) = {ort_fwd.cpu / ort_e2e.cpu:.2f}; (b)/(c) = {mx_e2e.cpu / ort_e2e.cpu:.2f}; "
          f"(c)/(d) = {mx_fwd.cpu / mx_e2e.cpu:.2f}")


if __name__ == "__main__":
    main()
