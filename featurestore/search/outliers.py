"""Images far from their own class and from everything: k-nearest-neighbour distances (issue 25).

Definition (``fs audit outliers``): in one feature set, with cosine distance
``1 - cosine similarity``,

* ``to_all`` is an image's mean distance to its ``k`` nearest other images;
* ``to_class`` is its mean distance to its ``k`` nearest other images of the
  same label (NaN when it is the only one of its label, or unlabelled);
* each is compared with Tukey's far-out fence of its values over the images
  examined, ``Q3 + 3 (Q3 - Q1)``; the image's ``score`` is the larger of
  ``to_all / fence_all`` and ``to_class / fence_class``, and it is an outlier when
  ``score > 1``.

A mislabelled photo is far from its class and near another one (high
``to_class``, normal ``to_all``); a photo of something else entirely is far from
everything (high ``to_all``). The search is exact, in blocks of rows (memory:
the unit vectors plus ``block * n`` similarities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore.errors import InvalidInputError

K = 10
FENCE_IQR = 3.0


@dataclass(frozen=True)
class OutlierScores:
    """Per image (in the order given): distances, the fences and the score."""

    image_ids: np.ndarray
    to_all: np.ndarray
    to_class: np.ndarray
    fence_all: float
    fence_class: float
    score: np.ndarray
    k: int


def _unit(mat: np.ndarray) -> np.ndarray:
    x = np.asarray(mat, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def mean_knn_distance(unit: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Mean cosine distance of each row to its ``k`` nearest other rows (NaN with no other row)."""
    n = unit.shape[0]
    out = np.full(n, np.nan)
    kk = min(k, n - 1)
    if kk < 1:
        return out
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not its own neighbour
        top = np.partition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
        out[start : start + block] = 1.0 - top.mean(axis=1)
    return out


def _fence(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan")
    q1, q3 = np.percentile(v, [25, 75])
    return float(q3 + FENCE_IQR * (q3 - q1))


def outlier_scores(image_ids: np.ndarray, mat: np.ndarray, labels: np.ndarray, k: int = K) -> OutlierScores:
    """kNN distances to everything and to the own class, their fences and each image's score (module docstring)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    ids = np.asarray(image_ids, dtype=np.int64)
    if ids.size < 3:
        raise InvalidInputError(f"need at least 3 images to find outliers, got {ids.size}")
    unit = _unit(mat)
    to_all = mean_knn_distance(unit, k)
    to_class = np.full(ids.size, np.nan)
    lab = np.asarray(labels, dtype=object)
    for cls in {v for v in lab.tolist() if v is not None}:
        rows = np.flatnonzero(lab == cls)
        to_class[rows] = mean_knn_distance(unit[rows], k)
    fa, fc = _fence(to_all), _fence(to_class)
    with np.errstate(invalid="ignore", divide="ignore"):
        ra = to_all / fa if fa > 0 else np.zeros_like(to_all)
        rc = to_class / fc if fc > 0 else np.zeros_like(to_class)
    score = np.fmax(ra, rc)
    return OutlierScores(ids, to_all, to_class, fa, fc, np.nan_to_num(score, nan=0.0), k)
