"""Accuracy by repeated random train/test splits (the paper's protocol), or by K folds.

The paper reports accuracy as mean ± std over repeated random 90/10 splits.
:func:`make_splits` draws the splits (stratified when the labels allow it),
:func:`make_folds` cuts K folds instead (every image in exactly one test part,
so each gets an out-of-fold prediction), :func:`splits_fingerprint` identifies
them so that two runs are compared with a paired test only when they saw the
very same splits of the same images, and :func:`evaluate` fits a fresh
estimator per split and records the metrics (and, asked to, the out-of-fold
class probabilities).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from featurestore.errors import InvalidInputError

Split = tuple[np.ndarray, np.ndarray]

STRATIFIED = "stratified"
RANDOM = "random"
STRATIFIED_KFOLD = "stratified-kfold"
GROUP_KFOLD = "stratified-group-kfold"
KFOLD = "kfold"
KFOLD_SCHEMES = (STRATIFIED_KFOLD, GROUP_KFOLD, KFOLD)
STRATIFIED_GROUP = "stratified-group"
GROUP = "group"


def _n_test(n_samples: int, test_size: float | int) -> int:
    # Same rounding as scikit-learn's ShuffleSplit: ceil for a fraction.
    if isinstance(test_size, float):
        return math.ceil(test_size * n_samples)
    return int(test_size)


def make_splits(
    y: np.ndarray | Sequence[Any],
    n_splits: int = 10,
    test_size: float | int = 0.1,
    seed: int = 0,
    groups: np.ndarray | Sequence[Any] | None = None,
) -> tuple[list[Split], str]:
    """Repeated random train/test splits, stratified when possible; group splits with ``groups``.

    Stratified splits (``StratifiedShuffleSplit``) are used when every class
    has at least 2 members and both the test and the training part have at
    least one row per class (``n_test >= n_classes`` and ``n_train >=
    n_classes``), which is what scikit-learn needs to place each class on both
    sides. Otherwise the splits are plain ``ShuffleSplit`` ("random"), and a
    rare class may then be missing from a training part.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels, in the row order of ``X``.
    n_splits : int
        Number of repetitions.
    test_size : float or int
        Fraction (``0 < test_size < 1``) or number of test rows.
    seed : int
        Same ``seed`` and same ``y`` give the same splits.
    groups : array-like of shape (n_samples,), optional
        Group of each row (e.g. near-duplicate groups): all rows of a group land
        on the same side of every split. See :func:`group_splits`.

    Returns
    -------
    splits : list of (train_indices, test_indices)
        Row indices into ``y`` (int arrays).
    scheme : {"stratified", "random", "stratified-group", "group"}
        Which splitter was used.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise InvalidInputError(f"labels must be one-dimensional, got shape {y.shape}")
    n_samples = y.shape[0]
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise InvalidInputError(f"n_splits must be a positive integer, got {n_splits!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise InvalidInputError(f"test_size must be between 0 and 1 when a fraction, got {test_size}")
    elif isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise InvalidInputError(f"test_size must be a fraction or a positive count, got {test_size!r}")
    n_test = _n_test(n_samples, test_size)
    n_train = n_samples - n_test
    if n_samples < 2 or n_test < 1 or n_train < 1:
        raise InvalidInputError(
            f"cannot split {n_samples} image(s) with test_size={test_size}: "
            "need at least one training and one test image"
        )

    if groups is not None:
        return group_splits(y, groups, n_splits, n_test, seed)
    _classes, counts = np.unique(y, return_counts=True)
    n_classes = counts.size
    stratify = counts.min() >= 2 and n_test >= n_classes and n_train >= n_classes
    splitter: ShuffleSplit | StratifiedShuffleSplit
    if stratify:
        splitter = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)
        scheme = STRATIFIED
    else:
        splitter = ShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)
        scheme = RANDOM
    splits = [
        (train.astype(np.int64), test.astype(np.int64)) for train, test in splitter.split(np.zeros((n_samples, 1)), y)
    ]
    return splits, scheme


def make_folds(
    y: np.ndarray | Sequence[Any],
    k: int,
    seed: int = 0,
    groups: np.ndarray | Sequence[Any] | None = None,
) -> tuple[list[Split], str]:
    """K folds: every row is in exactly one test part (out-of-fold scoring).

    ``StratifiedKFold`` (shuffled with ``seed``) when every class has at least
    ``k`` members, so each class is in every training part; with ``groups``,
    ``StratifiedGroupKFold``, which keeps each group (e.g. near-duplicates) in
    one fold. Otherwise plain shuffled ``KFold`` ("kfold"), where a rare class
    may be missing from a training part.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Labels, in the row order of ``X``.
    k : int
        Number of folds, at least 2 and at most the number of rows (or groups).
    seed : int
        Same ``seed``, ``y`` (and ``groups``) give the same folds.
    groups : array-like of shape (n_samples,), optional
        Group of each row; rows of one group always share a fold.

    Returns
    -------
    folds : list of (train_indices, test_indices)
        ``k`` splits whose test parts partition the rows.
    scheme : {"stratified-kfold", "stratified-group-kfold", "kfold"}
        Which splitter was used.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise InvalidInputError(f"labels must be one-dimensional, got shape {y.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InvalidInputError(f"the number of folds must be an integer of at least 2, got {k!r}")
    n_samples = y.shape[0]
    units = n_samples if groups is None else len(set(np.asarray(groups).tolist()))
    if groups is not None and len(groups) != n_samples:
        raise InvalidInputError(f"{len(groups)} groups given for {n_samples} labels")
    if k > units:
        what = "image(s)" if groups is None else "group(s)"
        raise InvalidInputError(f"cannot cut {k} folds from {units} {what}: use at most {units} folds")
    _classes, counts = np.unique(y, return_counts=True)
    X = np.zeros((n_samples, 1))
    splitter: Any
    if counts.min() >= k:
        if groups is not None:
            splitter, scheme = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), GROUP_KFOLD
        else:
            splitter, scheme = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), STRATIFIED_KFOLD
        parts = splitter.split(X, y, groups)
    else:
        if groups is not None:
            parts = GroupKFold(n_splits=k).split(X, y, groups)
        else:
            parts = KFold(n_splits=k, shuffle=True, random_state=seed).split(X, y)
        scheme = KFOLD
    folds = [(train.astype(np.int64), test.astype(np.int64)) for train, test in parts]
    return folds, scheme
def group_splits(y: np.ndarray, groups: np.ndarray | Sequence[Any], n_splits: int, n_test: int, seed: int
                 ) -> tuple[list[Split], str]:
    """Repeated train/test splits that never put one group on both sides.

    Each repetition is the first fold of a ``StratifiedGroupKFold`` with
    ``round(n_samples / n_test)`` folds, shuffled with its own seed drawn from
    ``seed``: the test part holds about ``n_test`` rows, whole groups only, with
    class proportions kept as well as whole groups allow ("stratified-group").
    When a class has fewer than two groups no stratification can put it on both
    sides, and ``GroupShuffleSplit`` draws the groups instead ("group"). Use
    :func:`unsplittable_classes` to report such classes.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    g = np.asarray(groups)
    n_samples = y.shape[0]
    if g.shape != y.shape:
        raise InvalidInputError(f"groups must give one group per image: {g.shape} for {y.shape} labels")
    _, g_codes = np.unique(g, return_inverse=True)
    n_groups = int(g_codes.max()) + 1 if n_samples else 0
    n_folds = max(2, min(round(n_samples / n_test), n_groups))
    if n_groups < 2:
        raise InvalidInputError(f"all {n_samples} images are in one near-duplicate group: no split can keep it on "
                                "one side; raise the threshold")
    seeds = np.random.RandomState(seed).randint(0, 2**31 - 1, size=n_splits)
    splits: list[Split] = []
    if not unsplittable_classes(y, g_codes):
        scheme = STRATIFIED_GROUP
        for s in seeds:
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(s))
            with warnings.catch_warnings():
                # only one fold is used: a class smaller than the fold count is fine (it misses some folds)
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                train, test = next(splitter.split(np.zeros((n_samples, 1)), y, g_codes))
            splits.append((train.astype(np.int64), test.astype(np.int64)))
    else:
        scheme = GROUP
        gss = GroupShuffleSplit(n_splits=n_splits, test_size=1 / n_folds, random_state=seed)
        splits = [(tr.astype(np.int64), te.astype(np.int64))
                  for tr, te in gss.split(np.zeros((n_samples, 1)), y, g_codes)]
    for i, (train, test) in enumerate(splits):
        # the promise of the scheme, checked rather than assumed
        if np.intersect1d(g_codes[train], g_codes[test]).size:
            raise AssertionError(f"split {i} puts a group on both sides")
        if not train.size or not test.size:
            raise InvalidInputError(f"split {i} has {train.size} training and {test.size} test images: the "
                                    "near-duplicate groups are too large for a train/test split; raise the threshold")
    return splits, scheme


def unsplittable_classes(y: np.ndarray | Sequence[Any], groups: np.ndarray | Sequence[Any]) -> list[Any]:
    """Classes whose images all lie in one group (they can never be both trained on and tested).

    Such a class is a group larger than (or as large as) the class; the caller
    reports it rather than dropping it silently.
    """
    y = np.asarray(y)
    g = np.asarray(groups)
    out = []
    for cls in np.unique(y):
        if np.unique(g[y == cls]).size < 2:
            out.append(cls.item() if hasattr(cls, "item") else cls)
    return out


def splits_fingerprint(image_ids: Sequence[int] | np.ndarray, splits: Sequence[Split]) -> str:
    """Identify a set of splits over a set of images.

    Two runs may be paired (compared with a paired t-test) only when their
    fingerprints are equal: same number of splits, in the same order, and
    each split puts the same image ids in its test part and in its training
    part. Within a split the ids are sorted (a split is a set of images), so
    the fingerprint does not depend on the row order inside one part.

    Parameters
    ----------
    image_ids : sequence of int
        Catalog id of each row of ``X`` (``image_ids[i]`` is row ``i``).
    splits : sequence of (train_indices, test_indices)
        As returned by :func:`make_splits`.

    Returns
    -------
    str
        sha256 hex digest.
    """
    ids = np.asarray(image_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise InvalidInputError(f"image ids must be one-dimensional, got shape {ids.shape}")
    digest = hashlib.sha256(b"featurestore-splits-v1\0")
    digest.update(np.int64(len(splits)).astype("<i8").tobytes())
    for i, (train, test) in enumerate(splits):
        for part, idx in (("train", train), ("test", test)):
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= ids.size):
                raise InvalidInputError(f"split {i} {part} indices go outside the {ids.size} image ids given")
            part_ids = np.sort(ids[idx]).astype("<i8")
            digest.update(part.encode() + b"\0")
            digest.update(np.int64(part_ids.size).astype("<i8").tobytes())
            digest.update(part_ids.tobytes())
    return digest.hexdigest()


@dataclass
class SplitResult:
    """Metrics of one train/test split."""

    index: int
    n_train: int
    n_test: int
    accuracy: float
    train_accuracy: float
    macro_f1: float
    superclass_accuracy: float | None
    fit_seconds: float
    predict_seconds: float
    # What the model predicted for each test row, in the order of the split's test indices. Runs on a
    # fixed test dataset record them (for McNemar's test); not part of to_dict().
    predicted: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Class probabilities of each test row (columns in the order of ``classes``), when asked for
    # (K-fold runs keep them as out-of-fold probabilities); not part of to_dict().
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)
    classes: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class MetricSummary:
    """Mean and sample standard deviation (ddof=1; ``None`` with one split)."""

    mean: float
    std: float | None
    min: float
    max: float
    n: int


METRICS = ("accuracy", "train_accuracy", "macro_f1", "superclass_accuracy", "fit_seconds", "predict_seconds")


@dataclass(frozen=True)
class OutOfFold:
    """Each row's class probabilities from the one fold model that did not train on it."""

    classes: list[str]
    """Column order of ``probabilities`` (every class of ``y``, sorted)."""
    probabilities: np.ndarray
    """(n_samples, n_classes), rows in the order of ``y``; each row sums to 1."""
    fold: np.ndarray
    """(n_samples,) the fold whose test part held the row."""


@dataclass
class EvaluationResult:
    """Per-split records and their summary (metric -> mean ± std)."""

    splits: list[SplitResult]
    summary: dict[str, MetricSummary] = field(default_factory=dict)
    oof: OutOfFold | None = None

    def values(self, metric: str) -> list[float]:
        """One metric over the splits, in split order (for paired tests)."""
        if metric not in METRICS:
            raise InvalidInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        return [getattr(s, metric) for s in self.splits if getattr(s, metric) is not None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (plain floats, ints, ``None``)."""
        return {
            "n_splits": len(self.splits),
            "splits": [{k: v for k, v in asdict(s).items() if k not in _ARRAYS} for s in self.splits],
            "summary": {k: asdict(v) for k, v in self.summary.items()},
        }


_ARRAYS = ("predicted", "probabilities", "classes")


def summarize(values: Sequence[float]) -> MetricSummary:
    """Mean, sample std (ddof=1), min and max of per-split values."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise InvalidInputError("no values to summarize")
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return MetricSummary(mean=float(arr.mean()), std=std, min=float(arr.min()), max=float(arr.max()), n=int(arr.size))


def evaluate(
    make_estimator: Callable[[], Any],
    X: np.ndarray,
    y: np.ndarray | Sequence[Any],
    splits: Sequence[Split],
    superclass_of: Mapping[Any, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    out_of_fold: bool = False,
) -> EvaluationResult:
    """Fit a fresh estimator on each training part and score it on the test part.

    Everything the estimator learns, feature selection included, is fitted on
    the training rows of the split only.

    Parameters
    ----------
    make_estimator : callable
        Returns a new unfitted estimator (called once per split).
    X : ndarray of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    splits : sequence of (train_indices, test_indices)
    superclass_of : mapping, optional
        Class label -> superclass. When given, ``superclass_accuracy`` is the
        accuracy after mapping the true and the predicted class to their
        superclass. Every label of ``y`` must be mapped.
    progress : callable, optional
        Called as ``progress(done, total)`` after each split.
    out_of_fold : bool
        The splits are folds (:func:`make_folds`): also keep each test row's
        class probabilities, assembled into ``EvaluationResult.oof``. No model
        is fitted beyond one per fold.

    Returns
    -------
    EvaluationResult
        Per-split metrics and their summary; ``superclass_accuracy`` is
        ``None`` (and not summarized) without ``superclass_of``.
    """
    X, y, to_super = check_inputs(X, y, splits, superclass_of)
    if out_of_fold:
        check_folds(splits, len(y))
    records: list[SplitResult] = []
    for i, (train, test) in enumerate(splits):
        records.append(fit_and_score(make_estimator(), X, y, train, test, i, to_super, out_of_fold))
        if progress is not None:
            progress(i + 1, len(splits))
    result = collect(records)
    if out_of_fold:
        result.oof = assemble_oof(result.splits, splits, y)
    return result


def check_folds(splits: Sequence[Split], n_samples: int) -> None:
    """Refuse splits whose test parts do not hold every row exactly once."""
    seen = np.zeros(n_samples, dtype=np.int64)
    for _train, test in splits:
        np.add.at(seen, np.asarray(test, dtype=np.int64), 1)
    if seen.min() != 1 or seen.max() != 1:
        raise InvalidInputError(
            f"out-of-fold scoring needs folds whose test parts hold every row once; {int((seen == 0).sum())} "
            f"row(s) are in no test part and {int((seen > 1).sum())} in several: cut them with make_folds()"
        )


def assemble_oof(records: Sequence[SplitResult], splits: Sequence[Split], y: np.ndarray) -> OutOfFold:
    """Place each fold's test probabilities in the rows of ``y``, columns aligned on every class of ``y``.

    A class missing from a fold's training part gets probability 0 in that fold's rows.
    """
    classes = np.unique(np.asarray(y).astype(str))
    column = {c: j for j, c in enumerate(classes.tolist())}
    probs = np.zeros((len(y), len(classes)), dtype=np.float64)
    fold = np.full(len(y), -1, dtype=np.int64)
    for record, (_train, test) in zip(records, splits, strict=True):
        if record.probabilities is None or record.classes is None:
            raise InvalidInputError(f"split {record.index} kept no class probabilities")
        cols = np.asarray([column[str(c)] for c in record.classes], dtype=np.int64)
        test = np.asarray(test, dtype=np.int64)
        probs[np.ix_(test, cols)] = record.probabilities
        fold[test] = record.index
    return OutOfFold(classes=classes.tolist(), probabilities=probs, fold=fold)


def check_inputs(X: np.ndarray, y: np.ndarray | Sequence[Any], splits: Sequence[Split],
                 superclass_of: Mapping[Any, Any] | None) -> tuple[np.ndarray, np.ndarray, Callable[..., Any] | None]:
    """``X`` and ``y`` as arrays after checking their shapes, and the label -> superclass mapper (or None)."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise InvalidInputError(f"X must be (n_samples, n_features) and y (n_samples,); got {X.shape} and {y.shape}")
    if not splits:
        raise InvalidInputError("no splits given: build them with make_splits()")
    to_super = None
    if superclass_of is not None:
        missing = sorted(map(str, set(np.unique(y).tolist()) - set(superclass_of)))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise InvalidInputError(f"{len(missing)} class(es) have no superclass: {shown}")
        mapping = dict(superclass_of)
        to_super = np.vectorize(lambda label: mapping[label], otypes=[object])
    return X, y, to_super


def fit_and_score(estimator: Any, X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, index: int,
                  to_super: Callable[..., Any] | None = None, probabilities: bool = False) -> SplitResult:
    """Fit ``estimator`` on the ``train`` rows and score it on the ``test`` rows (one split).

    The one implementation of a split's work, run in a loop by :func:`evaluate`
    and as one Ray task per split by the cluster path. With ``probabilities``
    the test rows' ``predict_proba`` is kept too (same fitted model).
    """
    train = np.asarray(train)
    test = np.asarray(test)
    start = time.perf_counter()
    estimator.fit(X[train], y[train])
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = estimator.predict(X[test])
    predict_seconds = time.perf_counter() - start
    train_predicted = estimator.predict(X[train])
    proba = np.asarray(estimator.predict_proba(X[test]), dtype=np.float64) if probabilities else None
    return SplitResult(
        index=index,
        n_train=int(train.size),
        n_test=int(test.size),
        accuracy=float(accuracy_score(y[test], predicted)),
        train_accuracy=float(accuracy_score(y[train], train_predicted)),
        macro_f1=float(f1_score(y[test], predicted, average="macro", zero_division=0)),
        superclass_accuracy=(
            None if to_super is None else float(np.mean(to_super(y[test]) == to_super(predicted)))
        ),
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        predicted=np.asarray(predicted),
        probabilities=proba,
        classes=np.asarray(estimator.classes_) if probabilities else None,
    )


def collect(records: Sequence[SplitResult]) -> EvaluationResult:
    """Per-split records (in split order) and their summary."""
    result = EvaluationResult(splits=sorted(records, key=lambda r: r.index))
    for metric in METRICS:
        values = result.values(metric)
        if values:
            result.summary[metric] = summarize(values)
    return result
