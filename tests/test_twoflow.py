"""Tests for featurestore.training: model, evaluation, stats, artifacts."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurestore.errors import (
    DimensionMismatchError,
    IntegrityError,
    InvalidInputError,
    ModelFilesMissingError,
)
from featurestore.training.artifacts import load_artifact, save_artifact
from featurestore.training.evaluation import (
    EvaluationResult,
    evaluate,
    make_splits,
    splits_fingerprint,
)
from featurestore.training.stats import mcnemar, paired_ttest
from featurestore.training.twoflow import (
    LOGREG_CS,
    LOGREG_STRONG_C,
    MLP_HIDDEN,
    TwoFlowClassifier,
    build_model,
    describe_model,
    kept_features,
)
from helpers import raises_cli

BLOCKS = {"rp": (0, 20), "cnn": (20, 60)}
SMALL = {"trees": 15, "selector_trees": 15, "n_jobs": 1}


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(
        n_samples=300,
        n_features=60,
        n_informative=8,
        n_redundant=4,
        n_classes=3,
        class_sep=2.0,
        random_state=0,
    )
    return X, y


def _importances(pipeline, name):
    return pipeline.named_steps["select"].named_transformers_[name].estimator_.feature_importances_


# --- model -------------------------------------------------------------------------------


def test_selection_keeps_at_most_k_above_mean(data):
    X, y = data
    pipe = build_model(BLOCKS, {"rp": 3, "cnn": None}, trees=15, selector_trees=15, n_jobs=1).fit(X, y)
    kept = kept_features(pipe)
    assert set(kept) == {"rp", "cnn"}
    assert 1 <= kept["rp"].size <= 3
    for name, (start, stop) in BLOCKS.items():
        imp = _importances(pipe, name)
        local = kept[name] - start
        assert kept[name].min() >= start and kept[name].max() < stop
        assert (imp[local] >= imp.mean()).all()
    # "auto" (None) keeps every feature at or above the mean, with no cap.
    imp = _importances(pipe, "cnn")
    assert kept["cnn"].size == int((imp >= imp.mean()).sum())
    # the capped block keeps the K most important
    imp = _importances(pipe, "rp")
    assert set(kept["rp"] - 0) == set(np.argsort(-imp, kind="mergesort")[: kept["rp"].size])
    assert pipe.predict(X).shape == (X.shape[0],)


def test_k_larger_than_block_is_clipped(data):
    X, y = data
    pipe = build_model(BLOCKS, {"rp": 500, "cnn": 5}, trees=10, selector_trees=10, n_jobs=1).fit(X, y)
    kept = kept_features(pipe)
    assert kept["rp"].size <= 20
    assert kept["cnn"].size <= 5


def test_none_passes_block_through(data):
    X, y = data
    pipe = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, trees=10, n_jobs=1).fit(X, y)
    kept = kept_features(pipe)
    np.testing.assert_array_equal(kept["rp"], np.arange(20))
    np.testing.assert_array_equal(kept["cnn"], np.arange(20, 60))
    assert pipe.named_steps["select"].transform(X).shape == (300, 60)
    description = describe_model(pipe)
    assert description["blocks"]["rp"]["selection"] == "none"
    assert description["n_kept"] == 60


@pytest.mark.parametrize("classifier", ["logreg", "logreg-cv", "logreg-strong", "hgb", "mlp"])
def test_other_classifiers(data, classifier):
    X, y = data
    model = TwoFlowClassifier(BLOCKS, {"rp": 5, "cnn": 10}, classifier=classifier, random_state=0, **SMALL)
    model.fit(X[:240], y[:240])
    assert model.score(X[240:], y[240:]) > 0.6
    proba = model.predict_proba(X[240:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert describe_model(model)["classifier"]["kind"] == classifier


def test_logreg_strong_is_the_logistic_regression_with_c_0_01():
    plain = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="logreg", n_jobs=1)
    strong = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="logreg-strong", n_jobs=1)
    assert plain.named_steps["clf"].C == 1.0 and strong.named_steps["clf"].C == LOGREG_STRONG_C == 0.01
    assert "scale" in strong.named_steps
    assert describe_model(plain)["classifier"]["kind"] == "logreg"
    assert describe_model(strong)["classifier"]["kind"] == "logreg-strong"


def test_logreg_cv_refuses_too_few_images_per_class_in_one_line():
    X = np.random.default_rng(0).normal(size=(6, 60))
    model = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="logreg-cv", n_jobs=1)
    with raises_cli(InvalidInputError, match="needs at least 3 images of some class.*--classifier logreg"):
        model.fit(X, np.array([0, 0, 1, 1, 2, 2]))


def test_mlp_refuses_a_training_part_too_small_to_hold_out_in_one_line():
    X = np.random.default_rng(0).normal(size=(12, 60))
    model = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="mlp", n_jobs=1)
    # a tenth of 12 images is 2, fewer than the 3 classes
    with raises_cli(InvalidInputError, match=r"mlp holds out a tenth.*\(2 here\).*--classifier logreg"):
        model.fit(X, np.repeat(["coat", "shirt", "bag"], 4))


def test_mlp_fits_string_labels_and_stops_on_its_own_held_out_part(data):
    X, y = data
    names = np.array(["bag", "coat", "shirt"])[y]  # scikit-learn's early stopping fails on string labels
    pipe = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="mlp", n_jobs=1, seed=0)
    pipe.fit(X[:240], names[:240])
    clf = pipe.named_steps["clf"]
    assert clf.classes_.tolist() == ["bag", "coat", "shirt"]
    assert set(pipe.predict(X[240:])) <= {"bag", "coat", "shirt"}
    assert (pipe.predict(X[240:]) == names[240:]).mean() > 0.6
    # stopped by its validation tenth of the 240 training rows, before the iteration cap
    assert len(clf.mlp_.validation_scores_) == clf.mlp_.n_iter_ < clf.max_iter
    assert clf.mlp_.hidden_layer_sizes == (MLP_HIDDEN,)
    again = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="mlp", n_jobs=1, seed=0)
    again.fit(X[:240], names[:240])
    np.testing.assert_allclose(pipe.predict_proba(X[240:]), again.predict_proba(X[240:]))


def test_logreg_cv_picks_c_on_the_training_data_only(data):
    X, y = data
    pipe = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="logreg-cv", n_jobs=1, seed=0)
    pipe.fit(X[:240], y[:240])
    clf = pipe.named_steps["clf"]
    assert clf.Cs_.tolist() == list(LOGREG_CS)  # the grid, searched by 3-fold CV inside fit
    assert set(clf.C_.tolist()) <= set(LOGREG_CS)
    assert np.asarray(clf.scores_[0]).shape == (3, len(LOGREG_CS))
    # refitting on the same training rows chooses the same C, whatever the held-out rows are
    again = build_model(BLOCKS, {"rp": "none", "cnn": "none"}, classifier="logreg-cv", n_jobs=1, seed=0)
    again.fit(X[:240], y[:240])
    np.testing.assert_array_equal(again.named_steps["clf"].C_, clf.C_)
    np.testing.assert_allclose(pipe.predict_proba(X[240:]), again.predict_proba(X[240:]))


def test_two_flow_classifier_fit_and_describe(data):
    X, y = data
    model = TwoFlowClassifier(BLOCKS, {"rp": 4, "cnn": 8}, random_state=0, **SMALL).fit(X, y)
    assert model.kept_features_["rp"].size <= 4
    assert model.kept_features_["cnn"].size <= 8
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    record = describe_model(model)
    json.dumps(record)  # JSON-serialisable
    assert record["blocks"]["cnn"]["columns"] == [20, 60]
    assert record["blocks"]["cnn"]["max_features"] == 8
    assert record["blocks"]["cnn"]["threshold"] == "mean"
    assert record["blocks"]["cnn"]["selector"]["n_estimators"] == 15
    assert record["blocks"]["rp"]["kept"] == model.kept_features_["rp"].size
    assert record["classifier"]["params"]["n_estimators"] == 15
    assert record["estimator"]["select"] == {"rp": 4, "cnn": 8}
    # same integer seed -> same model
    again = TwoFlowClassifier(BLOCKS, {"rp": 4, "cnn": 8}, random_state=0, **SMALL).fit(X, y)
    np.testing.assert_array_equal(model.predict_proba(X), again.predict_proba(X))


def test_describe_unfitted_pipeline():
    record = describe_model(build_model(BLOCKS, {"rp": 55}))
    assert record["n_kept"] is None
    assert record["blocks"]["rp"]["kept"] is None
    assert record["blocks"]["rp"]["max_features"] == 20  # clipped to the block width
    assert record["classifier"]["params"]["n_estimators"] == 200


@pytest.mark.parametrize(
    ("blocks", "select", "classifier"),
    [
        ({}, None, "rf"),
        ({"a": (5, 5)}, None, "rf"),
        ({"a": (0, 10), "b": (5, 20)}, None, "rf"),
        ({"a__b": (0, 10)}, None, "rf"),
        (BLOCKS, {"unknown": 3}, "rf"),
        (BLOCKS, {"rp": 0}, "rf"),
        (BLOCKS, {"rp": "all"}, "rf"),
        (BLOCKS, None, "svm"),
    ],
)
def test_build_model_rejects_bad_input(blocks, select, classifier):
    with pytest.raises(InvalidInputError):
        build_model(blocks, select, classifier)


def test_blocks_wider_than_x(data):
    X, y = data
    with pytest.raises(DimensionMismatchError, match="60 columns"):
        TwoFlowClassifier({"a": (0, 61)}, **SMALL).fit(X, y)


# scikit-learn's estimator checks, with the default blocks (all columns as one
# block named "all") because the checks feed matrices of 1 to a few columns.
# Every check applies and passes: none is marked as an expected failure.
# check_classifier_data_not_an_array skips itself when pandas is not installed.
# The hgb variant passes its block through: check_classifiers_train wants a
# training accuracy > 0.83 on 2-feature blobs, which 10 boosting iterations on
# the single feature a selector may keep do not reach (a score, not an API,
# matter); selection itself is covered by the rf variants.
@parametrize_with_checks(
    [
        TwoFlowClassifier(trees=10, selector_trees=10, n_jobs=1),
        TwoFlowClassifier(select={"all": 1}, trees=10, selector_trees=10, n_jobs=1),
        TwoFlowClassifier(select={"all": "none"}, classifier="logreg", n_jobs=1),
        TwoFlowClassifier(select={"all": "none"}, classifier="hgb", trees=10, n_jobs=1),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# --- evaluation --------------------------------------------------------------------------


def test_splits_reproducible_and_seeded():
    y = np.repeat(np.arange(5), 20)
    a, scheme = make_splits(y, n_splits=5, seed=1)
    b, _ = make_splits(y, n_splits=5, seed=1)
    c, _ = make_splits(y, n_splits=5, seed=2)
    assert scheme == "stratified"
    assert len(a) == 5
    for (tr1, te1), (tr2, te2) in zip(a, b, strict=True):
        np.testing.assert_array_equal(tr1, tr2)
        np.testing.assert_array_equal(te1, te2)
    assert any(not np.array_equal(te1, te3) for (_, te1), (_, te3) in zip(a, c, strict=True))
    for train, test in a:
        assert test.size == 10 and train.size == 90
        assert not set(train) & set(test)
        # stratified: each class has 2 of its 20 rows in the test part
        assert (np.bincount(y[test], minlength=5) == 2).all()


def test_splits_fall_back_to_random():
    y = np.array([0] * 30 + [1] * 30 + [2])  # class 2 has a single member
    splits, scheme = make_splits(y, n_splits=3)
    assert scheme == "random"
    assert len(splits) == 3
    # more classes than test rows -> random too
    y = np.repeat(np.arange(20), 3)
    _, scheme = make_splits(y, test_size=0.1)
    assert scheme == "random"


@pytest.mark.parametrize(("n_splits", "test_size"), [(0, 0.1), (3, 1.5), (3, 0.0), (3, 0)])
def test_splits_reject_bad_arguments(n_splits, test_size):
    with pytest.raises(InvalidInputError):
        make_splits(np.repeat([0, 1], 10), n_splits=n_splits, test_size=test_size)


def test_splits_fingerprint():
    y = np.repeat(np.arange(4), 10)
    ids = np.arange(1000, 1040)
    splits, _ = make_splits(y, n_splits=3, seed=0)
    fp = splits_fingerprint(ids, splits)
    assert len(fp) == 64
    assert fp == splits_fingerprint(list(ids), make_splits(y, n_splits=3, seed=0)[0])
    assert fp != splits_fingerprint(ids, make_splits(y, n_splits=3, seed=1)[0])
    other_ids = ids.copy()
    other_ids[splits[0][1][0]] = 5  # one test image is a different image
    assert fp != splits_fingerprint(other_ids, splits)
    with pytest.raises(InvalidInputError):
        splits_fingerprint(ids[:10], splits)


def test_evaluate_on_separable_data(data):
    X, y = data
    splits, _ = make_splits(y, n_splits=3, seed=0)
    calls = []
    superclass = {0: "a", 1: "a", 2: "b"}
    result = evaluate(
        lambda: TwoFlowClassifier(BLOCKS, {"rp": 5, "cnn": 10}, random_state=0, **SMALL),
        X,
        y,
        splits,
        superclass_of=superclass,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert isinstance(result, EvaluationResult)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert len(result.splits) == 3
    for record in result.splits:
        assert record.n_test == 30 and record.n_train == 270
        assert 0.75 <= record.accuracy <= 1.0
        assert record.train_accuracy >= record.accuracy - 0.05
        assert 0.0 <= record.macro_f1 <= 1.0
        assert record.superclass_accuracy >= record.accuracy
        assert record.fit_seconds > 0 and record.predict_seconds > 0
    summary = result.summary["accuracy"]
    assert summary.n == 3
    assert summary.mean == pytest.approx(np.mean(result.values("accuracy")))
    assert summary.std == pytest.approx(np.std(result.values("accuracy"), ddof=1))
    as_dict = result.to_dict()
    json.dumps(as_dict)
    assert as_dict["n_splits"] == 3 and "superclass_accuracy" in as_dict["summary"]


def test_evaluate_without_superclasses_and_missing_superclass(data):
    X, y = data
    splits, _ = make_splits(y, n_splits=2, seed=0)
    result = evaluate(lambda: RandomForestClassifier(n_estimators=5, random_state=0), X, y, splits)
    assert all(s.superclass_accuracy is None for s in result.splits)
    assert "superclass_accuracy" not in result.summary
    with pytest.raises(InvalidInputError, match="no superclass"):
        evaluate(lambda: RandomForestClassifier(n_estimators=5), X, y, splits, superclass_of={0: "a"})


# --- stats -------------------------------------------------------------------------------


def test_paired_ttest_matches_scipy():
    rng = np.random.RandomState(0)
    a = 0.80 + 0.02 * rng.randn(10)
    b = 0.78 + 0.02 * rng.randn(10)
    result = paired_ttest(a, b)
    expected = scipy_stats.ttest_rel(a, b)
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.pvalue == pytest.approx(expected.pvalue)
    assert result.mean_diff == pytest.approx(np.mean(a - b))
    assert result.ci_low < result.mean_diff < result.ci_high
    assert (result.n, result.df) == (10, 9)
    # the CI is the usual t interval
    half = scipy_stats.t.ppf(0.975, 9) * np.std(a - b, ddof=1) / np.sqrt(10)
    assert result.ci_high - result.mean_diff == pytest.approx(half)
    # a wider confidence gives a wider interval
    wide = paired_ttest(a, b, confidence=0.99)
    assert wide.ci_low < result.ci_low and wide.ci_high > result.ci_high
    json.dumps(result.to_dict())


def test_paired_ttest_zero_variance():
    same = paired_ttest([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (same.statistic, same.pvalue, same.mean_diff) == (0.0, 1.0, 0.0)
    assert same.zero_variance and same.ci_low == same.ci_high == 0.0
    # a constant shift (with float rounding in a - b) is a certain difference
    shifted = paired_ttest([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert shifted.zero_variance
    assert shifted.statistic == np.inf and shifted.pvalue == 0.0
    assert shifted.mean_diff == pytest.approx(0.1)
    assert shifted.to_dict()["statistic"] == "inf"
    assert paired_ttest([0.1, 0.2], [0.3, 0.4]).statistic == -np.inf
    json.dumps(shifted.to_dict(), allow_nan=False)


@pytest.mark.parametrize(("a", "b"), [([0.1, 0.2, 0.3], [0.1, 0.2]), ([0.5], [0.4]), ([0.1, float("nan")], [0.1, 0.2])])
def test_paired_ttest_rejects_bad_input(a, b):
    with pytest.raises(InvalidInputError):
        paired_ttest(a, b)


def _exact_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial p at one half, summed by hand: outcomes no likelier than k."""
    pk = math.comb(n, k)
    return min(1.0, sum(math.comb(n, i) for i in range(n + 1) if math.comb(n, i) <= pk) / 2**n)


def test_mcnemar_counts_discordant_images_and_matches_the_exact_binomial():
    rng = np.random.RandomState(3)
    a = rng.rand(400) < 0.90
    b = np.where(rng.rand(400) < 0.15, ~a, a)  # b disagrees with a on about 15% of the images
    result = mcnemar(a.tolist(), b.tolist())
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    assert (result.a_only, result.b_only, result.n) == (a_only, b_only, 400)
    assert result.mean_diff == pytest.approx(a.mean() - b.mean())
    assert result.pvalue == pytest.approx(_exact_two_sided(a_only, a_only + b_only), rel=1e-9)
    # Wald interval of a paired difference of proportions
    se = math.sqrt(a_only + b_only - (a_only - b_only) ** 2 / 400) / 400
    assert result.ci_high - result.mean_diff == pytest.approx(1.959964 * se, rel=1e-5)
    assert mcnemar(a, b, confidence=0.99).ci_high > result.ci_high
    assert result.kind == "mcnemar"


def test_mcnemar_lopsided_and_equal():
    one_sided = mcnemar([True] * 12 + [False] * 3, [False] * 12 + [False] * 3)
    assert (one_sided.a_only, one_sided.b_only) == (12, 0) and one_sided.pvalue == pytest.approx(2 / 2**12)
    same = mcnemar([True, False, True], [True, False, True])
    assert (same.a_only, same.b_only, same.pvalue, same.mean_diff) == (0, 0, 1.0, 0.0)


@pytest.mark.parametrize(("a", "b", "confidence"), [([True], [True, False], 0.95), ([], [], 0.95),
                                                    ([True], [False], 1.5)])
def test_mcnemar_rejects_bad_input(a, b, confidence):
    with pytest.raises(InvalidInputError):
        mcnemar(a, b, confidence)


# --- artifacts ---------------------------------------------------------------------------


def test_artifact_roundtrip(tmp_path, data):
    X, y = data
    model = TwoFlowClassifier(BLOCKS, {"rp": 4, "cnn": 8}, random_state=0, **SMALL).fit(X, y)
    path = tmp_path / "models" / "run1.pkl"
    digest = save_artifact(model, path)
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    loaded = load_artifact(path, digest)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


class _Bomb:
    """Records that it was unpickled."""

    unpickled = False

    def __reduce__(self):
        return (_Bomb._explode, ())

    @staticmethod
    def _explode():
        _Bomb.unpickled = True
        return _Bomb()


def test_tampered_artifact_is_not_unpickled(tmp_path):
    path = tmp_path / "model.pkl"
    digest = save_artifact({"payload": list(range(100))}, path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="model.pkl was modified since training"):
        load_artifact(path, digest)

    # a malicious pickle substituted for the file never runs
    path.write_bytes(pickle.dumps(_Bomb(), protocol=5))
    with pytest.raises(IntegrityError):
        load_artifact(path, digest)
    assert not _Bomb.unpickled


def test_missing_artifact(tmp_path):
    with pytest.raises(ModelFilesMissingError, match="missing"):
        load_artifact(tmp_path / "gone.pkl", "0" * 64)
    with pytest.raises(InvalidInputError):
        load_artifact(tmp_path / "gone.pkl", "not-a-digest")
