"""The Two-Flow model and its baselines, composed from scikit-learn parts.

The Two-Flow model ("Using Pre-Trained Models for Fine-Grained Image
Classification in Fashion Field") takes one matrix ``X`` whose columns are the
concatenation of several feature sets ("blocks", e.g. ``rp128`` then a CNN
embedding). Each block goes through its own Random-Forest feature selector and
the kept columns are concatenated and fed to a final classifier::

    Pipeline
      select: ColumnTransformer
                rp128 -> SelectFromModel(RandomForest, threshold="mean", max_features=55)
                cnn   -> SelectFromModel(RandomForest, threshold="mean", max_features=400)
      clf:    RandomForestClassifier(200 trees)

A selector keeps the features whose importance is at or above the mean
importance of its block, and at most ``K`` of them (the ``K`` most important).
Passing ``"none"`` for a block passes it through unselected: with every block
passed through this is the naive stacking baseline.

Because the selectors are steps of the pipeline, they are fitted inside
:meth:`~sklearn.pipeline.Pipeline.fit`, i.e. on the training rows of each
evaluation split only: the test rows never influence which features are kept
(no selection leakage).

:class:`TwoFlowClassifier` wraps :func:`build_model` as a scikit-learn
classifier; it is what gets pickled as a model artifact.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectFromModel
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from featurestore.errors import DimensionMismatchError, InvalidInputError

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn < 1.6

    def _validate_data(estimator, X, y="no_validation", reset=True, **kwargs):  # type: ignore[misc]
        return estimator._validate_data(X, y, reset=reset, **kwargs)


CLASSIFIERS = ("rf", "logreg", "logreg-cv", "logreg-strong", "hgb", "mlp")
"""Accepted values of ``classifier``."""

LOGREG_CS = (0.01, 0.1, 1.0)
"""Inverse regularisation strengths ``logreg-cv`` chooses from (3-fold CV on the training part)."""

LOGREG_STRONG_C = 0.01
"""``C`` of ``logreg-strong``: on thousands of standardised embedding columns and ~10 % wrong labels,
C = 1 fits the wrong labels of its training images; 0.01 keeps its out-of-fold probabilities
informative for ``fs audit labels`` (bench/bench_label_issues.py)."""

MLP_HIDDEN = 1024
"""Units of the one hidden layer of ``mlp``."""

MLP_ALPHA = 1e-2
"""L2 penalty of ``mlp`` (on standardised inputs)."""

NO_SELECTION = "none"
"""``select`` value that passes a block through without selection."""

Blocks = Mapping[str, tuple[int, int]]
Select = Mapping[str, "int | str | None"]

# Selector forest defaults. A selector only has to rank features, not to
# classify well, so it gets half the trees of the final forest; max_features
# "sqrt" keeps the 1280-wide CNN block cheap. Measured with
# bench/bench_train.py (5000 x 1408 synthetic, 2 cores): Two-Flow fit 1.03x a
# plain 200-tree RF; selector_max_samples=0.5 brings it to 0.84x.
SELECTOR_TREES = 100
SELECTOR_MAX_FEATURES = "sqrt"
SELECTOR_MAX_SAMPLES = None

_SEED_MAX = np.iinfo(np.int32).max
# ColumnTransformer refuses transformer names that shadow its own parameters.
_RESERVED_NAMES = tuple(sorted(ColumnTransformer([]).get_params(deep=False)))


def _check_blocks(blocks: Blocks) -> dict[str, tuple[int, int]]:
    if not blocks:
        raise InvalidInputError("no feature blocks given: pass at least one feature set")
    checked: dict[str, tuple[int, int]] = {}
    for name, cols in blocks.items():
        try:
            start, stop = (int(c) for c in cols)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"block {name!r}: columns must be a (start, stop) pair of integers, got {cols!r}"
            ) from None
        if not 0 <= start < stop:
            raise InvalidInputError(f"block {name!r}: column range [{start}, {stop}) is empty or negative")
        if "__" in str(name) or str(name) in _RESERVED_NAMES:
            raise InvalidInputError(
                f"block name {name!r} cannot be used (no '__', not one of {', '.join(_RESERVED_NAMES)})"
            )
        checked[str(name)] = (start, stop)
    spans = sorted((s, e, n) for n, (s, e) in checked.items())
    for (s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if s2 < e1:
            raise InvalidInputError(f"blocks {n1!r} [{s1}, {e1}) and {n2!r} [{s2}, {_e2}) overlap")
    return checked


def _check_select(select: Select | None, blocks: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    select = dict(select or {})
    unknown = sorted(set(select) - set(blocks))
    if unknown:
        raise InvalidInputError(
            f"selection given for unknown block(s) {', '.join(map(repr, unknown))}; "
            f"blocks are {', '.join(map(repr, blocks))}"
        )
    checked: dict[str, Any] = {}
    for name in blocks:
        k = select.get(name)
        if isinstance(k, str):
            low = k.lower()
            if low == NO_SELECTION:
                k = NO_SELECTION
            elif low == "auto":
                k = None
            else:
                raise InvalidInputError(f"block {name!r}: selection must be an integer K, 'auto' or 'none', got {k!r}")
        elif k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise InvalidInputError(
                    f"block {name!r}: selection K must be a positive integer, 'auto' or 'none', got {k!r}"
                )
            k = int(k)
        checked[name] = k
    return checked


@contextlib.contextmanager
def _openmp_limit(n_jobs: int | None) -> Iterator[None]:
    # HistGradientBoosting has no n_jobs: it uses every OpenMP thread, which
    # on a busy machine spins against other work. A positive n_jobs caps it.
    if n_jobs is not None and n_jobs > 0:
        with threadpool_limits(limits=n_jobs, user_api="openmp"):
            yield
    else:
        yield


class CVLogisticRegression(LogisticRegressionCV):
    """``LogisticRegressionCV`` that refuses, in one line, a training part too small for its folds."""

    def fit(self, X: Any, y: Any, **kwargs: Any) -> CVLogisticRegression:
        folds = int(self.cv)
        largest = int(np.unique(np.asarray(y), return_counts=True)[1].max(initial=0))
        if largest < folds:
            raise InvalidInputError(
                f"logreg-cv picks C by {folds}-fold cross-validation on the training images, which needs at "
                f"least {folds} images of some class; this training part has at most {largest}: use more images "
                "or {classifier} logreg", params=("classifier",)
            )
        super().fit(X, y, **kwargs)
        return self


class EarlyStoppedMLP(ClassifierMixin, BaseEstimator):
    """One-hidden-layer perceptron (ReLU, Adam) that stops when a held-out tenth of its training
    images stops improving, so the test images never decide when.

    It fits ``MLPClassifier`` on integer-coded labels: with string labels (ours) and
    ``early_stopping``, scikit-learn's validation scoring fails (``np.isnan`` on strings).
    """

    def __init__(self, hidden: int = MLP_HIDDEN, alpha: float = MLP_ALPHA, max_iter: int = 100,
                 random_state: int | None = None):
        self.hidden = hidden
        self.alpha = alpha
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> EarlyStoppedMLP:
        labels = np.asarray(y)
        classes, counts = np.unique(labels, return_counts=True)
        held_out = int(np.ceil(0.1 * labels.size))
        if classes.size < 2 or counts.min() < 2 or held_out < classes.size:
            raise InvalidInputError(
                f"mlp holds out a tenth of its training images ({held_out} here) to know when to stop, which "
                f"needs at least one image of each of the {classes.size} classes and 2 of each in all; this "
                f"training part has {labels.size} images, {int(counts.min(initial=0))} in its smallest class: "
                "use more images or {classifier} logreg", params=("classifier",)
            )
        self.encoder_ = LabelEncoder().fit(labels)
        self.classes_ = self.encoder_.classes_
        self.mlp_ = MLPClassifier(
            hidden_layer_sizes=(int(self.hidden),), alpha=self.alpha, max_iter=self.max_iter,
            batch_size=min(256, labels.size - held_out), early_stopping=True, validation_fraction=0.1,
            n_iter_no_change=5, random_state=self.random_state,
        ).fit(X, self.encoder_.transform(labels))
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.classes_[self.mlp_.predict(X)])

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.mlp_.predict_proba(X))


def _seed(rng: np.random.RandomState) -> int:
    return int(rng.randint(_SEED_MAX))


def build_model(
    blocks: Blocks,
    select: Select | None = None,
    classifier: str = "rf",
    trees: int = 200,
    seed: int | np.random.RandomState | None = 0,
    n_jobs: int | None = -1,
    *,
    selector_trees: int = SELECTOR_TREES,
    selector_max_features: int | float | str | None = SELECTOR_MAX_FEATURES,
    selector_max_samples: int | float | None = SELECTOR_MAX_SAMPLES,
) -> Pipeline:
    """Build the (unfitted) Two-Flow pipeline.

    Parameters
    ----------
    blocks : mapping of str to (int, int)
        Feature set name -> ``[start, stop)`` column range in ``X``, in column
        order. Ranges must not overlap; columns outside every block are dropped.
    select : mapping of str to int, None or "none", optional
        Per block: an integer ``K`` keeps at most ``K`` features whose RF
        importance is at or above the block's mean importance (``K`` larger
        than the block is clipped to its width); ``None`` (or ``"auto"``) keeps
        all features at or above the mean; ``"none"`` passes the block through
        unselected. Blocks not named default to ``None``.
    classifier : {"rf", "logreg", "logreg-cv", "logreg-strong", "hgb", "mlp"}
        Final classifier: a Random Forest of ``trees`` trees; a
        ``StandardScaler`` + multinomial ``LogisticRegression`` (``logreg-cv``:
        its ``C`` chosen from :data:`LOGREG_CS` by 3-fold CV on the training data; ``logreg-strong``:
        ``C`` = :data:`LOGREG_STRONG_C`); a
        ``HistGradientBoostingClassifier`` with ``trees`` boosting iterations; or a
        ``StandardScaler`` + :class:`EarlyStoppedMLP` (one hidden layer of :data:`MLP_HIDDEN` units).
    trees : int
        Size of the final forest (``rf``) or boosting iterations (``hgb``);
        ignored by ``logreg`` and ``mlp``.
    seed : int, RandomState or None
        Seeds the random components (selectors, classifier): each gets its
        own integer seed drawn from ``check_random_state(seed)``, so the same
        integer gives the same pipeline here and in :class:`TwoFlowClassifier`.
    n_jobs : int or None
        Parallel jobs of the forests (selector and final).
    selector_trees, selector_max_features, selector_max_samples
        ``n_estimators``, ``max_features`` and ``max_samples`` of each
        selector forest.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``select`` (a ``ColumnTransformer`` with one transformer per
        block, named after the block), optionally ``scale``, then ``clf``.
        The selectors are fitted with the pipeline, i.e. inside each training
        fold, so there is no selection leakage into the test rows.
    """
    return _build(
        blocks,
        select,
        classifier,
        trees,
        seed,
        n_jobs,
        selector_trees,
        selector_max_features,
        selector_max_samples,
    )


def _build(
    blocks: Blocks,
    select: Select | None,
    classifier: str,
    trees: int,
    seed: int | np.random.RandomState | None,
    n_jobs: int | None,
    selector_trees: int,
    selector_max_features: int | float | str | None,
    selector_max_samples: int | float | None,
) -> Pipeline:
    rng = check_random_state(seed)
    checked_blocks = _check_blocks(blocks)
    ks = _check_select(select, checked_blocks)
    if classifier not in CLASSIFIERS:
        raise InvalidInputError(f"unknown classifier {classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    for label, value in (("trees", trees), ("selector_trees", selector_trees)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidInputError(f"{label} must be a positive integer, got {value!r}")

    transformers = []
    for name, (start, stop) in checked_blocks.items():
        k = ks[name]
        if k == NO_SELECTION:
            step: Any = "passthrough"
        else:
            forest = RandomForestClassifier(
                n_estimators=selector_trees,
                max_features=selector_max_features,
                max_samples=selector_max_samples,
                random_state=_seed(rng),
                n_jobs=n_jobs,
            )
            # SelectFromModel refuses max_features > n_features: clip to the block.
            step = SelectFromModel(forest, threshold="mean", max_features=None if k is None else min(k, stop - start))
        transformers.append((name, step, slice(start, stop)))
    # Blocks run one after the other: the parallelism is inside each forest,
    # so two cores are not oversubscribed by nested joblib pools.
    steps: list[tuple[str, Any]] = [("select", ColumnTransformer(transformers, remainder="drop"))]

    if classifier == "rf":
        steps.append(("clf", RandomForestClassifier(n_estimators=trees, random_state=_seed(rng), n_jobs=n_jobs)))
    elif classifier == "logreg":
        # lbfgs fits the multinomial loss for 3+ classes (the `multi_class`
        # parameter is deprecated since scikit-learn 1.5 and not passed).
        steps.append(("scale", StandardScaler()))
        steps.append(("clf", LogisticRegression(max_iter=2000, random_state=_seed(rng))))
    elif classifier == "logreg-cv":
        # The same model with C chosen by 3-fold CV inside the training part of each split
        # (stratified folds, no shuffling), so the test images never pick it. On wide stacks of
        # embeddings (thousands of columns, a few thousand images) C = 1 under-regularises.
        steps.append(("scale", StandardScaler()))
        steps.append(("clf", CVLogisticRegression(Cs=list(LOGREG_CS), cv=3, max_iter=2000, n_jobs=n_jobs,
                                                  random_state=_seed(rng))))
    elif classifier == "logreg-strong":
        steps.append(("scale", StandardScaler()))
        steps.append(("clf", LogisticRegression(C=LOGREG_STRONG_C, max_iter=2000, random_state=_seed(rng))))
    elif classifier == "mlp":
        steps.append(("scale", StandardScaler()))
        steps.append(("clf", EarlyStoppedMLP(random_state=_seed(rng))))
    else:
        steps.append(("clf", HistGradientBoostingClassifier(max_iter=trees, random_state=_seed(rng))))
    return Pipeline(steps)


class TwoFlowClassifier(ClassifierMixin, BaseEstimator):
    """Two-Flow classifier: per-block RF feature selection, then a classifier.

    A thin scikit-learn estimator around :func:`build_model`; it is what is
    pickled as a model artifact.

    Parameters
    ----------
    blocks : mapping of str to (int, int), optional
        Feature set name -> ``[start, stop)`` column range. ``None`` treats
        all columns of ``X`` as one block named ``"all"``.
    select : mapping of str to int, None or "none", optional
        Per-block selection, see :func:`build_model`. ``None`` selects every
        block with no cap (keep features at or above the mean importance).
    classifier : {"rf", "logreg", "logreg-cv", "logreg-strong", "hgb", "mlp"}, default="rf"
    trees : int, default=200
    selector_trees : int, default=100
    selector_max_features : int, float, str or None, default="sqrt"
    selector_max_samples : int, float or None, default=None
    random_state : int, RandomState or None, default=None
        Seeds every random component; each gets its own seed drawn from it.
    n_jobs : int or None, default=-1
        Parallel jobs of the forests; a positive value also caps the OpenMP
        threads of ``hgb`` (which has no ``n_jobs`` of its own).

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
        The fitted pipeline.
    classes_ : ndarray
    n_features_in_ : int
    kept_features_ : dict of str to ndarray
        Per block, the kept column indices of ``X`` (absolute, sorted).
    """

    def __init__(
        self,
        blocks: Blocks | None = None,
        select: Select | None = None,
        classifier: str = "rf",
        trees: int = 200,
        selector_trees: int = SELECTOR_TREES,
        selector_max_features: int | float | str | None = SELECTOR_MAX_FEATURES,
        selector_max_samples: int | float | None = SELECTOR_MAX_SAMPLES,
        random_state: int | np.random.RandomState | None = None,
        n_jobs: int | None = -1,
    ):
        self.blocks = blocks
        self.select = select
        self.classifier = classifier
        self.trees = trees
        self.selector_trees = selector_trees
        self.selector_max_features = selector_max_features
        self.selector_max_samples = selector_max_samples
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X, y):
        """Fit the selectors and the classifier on ``X``, ``y``; return ``self``."""
        X, y = _validate_data(self, X, y)
        check_classification_targets(y)
        n_features = X.shape[1]
        blocks = dict(self.blocks) if self.blocks is not None else {"all": (0, n_features)}
        widest = max(int(stop) for _start, stop in blocks.values())
        if widest > n_features:
            raise DimensionMismatchError(
                f"X has {n_features} columns but the blocks need {widest} "
                f"({', '.join(f'{n} [{s}, {e})' for n, (s, e) in blocks.items())})"
            )
        pipeline = _build(
            blocks,
            self.select,
            self.classifier,
            self.trees,
            self.random_state,
            self.n_jobs,
            self.selector_trees,
            self.selector_max_features,
            self.selector_max_samples,
        )
        with _openmp_limit(self.n_jobs):
            self.pipeline_ = pipeline.fit(X, y)
        self.classes_ = self.pipeline_.classes_
        self.kept_features_ = kept_features(self.pipeline_)
        return self

    def predict(self, X):
        """Predicted class of each row of ``X``."""
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False)
        with _openmp_limit(self.n_jobs):
            return self.pipeline_.predict(X)

    def predict_proba(self, X):
        """Class probabilities, columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False)
        with _openmp_limit(self.n_jobs):
            return self.pipeline_.predict_proba(X)


def _unwrap(model: Pipeline | TwoFlowClassifier) -> Pipeline:
    if isinstance(model, TwoFlowClassifier):
        check_is_fitted(model)
        return model.pipeline_
    if not isinstance(model, Pipeline) or "select" not in model.named_steps:
        raise InvalidInputError(
            f"expected a pipeline from build_model() or a TwoFlowClassifier, got {type(model).__name__}"
        )
    return model


def kept_features(model: Pipeline | TwoFlowClassifier) -> dict[str, np.ndarray]:
    """Kept column indices of ``X`` per block of a fitted model.

    Parameters
    ----------
    model : Pipeline or TwoFlowClassifier
        Fitted, as built by :func:`build_model`.

    Returns
    -------
    dict of str to ndarray
        Block name -> sorted absolute column indices kept (all of the block's
        columns when it is passed through).
    """
    select = _unwrap(model).named_steps["select"]
    check_is_fitted(select)
    kept: dict[str, np.ndarray] = {}
    # The fitted transformers_ replace "passthrough" by a FunctionTransformer,
    # so the unfitted spec says which blocks were passed through.
    for name, step, cols in select.transformers:
        if step == "passthrough":
            kept[name] = np.arange(cols.start, cols.stop)
        else:
            fitted = select.named_transformers_[name]
            kept[name] = fitted.get_support(indices=True) + cols.start
    return kept


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return repr(value)


def _json_params(estimator: BaseEstimator) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in sorted(estimator.get_params(deep=False).items())}


def describe_model(model: Pipeline | TwoFlowClassifier) -> dict[str, Any]:
    """JSON-serialisable description of a Two-Flow model for run records.

    Parameters
    ----------
    model : Pipeline or TwoFlowClassifier
        A pipeline from :func:`build_model` (fitted or not) or a fitted
        :class:`TwoFlowClassifier`.

    Returns
    -------
    dict
        ``classifier``: ``{"kind", "class", "params"}``; ``scaler``: bool;
        ``blocks``: per block ``{"columns": [start, stop], "selection":
        "rf" | "none", "max_features", "threshold", "selector": params}``, plus
        ``"kept"`` (count of kept columns) once fitted, else ``None``;
        ``n_kept``: total kept columns (``None`` before fit); ``estimator``:
        the :class:`TwoFlowClassifier` params when given one.
    """
    pipeline = _unwrap(model)
    select = pipeline.named_steps["select"]
    clf = pipeline.named_steps["clf"]
    kind = {
        RandomForestClassifier: "rf",
        LogisticRegression: "logreg",
        CVLogisticRegression: "logreg-cv",
        HistGradientBoostingClassifier: "hgb",
        EarlyStoppedMLP: "mlp",
    }.get(type(clf), type(clf).__name__)
    if kind == "logreg" and clf.C == LOGREG_STRONG_C:
        kind = "logreg-strong"
    fitted = hasattr(select, "transformers_")
    kept = kept_features(pipeline) if fitted else {}

    blocks: dict[str, Any] = {}
    for name, step, cols in select.transformers:
        entry: dict[str, Any] = {"columns": [cols.start, cols.stop]}
        if step == "passthrough":
            entry.update(selection=NO_SELECTION, max_features=None, threshold=None, selector=None)
        else:
            entry.update(
                selection="rf",
                max_features=step.max_features,
                threshold=_json_value(step.threshold),
                selector=_json_params(step.estimator),
            )
        entry["kept"] = int(kept[name].size) if fitted else None
        blocks[name] = entry

    out: dict[str, Any] = {
        "classifier": {"kind": kind, "class": type(clf).__name__, "params": _json_params(clf)},
        "scaler": "scale" in pipeline.named_steps,
        "blocks": blocks,
        "n_kept": int(sum(v.size for v in kept.values())) if fitted else None,
    }
    if isinstance(model, TwoFlowClassifier):
        out["estimator"] = _json_params(model)
    return out
