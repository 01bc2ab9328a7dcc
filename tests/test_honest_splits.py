"""Honest splits (issue 25): near-duplicate groups never straddle a split; per-split test images stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.errors import FeatureStoreError, InvalidInputError, MissingFeaturesError
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, evaluate_many, get_run, train
from featurestore.search.groups import check_threshold, cross_pairs, group_near_duplicates
from featurestore.store import Store
from featurestore.training.evaluation import make_splits, unsplittable_classes
from helpers import ingest_with_near_copies, make_image, raises_cli

runner = CliRunner()


def _straddling(splits: list[tuple[np.ndarray, np.ndarray]], ids: np.ndarray, copy_of: dict[int, int]) -> int:
    pos = {int(i): n for n, i in enumerate(ids)}
    out = 0
    for rows_train, rows_test in splits:
        tr, te = set(rows_train.tolist()), set(rows_test.tolist())
        for c, o in copy_of.items():
            out += (pos[c] in tr and pos[o] in te) or (pos[c] in te and pos[o] in tr)
    return out


def test_group_splits_keep_each_group_on_one_side() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 40)
    groups = np.repeat([0, 100, 200], 40) + rng.integers(0, 20, size=y.size)  # near copies share a class
    splits, scheme = make_splits(y, n_splits=10, test_size=0.1, seed=3, groups=groups)
    assert scheme == "stratified-group" and len(splits) == 10
    for tr, test in splits:
        assert not set(groups[tr]) & set(groups[test])
        assert sorted(np.concatenate([tr, test]).tolist()) == list(range(y.size))
        assert 4 <= test.size <= 25  # about a tenth, in whole groups
    shares = [np.mean([np.mean(y[test] == c) * test.size / 40 for _, test in splits]) for c in "abc"]
    assert all(0.05 <= share <= 0.2 for share in shares), shares  # each class gives about a tenth
    again, _ = make_splits(y, n_splits=10, test_size=0.1, seed=3, groups=groups)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    other, _ = make_splits(y, n_splits=10, test_size=0.1, seed=4, groups=groups)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(splits, other, strict=True))


def test_a_class_inside_one_group_is_reported_and_splits_stay_grouped() -> None:
    y = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 3)
    groups = np.r_[np.arange(10), np.arange(10, 20), [99, 99, 99]]  # class c is one group of 3
    assert unsplittable_classes(y, groups) == ["c"]
    splits, scheme = make_splits(y, n_splits=5, test_size=0.2, seed=0, groups=groups)
    assert scheme == "group"
    for tr, test in splits:
        assert not set(groups[tr]) & set(groups[test])
    with pytest.raises(InvalidInputError, match="one near-duplicate group"):
        make_splits(y, n_splits=2, groups=np.zeros(y.size))


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan"), "x"])
def test_threshold_outside_0_1_is_refused(bad: object) -> None:
    with pytest.raises(InvalidInputError, match=r"\(0, 1\]"):
        check_threshold(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        TrainConfig(["c"], group_duplicates=bad).check()  # type: ignore[arg-type]
    assert check_threshold(1) == 1.0


def test_grouped_run_keeps_copies_on_one_side_and_stores_split_images(store: Store, tmp_path: Path) -> None:
    copy_of = ingest_with_near_copies(store, tmp_path)
    with store.writing():
        plain = train(store, TrainConfig(["r"], n_splits=6, test_size=0.25, trees=5, seed=1), fit_final=False)
        grouped = train(store, TrainConfig(["r"], n_splits=6, test_size=0.25, trees=5, seed=1,
                                           group_duplicates=0.99, group_features="c"), fit_final=False)
    catalog = store.catalog
    ids = catalog.run_image_ids(grouped.run_id)
    assert ids.size == 36 and np.array_equal(ids, catalog.run_image_ids(plain.run_id))

    def splits_of(run_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
        tests = catalog.split_test_ids(run_id)
        assert sorted(tests) == list(range(6))
        return [(np.flatnonzero(~np.isin(ids, t)), np.flatnonzero(np.isin(ids, t))) for t in tests.values()]

    assert _straddling(splits_of(plain.run_id), ids, copy_of) > 0  # the leak the grouping removes
    assert _straddling(splits_of(grouped.run_id), ids, copy_of) == 0
    run = get_run(store, grouped.run_id)
    assert (run.group_threshold, run.group_features, run.n_groups) == (0.99, "c", 12)
    assert run.split_scheme == "stratified-group" and "group_seconds" in run.timings
    assert grouped.grouping is not None and grouped.grouping.n_grouped == 24 and grouped.grouping.largest == 2
    assert get_run(store, plain.run_id).n_groups is None
    # the same images' pairs across each split, found from the stored rows: none with groups
    found = group_near_duplicates(store, "c", ids, 0.99)
    for split, test in catalog.split_test_ids(grouped.run_id).items():
        assert cross_pairs(store, found, ids[~np.isin(ids, test)], test) == [], split
    assert sum(len(cross_pairs(store, found, ids[~np.isin(ids, t)], t))
               for t in catalog.split_test_ids(plain.run_id).values()) > 0


def test_default_group_set_is_the_first_cnn_set(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    with store.writing():
        outs = evaluate_many(store, [["r"], ["r", "c"]], TrainConfig(["r"], n_splits=3, trees=5,
                                                                     group_duplicates=0.99))
        with raises_cli(InvalidInputError, match="none of r is one: name one with --group-features"):
            train(store, TrainConfig(["r"], n_splits=3, trees=5, group_duplicates=0.99), fit_final=False)
    assert {get_run(store, o.run_id).group_features for o in outs} == {"c"}
    assert len({get_run(store, o.run_id).splits_fingerprint for o in outs}) == 1


def test_missing_group_vectors_name_fs_extract(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    make_image(tmp_path / "late" / "shirt" / "x.png", seed=777)
    with store.writing():
        (new,) = ingest(store, tmp_path / "late", dataset="late").image_ids
        store.append_vectors(store.feature_set("r"), [new], np.zeros((1, 3), dtype=np.float32))
        with raises_cli(MissingFeaturesError, match="1 image.* lack c: run `fs extract"):
            train(store, TrainConfig(["r"], n_splits=3, trees=5, group_duplicates=0.9, group_features="c"),
                  fit_final=False)


def test_fixed_test_leaves_out_near_copies_of_test_images(store: Store, tmp_path: Path) -> None:
    copy_of = ingest_with_near_copies(store, tmp_path, datasets=("train", "test"))
    with store.writing():
        plain = train(store, TrainConfig(["r"], trees=5, dataset="train", test_dataset="test"), fit_final=False)
        grouped = train(store, TrainConfig(["r"], trees=5, dataset="train", test_dataset="test",
                                           group_duplicates=0.99, group_features="c"))
    assert plain.evaluation.splits[0].n_train == 24
    (split,) = grouped.evaluation.splits
    assert (split.n_train, split.n_test) == (24 - len(copy_of), 12)
    run = get_run(store, grouped.run_id)
    assert (run.n_test_overlap, run.n_near_overlap, run.n_groups) == (12, 12, 12)
    assert get_run(store, plain.run_id).n_test_overlap == 0
    train_ids = set(store.catalog.run_image_ids(grouped.run_id).tolist()) - set(
        store.catalog.split_test_ids(grouped.run_id)[0].tolist())
    assert not train_ids & set(copy_of.values())


def test_index_and_exact_grouping_agree(store: Store, tmp_path: Path) -> None:
    pytest.importorskip("usearch")
    from featurestore.search.index import build_index

    ingest_with_near_copies(store, tmp_path)
    ids = np.array([r[0] for r in store.select_images()])
    exact = group_near_duplicates(store, "c", ids, 0.99, exact=True)
    build_index(store, "c")
    indexed = group_near_duplicates(store, "c", ids, 0.99)
    assert (exact.method, indexed.method) == ("exact", "index")
    assert exact.groups == indexed.groups and len(exact.groups) == 12
    assert np.array_equal(exact.labels, indexed.labels)


def test_cli_group_duplicates(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    store.close()
    ok = runner.invoke(app, ["evaluate", "--features", "r", "--features", "c", "--splits", "3", "--trees", "5",
                             "--group-duplicates", "0.99"])
    assert ok.exit_code == 0, ok.output
    assert "12 group(s) of 24 images (largest 2) kept on one side of every split" in ok.output
    bad = runner.invoke(app, ["train", "--features", "r", "--group-duplicates", "1.5"])
    assert bad.exit_code == 2 and "threshold is a cosine similarity" in bad.output
    lonely = runner.invoke(app, ["train", "--features", "r", "--group-features", "c"])
    assert lonely.exit_code == 2 and "needs --group-duplicates" in lonely.output
    sql = runner.invoke(app, ["sql", "SELECT COUNT(*) AS n FROM run_split_images WHERE run_id = 1", "--format",
                              "csv"])
    # Every split's test images are stored: as many rows as the splits' test parts, whole groups of about
    # ceil(0.1 x 36) = 4 images each (how many exactly depends on scikit-learn's group shuffling).
    assert sql.exit_code == 0, sql.output
    stored = int(sql.output.split()[1])
    n_test = runner.invoke(app, ["sql", "SELECT SUM(n_test) AS n FROM run_splits WHERE run_id = 1", "--format", "csv"])
    assert n_test.exit_code == 0 and stored == int(n_test.output.split()[1]), (sql.output, n_test.output)
    assert 3 * 3 <= stored <= 3 * 5, sql.output


def test_class_inside_one_group_is_reported_by_the_run(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    rows = store.select_images()
    shirts = [r[0] for r in rows if r[2] == "shirt"]
    with store.writing():
        same = store.ensure_feature_set(FeatureSpec("same", "cnn", 2, {}))
        vecs = np.array([[1.0, 0.0] if r[2] == "shirt" else [np.cos(i), np.sin(i)] for i, r in enumerate(rows)])
        store.append_vectors(same, [r[0] for r in rows], vecs.astype(np.float32))
        out = train(store, TrainConfig(["r"], n_splits=3, trees=5, group_duplicates=0.9999, group_features="same"),
                    fit_final=False)
    assert out.grouping is not None and out.grouping.unsplittable == ("shirt",)
    assert out.grouping.largest >= len(shirts) and out.split_scheme == "group"
    assert out.n_images == len(rows)  # reported, not dropped
    store.close()
    cli = runner.invoke(app, ["evaluate", "--features", "r", "--splits", "3", "--trees", "5",
                              "--group-duplicates", "0.9999", "--group-features", "same"])
    assert cli.exit_code == 0, cli.output
    assert "1 class(es) lie in a single near-duplicate group" in cli.output and "shirt" in cli.output


def test_grouping_without_index_respects_the_memory_budget(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    store.settings = store.settings.replace(search_memory_mb=0)
    ids = [r[0] for r in store.select_images()]
    with raises_cli(FeatureStoreError, match="search memory budget .* `fs index build --features c`"):
        group_near_duplicates(store, "c", ids, 0.95)
