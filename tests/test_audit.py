"""``fs audit`` (issue 25): leaks across datasets and splits, outliers, bad photos; findings in SQL and the grid."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from featurestore.catalog import repository as q
from featurestore.cli.main import app
from featurestore.errors import InvalidInputError
from featurestore.features.base import FeatureSpec
from featurestore.io import quality
from featurestore.pipelines.audit import audit_images, audit_leaks, audit_outliers
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.train import TrainConfig, train
from featurestore.search.outliers import outlier_scores
from featurestore.store import Store
from helpers import ingest_with_near_copies, make_image, raises_cli

runner = CliRunner()


def test_leaks_between_two_datasets_are_listed_stored_and_filterable(store: Store, tmp_path: Path) -> None:
    copy_of = ingest_with_near_copies(store, tmp_path, datasets=("train", "test"))
    rep = audit_leaks(store, 0.99, dataset="train", against="test", feature_set="c")
    assert {(x.a, x.b) for x in rep.leaks} == {(o, c) for c, o in copy_of.items()}
    assert all(x.similarity >= 0.99 and x.a_label == x.b_label for x in rep.leaks)
    assert [x.similarity for x in rep.leaks] == sorted((x.similarity for x in rep.leaks), reverse=True)
    stored = store.catalog.findings(kind="leak")
    assert {(f.image_id, f.other_image_id) for f in stored} == {(x.a, x.b) for x in rep.leaks}
    # both images of a pair show in the grid's finding filter
    page = store.catalog.browse_page(q.ImageFilter(finding="leak"), limit=500)
    assert {t.id for t in page.tiles} == set(copy_of) | set(copy_of.values())
    assert store.catalog.count_images(q.ImageFilter(finding="outlier")) == 0
    with pytest.raises(InvalidInputError, match="unknown finding"):
        store.catalog.count_images(q.ImageFilter(finding="nope"))
    # a second audit replaces the first one's findings instead of adding to them
    again = audit_leaks(store, 0.99, dataset="train", against="test", feature_set="c")
    assert len(store.catalog.findings(kind="leak")) == len(again.leaks) == 12
    inside = audit_leaks(store, 0.99, dataset="train", feature_set="c")
    assert inside.leaks == []  # no two originals are near copies


def test_leaks_across_a_runs_splits_vanish_with_grouping(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path)
    with store.writing():
        plain = train(store, TrainConfig(["r"], n_splits=4, test_size=0.25, trees=5), fit_final=False)
        grouped = train(store, TrainConfig(["r"], n_splits=4, test_size=0.25, trees=5, group_duplicates=0.99,
                                           group_features="c"), fit_final=False)
    leaky = audit_leaks(store, 0.99, run=plain.run_id, feature_set="c")
    assert leaky.leaks and all(x.where.startswith("split ") for x in leaky.leaks)
    assert audit_leaks(store, 0.99, run=grouped.run_id).leaks == []  # the run's grouping set is the default
    with raises_cli(InvalidInputError, match="--dataset A .* or --run R"):
        audit_leaks(store, 0.9)


def test_cli_leaks_formats_and_bad_input(store: Store, tmp_path: Path) -> None:
    ingest_with_near_copies(store, tmp_path, datasets=("train", "test"))
    store.close()
    out = runner.invoke(app, ["audit", "leaks", "--dataset", "train", "--against", "test", "--threshold", "0.99",
                              "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 12 and set(rows[0]) == {"a", "b", "similarity", "a_label", "b_label", "where"}
    assert "12 near-duplicate pair(s) at cosine >= 0.99 in c" in out.stderr  # "c" is the first CNN set
    js = runner.invoke(app, ["audit", "leaks", "--dataset", "train", "--against", "test", "--threshold", "0.99",
                             "--format", "json"])
    assert js.exit_code == 0 and len(json.loads(js.stdout)) == 12
    bad = runner.invoke(app, ["audit", "leaks", "--dataset", "train", "--threshold", "0"])
    assert bad.exit_code == 2 and "near-duplicate threshold" in bad.output
    missing = runner.invoke(app, ["audit", "leaks", "--dataset", "nope", "--threshold", "0.9"])
    assert missing.exit_code == 1 and missing.output.startswith("Error: ") and "Traceback" not in missing.output


def _outlier_store(store: Store, tmp_path: Path) -> tuple[int, int]:
    """3 classes of 15 tight images; returns (a mislabelled one, one far from everything)."""
    seed = 0
    for cls in ("a", "b", "c"):
        for k in range(15):
            make_image(tmp_path / "o" / cls / f"{k}.png", size=(16, 12), seed=seed)
            seed += 1
    with store.writing():
        ingest(store, tmp_path / "o", dataset="o")
    rows = store.select_images()
    rng = np.random.default_rng(0)
    centers = {"a": np.eye(8)[0] * 5, "b": np.eye(8)[1] * 5, "c": np.eye(8)[2] * 5}
    vecs = np.stack([centers[r[2]] + rng.normal(scale=0.3, size=8) for r in rows])
    mislabelled, stranger = rows[3][0], rows[20][0]
    vecs[3] = centers["c"] + rng.normal(scale=0.3, size=8)  # labelled a, looks like c
    vecs[20] = np.eye(8)[7] * 5  # like nothing else
    with store.writing():
        fs_ = store.ensure_feature_set(FeatureSpec("e", "cnn", 8, {}))
        store.append_vectors(fs_, [r[0] for r in rows], vecs.astype(np.float32))
    return mislabelled, stranger


def test_outliers_find_a_mislabelled_and_a_stranger(store: Store, tmp_path: Path) -> None:
    mislabelled, stranger = _outlier_store(store, tmp_path)
    rep = audit_outliers(store, "e", dataset="o", k=5)
    assert {r.image_id for r in rep.rows[:2]} == {mislabelled, stranger}
    assert rep.n_outliers == 2 and all(r.outlier for r in rep.rows[:2]) and not rep.rows[2].outlier
    by_id = {r.image_id: r for r in rep.rows}
    assert by_id[mislabelled].to_class is not None and by_id[mislabelled].to_class > rep.fence_class
    assert by_id[mislabelled].to_all < rep.fence_all  # it has neighbours: those of class c
    assert by_id[stranger].to_all > rep.fence_all
    assert [r.score for r in rep.rows] == sorted((r.score for r in rep.rows), reverse=True)
    page = store.catalog.browse_page(q.ImageFilter(finding="outlier", dataset="o"))
    assert {t.id for t in page.tiles} == {mislabelled, stranger}
    store.close()
    out = runner.invoke(app, ["audit", "outliers", "--features", "e", "--k", "5", "--format", "json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)) == 45 and "2 outlier(s) of 45 images in e (k=5" in out.stderr
    make_image(tmp_path / "late" / "a" / "new.png", seed=999)
    runner.invoke(app, ["ingest", str(tmp_path / "late")])
    lacking = runner.invoke(app, ["audit", "outliers", "--features", "e"])
    assert lacking.exit_code == 1 and "1 image(s) lack e: run `fs extract" in lacking.output
    skipped = runner.invoke(app, ["audit", "outliers", "--features", "e", "--skip-missing"])
    assert skipped.exit_code == 0 and "of 45 images" in skipped.stderr


def test_outlier_scores_definition() -> None:
    rng = np.random.default_rng(1)
    mat = rng.normal(size=(30, 4))
    s = outlier_scores(np.arange(30), mat, np.array(["x"] * 30, dtype=object), k=3)
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    expected = 1 - np.sort(sims, axis=1)[:, -3:].mean(axis=1)
    assert np.allclose(s.to_all, expected, atol=1e-5) and np.allclose(s.to_class, expected, atol=1e-5)
    q1, q3 = np.percentile(expected, [25, 75])
    assert s.fence_all == pytest.approx(q3 + 3 * (q3 - q1), abs=1e-5)
    with pytest.raises(InvalidInputError, match="at least 3"):
        outlier_scores(np.arange(2), mat[:2], np.array(["x", "y"], dtype=object))


def _photo(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def test_photo_audit_flags_each_problem_by_its_definition(store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "p"

    def blocks(low: int, high: int) -> np.ndarray:  # 8 x 8 flat squares of 16 px: sharp edges
        return np.kron(rng.integers(low, high, size=(8, 8, 3)), np.ones((16, 16, 1)))

    _photo(d / "sharp.png", blocks(0, 256))
    Image.fromarray(blocks(0, 256).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4)).save(d / "blurred.png")
    _photo(d / "dark.png", blocks(0, 40))
    white = np.full((128, 128, 3), 252)
    white[20:40, 20:40], white[70:90, 60:100] = 200, 180  # a product on white, mostly white
    _photo(d / "bright.png", white)
    _photo(d / "constant.png", np.full((128, 128, 3), 120) + rng.integers(0, 2, size=(128, 128, 3)))
    make_image(d / "tiny.png", size=(20, 30), seed=3)
    make_image(d / "aspect.png", size=(400, 100), seed=4)
    with store.writing():
        ingest(store, d, dataset="p", labels="none")
    names = {r[0]: Path(r[1]).stem for r in store.select_images()}
    rep = audit_images(store, dataset="p")
    got = {(names[r.image_id], r.kind) for r in rep.rows}
    assert got == {("blurred", "blurred"), ("dark", "dark"), ("bright", "bright"), ("constant", "constant"),
                   ("tiny", "tiny"), ("aspect", "aspect")}, got
    assert rep.examined == 7 and rep.unreadable == []
    stored = {(names[f.image_id], f.kind) for f in store.catalog.findings(audit="images")}
    assert stored == got
    assert store.catalog.count_images(q.ImageFilter(finding="blurred")) == 1
    # a photo whose file vanished is still size-checked and listed as not measured, never skipped silently
    (d / "tiny.png").unlink()
    shutil.rmtree(store.root / "thumbnails")  # its cached thumbnail would still be measured
    again = audit_images(store, dataset="p")
    assert len(again.unreadable) == 1 and "tiny.png" in again.unreadable[0][0]
    assert ("tiny", "tiny") in {(names[r.image_id], r.kind) for r in again.rows}


def test_quality_measures() -> None:
    flat = Image.new("RGB", (50, 50), (10, 10, 10))
    m = quality.measure(flat)
    assert m.laplacian_var == 0 and m.contrast == 0 and m.brightness == pytest.approx(10 / 255)
    assert [k for k, _ in quality.problems(m, 50, 50)] == ["tiny", "constant", "dark"]
    assert quality.problems(None, 100, 400) == [("aspect", 4.0)]


def test_cli_images_csv(store: Store, tmp_path: Path) -> None:
    make_image(tmp_path / "q" / "x" / "long.png", size=(300, 60), seed=1)
    with store.writing():
        ingest(store, tmp_path / "q")
    store.close()
    out = runner.invoke(app, ["audit", "images", "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["finding"], float(r["value"])) for r in rows] == [("tiny", 60.0), ("aspect", 5.0)]
    assert "1 images examined: 1 tiny, 1 aspect" in out.stderr


def test_web_grid_filters_on_findings_and_leaks_page_shows_pairs(tmp_path: Path) -> None:
    import re

    from fastapi.testclient import TestClient

    from featurestore.config import Settings
    from featurestore.http.app import create_app

    settings = Settings(store=tmp_path / "web.fs", workers=2)
    store = Store.open(settings, create=True)
    copy_of = ingest_with_near_copies(store, tmp_path, datasets=("train", "test"))
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as c:
        empty = c.get("/ui/leaks")
        assert empty.status_code == 200 and "No leaks stored" in empty.text
        audit_leaks(store, 0.99, dataset="train", against="test", feature_set="c")
        store.close()
        grid = c.get("/ui/browse", params={"finding": "leak", "size": 100})
        assert grid.status_code == 200
        shown = {int(i) for i in re.findall(r'class="tile[^"]*" href="/ui/images/(\d+)[?"]', grid.text)}
        assert shown == set(copy_of) | set(copy_of.values())
        assert '<option value="leak" selected>' in grid.text
        assert c.get("/ui/browse", params={"finding": "bogus"}).status_code == 422
        page = c.get("/ui/leaks", params={"size": 5})
        assert page.status_code == 200
        pairs = re.findall(r'<img src="/v1/images/(\d+)/thumbnail\?size=128"', page.text)
        assert len(pairs) == 10
        linked = {(int(a), int(b)) for a, b in zip(pairs[::2], pairs[1::2], strict=True)}
        assert linked <= {(o, cp) for cp, o in copy_of.items()}
        assert c.get(f"/v1/images/{pairs[0]}/thumbnail", params={"size": 128}).status_code == 200
