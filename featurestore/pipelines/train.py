"""Training runs: assemble features from the store, evaluate on repeated splits, fit, predict.

A run records everything needed to reproduce and pair it: the feature sets
and their params, the selection, the classifier and its params, the seed,
the split scheme and a fingerprint of the exact splits (image ids), library
versions, timings, per-split scores (``run_splits``) and the sha256 of the
final model's artifact, checked before every load.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import h5py
import numpy as np
import scipy
import sklearn

from featurestore import __version__
from featurestore.catalog.labels import oof_rows
from featurestore.catalog.run_images import RunImages
from featurestore.catalog.schema import Run
from featurestore.errors import FeatureStoreError, InvalidInputError, InvalidParameterError
from featurestore.pipelines import cluster
from featurestore.pipelines.versions import run_sets
from featurestore.search.groups import DuplicateGroups, check_threshold, group_near_duplicates
from featurestore.store import FeatureMatrix, Store
from featurestore.training.artifacts import save_artifact
from featurestore.training.evaluation import (
    EvaluationResult,
    evaluate,
    make_folds,
    make_splits,
    splits_fingerprint,
    unsplittable_classes,
)
from featurestore.training.neighbours import DEFAULT_NEIGHBOURS, neighbour_votes
from featurestore.training.twoflow import CLASSIFIERS, TwoFlowClassifier, build_model, describe_model

Progress = Callable[[int, int], None]
TARGETS = ("label", "superclass")


@dataclass
class TrainConfig:
    """What to train and how to evaluate it (the CLI's options)."""

    features: list[str]
    target: str = "label"
    select: str | None = None
    classifier: str = "rf"
    trees: int = 200
    n_splits: int = 10
    test_size: float = 0.1
    seed: int = 0
    dataset: str | None = None
    skip_missing: bool = False
    test_dataset: str | None = None
    """Score on this fixed held-out dataset (one split) instead of repeated random splits."""
    folds: int | None = None
    """K-fold instead of repeated random splits: every image scored once out of fold, probabilities kept."""
    group_duplicates: float | None = None
    """Near-duplicate groups (cosine >= this) never straddle a split; with test_dataset, training images
    grouped with a test image are left out (issue 25)."""
    group_features: str | None = None
    """The feature set compared for group_duplicates (default: the first CNN set of ``features``)."""
    versions: int | dict[str, int] | None = None
    """The version of the feature sets to read (one for all, or per set; default the newest). ``train`` and
    ``evaluate_many`` pin it to a number per set before reading, and each run records it."""
    neighbours: int | None = None
    """With ``folds``: also keep each image's vote of its nearest training-part images (this many; default
    :data:`~featurestore.training.neighbours.DEFAULT_NEIGHBOURS`, 0 keeps none) for ``fs audit labels``."""

    def check(self) -> None:
        if not self.features:
            raise InvalidParameterError("give feature sets, e.g. {features} rp128,efficientnet-lite0", "features")
        if len(set(self.features)) != len(self.features):
            raise InvalidInputError(f"a feature set is listed twice in {','.join(self.features)}")
        if self.target not in TARGETS:
            raise InvalidParameterError("{target} must be one of {choices}", "target", choices=", ".join(TARGETS))
        if self.classifier not in CLASSIFIERS:
            raise InvalidParameterError("{classifier} must be one of {choices}", "classifier",
                                        choices=", ".join(CLASSIFIERS))
        if self.trees < 1:
            raise InvalidParameterError("{trees} must be at least 1", "trees")
        if self.n_splits < 2 and self.test_dataset is None:
            raise InvalidParameterError("{n_splits} must be at least 2 (a paired t-test needs two)", "n_splits")
        if self.test_dataset is not None and self.test_dataset == self.dataset:
            raise InvalidParameterError("{test_dataset} must differ from {dataset}: an image cannot test what it "
                                        "trained", "test_dataset", "dataset")
        if not 0 < self.test_size < 1:
            raise InvalidParameterError("{test_size} must be between 0 and 1, e.g. 0.1", "test_size")
        self._check_protocol()

    def _check_protocol(self) -> None:
        """--folds and --group-duplicates / --group-features."""
        if self.neighbours is not None:
            if self.folds is None:
                raise InvalidParameterError("{neighbours} needs {folds} K: the votes are taken out of fold",
                                            "neighbours", "folds")
            if self.neighbours < 0:
                raise InvalidParameterError("{neighbours} must be 0 (none) or more, e.g. {neighbours} 10",
                                            "neighbours")
        if self.folds is not None:
            if self.folds < 2:
                raise InvalidParameterError("{folds} must be at least 2, e.g. {folds} 5", "folds")
            if self.test_dataset is not None:
                raise InvalidParameterError("{folds} and {test_dataset} exclude each other: K folds score every "
                                            "selected image, a test dataset is one fixed split", "folds",
                                            "test_dataset")
        if self.group_duplicates is not None:
            check_threshold(self.group_duplicates)
        elif self.group_features is not None:
            raise InvalidParameterError("{group_features} needs {group_duplicates} THRESHOLD", "group_features",
                                        "group_duplicates")


def parse_select(spec: str | None, features: Sequence[str]) -> dict[str, int | str | None]:
    """``--select`` -> per feature set: K (cap), None (auto: above-mean, no cap) or "none".

    Default: with one feature set no selection ("none": the plain classifier);
    with several, "auto" for each (the Two-Flow model). ``none`` everywhere is
    the naive stacking the paper warns about.
    """
    if spec is None or spec == "":
        return {f: ("none" if len(features) == 1 else None) for f in features}
    if spec in ("auto", "none"):
        return dict.fromkeys(features, None if spec == "auto" else "none")
    out: dict[str, int | str | None] = dict.fromkeys(features)
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in out:
            raise InvalidParameterError("{select} {spec!r}: expected NAME=K|auto|none for the feature sets {names}",
                                        "select", spec=spec, names=", ".join(features))
        if value in ("auto", "none"):
            out[name] = None if value == "auto" else "none"
        else:
            try:
                k = int(value)
                if k < 1:
                    raise ValueError
            except ValueError:
                raise InvalidParameterError("{select} {name}={value}: K must be a positive integer", "select",
                                            name=name, value=value) from None
            out[name] = k
    return out


def _versions() -> dict[str, str]:
    return {"featurestore": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "scipy": scipy.__version__, "h5py": h5py.__version__}


def _targets(fm: FeatureMatrix, target: str) -> tuple[np.ndarray, dict[str, str] | None]:
    y = fm.labels if target == "label" else fm.superclasses
    if any(v is None for v in y):
        raise FeatureStoreError("some labelled images have no superclass; train with {target} label or label them "
                                "with superclass/class folders", params=("target",))
    superclass_of: dict[str, str] | None = None
    if target == "label" and len(fm.superclasses) and all(s is not None for s in fm.superclasses):
        pairs = set(zip(fm.labels.tolist(), fm.superclasses.tolist(), strict=True))
        if len({lb for lb, _ in pairs}) == len(pairs):  # each label in exactly one superclass
            superclass_of = dict(pairs)
    return np.asarray(y, dtype=object).astype(str), superclass_of


@dataclass
class RunOutcome:
    run_id: int
    evaluation: EvaluationResult
    split_scheme: str
    n_images: int
    n_classes: int
    kept: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    grouping: Grouping | None = None


@dataclass(frozen=True)
class Grouping:
    """How a run's near-duplicate groups came out (``--group-duplicates``)."""

    feature_set: str
    threshold: float
    n_groups: int  # groups of two or more images
    n_grouped: int  # images in them
    largest: int
    method: str  # "index" or "exact"
    seconds: float
    near_excluded: int = 0  # training images left out as near-duplicates of a test image
    unsplittable: tuple[str, ...] = ()  # classes lying in one group: never both trained on and tested

    def as_dict(self) -> dict[str, Any]:
        return {"feature_set": self.feature_set, "threshold": self.threshold, "n_groups": self.n_groups,
                "n_grouped": self.n_grouped, "largest": self.largest, "method": self.method,
                "seconds": self.seconds, "near_excluded": self.near_excluded,
                "unsplittable": list(self.unsplittable)}


def _estimator(cfg: TrainConfig, blocks: dict[str, tuple[int, int]]) -> TwoFlowClassifier:
    return TwoFlowClassifier(blocks=blocks, select=parse_select(cfg.select, list(blocks)),
                             classifier=cfg.classifier, trees=cfg.trees, random_state=cfg.seed, n_jobs=-1)


def _describe_unfitted(cfg: TrainConfig, blocks: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return describe_model(build_model(blocks, parse_select(cfg.select, list(blocks)), cfg.classifier, cfg.trees,
                                      cfg.seed))


def _load_matrix(store: Store, cfg: TrainConfig, features: Sequence[str]) -> FeatureMatrix:
    fm = store.read_matrix(features, dataset=cfg.dataset, labelled_only=True, skip_missing=cfg.skip_missing,
                           version=cfg.versions)
    if len(fm.image_ids) < 4:
        raise FeatureStoreError(f"only {len(fm.image_ids)} labelled images have {', '.join(features)}",
                                remedy="ingest-labelled", features=list(features))
    return fm


def _votes(prep: _Prepared, features: Sequence[str], ev: EvaluationResult, k: int,
           timings: dict[str, float]) -> np.ndarray | None:
    """A K-fold run's out-of-fold neighbour votes on its own columns (None: not K-fold, or ``k`` 0);
    their time goes into ``timings``."""
    if ev.oof is None or k == 0:
        return None
    t = time.perf_counter()
    spans = {f: prep.fm.blocks[f] for f in features}  # each feature set normalised on its own
    votes = neighbour_votes(prep.fm.X, prep.y, prep.splits, ev.oof.classes, k, spans)
    timings["neighbour_seconds"] = time.perf_counter() - t
    return votes


def _record(store: Store, cfg: TrainConfig, features: Sequence[str], prep: _Prepared, ev: EvaluationResult,
            model_desc: dict[str, Any], timings: dict[str, float], artifact: tuple[str, str] | None,
            group: str | None) -> int:
    pins = cfg.versions if isinstance(cfg.versions, dict) else store.pin_versions(features, cfg.versions)
    pins = {name: pins[name] for name in features if name in pins}
    sets = {name: store.feature_set(name, pins.get(name)) for name in features}
    k = DEFAULT_NEIGHBOURS if cfg.neighbours is None else cfg.neighbours
    votes = _votes(prep, features, ev, k, timings)
    oof = None if ev.oof is None else oof_rows(prep.fm.image_ids, ev.oof.fold, prep.y, ev.oof.probabilities, votes)
    s_ = ev.summary
    run = Run(
        status="complete",
        features=list(features),
        feature_params={n: {"kind": f.kind, "dim": f.dim, "params": f.params} for n, f in sets.items()},
        target=cfg.target,
        selection=dict(parse_select(cfg.select, list(features)).items()),
        classifier=cfg.classifier,
        classifier_params=model_desc,
        seed=cfg.seed,
        n_splits=len(prep.splits),
        test_size=_test_size(cfg, prep),
        split_scheme=prep.scheme,
        splits_fingerprint=prep.fingerprint,
        n_images=len(prep.fm.image_ids),
        test_dataset=cfg.test_dataset,
        n_test_overlap=prep.excluded if cfg.test_dataset is not None else None,
        group_threshold=prep.grouping.threshold if prep.grouping else None,
        group_features=prep.grouping.feature_set if prep.grouping else None,
        n_groups=prep.grouping.n_groups if prep.grouping else None,
        n_near_overlap=prep.grouping.near_excluded if prep.grouping and cfg.test_dataset is not None else None,
        dataset=cfg.dataset,
        accuracy_mean=s_["accuracy"].mean,
        accuracy_std=s_["accuracy"].std,
        macro_f1_mean=s_["macro_f1"].mean,
        superclass_accuracy_mean=s_["superclass_accuracy"].mean if "superclass_accuracy" in s_ else None,
        versions=_versions(),
        timings={**timings, **({"group_seconds": prep.grouping.seconds} if prep.grouping else {})},
        artifact_path=artifact[0] if artifact else None,
        artifact_sha256=artifact[1] if artifact else None,
        comparison_group=group,
        label_version=prep.label_version,
        oof_classes=ev.oof.classes if ev.oof is not None else None,
        oof_neighbours=k if votes is not None else None,
    )
    return store.catalog.add_run(run, [
        {"split": r.index, "test_accuracy": r.accuracy, "train_accuracy": r.train_accuracy,
         "macro_f1": r.macro_f1, "superclass_accuracy": r.superclass_accuracy, "fit_seconds": r.fit_seconds,
         "n_train": r.n_train, "n_test": r.n_test} for r in ev.splits], _test_predictions(prep, ev), oof,
        RunImages(prep.fm.image_ids.tolist(), [prep.fm.image_ids[test].tolist() for _, test in prep.splits]),
        feature_versions=pins)


def _test_size(cfg: TrainConfig, prep: _Prepared) -> float:
    if cfg.test_dataset is not None:
        return len(prep.splits[0][1]) / len(prep.fm.image_ids)
    if cfg.folds is not None:
        return 1 / cfg.folds
    return cfg.test_size


def _test_predictions(prep: _Prepared, ev: EvaluationResult) -> list[dict[str, Any]]:
    """Per test image of a fixed-test run: what was predicted and whether it was right (for `fs compare`)."""
    predicted = ev.splits[0].predicted if ev.splits else None
    if prep.scheme != "fixed-test" or predicted is None:
        return []
    test = prep.splits[0][1]
    ids = np.asarray(prep.fm.image_ids)[test]
    return [{"image_id": int(i), "predicted": str(p), "correct": bool(p == t)}
            for i, p, t in zip(ids, predicted, prep.y[test], strict=True)]


@dataclass
class _Prepared:
    """The assembled matrix, targets and splits a run is evaluated on."""

    fm: FeatureMatrix
    y: np.ndarray
    superclass_of: dict[str, str] | None
    splits: list[Any]
    scheme: str
    fingerprint: str
    excluded: int = 0  # images of the selection left out of training because they are in the test dataset
    label_version: int = 0  # the last label change when the labels were read
    grouping: Grouping | None = None


def _cut(y: np.ndarray, cfg: TrainConfig, groups: np.ndarray | None = None) -> tuple[list[Any], str]:
    """Repeated random splits, or K folds with --folds; whole near-duplicate groups with ``groups``."""
    if cfg.folds is not None:
        return make_folds(y, cfg.folds, cfg.seed, groups=groups)
    return make_splits(y, cfg.n_splits, cfg.test_size, cfg.seed, groups=groups)


def group_feature_set(store: Store, cfg: TrainConfig, features: Sequence[str]) -> str:
    """The set compared for ``--group-duplicates``: ``--group-features``, else the first CNN set of ``features``."""
    if cfg.group_features is not None:
        return store.feature_set(cfg.group_features).name
    for name in features:
        if store.feature_set(name).kind == "cnn":
            return name
    raise InvalidParameterError("{group_duplicates} compares images in a CNN feature set and none of {names} is "
                                "one: name one with {group_features} SET", "group_duplicates", "group_features",
                                names=", ".join(features))


def _group(store: Store, cfg: TrainConfig, features: Sequence[str], image_ids: np.ndarray) -> DuplicateGroups:
    assert cfg.group_duplicates is not None
    name = group_feature_set(store, cfg, features)
    pins = cfg.versions if isinstance(cfg.versions, dict) else {}
    if name in pins:  # compare the vectors of the version the run reads (an older one: its `<set>@v<N>` row)
        name = store.feature_set(name, pins[name]).name
    return group_near_duplicates(store, name, image_ids, cfg.group_duplicates)


def _summary(found: DuplicateGroups, y: np.ndarray | None, labels: np.ndarray | None, near_excluded: int = 0
             ) -> Grouping:
    """The grouping's facts; with ``y`` and ``labels`` (random splits) also the classes no split can divide."""
    unsplittable = () if y is None or labels is None else tuple(str(c) for c in unsplittable_classes(y, labels))
    return Grouping(found.feature_set, found.threshold, len(found.groups), found.n_grouped,
                    max((len(g) for g in found.groups), default=1), found.method, found.seconds, near_excluded,
                    unsplittable)


def _prepare(store: Store, cfg: TrainConfig, features: Sequence[str]) -> _Prepared:
    """Assemble the features and cut the splits: repeated random ones, or one fixed train/test split."""
    version = store.catalog.label_version()  # under the store lock: no label changes while we read
    if cfg.test_dataset is None:
        fm = _load_matrix(store, cfg, features)
        y, superclass_of = _targets(fm, cfg.target)
        grouping = None
        labels = None
        if cfg.group_duplicates is not None:
            found = _group(store, cfg, features, fm.image_ids)
            labels = found.label_of(fm.image_ids)
            grouping = _summary(found, y, labels)
        splits, scheme = _cut(y, cfg, labels)
        return _Prepared(fm, y, superclass_of, splits, scheme, splits_fingerprint(fm.image_ids, splits),
                         label_version=version, grouping=grouping)
    test_ids = store.catalog.dataset_image_ids(cfg.test_dataset)
    selected = set(store.catalog.selected_image_ids(cfg.dataset, True, None))
    excluded = len(selected & test_ids)
    fm = store.read_matrix(features, labelled_only=True, image_ids=sorted(selected | test_ids),
                           skip_missing=cfg.skip_missing, version=cfg.versions)
    is_test = np.isin(fm.image_ids, np.fromiter(test_ids, dtype=np.int64, count=len(test_ids)))
    grouping = None
    if cfg.group_duplicates is not None:
        # a training image grouped (transitively) with a test image would be a near copy of it on both sides
        found = _group(store, cfg, features, fm.image_ids)
        labels = found.label_of(fm.image_ids)
        near = ~is_test & np.isin(labels, labels[is_test])
        grouping = _summary(found, None, None, int(near.sum()))
        if near.any():
            keep = ~near
            fm = replace(fm, image_ids=fm.image_ids[keep], X=fm.X[keep], labels=fm.labels[keep],
                         superclasses=fm.superclasses[keep], paths=[p for p, k in zip(fm.paths, keep, strict=True)
                                                                      if k])
            is_test = is_test[keep]
            excluded += grouping.near_excluded
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if len(train_idx) < 2 or len(test_idx) < 1:
        raise FeatureStoreError(
            f"the fixed split has {len(train_idx)} labelled training and {len(test_idx)} labelled test images "
            f"with {', '.join(features)}", remedy="ingest-both", features=list(features))
    y, superclass_of = _targets(fm, cfg.target)
    splits = [(train_idx, test_idx)]
    return _Prepared(fm, y, superclass_of, splits, "fixed-test", splits_fingerprint(fm.image_ids, splits), excluded,
                     label_version=version, grouping=grouping)


def train(store: Store, cfg: TrainConfig, progress: Progress | None = None, fit_final: bool = True,
          ray_address: str | None = None) -> RunOutcome:
    """Evaluate ``cfg`` (repeated splits or the fixed test dataset), fit the final model, record the run.

    The final model is fitted on every labelled image of the selection, except
    those of the test dataset when there is one. With ``ray_address`` the splits
    run as parallel tasks on that Ray cluster (:mod:`featurestore.pipelines.cluster`;
    same scores); the final model is fitted here.
    """
    cfg.check()
    _check_ray(cfg, ray_address)
    cfg = replace(cfg, versions=store.pin_versions(cfg.features, cfg.versions))  # the versions this run reads
    t0 = time.perf_counter()
    prep = _prepare(store, cfg, cfg.features)
    fm, y = prep.fm, prep.y
    n_classes = len(set(y))
    if n_classes < 2:
        raise FeatureStoreError(f"all {len(y)} labelled images have the same {cfg.target}; need two classes")
    assembled = time.perf_counter() - t0
    t1 = time.perf_counter()
    make = partial(_estimator, cfg, fm.blocks)
    if ray_address:
        ev = cluster.evaluate_on_ray([cluster.EvalJob(make)], fm.X, y, prep.splits, prep.superclass_of,
                                     address=ray_address, progress=progress)[0]
    else:
        ev = evaluate(make, fm.X, y, prep.splits, prep.superclass_of, progress, out_of_fold=cfg.folds is not None)
    evaluated = time.perf_counter() - t1
    artifact = None
    final_seconds = 0.0
    model_desc: dict[str, Any] = _describe_unfitted(cfg, fm.blocks)
    kept: dict[str, int] = {}
    if fit_final:
        rows = prep.splits[0][0] if cfg.test_dataset is not None else slice(None)
        t2 = time.perf_counter()
        final = _estimator(cfg, fm.blocks).fit(fm.X[rows], y[rows])
        final_seconds = time.perf_counter() - t2
        model_desc = describe_model(final)
        kept = {k: len(v) for k, v in final.kept_features_.items()}
        rel = f"artifacts/{uuid.uuid4().hex}.pkl"
        sha = save_artifact(final, store.root / rel)
        store.publish(store.root / rel)  # a bucket store keeps it in the bucket, before the run records it
        artifact = (rel, sha)
    timings = {"assemble_seconds": assembled, "evaluate_seconds": evaluated, "final_fit_seconds": final_seconds}
    run_id = _record(store, cfg, cfg.features, prep, ev, model_desc, timings, artifact, None)
    return RunOutcome(run_id, ev, prep.scheme, len(fm.image_ids), n_classes, kept, prep.excluded, prep.grouping)


def _columns(fm: FeatureMatrix, combo: Sequence[str]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The columns of ``combo``'s blocks in ``fm`` and their block layout in the sub-matrix."""
    cols = np.concatenate([np.arange(*fm.blocks[f]) for f in combo])
    blocks, start = {}, 0
    for f in combo:
        width = fm.blocks[f][1] - fm.blocks[f][0]
        blocks[f] = (start, start + width)
        start += width
    return cols, blocks


def evaluate_many(store: Store, combos: Sequence[Sequence[str]], cfg: TrainConfig,
                  progress: Callable[[str, int, int], None] | None = None,
                  ray_address: str | None = None) -> list[RunOutcome]:
    """Evaluate several feature combinations on the same images and splits; one run each.

    The images are those that have every feature set of every combination
    (with --skip-missing) so all rows share one split fingerprint and can be
    compared pairwise with ``fs compare``. With ``ray_address`` every
    (combination, split) is a task on that Ray cluster, all in parallel (the
    matrix is shipped once; same scores as here).
    """
    if not combos:
        raise InvalidParameterError("give at least one {features} combination", "features")
    union = list(dict.fromkeys(f for c in combos for f in c))
    cfg = replace(cfg, versions=store.pin_versions(union, cfg.versions))  # every run reads the same versions
    base = TrainConfig(**{**cfg.__dict__, "features": union})
    base.check()
    _check_ray(base, ray_address)
    prep = _prepare(store, base, union)
    fm = prep.fm
    group = uuid.uuid4().hex
    plans = []
    for combo in combos:
        ccfg = TrainConfig(**{**cfg.__dict__, "features": list(combo)})
        ccfg.check()
        cols, blocks = _columns(fm, combo)
        plans.append((combo, ccfg, blocks, cols))
    outcomes = []

    def record(combo: Sequence[str], ccfg: TrainConfig, blocks: dict[str, tuple[int, int]], ev: EvaluationResult,
               seconds: float) -> None:
        run_id = _record(store, ccfg, combo, prep, ev, _describe_unfitted(ccfg, blocks),
                         {"evaluate_seconds": seconds}, None, group)
        outcomes.append(RunOutcome(run_id, ev, prep.scheme, len(fm.image_ids), len(set(prep.y)),
                                   excluded=prep.excluded, grouping=prep.grouping))

    if ray_address:
        t1 = time.perf_counter()
        jobs = [cluster.EvalJob(partial(_estimator, ccfg, blocks), cols) for _, ccfg, blocks, cols in plans]
        evs = cluster.evaluate_on_ray(jobs, fm.X, prep.y, prep.splits, prep.superclass_of, address=ray_address,
                                      progress=partial(progress, "all") if progress else None)
        seconds = time.perf_counter() - t1  # they ran together: each run records the whole evaluation's time
        for (combo, ccfg, blocks, _), ev in zip(plans, evs, strict=True):
            record(combo, ccfg, blocks, ev, seconds)
        return outcomes
    for combo, ccfg, blocks, cols in plans:  # each run is recorded as soon as it is evaluated
        t1 = time.perf_counter()
        ev = evaluate(partial(_estimator, ccfg, blocks), fm.X[:, cols], prep.y, prep.splits, prep.superclass_of,
                      partial(progress, ",".join(combo)) if progress else None, out_of_fold=cfg.folds is not None)
        record(combo, ccfg, blocks, ev, time.perf_counter() - t1)
    return outcomes


def _check_ray(cfg: TrainConfig, ray_address: str | None) -> None:
    if ray_address and cfg.folds is not None:
        raise InvalidParameterError("{folds} runs on this machine only (the Ray path keeps no out-of-fold "
                                    "probabilities): drop {ray_address} or use {n_splits}", "folds", "ray_address",
                                    "n_splits")


def get_run(store: Store, run_id: int) -> Run:
    """The run ``run_id`` (NotFoundError lists the existing ids)."""
    return store.catalog.run(run_id)


def check_features_unchanged(store: Store, run: Run) -> dict[str, str]:
    """Check the versions of the feature sets ``run`` read still have its params; returns set -> the catalog
    row name of that version (what to read for the run: :func:`featurestore.pipelines.versions.run_sets`)."""
    stored = run_sets(store, run)
    for name in run.features:
        fs = store.feature_set(stored[name])
        recorded = run.feature_params.get(name, {})
        if recorded.get("params") != fs.params or recorded.get("dim") != fs.dim:
            raise FeatureStoreError(
                f"feature set {name} was recomputed with other params since run {run.id} was trained",
                remedy="retrain", feature_set=name, run_id=run.id, features=",".join(run.features))
    return stored


def list_runs(store: Store) -> list[Run]:
    """Every run, oldest first."""
    return store.catalog.runs()
