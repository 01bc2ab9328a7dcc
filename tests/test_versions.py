"""Feature-set versions (issue 26 item 5): `--replace` keeps the old vectors, `--version N` reads them,
runs pin the version they read, `fs gc` deletes old versions crash-safely."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from typer.testing import CliRunner

from featurestore.catalog import database
from featurestore.catalog import feature_versions as fv
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.predict import predict
from featurestore.pipelines.train import TrainConfig, train
from featurestore.pipelines.versions import gc, list_versions
from featurestore.store import Store
from helpers import brute, make_image

runner = CliRunner()
CLASSES = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]


def _replace(store: Store, name: str, params: dict, vectors: np.ndarray, ids: list[int]) -> None:
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec(name, "test", vectors.shape[1], params), replace=True)
        store.append_vectors(fs, ids, vectors)


@pytest.fixture
def versioned(store: Store, tmp_path: Path) -> tuple[Store, list[int], np.ndarray, np.ndarray]:
    """30 labelled images; set "a" version 1 (informative vectors) replaced by version 2 (other vectors)."""
    seed = 0
    for sc, cls in CLASSES:
        for k in range(10):
            make_image(tmp_path / "imgs" / sc / cls / f"{k}.png", size=(16, 12), seed=seed)
            seed += 1
    with store.writing():
        ingest(store, tmp_path / "imgs")
    rows = store.select_images()
    ids = [r[0] for r in rows]
    rng = np.random.default_rng(0)
    centers = {cls: rng.normal(scale=4, size=6) for _, cls in CLASSES}
    v1 = np.stack([centers[r[2]] + rng.normal(size=6) for r in rows]).astype(np.float32)
    v2 = rng.normal(size=(len(rows), 6)).astype(np.float32)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("a", "test", 6, {"v": 1}))
        store.append_vectors(fs, ids, v1)
    _replace(store, "a", {"v": 2}, v2, ids)
    return store, ids, v1, v2


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(["a"], n_splits=3, trees=20, **kw)  # type: ignore[arg-type]


def test_replace_keeps_the_old_version(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    np.testing.assert_array_equal(store.read_matrix(["a"]).X, v2)  # the newest by default
    old = store.read_matrix(["a"], version=1)
    np.testing.assert_array_equal(old.X, v1)
    assert old.blocks == {"a": (0, 6)} and old.image_ids.tolist() == ids
    np.testing.assert_array_equal(store.read_matrix(["a"], version={"a": 2}).X, v2)
    assert store.feature_set("a", 1).params == {"v": 1} and store.feature_set("a").params == {"v": 2}
    # the old shard stays on disk, registered to version 1; listings show the set once
    assert len(list((store.root / "features" / "a").glob("*.h5"))) == 2
    with store.writing():
        pass  # the orphan sweep keeps it
    assert len(list((store.root / "features" / "a").glob("*.h5"))) == 2
    assert [fs.name for fs in store.feature_sets()] == ["a"]
    assert [row[0] for row in store.coverage()] == ["a"]
    found = list_versions(store, "a")
    assert [(v.version, v.latest, v.rows, v.params) for v in found] == [(1, False, 30, {"v": 1}),
                                                                        (2, True, 30, {"v": 2})]
    with pytest.raises(fv.VersionNotFoundError, match=r"'a' has no version 3; its versions: 1, 2"):
        store.read_matrix(["a"], version=3)


def test_cli_versions_list_and_errors(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, _, _ = versioned
    store.close()
    table = runner.invoke(app, ["versions", "a"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:7] == ["version", "latest", "created", "kind", "dim", "rows", "runtime"]
    assert lines[2].split()[0] == "1" and lines[3].split()[:2] == ["2", "yes"]
    got = json.loads(runner.invoke(app, ["versions", "a", "--format", "json"]).stdout)
    assert [(v["version"], v["latest"], v["rows"], v["params"], v["runs"]) for v in got] == [
        (1, False, 30, {"v": 1}, []), (2, True, 30, {"v": 2}, [])]
    missing = runner.invoke(app, ["versions", "nope"])
    assert missing.exit_code == 1 and "unknown feature set 'nope'" in missing.stderr
    for args in (["search", "--features", "a", "--id", str(ids[0]), "--version", "7"],
                 ["train", "--features", "a", "--version", "7"],
                 ["export", "features", "a", "x.parquet", "--version", "7"]):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 1, (args, bad.output)
        assert bad.stderr.strip().splitlines() == ["Error: feature set 'a' has no version 7; its versions: 1, 2 "
                                                   "(see `fs versions a`)"]
    assert runner.invoke(app, ["train", "--features", "a", "--version", "x=0"]).exit_code == 2
    helped = runner.invoke(app, ["versions", "--help"])
    assert helped.exit_code == 0 and "Example: fs versions" in helped.stdout
    assert "Example: fs gc" in runner.invoke(app, ["gc", "--help"]).stdout


def test_search_reads_the_asked_version(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    store.close()
    arr = np.asarray(ids)
    want1, _ = brute(v1[0], arr, v1, 5, "cosine", exclude=[ids[0]])
    want2, _ = brute(v2[0], arr, v2, 5, "cosine", exclude=[ids[0]])
    assert want1 != want2
    for version, want in ((["--version", "1"], want1), ([], want2)):
        r = runner.invoke(app, ["search", "--features", "a", "--id", str(ids[0]), "-k", "5", "-f", "json", *version])
        assert r.exit_code == 0, r.output
        assert [hit["image_id"] for hit in json.loads(r.stdout)] == want


def test_train_evaluate_export_record_and_read_the_version(versioned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    store, ids, v1, v2 = versioned
    store.close()
    r = runner.invoke(app, ["train", "--features", "a", "--version", "1", "--splits", "3", "--trees", "20",
                            "-f", "json"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["evaluate", "--features", "a", "--version", "a=1", "--splits", "3",
                               "--trees", "20"]).exit_code == 0
    assert runner.invoke(app, ["train", "--features", "a", "--splits", "3", "--trees", "20"]).exit_code == 0
    runs = json.loads(runner.invoke(app, ["runs", "-f", "json"]).stdout)
    assert [(x["run"], x["versions"]) for x in runs] == [(1, "a=v1"), (2, "a=v1"), (3, "a=v2")]
    with Store.open(Settings.from_env()) as s:
        assert s.catalog.run_pins([1, 2, 3]) == {1: {"a": 1}, 2: {"a": 1}, 3: {"a": 2}}
        assert s.catalog.run(1).feature_params["a"]["params"] == {"v": 1}
        assert s.catalog.run(3).feature_params["a"]["params"] == {"v": 2}
    listed = json.loads(runner.invoke(app, ["versions", "a", "-f", "json"]).stdout)
    assert [v["runs"] for v in listed] == [[1, 2], [3]]
    for version, want in ((["--version", "1"], v1), ([], v2)):
        dest = tmp_path / f"out{len(version)}.parquet"
        e = runner.invoke(app, ["export", "features", "a", str(dest), *version])
        assert e.exit_code == 0, e.output
        table = pq.read_table(dest)
        assert table.column_names[-1] == "a" and table.column("image_id").to_pylist() == ids
        np.testing.assert_array_equal(np.array(table.column("a").to_pylist(), dtype=np.float32), want)
        meta = json.loads(table.schema.metadata[b"featurestore"])
        assert meta["feature_sets"]["a"].get("version") == (1 if version else None)
    with Store.open(Settings.from_env()) as s:  # the Python API: the column keeps the set's name
        old = s.feature_set("a", version=1).to_arrow()
        assert old.column_names[-1] == "a"
        np.testing.assert_array_equal(np.array(old.column("a").to_pylist(), dtype=np.float32), v1)


def test_predict_uses_the_version_the_run_read(versioned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    with store.writing():
        out = train(store, _cfg(versions=1))
    model = store.run_model(store.catalog.run(out.run_id))
    on_v1 = np.asarray(model.classes_)[np.argmax(model.predict_proba(v1), axis=1)]
    on_v2 = np.asarray(model.classes_)[np.argmax(model.predict_proba(v2), axis=1)]
    assert (on_v1 != on_v2).any()  # the versions tell apart which one predict read
    _replace(store, "a", {"v": 3}, v2 + 1, ids)  # a third version: the run still reads version 1
    with store.writing():
        got = predict(store, out.run_id, ids)
    assert [row["label"] for row in got.rows] == on_v1.tolist()
    # an image without a version-1 vector cannot be added to an old version: refused, nothing written
    make_image(tmp_path / "new" / "x.png", size=(16, 12), seed=99)
    with store.writing():
        ingest(store, tmp_path / "new", dataset="new")
        new_id = max(r[0] for r in store.select_images())
        with pytest.raises(FeatureStoreError, match=r"older version of a \(kept as a@v1\), and 1 image\(s\) lack"):
            predict(store, out.run_id, [new_id])


def test_gc_keep_dry_run_and_force(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    _replace(store, "a", {"v": 3}, v2 + 1, ids)  # versions 1, 2, 3
    with store.writing():
        run_id = train(store, _cfg(versions=1)).run_id
    shards = {v.version: [store.root / p for p in _shard_paths(store, v.stored_as)] for v in list_versions(store, "a")}
    store.close()
    kept = runner.invoke(app, ["gc", "--keep", "3", "--dry-run"])
    assert kept.exit_code == 0 and "would delete 0 version(s), kept 0" in kept.stderr
    dry = runner.invoke(app, ["gc", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete a version 2 (30 rows, 1 shard(s))" in dry.stderr
    assert f"kept a version 1: read by run(s) {run_id} (--force deletes it)" in dry.stderr
    assert all(p.exists() for paths in shards.values() for p in paths)
    assert _listed() == [1, 2, 3]
    done = runner.invoke(app, ["gc"])
    assert done.exit_code == 0, done.output
    assert "deleted 1 version(s), kept 1 that runs read, 1 shard file(s) removed" in done.stderr
    assert _listed() == [1, 3] and not any(p.exists() for p in shards[2])
    assert all(p.exists() for p in shards[1] + shards[3])
    assert runner.invoke(app, ["gc", "--keep", "0"]).exit_code == 2
    forced = runner.invoke(app, ["gc", "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"deleted a version 1 (30 rows, 1 shard(s)); runs {run_id} lose it" in forced.stderr
    assert f"run(s) {run_id} can no longer be reproduced" in forced.stderr
    assert _listed() == [3] and not any(p.exists() for p in shards[1])
    with Store.open(Settings.from_env()) as s:
        np.testing.assert_array_equal(s.read_matrix(["a"]).X, v2 + 1)  # the newest is untouched
        with s.writing(), pytest.raises(FeatureStoreError, match=r"version 1 of feature set a, which was deleted"):
            predict(s, run_id, ids)
    again = runner.invoke(app, ["gc", "--force"])
    assert again.exit_code == 0 and "deleted 0 version(s)" in again.stderr


def _listed() -> list[int]:
    r = runner.invoke(app, ["versions", "a", "-f", "json"])
    assert r.exit_code == 0, r.output
    return [v["version"] for v in json.loads(r.stdout)]


def _shard_paths(store: Store, stored_as: str) -> list[str]:
    return [sh.path for sh in store.catalog.shards(store.feature_set(stored_as).id)]


GC_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from featurestore.config import Settings
    from featurestore.pipelines.versions import gc
    from featurestore.store import Store
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    Store._discard_files = die  # the catalog has committed; the old files are not deleted yet
    store = Store.open(Settings.from_env(store=Path(sys.argv[1])))
    gc(store)
    """
)


def test_gc_killed_between_catalog_and_files(versioned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    old = [store.root / p for p in _shard_paths(store, "a@v1")]
    root = store.root
    store.close()
    script = tmp_path / "gc_killed.py"
    script.write_text(GC_KILLED)
    proc = subprocess.run([sys.executable, str(script), str(root)], env={**os.environ,
                          "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with Store.open(Settings.from_env(store=root)) as s:
        # the catalog forgot version 1; its file is an orphan no row points at, until the next writer
        assert [v.version for v in list_versions(s, "a")] == [2]
        assert old and all(p.exists() for p in old)
        np.testing.assert_array_equal(s.read_matrix(["a"]).X, v2)
        plan = gc(s)  # the next run: nothing left to delete in the catalog, and its sweep removes the files
        assert plan.delete == () and not any(p.exists() for p in old)
        np.testing.assert_array_equal(s.read_matrix(["a"]).X, v2)


def test_migration_gives_existing_sets_and_runs_version_1(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("b", "test", 2, {}))
        store.append_vectors(fs, ids, np.ones((len(ids), 2), dtype=np.float32))
        run_id = train(store, TrainConfig(["b"], n_splits=3, trees=5)).run_id
    gc(store, force=True)  # a store as 0013 could hold it: one version of each set
    url = store.settings.catalog_url
    store.close()
    cfg = database.alembic_config(url)
    command.downgrade(cfg, "0013")
    engine = database.make_engine(url)
    try:
        before, after = database.upgrade(engine, url)
        assert (before, after) == ("0013", database.head_revision(url))
        command.check(cfg)
    finally:
        engine.dispose()
    with Store.open(Settings.from_env(store=store.root)) as s:
        assert [(v.name, v.version, v.latest, v.rows) for v in s.catalog.list_versions()] == [
            ("a", 1, True, 30), ("b", 1, True, 30)]
        assert s.catalog.run_pins([run_id]) == {run_id: {"b": 1}}
        _replace(s, "a", {"v": 9}, v1, ids)  # a replace after the migration numbers on from 1
        assert [v.version for v in list_versions(s, "a")] == [1, 2]
        np.testing.assert_array_equal(s.read_matrix(["a"], version=1).X, v2)


def test_group_duplicates_compare_the_version_read(versioned) -> None:  # type: ignore[no-untyped-def]
    store, ids, v1, v2 = versioned
    with store.writing():
        old = train(store, _cfg(versions=1, group_duplicates=0.99, group_features="a"), fit_final=False)
        new = train(store, _cfg(group_duplicates=0.99, group_features="a"), fit_final=False)
    assert store.catalog.run(old.run_id).group_features == "a@v1"  # the version-1 vectors were compared
    assert store.catalog.run(new.run_id).group_features == "a"


def test_upload_prediction_refused_for_a_run_on_an_older_version(versioned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    from featurestore.io.images import decode_bytes
    from featurestore.pipelines.predict import predict_upload

    store, ids, v1, v2 = versioned
    with store.writing():
        run_id = train(store, _cfg(versions=1)).run_id
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, format="PNG")
    with pytest.raises(FeatureStoreError, match=r"older version of a \(kept as a@v1\)"):
        predict_upload(store, run_id, decode_bytes(buf.getvalue()), buf.getvalue(), keep=True)
    assert len(store.select_images()) == len(ids)  # nothing stored


def test_replace_with_the_same_params_still_predicts_new_images(versioned) -> None:  # type: ignore[no-untyped-def]
    """`--replace` that only recomputed (same params, e.g. to add checksums): a run on the older version reads
    its own vectors, and an image that version lacks takes the newest version's."""
    from sqlalchemy import delete

    from featurestore.catalog.schema import FeatureRow

    store, ids, v1, v2 = versioned
    with store.writing():
        out = train(store, _cfg())  # reads version 2 ({"v": 2})
    v3 = np.full((len(ids) - 1, 6), 5, dtype=np.float32)
    _replace(store, "a", {"v": 2}, v3, ids[:-1])  # version 3: same params, other vectors, one image fewer
    model = store.run_model(store.catalog.run(out.run_id))

    def top(X: np.ndarray) -> list[float]:
        return np.max(model.predict_proba(X), axis=1).tolist()

    with store.writing():
        got = predict(store, out.run_id, ids)
    assert [r["probability"] for r in got.rows] == pytest.approx(top(v2))  # the run's own version 2
    with store.session() as s:  # image 0 loses its version-2 vector: it takes version 3's
        s.execute(delete(FeatureRow).where(FeatureRow.feature_set_id == store.feature_set("a", 2).id,
                                           FeatureRow.image_id == ids[0]))
    mixed = v2.copy()
    mixed[0] = v3[0]
    assert top(mixed)[0] != pytest.approx(top(v2)[0])  # the two versions tell apart which was read
    with store.writing():
        got = predict(store, out.run_id, ids)
    assert [r["image_id"] for r in got.rows] == ids
    assert [r["probability"] for r in got.rows] == pytest.approx(top(mixed))


def test_cli_extract_replace_end_to_end(image_tree: Path, tmp_path: Path) -> None:
    """The real path: `fs extract --rp --replace` keeps version 1 (shards and projection), runs pin it."""
    def ok(*args: str) -> str:
        r = runner.invoke(app, list(args))
        assert r.exit_code == 0, (args, r.output)
        return r.stdout

    ok("ingest", str(image_tree))
    ok("extract", "--rp", "16", "--size", "32x24")
    assert json.loads(ok("train", "--features", "rp16", "--splits", "2", "--test-size", "0.25", "--trees", "5",
                         "-f", "json"))["run"] == 1
    replaced = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--seed", "9", "--replace"])
    assert replaced.exit_code == 0 and "rp16: 12 vectors written" in replaced.output
    got = json.loads(ok("versions", "rp16", "-f", "json"))
    assert [(v["version"], v["params"]["seed"], v["rows"], v["runs"]) for v in got] == [(1, 0, 12, [1]),
                                                                                      (2, 9, 12, [])]
    assert len(list((tmp_path / ".fs" / "projections").glob("rp16-*.npz"))) == 2  # both projections stay
    with Store.open(Settings.from_env()) as s:
        assert [fs.name for fs in s.feature_sets()] == ["rp16"]
        old = s.read_matrix(["rp16"], version=1)
        assert not np.allclose(old.X, s.read_matrix(["rp16"]).X)
    want, _ = brute(old.X[0], old.image_ids, old.X, 3, "cosine", exclude=[int(old.image_ids[0])])
    hits = json.loads(ok("search", "--features", "rp16", "--id", str(old.image_ids[0]), "-k", "3", "--version", "1",
                         "-f", "json"))
    assert [h["image_id"] for h in hits] == want
    assert len(json.loads(ok("predict", "--run", "1", "--dataset", "shoes", "-f", "json", "--show", "100"))) == 12
    new = make_image(tmp_path / "new" / "n.png", seed=77)
    refused = runner.invoke(app, ["predict", "--run", "1", str(new)])
    assert refused.exit_code == 1
    assert "run 1 was trained on an older version of rp16 (kept as rp16@v1)" in refused.stderr
    assert "would delete 0 version(s), kept 1 that runs read" in runner.invoke(app, ["gc", "--dry-run"]).stderr
    ok("gc", "--force")
    gone = runner.invoke(app, ["predict", "--run", "1", "--dataset", "shoes"])
    assert gone.exit_code == 1 and "version 1 of feature set rp16, which was deleted" in gone.stderr
