"""K-fold runs (out-of-fold probabilities in run_oof), fold-by-fold compare, and `fs audit labels`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.compare import compare
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.labels import NoOutOfFoldError, audit_labels, set_labels
from featurestore.pipelines.train import TrainConfig, evaluate_many, get_run, train
from featurestore.store import Store
from featurestore.training.evaluation import evaluate, make_folds
from featurestore.training.label_issues import DEFAULT_FILTER, DEFAULT_NEIGHBOUR_WEIGHT, FILTERS, find_label_issues
from helpers import make_image, raises_cli

runner = CliRunner()
CLASSES = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]
FLIPPED = 3  # images of the fixture whose stored label is wrong (their features say another class)
WRONG = (0, 12, 24)  # their positions by id: one per class


@pytest.fixture
def kstore(store: Store, tmp_path: Path) -> Store:
    """36 labelled images (3 classes x 12), feature set 'a' separates the classes; 3 labels are wrong."""
    seed = 0
    for sc, cls in CLASSES:
        for k in range(12):
            make_image(tmp_path / "imgs" / sc / cls / f"{k}.png", size=(16, 12), seed=seed)
            seed += 1
    with store.writing():
        ingest(store, tmp_path / "imgs")
    rows = store.select_images()
    rng = np.random.default_rng(0)
    names = [c for _, c in CLASSES]
    centers = {cls: 6.0 * np.eye(3)[i] for i, cls in enumerate(names)}
    # The images at WRONG look like the next class: their label is the mistake.
    looks = [names[(names.index(r[2]) + 1) % 3] if k in WRONG else r[2] for k, r in enumerate(rows)]
    a = np.stack([centers[c] + rng.normal(scale=0.7, size=3) for c in looks]).astype(np.float32)
    b = rng.normal(size=(len(rows), 4)).astype(np.float32)
    with store.writing():
        fa = store.ensure_feature_set(FeatureSpec("a", "test", 3, {}))
        fb = store.ensure_feature_set(FeatureSpec("b", "test", 4, {}))
        ids = [r[0] for r in rows]
        store.append_vectors(fa, ids, a)
        store.append_vectors(fb, ids, b)
    return store


def _cfg(features: list[str], **kw: object) -> TrainConfig:
    return TrainConfig(features, trees=30, classifier="logreg", **kw)  # type: ignore[arg-type]


def test_make_folds_partition_rows_and_stratify() -> None:
    y = np.array(["a"] * 10 + ["b"] * 6 + ["c"] * 5)
    folds, scheme = make_folds(y, 5, seed=3)
    assert scheme == "stratified-kfold" and len(folds) == 5
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests.tolist()) == list(range(21))  # every row in exactly one test part
    for train_idx, test_idx in folds:
        assert not set(train_idx) & set(test_idx)
        assert set(y[train_idx]) == {"a", "b", "c"}
    again, _ = make_folds(y, 5, seed=3)
    assert all(np.array_equal(t1, t2) for (_, t1), (_, t2) in zip(folds, again, strict=True))
    _, rare = make_folds(np.array(["a"] * 10 + ["b"]), 3)
    assert rare == "kfold"  # a class with fewer members than folds cannot be stratified


def test_make_folds_keeps_groups_together() -> None:
    y = np.array(["a", "b"] * 10)
    groups = np.repeat(np.arange(10), 2)
    folds, scheme = make_folds(y, 5, seed=0, groups=groups)
    assert scheme == "stratified-group-kfold"
    for _, test_idx in folds:
        for g in set(groups[test_idx]):
            assert set(np.flatnonzero(groups == g)) <= set(test_idx)


def test_make_folds_refuses_bad_k() -> None:
    with pytest.raises(InvalidInputError, match="at least 2"):
        make_folds(np.array(["a", "b"]), 1)
    with pytest.raises(InvalidInputError, match="cannot cut 5 folds from 3 image"):
        make_folds(np.array(["a", "b", "a"]), 5)


def test_evaluate_out_of_fold_probabilities_align_with_classes() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    y = np.array(["x"] * 12 + ["y"] * 12 + ["z"] * 12)
    X = np.concatenate([rng.normal(loc=m, size=(12, 2)) for m in (0, 5, 10)])
    folds, _ = make_folds(y, 4, seed=0)
    ev = evaluate(lambda: LogisticRegression(max_iter=500), X, y, folds, out_of_fold=True)
    assert ev.oof is not None and ev.oof.classes == ["x", "y", "z"]
    assert np.allclose(ev.oof.probabilities.sum(axis=1), 1.0)
    assert sorted(set(ev.oof.fold.tolist())) == [0, 1, 2, 3]
    # each row's probabilities are those of the one fold model that did not train on it
    for i, (train_idx, test_idx) in enumerate(folds):
        model = LogisticRegression(max_iter=500).fit(X[train_idx], y[train_idx])
        assert np.allclose(ev.oof.probabilities[test_idx], model.predict_proba(X[test_idx]))
        assert (ev.oof.fold[test_idx] == i).all()
    with pytest.raises(InvalidInputError, match="every row once"):
        evaluate(lambda: LogisticRegression(), X, y, [(np.arange(30), np.arange(30, 36))], out_of_fold=True)


def test_kfold_run_stores_oof_and_compares_fold_by_fold(kstore: Store) -> None:
    with kstore.writing():
        one = train(kstore, _cfg(["a"], folds=3), fit_final=False)
        two, three = evaluate_many(kstore, [["a", "b"], ["b"]], _cfg(["a"], folds=3))
        splits_run = train(kstore, _cfg(["a"], n_splits=3), fit_final=False)
    run = get_run(kstore, one.run_id)
    assert run.split_scheme == "stratified-kfold" and run.n_splits == 3
    assert run.oof_classes == ["sandal", "shirt", "sneaker"] and run.label_version == 0
    oof = kstore.catalog.run_oof(one.run_id)
    assert oof is not None and len(oof.image_ids) == 36
    assert sorted(np.bincount(oof.folds).tolist()) == [12, 12, 12]
    assert sum(s.n_test for s in one.evaluation.splits) == 36
    with kstore.catalog.engine.connect() as conn:  # readable by SQL, JSON probabilities
        n, = conn.execute(text("SELECT count(*) FROM run_oof WHERE run_id = :r"), {"r": two.run_id}).one()
    assert n == 36
    c = compare(kstore, two.run_id, three.run_id)
    assert c.test.n == 3 and c.labels_note is None and c.test.mean_diff > 0
    with pytest.raises(FeatureStoreError, match="evaluated on 3 folds, the other on repeated random splits"):
        compare(kstore, one.run_id, splits_run.run_id)


def test_folds_refuse_test_dataset_and_ray(kstore: Store) -> None:
    with raises_cli(InvalidInputError, match="--folds and --test-dataset"):
        _cfg(["a"], folds=3, test_dataset="x").check()
    with raises_cli(InvalidInputError, match="--folds must be at least 2"):
        _cfg(["a"], folds=1).check()
    with kstore.writing(), raises_cli(InvalidInputError, match="--folds runs on this machine only"):
        train(kstore, _cfg(["a"], folds=3), ray_address="local")


def test_audit_labels_finds_the_flipped_images_and_matches_cleanlab(kstore: Store) -> None:
    with kstore.writing():
        run = train(kstore, _cfg(["a"], folds=3), fit_final=False).run_id
    audit = audit_labels(kstore, run)
    ids = sorted(int(r[0]) for r in kstore.select_images())
    first_ids = [ids[k] for k in WRONG]
    assert {r.image_id for r in audit.rows[:FLIPPED]} == set(first_ids)  # the three mistakes rank worst
    assert all(r.flagged for r in audit.rows[:FLIPPED])
    quality = [r.quality for r in audit.rows]
    assert quality == sorted(quality)
    # same answer as cleanlab called directly on the stored probabilities
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    oof = kstore.catalog.run_oof(run)
    assert oof is not None and oof.neighbours is not None  # a K-fold run keeps neighbour votes by default
    given = np.array([oof.classes.index(lb) for lb in oof.labels])
    judged = (1 - DEFAULT_NEIGHBOUR_WEIGHT) * oof.probabilities + DEFAULT_NEIGHBOUR_WEIGHT * oof.neighbours
    assert audit.neighbour_weight == DEFAULT_NEIGHBOUR_WEIGHT
    direct = cl_find(given, judged, filter_by=DEFAULT_FILTER)
    by_id = {r.image_id: r for r in audit.rows}
    assert [by_id[int(i)].flagged for i in oof.image_ids] == direct.tolist()
    assert np.allclose([by_id[int(i)].quality for i in oof.image_ids], get_label_quality_scores(given, judged))
    # --neighbour-weight 0: cleanlab on the fold models' probabilities alone
    alone = {r.image_id: r for r in audit_labels(kstore, run, neighbour_weight=0.0).rows}
    assert [alone[int(i)].flagged for i in oof.image_ids] == cl_find(given, oof.probabilities,
                                                                     filter_by=DEFAULT_FILTER).tolist()
    assert np.allclose([alone[int(i)].quality for i in oof.image_ids],
                       get_label_quality_scores(given, oof.probabilities))
    suggested = {r.image_id: r.suggested for r in audit.rows[:FLIPPED]}
    labels = {int(r[0]): r[2] for r in kstore.select_images()}
    names = [c for _, c in CLASSES]
    assert all(suggested[i] == names[(names.index(labels[i]) + 1) % 3] for i in first_ids)


def test_audit_refuses_run_without_oof(kstore: Store) -> None:
    with kstore.writing():
        run = train(kstore, _cfg(["a"], n_splits=3), fit_final=False).run_id
    with raises_cli(NoOutOfFoldError, match="--folds"):
        audit_labels(kstore, run)
    result = runner.invoke(app, ["audit", "labels", "--run", str(run)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: run {run} kept no out-of-fold probabilities; audit a run evaluated with --folds, e.g. "
        "`fs evaluate --features ... --folds 5`"]


def test_find_label_issues_refuses_bad_shapes() -> None:
    with pytest.raises(InvalidInputError, match="do not match"):
        find_label_issues(np.array([0, 1]), np.ones((3, 2)) / 2)
    with pytest.raises(InvalidInputError, match="nobody's given label"):
        find_label_issues(np.array([0, 0, 0]), np.full((3, 2), 0.5))


def _noisy_probabilities(n: int = 300, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Given labels (a tenth wrong) and probabilities that mostly believe the true class."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % k
    given = truth.copy()
    wrong = rng.choice(n, n // 10, replace=False)
    given[wrong] = (truth[wrong] + 1 + rng.integers(k - 1, size=wrong.size)) % k
    logits = rng.normal(size=(n, k)) + 3.0 * np.eye(k)[truth]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return given, probs


@pytest.mark.parametrize("filter_by", FILTERS)
def test_find_label_issues_filter_by_matches_cleanlab(filter_by: str) -> None:
    from cleanlab.filter import find_label_issues as cl_find

    given, probs = _noisy_probabilities()
    issues = find_label_issues(given, probs, filter_by=filter_by)
    direct = np.asarray(cl_find(given, probs, filter_by=filter_by, n_jobs=1), dtype=bool)
    assert issues.flagged.tolist() == direct.tolist() and direct.any()


def test_find_label_issues_min_confidence_keeps_confident_suggestions() -> None:
    given, probs = _noisy_probabilities()
    every = find_label_issues(given, probs)
    others = probs.copy()
    others[np.arange(len(given)), given] = 0.0
    assert np.allclose(every.confidence, others.max(axis=1))
    assert np.array_equal(every.suggested, others.argmax(axis=1))
    threshold = float(np.median(every.confidence[every.flagged]))
    some = find_label_issues(given, probs, min_confidence=threshold)
    assert some.flagged.tolist() == (every.flagged & (every.confidence >= threshold)).tolist()
    assert 0 < some.flagged.sum() < every.flagged.sum()
    assert np.array_equal(some.quality, every.quality) and some.estimated_issues == every.estimated_issues
    assert not find_label_issues(given, probs, min_confidence=1.0).flagged.any()


def test_find_label_issues_refuses_bad_options() -> None:
    given, probs = _noisy_probabilities()
    with pytest.raises(InvalidInputError, match="filter_by must be one of both, "):
        find_label_issues(given, probs, filter_by="nope")
    with pytest.raises(InvalidInputError, match="min_confidence must be between 0 and 1"):
        find_label_issues(given, probs, min_confidence=1.5)


def test_cli_audit_labels_filter_and_min_confidence(kstore: Store) -> None:
    with kstore.writing():
        run = train(kstore, _cfg(["a"], folds=3), fit_final=False).run_id
    kstore.close()
    r = runner.invoke(app, ["audit", "labels", "--run", str(run), "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert all(0.0 <= x["confidence"] <= 1.0 for x in rows) and any(x["flagged"] for x in rows)
    r = runner.invoke(app, ["audit", "labels", "--run", str(run), "--format", "json", "--min-confidence", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["flagged"] == 0
    r = runner.invoke(app, ["audit", "labels", "--run", str(run), "--format", "json", "--filter-by",
                            "prune_by_noise_rate"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["flagged"] >= FLIPPED
    r = runner.invoke(app, ["audit", "labels", "--run", str(run), "--filter-by", "nope"])
    assert r.exit_code == 2 and "must be one of both, prune_by_noise_rate" in r.output
    r = runner.invoke(app, ["audit", "labels", "--run", str(run), "--min-confidence", "2"])
    assert r.exit_code == 2


def test_cli_folds_audit_runs_and_compare_label_note(kstore: Store) -> None:
    kstore.close()
    r = runner.invoke(app, ["evaluate", "--features", "a", "--features", "b", "--folds", "3", "--classifier",
                            "logreg"])
    assert r.exit_code == 0, r.output
    assert "3 folds (stratified-kfold; out-of-fold probabilities kept)" in r.output
    r = runner.invoke(app, ["audit", "labels", "--run", "1", "--format", "json", "--limit", "5"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["images"] == 36 and len(data["rows"]) == 5 and data["flagged"] >= FLIPPED
    assert data["estimated_issues"] >= 1
    assert {"image_id", "label", "suggested", "quality", "flagged"} <= set(data["rows"][0])
    worst = data["rows"][0]
    r = runner.invoke(app, ["audit", "labels", "--run", "1"])
    assert r.exit_code == 0 and "flagged" in r.output and str(worst["image_id"]) in r.stdout
    # a label fix between two K-fold runs: compare pairs them fold by fold and says the labels differed
    r = runner.invoke(app, ["labels", "set", "--id", str(worst["image_id"]), worst["suggested"]])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "--features", "a", "--folds", "3", "--classifier", "logreg"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", "3", "1"])
    assert r.exit_code == 1
    assert ("labels were changed between runs 3 and 1 (label versions 1 and 0: changes 1..1, see `fs labels "
            "history`), and stratified splits follow the labels") in r.output
    r = runner.invoke(app, ["runs", "--format", "json"])
    runs = json.loads(r.stdout)
    assert [x["labels"] for x in runs] == [0, 0, 1] and runs[0]["splits"] == "3 folds"
    assert "runs saw 2 different versions" in r.output


def test_labels_note_names_the_versions() -> None:
    from featurestore.catalog.schema import Run
    from featurestore.pipelines.compare import labels_note

    old, same, new = Run(id=1, label_version=None), Run(id=2, label_version=0), Run(id=3, label_version=4)
    assert labels_note(old, same) is None  # before label history = no change yet
    assert labels_note(same, new) == ("labels were changed between runs 2 and 3 (label versions 0 and 4: "
                                      "changes 1..4, see `fs labels history`)")


def test_set_labels_after_audit_changes_what_the_next_run_reads(kstore: Store) -> None:
    with kstore.writing():
        run = train(kstore, _cfg(["a"], folds=3), fit_final=False).run_id
        audit = audit_labels(kstore, run)
        for row in [r for r in audit.rows if r.flagged]:
            set_labels(kstore, [row.image_id], row.suggested, reason=f"audit of run {run}")
        fixed = train(kstore, _cfg(["a"], folds=3), fit_final=False)
    assert get_run(kstore, fixed.run_id).label_version == len([r for r in audit.rows if r.flagged])
    assert fixed.evaluation.summary["accuracy"].mean > get_run(kstore, run).accuracy_mean  # type: ignore[operator]
    after = audit_labels(kstore, fixed.run_id)
    assert after.n_flagged < audit.n_flagged
    # the first run still judges the labels it saw
    assert audit_labels(kstore, run).rows[0].label == audit.rows[0].label


def test_audit_of_a_superclass_run_judges_superclasses(kstore: Store) -> None:
    with kstore.writing():
        run = train(kstore, _cfg(["a"], folds=3, target="superclass"), fit_final=False).run_id
    audit = audit_labels(kstore, run)
    assert audit.target == "superclass" and audit.classes == ["footwear", "tops"]
    assert {r.label for r in audit.rows} == {"footwear", "tops"} and len(audit.rows) == 36
