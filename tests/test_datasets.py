"""Datasets are collections: one stored image can belong to several datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from featurestore.catalog import database
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.compare import compare
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, evaluate_many, train
from featurestore.store import Store
from helpers import make_image

runner = CliRunner()


def fs(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def _lists(tmp_path: Path) -> tuple[Path, Path]:
    """train/ holds photos 0..9, test/ photos 5..14: five identical photos in both (labels from folders)."""
    for k in range(15):
        cls = ("sneaker", "sandal")[k % 2]
        if k < 10:
            make_image(tmp_path / "train" / cls / f"t{k}.png", size=(16, 12), seed=k)
        if k >= 5:
            src = tmp_path / "train" / cls / f"t{k}.png"
            dst = tmp_path / "test" / cls / f"q{k}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.copyfile(src, dst)
            else:
                make_image(dst, size=(16, 12), seed=k)
    return tmp_path / "train", tmp_path / "test"


def test_same_photo_in_two_datasets(store: Store, tmp_path: Path) -> None:
    tr, te = _lists(tmp_path)
    with store.writing():
        first = ingest(store, tr, dataset="train")
        second = ingest(store, te, dataset="test")
        again = ingest(store, te, dataset="test")
    assert (first.new, first.added, first.duplicates) == (10, 0, 0)
    assert (second.new, second.added, second.duplicates) == (5, 5, 0)
    assert second.line() == "5 new, 5 already stored (added to test), 0 duplicates, 0 failed"
    assert (again.new, again.added, again.duplicates) == (0, 0, 10)
    assert len(store.select_images()) == 15  # content is stored once
    assert len(store.select_images(dataset="train")) == 10
    assert len(store.select_images(dataset="test")) == 10  # the shared photos count in both
    assert store.catalog.dataset_overlap("train", "test") == 5
    assert dict(store.catalog.dataset_overlaps("test")) == {"train": 5}
    assert {n: c for n, c, _ in store.catalog.dataset_counts()} == {"train": 10, "test": 10}
    status = {d["dataset"]: d["images"] for d in store.status()["datasets"]}
    assert status == {"train": 10, "test": 10}


def test_datasets_cli_and_selection_by_membership(tmp_path: Path) -> None:
    tr, te = _lists(tmp_path)
    assert fs("ingest", str(tr), "--dataset", "train").exit_code == 0
    done = fs("ingest", str(te), "--dataset", "test")
    assert done.exit_code == 0, done.output
    assert "5 new, 5 already stored (added to test), 0 duplicates, 0 failed" in done.output
    listed = fs("datasets", "list", "--format", "json")
    assert {r["dataset"]: r["images"] for r in json.loads(listed.stdout)} == {"train": 10, "test": 10}
    shown = fs("datasets", "show", "test", "--format", "json")
    body = json.loads(shown.stdout)
    assert body["images"] == 10 and body["overlap"] == [{"dataset": "train", "images": 5}]
    assert {(r["label"], r["images"]) for r in body["labels"]} == {("sandal", 5), ("sneaker", 5)}
    both = fs("datasets", "overlap", "train", "test", "--ids")
    assert both.exit_code == 0 and both.stdout.splitlines()[0] == "5" and len(both.stdout.splitlines()) == 6
    assert "5 image(s) are in both train and test" in both.output
    missing = fs("datasets", "show", "nope")
    assert missing.exit_code == 1 and "unknown dataset 'nope'" in missing.output
    # extract --dataset and search --where use membership: the shared photos are in test too
    assert fs("extract", "--rp", "8", "--size", "16x12", "--dataset", "test").exit_code == 0
    status = json.loads(fs("status", "--format", "json").stdout)
    assert status["feature_sets"][0]["images"] == 10
    with Store.open(Settings()) as store:
        shared = store.catalog.dataset_image_ids("train") & store.catalog.dataset_image_ids("test")
    query = min(shared)
    hits = fs("search", "-F", "rp8", "--id", str(query), "-k", "20", "--where", "dataset = 'train'", "--format",
              "json")
    assert hits.exit_code == 0, hits.output
    # train members that have rp8 are the shared photos (extracted as members of test), less the query
    assert {r["image_id"] for r in json.loads(hits.stdout)} == shared - {query}


def test_label_conflict_refused_naming_both_paths(store: Store, tmp_path: Path) -> None:
    a = make_image(tmp_path / "one" / "boot" / "a.png", seed=3)
    b = tmp_path / "two" / "sandal" / "b.png"
    b.parent.mkdir(parents=True)
    b.write_bytes(a.read_bytes())
    c = tmp_path / "three" / "c.png"
    c.parent.mkdir(parents=True)
    c.write_bytes(a.read_bytes())
    with store.writing():
        ingest(store, tmp_path / "one", dataset="one")
        clash = ingest(store, tmp_path / "two", dataset="two")
        unlabelled = ingest(store, tmp_path / "three", dataset="three", labels="none")
    assert clash.new == clash.added == 0 and len(clash.failed) == 1
    path, reason = clash.failed[0]
    assert path == str(b) and str(a) in reason and "'boot'" in reason and "'sandal'" in reason
    assert store.catalog.dataset_overlaps("one") == [("three", 1)]  # the unlabelled copy joins; no conflict
    assert unlabelled.added == 1
    assert [r[2] for r in store.select_images()] == ["boot"]


def test_unlabelled_image_gets_its_label_later(store: Store, tmp_path: Path) -> None:
    a = make_image(tmp_path / "raw" / "x.png", seed=5)
    (tmp_path / "lab" / "shirt").mkdir(parents=True)
    shutil.copyfile(a, tmp_path / "lab" / "shirt" / "x.png")
    with store.writing():
        ingest(store, tmp_path / "raw", labels="none")
        later = ingest(store, tmp_path / "lab", dataset="labelled")
    assert later.added == 1 and store.select_images()[0][2] == "shirt"


def test_fixed_test_protocol_never_trains_on_a_test_image(store: Store, tmp_path: Path) -> None:
    tr, te = _lists(tmp_path)
    with store.writing():
        ingest(store, tr, dataset="train")
        ingest(store, te, dataset="test")
        fs_ = store.ensure_feature_set(FeatureSpec("v", "test", 4, {}))
        ids = np.array([r[0] for r in store.select_images()], dtype=np.int64)
        store.append_vectors(fs_, ids, np.random.default_rng(0).normal(size=(len(ids), 4)))
        cfg = TrainConfig(["v"], trees=5, dataset="train", test_dataset="test")
        out = train(store, cfg)
        rep = train(store, TrainConfig(["v"], trees=5, n_splits=2, test_size=0.5))
        many = evaluate_many(store, [["v"]], cfg)
    assert out.split_scheme == "fixed-test" and out.excluded == 5 and many[0].excluded == 5
    (split,) = out.evaluation.splits
    assert (split.n_train, split.n_test) == (5, 10)  # 10 train images minus the 5 that are also test images
    run = store.catalog.run(out.run_id)
    assert (run.test_dataset, run.n_test_overlap, run.n_splits) == ("test", 5, 1)
    with pytest.raises(Exception, match="fixed test dataset"):
        compare(store, out.run_id, rep.run_id)
    bad = fs("train", "--features", "v", "--dataset", "test", "--test-dataset", "test")
    assert bad.exit_code == 2 and "must differ" in bad.output


def _two_fixed_test_runs(store: Store, tmp_path: Path) -> tuple[int, int]:
    """Runs a ("good", informative) and b ("noise") evaluated on the test dataset "test"."""
    tr, te = _lists(tmp_path)
    rng = np.random.default_rng(1)
    with store.writing():
        ingest(store, tr, dataset="train")
        ingest(store, te, dataset="test")
        ids = np.array([r[0] for r in store.select_images()], dtype=np.int64)
        labels = {r[0]: r[2] for r in store.select_images()}
        good = np.array([[1.0, 0.0] if labels[i] == "sneaker" else [0.0, 1.0] for i in ids]) + rng.normal(
            scale=0.05, size=(len(ids), 2))
        for name, vecs in (("good", good), ("noise", rng.normal(size=(len(ids), 2)))):
            store.append_vectors(store.ensure_feature_set(FeatureSpec(name, "test", 2, {})), ids, vecs)
        cfg = TrainConfig(["good"], trees=5, dataset="train", test_dataset="test")
        a, b = (o.run_id for o in evaluate_many(store, [["good"], ["noise"]], cfg))
    return a, b


def test_fixed_test_runs_are_compared_image_by_image(store: Store, tmp_path: Path) -> None:
    """Two runs on the same test dataset: McNemar's exact test over their stored per-image predictions."""
    a, b = _two_fixed_test_runs(store, tmp_path)
    right = {r: store.catalog.test_correctness(r) for r in (a, b)}
    test_ids = store.catalog.dataset_image_ids("test")
    assert set(right[a]) == set(right[b]) == test_ids  # one row per test image
    a_only = sum(right[a][i] and not right[b][i] for i in test_ids)
    b_only = sum(right[b][i] and not right[a][i] for i in test_ids)
    assert a_only > b_only  # the informative set beats noise on the test photos
    c = compare(store, a, b)
    assert c.test.kind == "mcnemar" and (c.test.a_only, c.test.b_only, c.test.n) == (a_only, b_only, 10)
    run_a, run_b = store.catalog.run(a), store.catalog.run(b)
    assert c.test.mean_diff == pytest.approx(run_a.accuracy_mean - run_b.accuracy_mean)
    assert sum(right[a].values()) / 10 == pytest.approx(run_a.accuracy_mean)
    swapped = compare(store, b, a).test
    assert (swapped.a_only, swapped.b_only, swapped.pvalue) == (b_only, a_only, c.test.pvalue)

    shown = fs("compare", str(a), str(b), "--format", "json")
    assert shown.exit_code == 0, shown.output
    (row,) = json.loads(shown.stdout)
    assert (row["test"], row["a_only"], row["b_only"], row["n"]) == ("mcnemar", a_only, b_only, 10)
    assert f"McNemar: only A right on {a_only}, only B right on {b_only} of 10 test images" in shown.output


def test_fixed_test_runs_that_cannot_be_paired_are_refused(store: Store, tmp_path: Path) -> None:
    a, b = _two_fixed_test_runs(store, tmp_path)
    test_ids = store.catalog.dataset_image_ids("test")
    with store.writing():
        other = train(store, TrainConfig(["good"], trees=5, dataset="test", test_dataset="train"))
        rep = train(store, TrainConfig(["good"], trees=5, n_splits=2, test_size=0.5))
    with pytest.raises(Exception, match="not scored on the same test images .*test_dataset: test vs train"):
        compare(store, a, other.run_id)
    with pytest.raises(Exception, match=f"run {a} was scored on the fixed test dataset test .* repeated random"):
        compare(store, a, rep.run_id)
    with store.session() as s:  # one test image fewer: no longer the same test images
        s.execute(text("DELETE FROM run_test_predictions WHERE run_id = :r AND image_id = :i"),
                  {"r": b, "i": min(test_ids)})
    with pytest.raises(Exception, match=r"different images of the test dataset test \(10 and 9, 9 in common"):
        compare(store, a, b)
    with store.session() as s:  # a run recorded before the predictions were kept
        s.execute(text("DELETE FROM run_test_predictions WHERE run_id = :r"), {"r": b})
    with pytest.raises(Exception, match=f"run {b} was recorded before .* evaluate it again"):
        compare(store, a, b)
    refused = fs("compare", str(a), str(b))
    assert refused.exit_code == 1 and "evaluate it again" in refused.output and "Traceback" not in refused.output


def test_membership_migration_keeps_existing_stores(tmp_path: Path, backend_url: str | None) -> None:
    """A catalog made by the previous schema (0002) upgrades: every image is a member of its dataset."""
    (tmp_path / ".fs").mkdir()
    url = backend_url or Settings(store=tmp_path / ".fs").catalog_url
    engine = database.make_engine(url)
    database.upgrade(engine, url, "0002")
    with engine.begin() as c:
        c.execute(text("INSERT INTO datasets (id, name, created_at) VALUES (1, 'old', CURRENT_TIMESTAMP), "
                       "(2, 'other', CURRENT_TIMESTAMP)"))
        for i, ds in [(1, 1), (2, 1), (3, 2)]:
            c.execute(text("INSERT INTO images (id, sha256, source_path, width, height, format, mode, bytes, label, "
                           "dataset_id, ingested_at) VALUES (:i, :h, :p, 4, 4, 'PNG', 'RGB', 10, 'a', :d, "
                           "CURRENT_TIMESTAMP)"), {"i": i, "h": f"{i:064d}", "p": f"/photos/{i}.png", "d": ds})
    before, after = database.upgrade(engine, url)
    engine.dispose()
    assert (before, after) == ("0002", database.head_revision(url))
    with Store.open(Settings(store=tmp_path / ".fs", database_url=backend_url)) as store:
        assert [r[0] for r in store.select_images(dataset="old")] == [1, 2]
        assert [r[0] for r in store.select_images(dataset="other")] == [3]
        assert store.catalog.dataset_overlap("old", "other") == 0
