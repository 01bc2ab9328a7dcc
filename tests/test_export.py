"""Parquet exports (`fs export features|predictions`) and FeatureSetHandle.to_arrow, read back with pyarrow, DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import featurestore.arrow as arrow_mod
from featurestore.cli.main import app
from featurestore.features.base import FeatureSpec
from featurestore.features.projection import projection_extractor
from featurestore.io.atomic import is_temp
from featurestore.pipelines.export import export_features, export_predictions
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.predict import predict
from featurestore.pipelines.train import TrainConfig, train
from featurestore.shards import read_span_rows, write_shard
from featurestore.store import Store

runner = CliRunner()


def _two_sets(store: Store, tree: Path) -> tuple[list[int], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Ingest (sandals also in dataset 'extra'); set a in two shuffled shards, b in one reversed shard
    that lacks the first image."""
    with store.writing():
        ingest(store, tree, dataset="shoes")
        ingest(store, tree / "footwear" / "sandal", dataset="extra")
    ids = [r[0] for r in store.select_images()]
    rng = np.random.default_rng(0)
    va = {i: rng.normal(size=4).astype(np.float32) for i in ids}
    vb = {i: rng.normal(size=3).astype(np.float32) for i in ids}
    with store.writing():
        a = store.ensure_feature_set(FeatureSpec("a", "test", 4, {"p": 1}))
        b = store.ensure_feature_set(FeatureSpec("b", "test", 3, {}))
        odd, even = ids[1::2][::-1], ids[::2]
        store.append_vectors(a, odd, np.stack([va[i] for i in odd]))
        store.append_vectors(a, even, np.stack([va[i] for i in even]))
        rest = ids[1:][::-1]
        store.append_vectors(b, rest, np.stack([vb[i] for i in rest]))
    return ids, va, vb


def test_features_export_is_aligned_and_readable_by_pyarrow_and_duckdb(store: Store, image_tree: Path,
                                                                        tmp_path: Path) -> None:
    ids, va, vb = _two_sets(store, image_tree)
    dest = tmp_path / "out" / "vectors.parquet"
    summary = export_features(store, ["a", "b"], dest, batch_rows=5)
    assert summary.rows == len(ids) - 1 and summary.lacking == {"a": 0, "b": 1}
    assert summary.row_groups == pq.ParquetFile(dest).metadata.num_row_groups == 3  # 11 rows by 5

    table = pq.read_table(dest)
    assert table.column_names == ["image_id", "sha256", "label", "superclass", "datasets", "a", "b"]
    assert table.schema.field("a").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("b").type == pa.list_(pa.float32(), 3)
    got = table.column("image_id").to_pylist()
    assert got == ids[1:]
    a = np.asarray(table.column("a").combine_chunks().flatten()).reshape(-1, 4)
    b = np.asarray(table.column("b").combine_chunks().flatten()).reshape(-1, 3)
    np.testing.assert_array_equal(a, np.stack([va[i] for i in got]))
    np.testing.assert_array_equal(b, np.stack([vb[i] for i in got]))
    meta = json.loads(table.schema.metadata[b"featurestore"])
    assert meta["feature_sets"]["a"] == {"kind": "test", "dim": 4, "params": {"p": 1}}
    rows = {r["image_id"]: r for r in table.to_pylist()}
    labels = {i: (lb, sc) for i, _, lb, sc in store.select_images()}
    for i, r in rows.items():
        assert (r["label"], r["superclass"]) == labels[i]
        assert r["datasets"] == (["extra", "shoes"] if r["label"] == "sandal" else ["shoes"])
        assert len(r["sha256"]) == 64

    con = duckdb.connect()
    n, sandals = con.execute(f"SELECT count(*), count(*) FILTER (WHERE list_contains(datasets, 'extra')) "
                             f"FROM read_parquet('{dest}')").fetchone()
    assert (n, sandals) == (len(ids) - 1, sum(r["label"] == "sandal" for r in rows.values()))
    first = con.execute(f"SELECT image_id, a[1], b[3] FROM read_parquet('{dest}') ORDER BY image_id LIMIT 1"
                        ).fetchone()
    assert first[0] == ids[1]
    assert first[1] == pytest.approx(float(va[ids[1]][0])) and first[2] == pytest.approx(float(vb[ids[1]][2]))


def test_dataset_and_where_select_the_rows(store: Store, image_tree: Path, tmp_path: Path) -> None:
    _two_sets(store, image_tree)
    by_ds = export_features(store, ["a"], tmp_path / "x.parquet", dataset="extra")
    assert pq.read_table(by_ds.path).column("label").to_pylist() == ["sandal"] * 4
    by_where = export_features(store, ["a"], tmp_path / "y.parquet", where="label = 'shirt' OR dataset = 'extra'")
    assert sorted(set(pq.read_table(by_where.path).column("label").to_pylist())) == ["sandal", "shirt"]
    assert by_where.rows == 8
    none = export_features(store, ["a"], tmp_path / "z.parquet", where="label = 'boot'")
    assert none.rows == 0 and pq.read_table(none.path).num_rows == 0


def test_to_arrow_matches_read(store: Store, image_tree: Path) -> None:
    _two_sets(store, image_tree)
    table = store.feature_set("b").to_arrow()
    ids, vecs = store.feature_set("b").read(store.feature_set("b").read()[0].tolist())
    assert table.column("image_id").to_pylist() == ids.tolist()
    np.testing.assert_array_equal(np.asarray(table.column("b").combine_chunks().flatten()).reshape(-1, 3), vecs)
    shirts = store.feature_set("a").to_arrow(where="label = 'shirt'")
    assert shirts.num_rows == 4 and set(shirts.column("label").to_pylist()) == {"shirt"}


def test_read_span_rows_reads_scattered_rows_in_windows(tmp_path: Path) -> None:
    mat = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    path = write_shard(tmp_path, "s", "test", {}, np.arange(200), mat)
    rows = np.array([0, 1, 7, 64, 65, 130, 199])
    np.testing.assert_array_equal(read_span_rows(path, rows, window=16), mat[rows])
    np.testing.assert_array_equal(read_span_rows(path, rows, window=1), mat[rows])
    assert read_span_rows(path, np.array([], dtype=np.int64)).shape == (0, 3)


def test_failed_export_leaves_the_old_file_and_no_temp(store: Store, image_tree: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _two_sets(store, image_tree)
    dest = tmp_path / "v.parquet"
    dest.write_bytes(b"old")
    real = arrow_mod.feature_batches

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        batches = real(*args, **kwargs)
        yield next(batches)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(arrow_mod, "feature_batches", broken)
    with pytest.raises(OSError):
        export_features(store, ["a"], dest, batch_rows=2)
    assert dest.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if is_temp(p)]


def test_predictions_export(store: Store, image_tree: Path, tmp_path: Path) -> None:
    with store.writing():
        ingest(store, image_tree, dataset="shoes")
        extract(store, [projection_extractor(store, 16, (32, 24))])
        run = train(store, TrainConfig(["rp16"], n_splits=2, trees=5)).run_id
        ids = [r[0] for r in store.select_images()]
        predict(store, run, ids[:7])
    summary = export_predictions(store, run, tmp_path / "p.parquet", batch_rows=3)
    assert (summary.rows, summary.row_groups) == (7, 3)
    table = pq.read_table(summary.path)
    assert table.column("image_id").to_pylist() == ids[:7]
    assert set(table.column("run_id").to_pylist()) == {run}
    first = table.slice(0, 1).to_pylist()[0]
    assert first["top5"][0] == {"label": first["predicted"], "probability": pytest.approx(first["probability"])}
    con = duckdb.connect()
    hits = con.execute(f"SELECT count(*) FILTER (WHERE predicted = label), count(*), min(len(top5)) "
                       f"FROM read_parquet('{summary.path}')").fetchone()
    stored = sum(r["predicted"] == r["label"] for r in table.to_pylist())
    assert hits == (stored, 7, 3)  # three classes: the top-5 holds all three


def _fs(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_cli_export_and_its_errors(image_tree: Path, tmp_path: Path) -> None:
    assert _fs("ingest", str(image_tree)).exit_code == 0
    assert _fs("extract", "--rp", "8", "--size", "32x24").exit_code == 0
    result = _fs("export", "features", "rp8", str(tmp_path / "v.parquet"), "--where", "label = 'sneaker'")
    assert result.exit_code == 0, result.output
    assert "4 rows of rp8" in result.output
    assert pq.read_table(tmp_path / "v.parquet").num_rows == 4

    unknown = _fs("export", "features", "rp8,nope", str(tmp_path / "w.parquet"))
    assert unknown.exit_code == 1 and "Error: unknown feature set 'nope'" in unknown.output
    assert not (tmp_path / "w.parquet").exists()
    folder = _fs("export", "features", "rp8", str(tmp_path))
    assert folder.exit_code == 1 and "is a folder" in folder.output
    bad_where = _fs("export", "features", "rp8", str(tmp_path / "w.parquet"), "--where", "label = ")
    assert bad_where.exit_code == 1 and "Error: bad --where condition" in bad_where.output
    no_run = _fs("export", "predictions", "--run", "9", str(tmp_path / "p.parquet"))
    assert no_run.exit_code == 1 and "Error: unknown run '9'" in no_run.output
    assert _fs("export", "predictions", "--run", "0", str(tmp_path / "p.parquet")).exit_code == 2
    for cmd in (["export"], ["export", "features"], ["export", "predictions"]):
        helped = _fs(*cmd, "--help")
        assert helped.exit_code == 0 and "Usage" in helped.output
