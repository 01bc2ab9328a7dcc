"""Benchmark: the 20,000-point t-SNE map, scikit-learn's TSNE (the previous implementation) vs openTSNE, in one run.

Data: the first ``--n`` Fashion-MNIST images' pixels (784 values), L2-normalised
like every map. Both maps start from the same 50 principal components and use
perplexity 30 and PCA initialisation:

* ``sklearn``: ``sklearn.manifold.TSNE(init="pca", learning_rate="auto")``,
  Barnes-Hut, 1,000 iterations: what the web app ran before;
* ``openTSNE``: ``featurestore.pipelines.embedding_map`` as it runs now
  (FFT-accelerated above 10,000 points, 250 + 500 iterations).

Both run on one thread (``--threads`` changes it) so the figure does not depend
on what else loads the machine. Map quality of each, on the same points:

* kNN preservation: the share of each point's 10 nearest neighbours (in the
  50-D input) that are among its 10 nearest on the map;
* trustworthiness (scikit-learn, 10 neighbours) on a seeded 5,000-point subsample;
* class agreement: the share of points whose nearest map neighbour has the same
  Fashion-MNIST class.

Then ``--place`` further images (default 1,000) are placed on the openTSNE map
without refitting it (``place_points``, what a request for a grown set does),
timed beside the fit, with the class agreement of the placed points with their
nearest fitted neighbour.

Run::

    python -m bench.bench_map                 # 20,000 points (several minutes on 2 cores)
    python -m bench.bench_map --n 5000        # quicker
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def knn_preservation(X: np.ndarray, xy: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import NearestNeighbors

    hi = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    lo = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy, return_distance=False)[:, 1:]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(hi, lo, strict=True)]))


def class_agreement(xy_ref: np.ndarray, y_ref: np.ndarray, xy: np.ndarray, y: np.ndarray, skip_self: bool) -> float:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=2 if skip_self else 1).fit(xy_ref).kneighbors(xy, return_distance=False)
    return float(np.mean(y_ref[nn[:, -1]] == y))


def quality(X: np.ndarray, xy: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    from sklearn.manifold import trustworthiness

    sub = np.random.default_rng(seed).choice(len(X), min(5000, len(X)), replace=False)
    return {"knn": knn_preservation(X, xy), "trust": float(trustworthiness(X[sub], xy[sub], n_neighbors=10)),
            "classes": class_agreement(xy, labels, xy, labels, skip_self=True)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--place", type=int, default=1_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.n < 100 or args.place < 0 or args.threads < 1:
        raise SystemExit("--n must be at least 100, --place 0 or more, --threads at least 1")
    try:
        import openTSNE  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"skipped: {exc.name} is not installed") from None
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from featurestore.io.fashion_mnist import DatasetMissingError, load_fashion_mnist
    from featurestore.pipelines import embedding_map as em

    try:
        _, images, labels = load_fashion_mnist("train")[0]
    except DatasetMissingError as exc:
        raise SystemExit(f"skipped: {exc}") from None
    total = args.n + args.place
    X = em._normalised(images[:total].reshape(total, -1).astype(np.float32))
    y = labels[:total].astype(np.int64)
    em.TSNE_THREADS = args.threads
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.n:,} Fashion-MNIST "
          f"images (784 pixels, L2-normalised) -> 50 principal components -> 2-D; {args.threads} thread(s)")
    Y = PCA(n_components=em.TSNE_PCA_DIMS, random_state=0).fit_transform(X[: args.n])

    print(f"{'map':10} {'wall s':>8} {'CPU s':>8} {'kNN@10 kept':>12} {'trustworthiness':>16} {'same class':>11}")
    with threadpool_limits(args.threads):
        old, old_wall, old_cpu = _timed(lambda: TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=30.0,
                                                     random_state=0).fit_transform(Y))
    q = quality(Y, old, y[: args.n])
    print(f"{'sklearn':10} {old_wall:8.1f} {old_cpu:8.1f} {q['knn']:12.3f} {q['trust']:16.3f} {q['classes']:11.3f}",
          flush=True)
    ids = np.arange(args.n, dtype=np.int64)
    with threadpool_limits(args.threads):
        fitted, new_wall, new_cpu = _timed(lambda: em._tsne_fit(X[: args.n], ids, ids, 0))
    q_new = quality(em._reduce(X[: args.n], fitted), fitted.xy, y[: args.n])
    print(f"{'openTSNE':10} {new_wall:8.1f} {new_cpu:8.1f} {q_new['knn']:12.3f} {q_new['trust']:16.3f} "
          f"{q_new['classes']:11.3f}")
    print(f"openTSNE is {old_wall / new_wall:.1f}x faster (wall), {old_cpu / new_cpu:.1f}x (CPU); target >= 2x",
          flush=True)
    if args.place:
        X_new = em._reduce(X[args.n :], fitted)
        (ref_xy, new_xy), wall, cpu = _timed(lambda: em.place_points(em._reduce(X[: args.n], fitted), fitted.xy,
                                                                     X_new, fitted.perplexity))
        agree = class_agreement(ref_xy, y[: args.n], new_xy, y[args.n :], skip_self=False)
        print(f"placing {args.place:,} new images on the fitted map: {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"({new_wall / wall:.0f}x less than fitting again); nearest fitted neighbour of the same class: "
              f"{agree:.3f} (fitted points: {q_new['classes']:.3f})")


if __name__ == "__main__":
    main()
