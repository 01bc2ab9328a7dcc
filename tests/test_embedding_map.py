"""t-SNE maps on openTSNE: clusters stay apart, and images added later are placed on the fitted map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore.features.base import FeatureSpec
from featurestore.pipelines.embedding_map import embedding_map
from featurestore.pipelines.ingest import ingest
from featurestore.store import Store
from helpers import make_image

DIM = 64  # above 50: the vectors go through the stored PCA projection


def _centres() -> np.ndarray:
    return np.random.default_rng(42).normal(size=(3, DIM)).astype(np.float32) * 4


def _add(store: Store, tmp: Path, start: int, count: int) -> dict[int, int]:
    """Ingest ``count`` new images; give each a vector near one of three cluster centres. Returns id -> cluster."""
    folder = tmp / f"batch{start}"
    for i in range(start, start + count):
        make_image(folder / f"{i}.png", size=(8, 8), seed=10_000 + i)
    before = {r[0] for r in store.select_images()}
    with store.writing():
        ingest(store, folder, dataset=f"b{start}", labels="none")
        ids = sorted({r[0] for r in store.select_images()} - before)
        fs = store.ensure_feature_set(FeatureSpec("vec", "test", DIM, {}))
        rng = np.random.default_rng(start)
        clusters = {i: k % 3 for k, i in enumerate(ids)}
        vecs = np.stack([_centres()[clusters[i]] + rng.normal(size=DIM).astype(np.float32) for i in ids])
        store.append_vectors(fs, ids, vecs)
    return clusters


def _same_cluster_share(xy: np.ndarray, ids: np.ndarray, clusters: dict[int, int], which: np.ndarray) -> float:
    """Share of the points ``which`` whose nearest other point on the map is in the same cluster."""
    d = np.linalg.norm(xy[which][:, None, :] - xy[None, :, :], axis=2)
    d[np.arange(len(which)), which] = np.inf
    nearest = d.argmin(axis=1)
    return float(np.mean([clusters[int(ids[w])] == clusters[int(ids[j])] for w, j in zip(which, nearest,
                                                                                             strict=True)]))


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
def test_new_images_are_placed_on_the_fitted_map(store: Store, tmp_path: Path) -> None:
    clusters = _add(store, tmp_path, 0, 60)
    fitted = embedding_map(store, "vec", "tsne", n=100)
    assert fitted.placed == 0 and not fitted.cached and fitted.xy.shape == (60, 2)
    assert _same_cluster_share(fitted.xy, fitted.image_ids, clusters, np.arange(60)) > 0.95

    clusters |= _add(store, tmp_path, 60, 12)  # 20 % more: placed, not refitted
    placed = embedding_map(store, "vec", "tsne", n=100)
    assert (placed.placed, placed.available, placed.cached, placed.xy.shape) == (12, 72, False, (72, 2))
    old = np.isin(placed.image_ids, fitted.image_ids)
    shift = placed.xy[old] - fitted.xy
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-3)  # the map did not move
    assert _same_cluster_share(placed.xy, placed.image_ids, clusters, np.flatnonzero(~old)) > 0.9
    again = embedding_map(store, "vec", "tsne", n=100)
    assert again.cached and again.placed == 12
    np.testing.assert_array_equal(again.xy, placed.xy)

    _add(store, tmp_path, 72, 40)  # the set grew by more than half of what the map was fitted on
    refit = embedding_map(store, "vec", "tsne", n=100)
    assert refit.placed == 0 and refit.xy.shape == (100, 2) and refit.available == 112


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
def test_placing_keeps_n_points_and_refits_when_a_fitted_image_lost_its_vector(store: Store, tmp_path: Path) -> None:
    clusters = _add(store, tmp_path, 0, 60)
    fitted = embedding_map(store, "vec", "tsne", n=40)
    assert fitted.xy.shape == (40, 2)
    clusters |= _add(store, tmp_path, 60, 20)
    placed = embedding_map(store, "vec", "tsne", n=40)
    assert placed.xy.shape == (40, 2) and placed.placed == 10  # 20 of 80 images are new: a quarter of 40
    assert np.isin(placed.image_ids[placed.image_ids >= 61], list(clusters)).all()
    with store.writing():  # replace the set: the fitted map's vectors are gone
        store.drop_feature_set("vec")
    _add(store, tmp_path, 80, 10)
    assert embedding_map(store, "vec", "tsne", n=40).placed == 0
