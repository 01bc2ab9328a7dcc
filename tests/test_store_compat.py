"""A store written by release 0.1 (MXNet's ONNX exporter) keeps working without MXNet (issue 27)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.onnx_export import export_onnx
from featurestore.features.cnn.registry import cnn_extractor, verify_files
from featurestore.features.cnn.specs import BUILTIN_MODELS
from featurestore.features.cnn.testing import build_tiny_inception_checkpoint
from featurestore.io.images import load_rgb
from featurestore.store import Store
from helpers import make_image

runner = CliRunner()
FIXTURE = Path(__file__).parent / "data" / "store-0.1.0"
SETS = {"inception21k": "global_pool", "inception21k.ch_concat_5b_chconcat": "ch_concat_5b_chconcat"}


@pytest.fixture
def old_store(tmp_path: Path) -> Store:
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    upgraded = runner.invoke(app, ["--store", str(root / ".fs"), "db", "upgrade"])  # later releases add migrations
    assert upgraded.exit_code == 0, upgraded.output
    return Store.open(Settings.from_env(store=root / ".fs"))


def _images(store: Store, paths: list[str]) -> list[np.ndarray]:
    """The fixture's images (the catalog holds the absolute paths of the machine that wrote it)."""
    by_name = {p.name: p for p in (store.root.parent / "images").rglob("*.png")}
    return [load_rgb(by_name[Path(p).name]) for p in paths]


def test_vectors_and_model_of_a_0_1_store(old_store: Store) -> None:
    store = old_store
    row = store.catalog.model("inception21k")
    assert row is not None and row.onnx_path and verify_files(store, row)  # its files pass the sha256 checks
    stored = {name: store.read_matrix([name]) for name in SETS}
    assert {n: fm.X.shape for n, fm in stored.items()} == {"inception21k": (6, 32),
                                                           "inception21k.ch_concat_5b_chconcat": (6, 32)}
    paths = list(stored["inception21k"].paths)
    # Its stored export (made by MXNet's exporter) still extracts the same vectors.
    ex = cnn_extractor(store, "inception21k", list(SETS.values()))
    assert ex.runtime == "onnxruntime"
    got = ex.compute([ex.prepare(im) for im in _images(store, paths)])
    for name, fm in stored.items():
        assert list(fm.paths) == paths
        np.testing.assert_allclose(got[name], fm.X, rtol=1e-6, atol=1e-5)
    # featurestore's own reader exports the same checkpoint to a graph giving the same vectors.
    pre = BUILTIN_MODELS["inception21k"].preprocess
    data = export_onnx(store.root / row.symbol_path, store.root / row.params_path, pre, list(row.taps))
    ours = OnnxModel.load(data, pre, list(SETS.values()), threads=1)
    x = np.stack([ours.prepare(im) for im in _images(store, paths)])
    out = ours.forward(x)
    for name, tap in SETS.items():
        scale = max(1.0, float(np.abs(stored[name].X).max()))
        assert float(np.abs(out[tap] - stored[name].X).max()) / scale <= 1e-5
    store.close()


def test_cli_continues_a_0_1_store(old_store: Store, tmp_path: Path) -> None:
    """New images ingested into the old store get vectors from its registered model; search answers."""
    root = old_store.root
    old_store.close()
    new = make_image(tmp_path / "more" / "tops" / "shirt" / "new.png", size=(40, 30), seed=999)
    store_opt = ["--store", str(root)]
    assert runner.invoke(app, [*store_opt, "ingest", str(new.parent.parent.parent)]).exit_code == 0
    r = runner.invoke(app, [*store_opt, "extract", "--model", "inception21k"])
    assert r.exit_code == 0 and "inception21k: 1 vectors written" in r.output, r.output
    models = runner.invoke(app, [*store_opt, "models", "list", "-f", "json"])
    assert '"status": "ready"' in models.stdout


def test_the_test_checkpoint_is_0_1s_byte_for_byte(tmp_path: Path) -> None:
    """Written without MXNet now, the tiny checkpoint's weights are the bytes release 0.1 wrote with mx.nd.save."""
    _, params = build_tiny_inception_checkpoint(tmp_path / "Inception")
    assert params.read_bytes() == (FIXTURE / ".fs" / "models" / "inception21k" / "Inception-0009.params").read_bytes()
