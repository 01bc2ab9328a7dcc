"""The extract pass: one decode per image, incremental, crash-safe, reproducible feature sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import featurestore.pipelines.extract as extract_mod
from featurestore.catalog.schema import Model
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import IntegrityError, InvalidInputError, ParamsMismatchError
from featurestore.features.cnn.testing import build_tiny_inception_checkpoint
from featurestore.features.lowlevel import LowLevelExtractor
from featurestore.features.pixels import PixelsExtractor
from featurestore.features.projection import projection_extractor
from featurestore.features.registry import extractor_for
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.store import Store

runner = CliRunner()
SMALL = (32, 24)


def _rp(store: Store, seed: int = 0):  # type: ignore[no-untyped-def]
    return projection_extractor(store, 16, SMALL, "stretch", seed)


def test_one_decode_per_image_for_all_extractors(store: Store, image_tree: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with store.writing():
        ingest(store, image_tree)
    calls = []
    real = extract_mod.decode_bytes
    monkeypatch.setattr(extract_mod, "decode_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    with store.writing():
        summary = extract(store, [_rp(store), LowLevelExtractor(), PixelsExtractor((8, 6))], batch_size=5)
    assert len(calls) == 12 == summary.processed
    assert summary.written == {"rp16": 12, "lowlevel": 12, "pixels8x6": 12}
    fm = store.read_matrix(["rp16", "lowlevel", "pixels8x6"])
    assert fm.X.shape == (12, 16 + 843 + 8 * 6 * 3) and fm.X.dtype == np.float32
    fs = store.feature_set("rp16")
    assert fs.dim == 16 and fs.dtype == "float32" and fs.params["size"] == [32, 24]
    assert fs.params["seed"] == 0 and len(fs.params["projection_sha256"]) == 64


def test_incremental_and_later_images_match_batch(tmp_path: Path, image_tree: Path) -> None:
    whole = Store.open(Settings.from_env(store=tmp_path / "whole"), create=True)
    with whole.writing():
        ingest(whole, image_tree)
        extract(whole, [_rp(whole)])
    # Same images, ingested in two steps, extracted in two passes in another store.
    parts = Store.open(Settings.from_env(store=tmp_path / "parts"), create=True)
    with parts.writing():
        ingest(parts, image_tree / "footwear")
        first = extract(parts, [_rp(parts)])
        ingest(parts, image_tree / "tops")
        second = extract(parts, [_rp(parts)])
        third = extract(parts, [_rp(parts)])
    assert (first.processed, second.processed, third.processed) == (8, 4, 0)
    assert third.up_to_date == ["rp16"]
    a, b = whole.read_matrix(["rp16"]), parts.read_matrix(["rp16"])
    by_path_a = dict(zip(a.paths, a.X, strict=True))
    for path, vec in zip(b.paths, b.X, strict=True):
        np.testing.assert_array_equal(vec, by_path_a[path])
    whole.close()
    parts.close()


def test_mismatched_params_refused_and_projection_checked(store: Store, image_tree: Path) -> None:
    with store.writing():
        ingest(store, image_tree)
        extract(store, [_rp(store)])
        with pytest.raises(ParamsMismatchError, match="seed: stored 0 vs requested 1"):
            projection_extractor(store, 16, SMALL, "stretch", 1)
        with pytest.raises(ParamsMismatchError, match="size"):
            projection_extractor(store, 16, (64, 48), "stretch", 0)
    (npz,) = (store.root / "projections").glob("rp16-*.npz")
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises((IntegrityError, InvalidInputError)) as info:
        projection_extractor(store, 16, SMALL, "stretch", 0)
    assert "rp16-" in str(info.value)


def test_vanished_source_reported_and_rest_continue(store: Store, image_tree: Path) -> None:
    with store.writing():
        ingest(store, image_tree)
    gone = image_tree / "tops" / "shirt" / "shirt0.jpg"
    gone.unlink()
    broken = image_tree / "tops" / "shirt" / "shirt1.png"
    broken.write_bytes(b"garbage now")
    with store.writing():
        summary = extract(store, [_rp(store)])
    assert summary.processed == 10
    reasons = {Path(p).name: r for p, r in summary.failed}
    assert reasons.keys() == {"shirt0.jpg", "shirt1.png"}
    assert "not found" in reasons["shirt0.jpg"] and "not an image" in reasons["shirt1.png"]
    assert len(store.images_lacking("rp16")) == 2


def test_extractor_for_reproduces_stored_vectors(store: Store, image_tree: Path) -> None:
    with store.writing():
        ingest(store, image_tree)
        extract(store, [_rp(store), LowLevelExtractor()])
    fm = store.read_matrix(["rp16", "lowlevel"])
    from featurestore.io.images import load_rgb

    img = load_rgb(Path(fm.paths[0]))
    for name, (c0, c1) in fm.blocks.items():
        ex = extractor_for(store, name)
        vec = ex.compute([ex.prepare(img)])[name][0]
        np.testing.assert_allclose(vec, fm.X[0, c0:c1], rtol=1e-6, atol=1e-6)


def test_cli_extract_messages(image_tree: Path) -> None:
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--lowlevel"])
    assert r.exit_code == 0, r.output
    assert "rp16: 12 vectors written" in r.output and "lowlevel: 12 vectors written" in r.output
    again = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24"])
    assert "rp16: up to date, nothing to do" in again.output
    bad = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--seed", "9"])
    assert bad.exit_code == 1 and "different parameters" in bad.output and "--replace" in bad.output
    replaced = runner.invoke(app, ["extract", "--rp", "16", "--size", "32x24", "--seed", "9", "--replace"])
    assert replaced.exit_code == 0 and "rp16: 12 vectors written" in replaced.output
    assert runner.invoke(app, ["extract"]).exit_code == 2
    assert runner.invoke(app, ["extract", "--rp", "8", "--size", "big"]).exit_code == 2
    unknown = runner.invoke(app, ["extract", "--model", "nope"])
    assert unknown.exit_code == 1 and "unknown model 'nope'" in unknown.output


def test_inception21k_checkpoint_end_to_end(tmp_path: Path, image_tree: Path) -> None:
    """A user-supplied checkpoint with the paper's layer names: add, show, extract several taps."""
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    missing = runner.invoke(app, ["extract", "--model", "inception21k"])
    assert missing.exit_code == 1
    assert "Inception-symbol.json and Inception-0009.params" in missing.output
    assert "fs models add inception21k" in missing.output
    symbol, params = build_tiny_inception_checkpoint(tmp_path / "ckpt" / "Inception")
    added = runner.invoke(app, ["models", "add", "inception21k", "--symbol", str(symbol), "--params", str(params)])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["models", "list", "-f", "json"])
    info = {m["name"]: m for m in json.loads(listed.stdout)}
    assert info["inception21k"]["status"] == "ready"
    shown = runner.invoke(app, ["models", "show", "inception21k", "-f", "json"])
    layers = {r["layer"]: r for r in json.loads(shown.stdout)}
    assert {"global_pool", "ch_concat_3c_chconcat", "ch_concat_4e_chconcat", "ch_concat_5b_chconcat"} <= set(layers)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--layers", "global_pool,ch_concat_4e_chconcat",
                            "--batch", "5"])
    assert r.exit_code == 0, r.output
    store = Store.open(Settings.from_env())
    fs = store.feature_set("inception21k")
    other = store.feature_set("inception21k.ch_concat_4e_chconcat")
    assert fs.params["layer"] == "global_pool" and fs.params["preprocess"]["mean"] == [117.0] * 3
    assert fs.dim == layers["global_pool"]["dim"] and other.dim == layers["ch_concat_4e_chconcat"]["dim"]
    with store.session() as s:
        row = s.scalar(select(Model).where(Model.name == "inception21k"))
    assert fs.params["params_sha256"] == row.params_sha256
    assert store.read_matrix(["inception21k", "inception21k.ch_concat_4e_chconcat"]).X.shape[0] == 12
    stored_params = store.root / row.params_path
    store.close()
    unknown = runner.invoke(app, ["extract", "--model", "inception21k", "--layers", "pool_nope"])
    assert unknown.exit_code == 1 and "unknown layer 'pool_nope'; available:" in unknown.output
    stored_params.write_bytes(stored_params.read_bytes() + b"x")
    tampered = runner.invoke(app, ["extract", "--model", "inception21k", "--layers", "ch_concat_3c_chconcat"])
    assert tampered.exit_code == 1 and "does not match the sha256" in tampered.output


@pytest.mark.realmodel
def test_efficientnet_lite0_extract(image_tree: Path) -> None:
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "efficientnet-lite0", "--layers", "global_pool,block15_out"])
    assert r.exit_code == 0, r.output
    store = Store.open(Settings.from_env())
    fm = store.read_matrix(["efficientnet-lite0", "efficientnet-lite0.block15_out"])
    assert fm.blocks == {"efficientnet-lite0": (0, 1280), "efficientnet-lite0.block15_out": (1280, 1600)}
    assert np.isfinite(fm.X).all() and (fm.X[:, :1280] >= 0).all()  # ReLU6 head, pooled
    store.close()
