"""Near-duplicate groups of a chosen set of images, and the near-duplicate pairs between two sets.

Honest splits (issue 25) need, for the images of a run, which of them are near
copies of each other: cosine similarity >= a threshold in one feature set,
joined transitively (connected components). :func:`group_near_duplicates`
finds them through the set's HNSW index when it has a cosine one (memory
bounded, see :func:`featurestore.search.index.duplicate_groups_indexed`), else
exactly with blocked matrix products (the vectors of the images must fit the
search memory budget). :func:`cross_pairs` lists the pairs that straddle two
sides (train/test, dataset A/B): every such pair is inside one group, so only
the members of groups are compared, exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from featurestore.errors import FeatureStoreError, InvalidInputError, MissingFeaturesError
from featurestore.search import backends as ann
from featurestore.search.kernel import near_duplicate_groups
from featurestore.search.protocol import SearchStore


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float if it is a cosine similarity in (0, 1], else InvalidInputError."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InvalidInputError(f"the near-duplicate threshold must be a number in (0, 1], got {threshold!r}") from None
    if not 0.0 < value <= 1.0:
        raise InvalidInputError(
            f"the near-duplicate threshold is a cosine similarity in (0, 1], got {threshold!r} (e.g. 0.95)"
        )
    return value


@dataclass(frozen=True)
class DuplicateGroups:
    """Near-duplicate groups among ``image_ids``.

    Attributes
    ----------
    image_ids : ndarray of int
        The images examined, ascending.
    labels : ndarray of int
        Group number of each image of ``image_ids`` (same order); an image with no
        near duplicate is a group of its own. Usable as ``groups`` of scikit-learn splitters.
    groups : list of list of int
        The groups of two or more images (ids ascending), ordered by smallest id.
    feature_set, threshold : the set and the cosine similarity used.
    method : {"index", "exact"}
    seconds : float
        Wall time of the grouping.
    """

    image_ids: np.ndarray
    labels: np.ndarray
    groups: list[list[int]]
    feature_set: str
    threshold: float
    method: str
    note: str
    seconds: float

    @property
    def n_grouped(self) -> int:
        """Images that have at least one near duplicate."""
        return sum(len(g) for g in self.groups)

    def label_of(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The group numbers of ``image_ids`` (each must be among :attr:`image_ids`)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(self.image_ids, ids)
        pos = np.minimum(pos, max(self.image_ids.size - 1, 0))
        if ids.size and not np.array_equal(self.image_ids[pos], ids):
            raise InvalidInputError("some images were not part of the grouping")
        return self.labels[pos]


def group_labels(image_ids: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """One group number per id of (ascending) ``image_ids``: groups first, then singletons."""
    labels = np.full(image_ids.size, -1, dtype=np.int64)
    for n, group in enumerate(groups):
        labels[np.searchsorted(image_ids, np.asarray(group, dtype=np.int64))] = n
    alone = labels < 0
    labels[alone] = len(groups) + np.arange(int(alone.sum()))
    return labels


def group_near_duplicates(store: SearchStore, feature_set: str, image_ids: Sequence[int] | np.ndarray, threshold: float,
                          exact: bool = False, progress: Callable[[int, int], None] | None = None
                          ) -> DuplicateGroups:
    """Group ``image_ids`` by near duplication: cosine similarity >= ``threshold`` in ``feature_set``, transitively.

    Parameters
    ----------
    store : SearchStore
        A :class:`featurestore.store.Store`.
    feature_set : str
    image_ids : sequence of int
        The images to group (others are ignored, even when they would link two of these).
    threshold : float
        Cosine similarity in (0, 1].
    exact : bool
        Compare every pair even when the set has an HNSW index (recall 1.0).
    progress : callable, optional
        ``progress(done, total)`` while querying the index.

    Raises
    ------
    InvalidInputError
        The threshold is outside (0, 1].
    MissingFeaturesError
        Some images have no vector in the set (the message names ``fs extract``).
    FeatureStoreError
        No index, and the vectors do not fit the search memory budget.
    """
    threshold = check_threshold(threshold)
    fs = store.feature_set(feature_set)
    ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    lacking = store.images_lacking(fs.name, ids.tolist())
    if lacking:
        raise MissingFeaturesError(fs.name, len(lacking), stored=fs)
    start = time.perf_counter()
    found = None if exact else ann.duplicate_groups_indexed(store, fs, threshold, ids, progress)
    if found is not None:
        groups, method, note = found.groups, "index", found.note
    else:
        need = ids.size * int(fs.dim) * 4
        budget = store.settings.search_memory_mb * 2**20
        if need > budget:
            raise FeatureStoreError(
                f"grouping {ids.size:,} images by {fs.name} needs {need / 2**20:,.0f} MiB of vectors, more than the "
                f"search memory budget of {store.settings.search_memory_mb} MiB", remedy="index-or-budget",
                feature_set=fs.name)
        fm = store.read_matrix([fs.name], image_ids=ids.tolist())
        groups = near_duplicate_groups(fm.image_ids, fm.X, threshold=threshold)
        method, note = "exact", f"every pair of {ids.size:,} vectors of {fs.name} compared"
    return DuplicateGroups(ids, group_labels(ids, groups), groups, fs.name, threshold, method, note,
                           time.perf_counter() - start)


@dataclass(frozen=True)
class LeakPair:
    """Two near-duplicate images on different sides (``a`` on the first, ``b`` on the second)."""

    a: int
    b: int
    similarity: float


def cross_pairs(store: SearchStore, grouping: DuplicateGroups, side_a: Sequence[int] | np.ndarray,
                side_b: Sequence[int] | np.ndarray) -> list[LeakPair]:
    """Pairs (a in ``side_a``, b in ``side_b``, a != b) with cosine similarity >= the grouping's threshold.

    Both images of such a pair are in one group of ``grouping``, so only the
    members of each group are compared (exactly, in float64). An image on both
    sides pairs with its near copies on the other side, not with itself.
    Sorted by decreasing similarity, then ids.
    """
    a_ids = np.asarray(side_a, dtype=np.int64)
    b_ids = np.asarray(side_b, dtype=np.int64)
    candidates = [np.asarray(g, dtype=np.int64) for g in grouping.groups]
    candidates = [g for g in candidates if np.isin(g, a_ids).any() and np.isin(g, b_ids).any()]
    if not candidates:
        return []
    members = np.unique(np.concatenate(candidates))
    fm = store.read_matrix([grouping.feature_set], image_ids=members.tolist())
    unit = fm.X.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
    out = []
    for g in candidates:
        ga, gb = g[np.isin(g, a_ids)], g[np.isin(g, b_ids)]
        va = unit[np.searchsorted(fm.image_ids, ga)]
        vb = unit[np.searchsorted(fm.image_ids, gb)]
        sims = va @ vb.T
        # float64 rounding must not lose a pair the grouping found at exactly the threshold
        r, c = np.nonzero((sims >= grouping.threshold - 1e-6) & (ga[:, None] != gb[None, :]))
        out += [LeakPair(int(ga[i]), int(gb[j]), float(min(sims[i, j], 1.0))) for i, j in zip(r, c, strict=True)]
    out.sort(key=lambda p: (-p.similarity, p.a, p.b))
    return out
