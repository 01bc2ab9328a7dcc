"""Benchmark: our sparse random projection vs scikit-learn's, on 640x480 RGB images.

Run ``python bench/bench_projection.py --images 500``. Images are synthetic
uint8 arrays; a pool of at most 64 distinct images is cycled so memory stays
small (64 x 921,600 bytes = 59 MB), which keeps the comparison about the
projection, not the allocator.

Figures printed (images/s, higher is better):

* ``ours batch=B``: :meth:`SparseRandomProjection.transform` on batches of B
  images, as the extract pipeline calls it;
* ``ours batch=1``: the same, image by image;
* ``sklearn batch=1``: ``sklearn.random_projection.SparseRandomProjection(
  n_components=K, density=1/sqrt(D), dense_output=True)`` fitted on a 1 x D
  dummy and applied image by image (it converts each image to float64 first);
* ``scipy X@R batch=B``: ``X.astype(float32) @ R`` with our matrix, for reference.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

from featurestore.features.projection import SparseRandomProjection


def _rate(fn: Callable[[np.ndarray], object], pool: np.ndarray, n_images: int, batch: int) -> float:
    """Images per second for ``fn`` applied to ``n_images`` images in batches of ``batch``."""
    fn(pool[:batch])  # warm-up
    done = 0
    start = time.perf_counter()
    while done < n_images:
        b = min(batch, n_images - done)
        i = done % len(pool)
        if i + b > len(pool):
            i = 0
        fn(pool[i : i + b])
        done += b
    return n_images / (time.perf_counter() - start)


def bench_projection(
    n_images: int = 500,
    k: int = 128,
    width: int = 640,
    height: int = 480,
    batch: int = 32,
    seed: int = 0,
    pool: np.ndarray | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """Time our projection against scikit-learn's on flat uint8 images.

    Parameters
    ----------
    n_images : int
        Images projected per measurement.
    k : int
        Output dimension.
    width, height : int
        Image size; ``D = width * height * 3``.
    batch : int
        Batch size for the batched measurements.
    seed : int
        Projection seed.
    pool : numpy.ndarray, optional
        ``(m, D)`` uint8 images to cycle through; synthetic if omitted.
    verbose : bool
        Print the table.

    Returns
    -------
    dict
        Images/s for each method, generation seconds, and ratios.
    """
    from sklearn.random_projection import SparseRandomProjection as SkSRP

    d = width * height * 3
    if pool is None:
        rng = np.random.default_rng(seed)
        pool = rng.integers(0, 256, (min(64, max(batch, n_images)), d), dtype=np.uint8)
    if pool.ndim != 2 or pool.shape[1] != d:
        raise ValueError(f"pool must be (m, {d}) uint8, got {pool.shape}")

    t0 = time.perf_counter()
    ours = SparseRandomProjection.generate(d, k, seed=seed)
    gen_s = time.perf_counter() - t0

    density = 1 / math.sqrt(d)
    t0 = time.perf_counter()
    sk = SkSRP(n_components=k, density=density, dense_output=True, random_state=seed)
    sk.fit(np.zeros((1, d), dtype=np.float32))
    sk_fit_s = time.perf_counter() - t0
    matrix = ours.matrix

    results = {
        "generate_s": gen_s,
        "sklearn_fit_s": sk_fit_s,
        f"ours_batch{batch}": _rate(ours.transform, pool, n_images, batch),
        "ours_batch1": _rate(ours.transform, pool, n_images, 1),
        "sklearn_batch1": _rate(sk.transform, pool, n_images, 1),
        f"scipy_batch{batch}": _rate(lambda x: x.astype(np.float32) @ matrix, pool, n_images, batch),
    }
    results["ratio_batch1"] = results["ours_batch1"] / results["sklearn_batch1"]
    results[f"ratio_batch{batch}"] = results[f"ours_batch{batch}"] / results["sklearn_batch1"]
    if verbose:
        print(f"D={d} ({width}x{height}x3), K={k}, density=1/{math.sqrt(d):.0f}, nnz={ours.nnz}", end="")
        print(f", images={n_images}")
        print(f"generate (ours): {gen_s:.2f} s   fit (sklearn): {sk_fit_s:.2f} s")
        print(f"{'method':<22}{'images/s':>12}{'ms/image':>12}{'vs sklearn':>12}")
        base = results["sklearn_batch1"]
        for label, key in [
            (f"ours batch={batch}", f"ours_batch{batch}"),
            ("ours batch=1", "ours_batch1"),
            ("sklearn batch=1", "sklearn_batch1"),
            (f"scipy X@R batch={batch}", f"scipy_batch{batch}"),
        ]:
            r = results[key]
            print(f"{label:<22}{r:>12.1f}{1000 / r:>12.3f}{r / base:>11.1f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="images per measurement")
    parser.add_argument("--k", type=int, default=128, help="output dimension")
    parser.add_argument("--batch", type=int, default=32, help="batch size for the batched runs")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_projection(args.images, args.k, args.width, args.height, args.batch, args.seed)


if __name__ == "__main__":
    main()
