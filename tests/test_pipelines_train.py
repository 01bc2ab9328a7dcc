"""Training runs, paired comparison, artifacts and predictions (store level and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.errors import FeatureStoreError, IntegrityError, InvalidInputError
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.compare import compare
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.predict import predict
from featurestore.pipelines.train import TrainConfig, evaluate_many, get_run, parse_select, train
from featurestore.store import Store
from helpers import make_image, raises_cli

runner = CliRunner()
CLASSES = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]


@pytest.fixture
def trained_store(store: Store, tmp_path: Path) -> Store:
    """30 labelled images (3 classes) with two synthetic feature sets: 'a' informative, 'b' noise."""
    seed = 0
    for sc, cls in CLASSES:
        for k in range(10):
            make_image(tmp_path / "imgs" / sc / cls / f"{k}.png", size=(16, 12), seed=seed)
            seed += 1
    with store.writing():
        ingest(store, tmp_path / "imgs")
    rows = store.select_images()
    rng = np.random.default_rng(0)
    centers = {cls: rng.normal(scale=4, size=6) for _, cls in CLASSES}
    a = np.stack([centers[r[2]] + rng.normal(size=6) for r in rows]).astype(np.float32)
    b = rng.normal(size=(len(rows), 5)).astype(np.float32)
    with store.writing():
        fa = store.ensure_feature_set(FeatureSpec("a", "test", 6, {}))
        fb = store.ensure_feature_set(FeatureSpec("b", "test", 5, {}))
        ids = [r[0] for r in rows]
        store.append_vectors(fa, ids, a)
        store.append_vectors(fb, ids, b)
    return store


def _cfg(features: list[str], **kw: object) -> TrainConfig:
    return TrainConfig(features, n_splits=3, trees=20, **kw)  # type: ignore[arg-type]


def test_parse_select() -> None:
    assert parse_select(None, ["a"]) == {"a": "none"}
    assert parse_select(None, ["a", "b"]) == {"a": None, "b": None}
    assert parse_select("none", ["a", "b"]) == {"a": "none", "b": "none"}
    assert parse_select("a=3,b=auto", ["a", "b"]) == {"a": 3, "b": None}
    with pytest.raises(InvalidInputError, match="expected NAME=K"):
        parse_select("c=3", ["a", "b"])
    with pytest.raises(InvalidInputError, match="positive integer"):
        parse_select("a=0", ["a"])


def test_train_records_run_and_splits_are_reproducible(trained_store: Store) -> None:
    with trained_store.writing():
        one = train(trained_store, _cfg(["a", "b"], select="a=3,b=2", seed=7))
        two = train(trained_store, _cfg(["a"], seed=7))
        other = train(trained_store, _cfg(["a"], seed=8))
    r1, r2, r3 = (get_run(trained_store, o.run_id) for o in (one, two, other))
    assert r1.splits_fingerprint == r2.splits_fingerprint != r3.splits_fingerprint
    assert r1.split_scheme == "stratified" and r1.n_images == 30
    assert one.kept["a"] <= 3 and one.kept["b"] <= 2
    assert r1.accuracy_mean is not None and r1.accuracy_mean > 0.8  # 'a' separates the classes
    assert r1.superclass_accuracy_mean is not None
    assert set(r1.feature_params) == {"a", "b"} and "scikit-learn" in r1.versions
    assert len(one.evaluation.splits) == 3
    c = compare(trained_store, one.run_id, two.run_id)
    assert c.test.n == 3


def test_compare_refuses_unpaired_runs(trained_store: Store) -> None:
    with trained_store.writing():
        a = train(trained_store, _cfg(["a"], seed=1))
        b = train(trained_store, _cfg(["a"], seed=2))
        c = train(trained_store, TrainConfig(["a"], n_splits=4, trees=20, seed=1))
    with pytest.raises(FeatureStoreError, match="not evaluated on the same splits .*seed: 1 vs 2"):
        compare(trained_store, a.run_id, b.run_id)
    with pytest.raises(FeatureStoreError, match="n_splits: 3 vs 4"):
        compare(trained_store, a.run_id, c.run_id)


def test_evaluate_many_shares_splits(trained_store: Store) -> None:
    with trained_store.writing():
        outs = evaluate_many(trained_store, [["a"], ["b"], ["a", "b"]], _cfg(["a"]))
    runs = [get_run(trained_store, o.run_id) for o in outs]
    assert len({r.splits_fingerprint for r in runs}) == 1
    assert len({r.comparison_group for r in runs}) == 1
    assert all(r.artifact_path is None for r in runs)
    assert runs[0].accuracy_mean > runs[1].accuracy_mean  # informative beats noise
    assert compare(trained_store, outs[0].run_id, outs[1].run_id).test.mean_diff > 0


def test_tampered_artifact_refused(trained_store: Store) -> None:
    with trained_store.writing():
        out = train(trained_store, _cfg(["a"]))
    run = get_run(trained_store, out.run_id)
    path = trained_store.root / run.artifact_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ids = [r[0] for r in trained_store.select_images()]
    with pytest.raises(IntegrityError, match="modified"):
        with trained_store.writing():
            predict(trained_store, out.run_id, ids)


def test_predict_replaces_rows_and_refuses_changed_features(trained_store: Store) -> None:
    with trained_store.writing():
        out = train(trained_store, _cfg(["a"]))
        ids = [r[0] for r in trained_store.select_images()]
        first = predict(trained_store, out.run_id, ids[:10])
        again = predict(trained_store, out.run_id, ids[:10])
    assert first.predicted == again.predicted == 10
    assert len(again.rows[0]["top5"]) == 3  # three classes
    with trained_store.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM predictions").scalar() == 10
    with trained_store.writing():
        trained_store.ensure_feature_set(FeatureSpec("a", "test", 6, {"changed": True}), replace=True)
        # issue 26: the run reads the version it was trained on, which --replace kept
        assert predict(trained_store, out.run_id, ids[:10]).rows == again.rows
        with trained_store.session() as s:  # a catalog where that version now has other params
            trained_store.catalog.find_feature_set(s, "a@v1").params = {"changed": True}
        with pytest.raises(FeatureStoreError, match="recomputed with other params since run"):
            predict(trained_store, out.run_id, ids)


def test_cli_train_predict_sql(trained_store: Store) -> None:
    trained_store.close()
    result = runner.invoke(app, ["train", "--features", "a,b", "--splits", "3", "--trees", "20", "-f", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["run"] == 1 and info["evaluation"]["n_splits"] == 3
    result = runner.invoke(app, ["predict", "--run", "1", "--dataset", "imgs"])
    assert result.exit_code == 0, result.output
    assert "30 predictions stored for run 1" in result.output
    q = runner.invoke(app, ["sql", "SELECT count(*) AS n, sum(CASE WHEN p.label = i.label THEN 1 ELSE 0 END) "
                            "AS correct FROM predictions p JOIN images i ON i.id = p.image_id", "-f", "json"])
    rows = json.loads(q.stdout)
    assert rows[0]["n"] == 30 and rows[0]["correct"] >= 27
    ev = runner.invoke(app, ["evaluate", "--features", "a", "--features", "a,b", "--splits", "4", "--trees",
                             "20"])
    assert ev.exit_code == 0, ev.output
    assert "a+b" in ev.stdout and "+0.0" in ev.stdout
    cmp_ = runner.invoke(app, ["compare", "2", "3"])
    assert cmp_.exit_code == 0, cmp_.output
    assert "A - B =" in cmp_.output
    bad = runner.invoke(app, ["compare", "1", "2"])
    assert bad.exit_code == 1 and "not evaluated on the same splits (n_splits: 3 vs 4)" in bad.output
    listed = runner.invoke(app, ["runs", "-f", "csv"])
    assert listed.stdout.count("\n") == 4
    nomodel = runner.invoke(app, ["predict", "--run", "2", "--unlabelled"])
    assert nomodel.exit_code == 1 and "no final model" in nomodel.output
    missing = runner.invoke(app, ["train", "--features", "zzz"])
    assert missing.exit_code == 1 and "unknown feature set 'zzz'; available: a, b" in missing.output


@pytest.mark.parametrize("classifier", ["logreg-cv", "mlp"])
def test_cv_and_mlp_runs_train_save_and_predict(trained_store: Store, classifier: str) -> None:
    with trained_store.writing():
        out = train(trained_store, _cfg(["a"], classifier=classifier))
        ids = [r[0] for r in trained_store.select_images()]
        got = predict(trained_store, out.run_id, ids)  # the artifact loads back and scores every image
    assert trained_store.catalog.run(out.run_id).classifier == classifier
    assert got.predicted == len(ids)
    truth = {r[0]: r[2] for r in trained_store.select_images()}
    right = sum(row["label"] == truth[row["image_id"]] for row in got.rows)
    assert right >= 0.8 * len(ids)  # 'a' separates the three classes


def test_logreg_cv_too_few_images_is_a_one_line_error(trained_store: Store) -> None:
    # 90 % test: each training part holds one image per class, too few for 3-fold CV
    with trained_store.writing():
        with raises_cli(InvalidInputError, match="logreg-cv picks C.*--classifier logreg"):
            train(trained_store, TrainConfig(["a"], n_splits=2, test_size=0.9, classifier="logreg-cv"))
