"""Forward-only throughput: our symbolic Module executor vs a hybridized Gluon block.

Both run the same checkpoint (default: the built-in EfficientNet-Lite0) on the
same pre-decoded random tensors, batch 32, after one warm-up batch, so the
figure is pure network time (no JPEG decoding or resizing). Run::

    python bench/bench_cnn_forward.py --images 256
    MXNET_SUBGRAPH_BACKEND=NONE python bench/bench_cnn_forward.py   # without oneDNN fusion

``--symbol/--params`` benchmark another checkpoint (e.g. the gallery Inception-BN).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.errors import RuntimeUnavailableError  # noqa: E402
from featurestore.features.cnn.mxnet_backend import CheckpointModel, Preprocess, import_mxnet  # noqa: E402


def make_batches(n_images: int, batch: int, size: tuple[int, int] = (224, 224)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    w, h = size
    sizes = [min(batch, n_images - i) for i in range(0, n_images, batch)]
    return [rng.standard_normal((k, 3, h, w), dtype=np.float32) for k in sizes]


def bench_module(symbol: Path, params: Path, tap: str, batches: list[np.ndarray], batch: int) -> float:
    """Images/s of CheckpointModel.forward (mx.mod.Module, in-graph pooling)."""
    model = CheckpointModel.load(symbol, params, Preprocess(), [tap], batch_size=batch)
    model.forward(batches[0])  # warm-up: memory planning, oneDNN primitive creation
    n = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    for b in batches:
        model.forward(b)
    return n / (time.perf_counter() - t0)


def bench_gluon(symbol: Path, params: Path, tap: str, batches: list[np.ndarray], batch: int) -> float:
    """Images/s of the same graph as a SymbolBlock, hybridize(static_alloc, static_shape)."""
    mx = import_mxnet()
    sym = mx.sym.load(str(symbol)).get_internals()[tap + "_output"]
    sym = mx.sym.mean(sym, axis=(2, 3))
    net = mx.gluon.SymbolBlock(sym, mx.sym.var("data"))
    loaded = mx.nd.load(str(params))
    net_params = net.collect_params()
    for key, value in loaded.items():
        name = key.split(":", 1)[1]
        if name in net_params:
            net_params[name]._load_init(value, mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    w, h = 224, 224
    net(mx.nd.zeros((batch, 3, h, w))).wait_to_read()  # warm-up
    n = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    for b in batches:
        if len(b) < batch:  # keep static_shape: pad like the Module path does
            b = np.concatenate([b, np.zeros((batch - len(b), 3, h, w), np.float32)])
        net(mx.nd.array(b)).asnumpy()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description="forward-only images/s: symbolic Module vs hybridized Gluon")
    ap.add_argument("--images", type=int, default=256, help="images per measurement (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--symbol", type=Path, help="-symbol.json (default: built-in efficientnet-lite0)")
    ap.add_argument("--params", type=Path, help=".params matching --symbol")
    ap.add_argument("--tap", default="global_pool", help="layer to extract (default global_pool)")
    args = ap.parse_args()
    try:
        import_mxnet()
    except RuntimeUnavailableError as exc:  # the mxnet extra is not installed
        print(f"skipped: {exc}")
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.symbol is None:
            from featurestore.features.cnn.efficientnet import ensure_efficientnet_lite

            args.symbol, args.params = ensure_efficientnet_lite("efficientnet-lite0", Path(tmp))
        batches = make_batches(args.images, args.batch)
        mx = import_mxnet()
        print(
            f"mxnet {mx.__version__}, MXNET_SUBGRAPH_BACKEND={os.environ.get('MXNET_SUBGRAPH_BACKEND')}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(default)')}, cpus={os.cpu_count()}",
            file=sys.stderr,
        )
        module = bench_module(args.symbol, args.params, args.tap, batches, args.batch)
        gluon = bench_gluon(args.symbol, args.params, args.tap, batches, args.batch)
    print(f"{args.symbol.name} tap={args.tap} images={args.images} batch={args.batch}")
    print(f"{'symbolic Module':>20}: {module:8.1f} img/s")
    print(f"{'hybridized Gluon':>20}: {gluon:8.1f} img/s")
    print(f"{'ratio':>20}: {module / gluon:8.2f}x")


if __name__ == "__main__":
    main()
