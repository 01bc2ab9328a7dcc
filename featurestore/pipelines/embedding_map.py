"""2-D maps of a feature set (PCA or t-SNE), computed on demand and cached in the store.

A map places up to ``MAX_POINTS`` images of a feature set in the plane. The
images are a seeded sample of those with a vector (all of them when there are
fewer); vectors are L2-normalised first, so the map reflects cosine
similarity, the default search metric. PCA is scikit-learn's ``PCA``; t-SNE is
scikit-learn's Barnes-Hut ``TSNE`` on the first 50 principal components.

The result (image ids and coordinates) is cached under
``<store>/maps/<feature set>/<method>-n<N>-s<seed>-<fingerprint>.npz``, written
atomically; the fingerprint covers the set's shard list, so adding, replacing
or compacting vectors gives a new map. A store that cannot be written (a
read-only mount) computes the map without keeping it.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass

import numpy as np

from featurestore.catalog.repository import live_image_ids, shard_fingerprint
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.io.atomic import write_bytes_atomic
from featurestore.store import Store

METHODS = ("pca", "tsne")
MAX_POINTS = 20_000
FOLDER = "maps"
TSNE_PCA_DIMS = 50

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class EmbeddingMap:
    feature_set: str
    method: str
    image_ids: np.ndarray  # int64, ascending
    xy: np.ndarray  # float32 (n, 2)
    available: int  # images with a vector (the sample is drawn from them)
    seconds: float  # time it took to compute (when it was computed)
    cached: bool  # read from the cache


def _check(method: str, n: int) -> None:
    if method not in METHODS:
        raise InvalidInputError(f"map method must be one of {', '.join(METHODS)}, not {method!r}")
    if not 2 <= n <= MAX_POINTS:
        raise InvalidInputError(f"a map shows 2 to {MAX_POINTS:,} images, not {n:,}")


def cache_path(store: Store, feature_set: str, method: str, n: int, seed: int) -> str:
    """The cache file (relative to the store) of a map of the set as it is now."""
    fs = store.feature_set(feature_set)
    shards = shard_fingerprint(store.engine, fs.id)
    key = json.dumps({"set": fs.id, "params": fs.params, "shards": shards, "v": 1}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{FOLDER}/{fs.name}/{method}-n{n}-s{seed}-{digest}.npz"


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _project(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    X = np.nan_to_num(X.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    n, dim = X.shape
    if method == "pca":
        if dim == 1:
            return np.hstack([X, np.zeros_like(X)])
        return PCA(n_components=2, random_state=seed).fit_transform(X)
    from sklearn.manifold import TSNE

    if n < 5:
        raise InvalidInputError(f"t-SNE needs at least 5 images, the set has {n}; use PCA")
    if dim > TSNE_PCA_DIMS:
        X = PCA(n_components=min(TSNE_PCA_DIMS, n), random_state=seed).fit_transform(X)
    perplexity = float(min(30.0, (n - 1) / 3))
    return TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity,
                random_state=seed).fit_transform(X)


def embedding_map(store: Store, feature_set: str, method: str = "pca", n: int = 5000, seed: int = 0
                  ) -> EmbeddingMap:
    """The 2-D map of (a sample of ``n`` images of) a feature set, from the cache or computed now.

    Raises
    ------
    NotFoundError
        No such feature set.
    InvalidInputError
        Unknown method, ``n`` out of range, or too few images for t-SNE.
    FeatureStoreError
        The set has fewer than 2 vectors.
    """
    _check(method, n)
    fs = store.feature_set(feature_set)
    path = store.root / cache_path(store, fs.name, method, n, seed)
    with _lock_for(str(path)):  # one computation per map in this process; others wait for it
        try:
            with np.load(path) as z:
                cached = EmbeddingMap(fs.name, method, z["image_ids"], z["xy"], int(z["available"]),
                                      float(z["seconds"]), True)
            return cached
        except (OSError, KeyError, ValueError):
            pass
        t0 = time.perf_counter()
        live = np.asarray(live_image_ids(store.engine, fs.id), dtype=np.int64)
        if live.size < 2:
            raise FeatureStoreError(f"feature set {fs.name} has {live.size} vector(s); a map needs at least 2")
        ids = live if live.size <= n else np.sort(np.random.default_rng(seed).choice(live, n, replace=False))
        fm = store.read_matrix([fs.name], image_ids=ids.tolist())
        xy = _project(fm.X, method, seed).astype(np.float32)
        seconds = time.perf_counter() - t0
        buf = io.BytesIO()
        np.savez(buf, image_ids=fm.image_ids.astype(np.int64), xy=xy, available=np.int64(live.size),
                 seconds=np.float64(seconds))
        try:
            write_bytes_atomic(path, buf.getvalue())
        except OSError:
            pass  # read-only store: serve the map without keeping it
    return EmbeddingMap(fs.name, method, fm.image_ids.astype(np.int64), xy, int(live.size), seconds, False)

