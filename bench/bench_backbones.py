"""Right-flow extraction speed on real images (issue 4).

    python -m bench.bench_backbones [--images 500] [--gluon-images 0] [--runtime mxnet|onnxruntime]
        [--models efficientnet-lite0,efficientnet-lite1,efficientnet-lite2]

Extraction speed of the built-in backbones (issue 16); bench_extract_cnn compares the two runtimes
on efficientnet-lite0 (issue 12).

Prints, side by side in one run, for each of --models (default efficientnet-lite0; batch 32, 2 cores):
  (a) forward-only images/s of our symbolic executor (mx.mod.Module + MKLDNN fusion)
      on pre-decoded, pre-normalised tensors of the real images,
  (b) the same network as a hybridized Gluon SymbolBlock (static_alloc, static_shape)
      on the same tensors (a subset: it is slow; efficientnet-lite0 only, 224x224),
  (c) end-to-end `fs extract --model NAME` (decode, resize, normalise,
      infer, write shards) on the same files.
Targets: (c) >= 80% of (a); (a) not slower than (b).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.bench_cnn_forward import bench_gluon
from bench.common import fashion_images, image_files, row, temp_store
from featurestore.errors import RuntimeUnavailableError
from featurestore.features.cnn.mxnet_backend import import_mxnet
from featurestore.features.cnn.registry import cnn_extractor
from featurestore.features.cnn.runtimes import load_model, load_onnx_model
from featurestore.io.images import load_rgb
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--gluon-images", type=int, default=0, help="0 skips (b)")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "mxnet"],
                    help="runtime of (a) and (c)")
    ap.add_argument("--size", default="224x224", help="size of the exported JPEGs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="efficientnet-lite0", help="comma-separated built-in models, e.g. "
                    "efficientnet-lite0,efficientnet-lite1,efficientnet-lite2")
    args = ap.parse_args()
    if args.runtime == "mxnet" or args.gluon_images:
        try:
            import_mxnet()
        except RuntimeUnavailableError as exc:  # the mxnet extra is not installed
            print(f"--runtime mxnet / --gluon-images skipped: {exc}")
            return
    w, h = (int(v) for v in args.size.split("x"))
    root = fashion_images(args.images, (w, h))
    files = image_files(root)
    n = len(files)
    print(f"{n} real images ({args.size} JPEG), batch {args.batch}, {os.cpu_count()} cores")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        bench_model(args, name, root, files)


def bench_model(args: argparse.Namespace, name: str, root: Path, files: list[Path]) -> None:
    n = len(files)
    with temp_store("cnn") as store:
        with store.writing():
            ingest(store, root)
            if args.runtime == "onnxruntime":
                model, row_ = load_onnx_model(store, name, batch_size=args.batch, save_export=True)
            else:
                model, row_ = load_model(store, name, batch_size=args.batch)
        symbol, params = store.root / row_.symbol_path, store.root / row_.params_path
        tensors = np.stack([model.prepare(load_rgb(p)) for p in files])
        batches = [tensors[i : i + args.batch] for i in range(0, n, args.batch)]
        model.forward(batches[0])  # warm-up
        t, c = time.perf_counter(), time.process_time()
        for b in batches:
            model.forward(b)
        fwd, fwd_cpu = time.perf_counter() - t, time.process_time() - c
        g = min(args.gluon_images, n) if name == "efficientnet-lite0" else 0
        gluon_rate = bench_gluon(symbol, params, "global_pool", [tensors[i : i + args.batch] for i in range(
            0, g, args.batch)], args.batch) if g else 0.0
        del tensors, batches
        with store.writing():
            ex = cnn_extractor(store, name, batch_size=args.batch, runtime=args.runtime)
            t, c = time.perf_counter(), time.process_time()
            summary = extract(store, [ex], batch_size=args.batch)
            e2e, e2e_cpu = time.perf_counter() - t, time.process_time() - c
        assert summary.processed == n, summary
    base = n / fwd
    side = model.preprocess.size[0]
    print(row(f"(a) {name} forward only ({side}px, {args.runtime})", n, fwd))
    if g:
        print(row("(b) forward only, hybridized Gluon", g, g / gluon_rate, base))
    print(row(f"(c) fs extract --model {name}", n, e2e, base))
    print(f"{name}: end-to-end / forward-only = {fwd / e2e:.2f} (target >= 0.80)"
          + (f"; Module / Gluon = {base / gluon_rate:.2f} (target >= 1.0)" if g else ""))
    # CPU time (all threads) per image: steadier than wall time when other jobs share the cores.
    print(f"{name}: CPU per image: forward only {1e3 * fwd_cpu / n:.0f} ms, end-to-end {1e3 * e2e_cpu / n:.0f} ms")


if __name__ == "__main__":
    main()
