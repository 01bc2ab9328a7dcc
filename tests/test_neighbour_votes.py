"""Out-of-fold neighbour votes (issue 24): kept by K-fold runs, averaged into `fs audit labels`."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sqlalchemy import text
from test_folds_audit import kstore  # noqa: F401  (the fixture: 36 images, 3 of them mislabelled)
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.errors import InvalidInputError
from featurestore.pipelines.labels import audit_labels
from featurestore.pipelines.train import TrainConfig, get_run, train
from featurestore.store import Store
from featurestore.training import neighbours as nb
from featurestore.training.evaluation import make_folds
from featurestore.training.label_issues import judged_probabilities
from helpers import raises_cli

runner = CliRunner()


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["a", "b", "c"]), 20)
    centers = {"a": 0, "b": 1, "c": 2}
    first = np.stack([np.eye(3)[centers[v]] * 3 + rng.normal(scale=0.8, size=3) for v in y])
    second = rng.normal(size=(len(y), 5)) * 1000.0  # wide scale: must not outweigh the first block
    return np.hstack([first, second]), y, {"first": (0, 3), "second": (3, 8)}


def test_votes_equal_a_brute_force_search_of_each_training_part() -> None:
    X, y, blocks = _data()
    splits, _ = make_folds(y, 4, seed=1)
    classes = ["a", "b", "c"]
    votes = nb.neighbour_votes(X, y, splits, classes, k=5, blocks=blocks)
    assert votes.shape == (60, 3) and np.allclose(votes.sum(axis=1), 1.0)
    Z = nb.unit_blocks(X, blocks)
    for train_rows, test_rows in splits:
        search = NearestNeighbors(n_neighbors=5, metric="cosine").fit(Z[train_rows])
        _, near = search.kneighbors(Z[test_rows])
        for row, hits in zip(test_rows, near, strict=True):
            counts = np.array([(y[train_rows][hits] == c).sum() for c in classes])
            assert np.allclose(votes[row], counts / 5)


def test_unit_blocks_weigh_each_feature_set_equally() -> None:
    X, _, blocks = _data()
    Z = nb.unit_blocks(X, blocks)
    assert Z.dtype == np.float32
    assert np.allclose(np.linalg.norm(Z[:, :3], axis=1), np.sqrt(0.5), atol=1e-6)
    assert np.allclose(np.linalg.norm(Z[:, 3:], axis=1), np.sqrt(0.5), atol=1e-6)
    zero = nb.unit_blocks(np.zeros((2, 4)), {"z": (0, 4)})  # a zero vector stays zero, no NaN
    assert np.array_equal(zero, np.zeros((2, 4), dtype=np.float32))


def test_own_label_never_votes_and_chunks_do_not_change_votes(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, blocks = _data()
    y = y.copy()
    y[0] = "c"  # a mislabelled "a": its own label must not count, its neighbours say "a"
    splits, _ = make_folds(y, 3, seed=0)
    whole = nb.neighbour_votes(X, y, splits, ["a", "b", "c"], k=3, blocks=blocks)
    assert whole[0].tolist() == [1.0, 0.0, 0.0]
    monkeypatch.setattr(nb, "CHUNK_BYTES", 64)  # one test row per chunk
    ticks: list[tuple[int, int]] = []
    chunked = nb.neighbour_votes(X, y, splits, ["a", "b", "c"], k=3, blocks=blocks,
                                 progress=lambda d, t: ticks.append((d, t)))
    assert np.array_equal(whole, chunked)
    assert ticks[-1] == (60, 60) and len(ticks) == 60


def test_votes_refuse_bad_input() -> None:
    X, y, blocks = _data()
    splits, _ = make_folds(y, 3, seed=0)
    with raises_cli(InvalidInputError, match="--neighbours must be at least 1"):
        nb.neighbour_votes(X, y, splits, ["a", "b", "c"], k=0)
    with pytest.raises(InvalidInputError, match="not among the classes"):
        nb.neighbour_votes(X, y, splits, ["a", "b"], k=3)
    with raises_cli(InvalidInputError, match="--neighbour-weight must be between 0 and 1, got 1.5"):
        judged_probabilities(np.full((2, 2), 0.5), np.full((2, 2), 0.5), 1.5)
    with pytest.raises(InvalidInputError, match="do not match"):
        judged_probabilities(np.full((2, 2), 0.5), np.full((3, 2), 0.5), 0.5)
    assert np.allclose(judged_probabilities(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 0.25), [[0.75, 0.25]])


def test_neighbours_need_folds_and_zero_keeps_none(kstore: Store) -> None:  # noqa: F811
    cfg = TrainConfig(["a", "b"], classifier="logreg", trees=30, neighbours=5)
    with raises_cli(InvalidInputError, match="--neighbours needs --folds K"):
        cfg.check()
    with raises_cli(InvalidInputError, match="--neighbours must be 0"):
        TrainConfig(["a"], folds=3, neighbours=-1).check()
    with kstore.writing():
        kept = train(kstore, TrainConfig(["a", "b"], classifier="logreg", folds=3, neighbours=4),
                     fit_final=False).run_id
        none = train(kstore, TrainConfig(["a", "b"], classifier="logreg", folds=3, neighbours=0),
                     fit_final=False).run_id
    oof = kstore.catalog.run_oof(kept)
    assert oof is not None and oof.neighbours is not None
    assert np.allclose(oof.neighbours * 4, np.round(oof.neighbours * 4))  # fractions of 4 votes
    assert (get_run(kstore, kept).oof_neighbours, get_run(kstore, none).oof_neighbours) == (4, None)
    with kstore.catalog.engine.connect() as conn:  # SQL-readable, NULL without votes
        nulls = conn.execute(text("SELECT count(*) FROM run_oof WHERE run_id = :r AND neighbours IS NULL"),
                             {"r": none}).scalar()
    assert nulls == 36
    assert kstore.catalog.run_oof(none).neighbours is None  # type: ignore[union-attr]
    assert audit_labels(kstore, none).neighbour_weight == 0.0
    assert audit_labels(kstore, kept, neighbour_weight=0.3).neighbour_weight == 0.3


def test_cli_neighbours_and_neighbour_weight(kstore: Store) -> None:  # noqa: F811
    result = runner.invoke(app, ["evaluate", "--features", "a", "--classifier", "logreg", "--folds", "3",
                                 "--neighbours", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    run = max(r.id for r in kstore.catalog.runs())
    oof = kstore.catalog.run_oof(run)
    assert oof is not None and oof.neighbours is not None
    assert np.allclose(oof.neighbours * 3, np.round(oof.neighbours * 3))  # --neighbours 3 reached the run
    result = runner.invoke(app, ["audit", "labels", "--run", str(run), "--neighbour-weight", "0.25",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"neighbour_weight": 0.25' in result.output
    assert "neighbour votes, weight 0.25" in result.output
    bad = runner.invoke(app, ["evaluate", "--features", "a", "--neighbours", "3"])
    assert bad.exit_code == 2 and "--neighbours needs --folds K" in bad.output
