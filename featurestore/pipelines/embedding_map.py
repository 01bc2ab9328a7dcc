"""2-D maps of a feature set (PCA or t-SNE), computed on demand and cached in the store.

A map places up to ``MAX_POINTS`` images of a feature set in the plane. The
images are a seeded sample of those with a vector (all of them when there are
fewer); vectors are L2-normalised first, so the map reflects cosine
similarity, the default search metric. PCA is scikit-learn's ``PCA``; t-SNE is
openTSNE's FFT-accelerated t-SNE (Barnes-Hut below 10,000 points) on the first
50 principal components.

The result (image ids and coordinates) is cached under
``<store>/maps/<feature set>/<method>-n<N>-s<seed>-<fingerprint>.npz``, written
atomically; the fingerprint covers the set's shard list, so adding, replacing
or compacting vectors gives a new map. A store that cannot be written (a
read-only mount) computes the map without keeping it.

A fitted t-SNE map also keeps what it was fitted on (the ids that had a vector
then, the PCA projection). When vectors are added later, the next request
places the new images on that map (openTSNE's ``TSNEEmbedding.transform``:
each new point is optimised against the fixed map, which does not move)
instead of recomputing it, as long as the set grew by at most
``PLACE_MAX_GROWTH`` of the images the map was fitted on and none of those
lost its vector; past that, the map is fitted again. Placed images are a
sample of the new ones at the map's sampling rate, so a map keeps ``n`` points.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.io.atomic import write_bytes_atomic
from featurestore.io.params import params_key
from featurestore.store import FeatureSetHandle, Store

METHODS = ("pca", "tsne")
MAX_POINTS = 20_000
FOLDER = "maps"
TSNE_PCA_DIMS = 50
TSNE_THREADS = 1
"""openTSNE's threads busy-wait: on a loaded machine (or beside `fs serve`'s other workers) more than one
thread made a small map 30x slower (100 s instead of 3 s for 60 points); one thread is what a web request gets."""
PLACE_MAX_GROWTH = 0.5
"""New images are placed on a fitted t-SNE map while they number at most this share of the images it was fitted on."""

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
    placed: int = 0  # of the images, how many were placed on an earlier t-SNE map instead of fitted with it


@dataclass(frozen=True)
class _Fitted:
    """A fitted t-SNE map and what it was fitted on (for placing images added since)."""

    image_ids: np.ndarray
    xy: np.ndarray
    live: np.ndarray  # ids that had a vector when it was fitted
    pca_mean: np.ndarray  # (dim,) or empty when the vectors were not reduced
    pca_components: np.ndarray  # (50, dim) or empty
    perplexity: float


def _check(method: str, n: int) -> None:
    if method not in METHODS:
        raise InvalidInputError(f"map method must be one of {', '.join(METHODS)}, not {method!r}")
    if not 2 <= n <= MAX_POINTS:
        raise InvalidInputError(f"a map shows 2 to {MAX_POINTS:,} images, not {n:,}")


def cache_path(store: Store, feature_set: str, method: str, n: int, seed: int) -> str:
    """The cache file (relative to the store) of a map of the set as it is now."""
    fs = store.feature_set(feature_set)
    shards = store.catalog.shard_fingerprint(fs.id)
    version = 2 if method == "tsne" else 1  # 2: openTSNE, with what placing new images needs
    key = json.dumps({"set": fs.id, "params": fs.params, "shards": shards, "v": version}, sort_keys=True,
                     default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{FOLDER}/{fs.name}/{method}-n{n}-s{seed}-{digest}.npz"


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _normalised(X: np.ndarray) -> np.ndarray:
    X = np.nan_to_num(X.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _pca_map(X: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    if X.shape[1] == 1:
        return np.hstack([X, np.zeros_like(X)])
    return PCA(n_components=2, random_state=seed).fit_transform(X)  # type: ignore[no-any-return]


def _perplexity(n: int) -> float:
    return float(min(30.0, (n - 1) / 3))


def _tsne_fit(X: np.ndarray, image_ids: np.ndarray, live: np.ndarray, seed: int) -> _Fitted:
    """Fit a t-SNE map of the normalised vectors ``X`` (reduced to 50 principal components first)."""
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    n, dim = X.shape
    if n < 5:
        raise InvalidInputError(f"t-SNE needs at least 5 images, the set has {n}; use PCA")
    mean = components = np.empty(0, dtype=np.float32)
    if dim > TSNE_PCA_DIMS:
        pca = PCA(n_components=min(TSNE_PCA_DIMS, n), random_state=seed).fit(X)
        mean, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        X = (X - mean) @ components.T
    perplexity = _perplexity(n)
    emb = TSNE(n_components=2, perplexity=perplexity, initialization="pca", learning_rate="auto", n_jobs=TSNE_THREADS,
               random_state=seed).fit(np.ascontiguousarray(X, dtype=np.float64))
    return _Fitted(image_ids, np.asarray(emb, dtype=np.float32), live, mean, components, perplexity)


def _reduce(X: np.ndarray, fitted: _Fitted) -> np.ndarray:
    return X if not fitted.pca_components.size else (X - fitted.pca_mean) @ fitted.pca_components.T


def _params_digest(fs: FeatureSetHandle) -> str:
    return hashlib.sha256(params_key(fs.params).encode()).hexdigest()[:16]


def _fitted_maps(store: Store, fs: FeatureSetHandle, n: int, seed: int) -> list[Path]:
    """This set's cached t-SNE maps of ``n`` images and ``seed``, newest first."""
    folder = store.root / FOLDER / fs.name
    files = list(folder.glob(f"tsne-n{n}-s{seed}-*.npz")) if folder.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def _load_fitted(path: Path, fs: FeatureSetHandle) -> _Fitted | None:
    """The fitted map in ``path`` if it was fitted (not placed) on this very set (same id and params)."""
    try:
        with np.load(path) as z:
            if (int(z["placed"]) != 0 or int(z["set_id"]) != fs.id
                    or str(z["params_digest"]) != _params_digest(fs)):
                return None
            return _Fitted(z["image_ids"], z["xy"], z["live"], z["pca_mean"], z["pca_components"],
                           float(z["perplexity"]))
    except (OSError, KeyError, ValueError):
        return None


def _placement(fitted: _Fitted, live: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(fitted images kept on show, new images to place), or None when the map should be fitted again."""
    if not np.isin(fitted.image_ids, live).all():
        return None  # a fitted image lost its vector (replaced or re-extracted): fit again
    new = np.setdiff1d(live, fitted.live)
    if new.size > PLACE_MAX_GROWTH * fitted.live.size:
        return None
    total = min(n, fitted.live.size + new.size)
    k = int(round(total * new.size / max(1, fitted.live.size + new.size)))
    keep = min(fitted.image_ids.size, total - k)
    k = total - keep
    rng = np.random.default_rng(seed)
    shown = fitted.image_ids if keep == fitted.image_ids.size else np.sort(rng.choice(fitted.image_ids, keep,
                                                                                        replace=False))
    added = new if k == new.size else np.sort(rng.choice(new, k, replace=False))
    return shown, added


def place_points(X_ref: np.ndarray, xy_ref: np.ndarray, X_new: np.ndarray, perplexity: float, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Place the rows of ``X_new`` on a fitted t-SNE map of ``X_ref`` (at ``xy_ref``) without moving it.

    Each new point is optimised against the fixed map only (openTSNE's
    ``TSNEEmbedding.transform``). Returns the map's points (translated: the
    map is centred first) and the new points' coordinates, both float32.
    """
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN

    affinities = PerplexityBasedNN(np.ascontiguousarray(X_ref, dtype=np.float64), perplexity=perplexity,
                                   n_jobs=TSNE_THREADS, random_state=seed)
    emb = TSNEEmbedding(np.asarray(xy_ref, dtype=np.float64), affinities, random_state=seed, n_jobs=TSNE_THREADS)
    new_xy = np.asarray(emb.transform(np.ascontiguousarray(X_new, dtype=np.float64)), dtype=np.float32)
    return np.asarray(emb, dtype=np.float32), new_xy  # transform centred the map in place: read it back after


def _place(store: Store, fs: FeatureSetHandle, fitted: _Fitted, shown: np.ndarray, added: np.ndarray, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Image ids (ascending) and coordinates of ``shown`` fitted images plus ``added`` ones placed on the map."""
    fm = store.read_matrix([fs.name], image_ids=np.union1d(fitted.image_ids, added).tolist())
    X = _reduce(_normalised(fm.X), fitted)
    ref_xy, new_xy = place_points(X[np.searchsorted(fm.image_ids, fitted.image_ids)], fitted.xy,
                                  X[np.searchsorted(fm.image_ids, added)], fitted.perplexity, seed)
    ids = np.concatenate([shown, added])
    order = np.argsort(ids, kind="stable")
    return ids[order], np.concatenate([ref_xy[np.searchsorted(fitted.image_ids, shown)], new_xy])[order]


def _placed_map(store: Store, fs: FeatureSetHandle, live: np.ndarray, n: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Images added since the newest fitted map of the set placed on it, or None if it must be fitted."""
    for path in _fitted_maps(store, fs, n, seed):
        fitted = _load_fitted(path, fs)
        if fitted is None:
            continue
        plan = _placement(fitted, live, n, seed)
        if plan is None:
            return None
        shown, added = plan
        if not added.size:
            return shown, fitted.xy[np.searchsorted(fitted.image_ids, shown)], 0
        ids, xy = _place(store, fs, fitted, shown, added, seed)
        return ids, xy, int(added.size)
    return None


def _fresh(store: Store, fs: FeatureSetHandle, method: str, live: np.ndarray, n: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray, _Fitted | None]:
    ids = live if live.size <= n else np.sort(np.random.default_rng(seed).choice(live, n, replace=False))
    fm = store.read_matrix([fs.name], image_ids=ids.tolist())
    X = _normalised(fm.X)
    if method == "pca":
        return fm.image_ids.astype(np.int64), _pca_map(X, seed).astype(np.float32), None
    fitted = _tsne_fit(X, fm.image_ids.astype(np.int64), live, seed)
    return fitted.image_ids, fitted.xy, fitted


def _save(path: Path, emap: EmbeddingMap, fs: FeatureSetHandle, fitted: _Fitted | None) -> None:
    extra: dict[str, Any] = {}
    if emap.method == "tsne":
        extra = {"placed": np.int64(emap.placed), "set_id": np.int64(fs.id), "params_digest": _params_digest(fs)}
        if fitted is not None:
            extra |= {"live": fitted.live, "pca_mean": fitted.pca_mean, "pca_components": fitted.pca_components,
                      "perplexity": np.float64(fitted.perplexity)}
    buf = io.BytesIO()
    np.savez(buf, image_ids=emap.image_ids, xy=emap.xy, available=np.int64(emap.available),
             seconds=np.float64(emap.seconds), **extra)
    try:
        write_bytes_atomic(path, buf.getvalue())
    except OSError:
        pass  # read-only store: serve the map without keeping it


def embedding_map(store: Store, feature_set: str, method: str = "pca", n: int = 5000, seed: int = 0
                  ) -> EmbeddingMap:
    """The 2-D map of (a sample of ``n`` images of) a feature set, from the cache or computed now.

    A t-SNE map of a set that grew since its last fitted map places the new
    images on that map (``placed`` counts them) instead of fitting it again.

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
                return EmbeddingMap(fs.name, method, z["image_ids"], z["xy"], int(z["available"]),
                                    float(z["seconds"]), True, int(z["placed"]) if "placed" in z else 0)
        except (OSError, KeyError, ValueError):
            pass
        t0 = time.perf_counter()
        live = np.asarray(store.catalog.live_image_ids(fs.id), dtype=np.int64)
        if live.size < 2:
            raise FeatureStoreError(f"feature set {fs.name} has {live.size} vector(s); a map needs at least 2")
        placed = _placed_map(store, fs, live, n, seed) if method == "tsne" else None
        fitted = None
        if placed is None:
            ids, xy, fitted = _fresh(store, fs, method, live, n, seed)
            count = 0
        else:
            ids, xy, count = placed
        emap = EmbeddingMap(fs.name, method, ids.astype(np.int64), xy.astype(np.float32), int(live.size),
                            time.perf_counter() - t0, False, count)
        _save(path, emap, fs, fitted)
    return emap
