"""onnxruntime as the CNN runtime (issue 12): export at registration, same vectors as MXNet, per-shard runtime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from featurestore.catalog.schema import FeatureShard
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import (
    IntegrityError,
    InvalidInputError,
    ModelFilesMissingError,
    NotFoundError,
    RuntimeUnavailableError,
)
from featurestore.features.cnn.mxnet_backend import CheckpointModel
from featurestore.features.cnn.mxnet_format import SymbolBuilder, write_params
from featurestore.features.cnn.onnx_backend import OnnxModel, _prune
from featurestore.features.cnn.onnx_export import ONNX_OPSET, export_onnx, read_metadata
from featurestore.features.cnn.registration import add_model
from featurestore.features.cnn.registry import cnn_extractor, model_record
from featurestore.features.cnn.specs import BUILTIN_MODELS
from featurestore.features.cnn.testing import TINY_INCEPTION_DIMS, build_tiny_inception_checkpoint
from featurestore.features.registry import extractor_for
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.search.service import embedder_for
from featurestore.store import Store
from helpers import raises_cli

onnx = pytest.importorskip("onnx")
skdata = pytest.importorskip("skimage.data")

runner = CliRunner()
INCEPTION = BUILTIN_MODELS["inception21k"]
TAPS = list(INCEPTION.taps)  # global_pool and the pool 5b/4e/3c concats


def _photos() -> list[Image.Image]:
    """Real photos shipped with scikit-image (a cat, a coffee cup, an astronaut)."""
    return [Image.fromarray(a) for a in (skdata.chelsea(), skdata.coffee(), skdata.astronaut())]


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-4) -> float:
    """Max |a - b| scaled by the largest |b| when that exceeds 1; asserts it is <= ``tol``."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    err = float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))
    assert err <= tol, err
    return err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_inception_checkpoint(tmp_path_factory.mktemp("tiny") / "Inception")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt) -> bytes:
    return export_onnx(*tiny_ckpt, INCEPTION.preprocess, TAPS + ["fc1"])


# ---------------------------------------------------------------- export


def test_export_outputs_every_tap_pooled_with_weights_folded(tiny_ckpt, tiny_onnx: bytes) -> None:
    model = onnx.load_from_string(tiny_onnx)
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert [i.name for i in model.graph.input] == ["data"]  # weights are initializers only
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value")  # dynamic batch
    taps, record = read_metadata(model, "tiny")
    assert [t.tap for t in taps] == TAPS + ["fc1"]
    assert {t.tap: t.dim for t in taps} == {**TINY_INCEPTION_DIMS, "fc1": 10}
    assert {t.tap: t.pooling for t in taps} == {**dict.fromkeys(TAPS, "global-average"), "fc1": "none"}
    assert {o.name for o in model.graph.output} == {t.output for t in taps}
    assert "GlobalAveragePool" in {n.op_type for n in model.graph.node}  # pooling inside the graph
    sym, params = tiny_ckpt
    assert record["params_sha256"] == hashlib.sha256(params.read_bytes()).hexdigest()
    assert record["preprocess"] == INCEPTION.preprocess.to_params()
    # Deterministic: the same checkpoint and taps give the same file (and so the same sha256).
    assert export_onnx(sym, params, INCEPTION.preprocess, TAPS + ["fc1"]) == tiny_onnx


def test_export_refuses_unknown_layer_and_missing_files(tiny_ckpt, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="unknown layer 'pool_nope'; available: .*ch_concat_3c_chconcat"):
        export_onnx(*tiny_ckpt, INCEPTION.preprocess, ["pool_nope"])
    with pytest.raises(ModelFilesMissingError, match="nope-symbol.json"):
        export_onnx(tmp_path / "nope-symbol.json", tiny_ckpt[1], INCEPTION.preprocess, ["global_pool"])


def _unsupported_checkpoint(prefix: Path) -> tuple[Path, Path]:
    """conv -> softsign (an operator the reader does not translate) -> global pool, written without MXNet."""
    b = SymbolBuilder()
    x = b.op("Convolution", "conv", [b.var("data")], kernel=(3, 3), no_bias=True, num_filter=4)
    x = b.op("softsign", "act", [x])
    sym = b.op("Pooling", "global_pool", [x], global_pool=True, kernel=(1, 1), pool_type="avg")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}-symbol.json").write_text(b.to_json(sym))
    write_params(f"{prefix}-0000.params", {"conv_weight": np.full((4, 3, 3, 3), 0.01, np.float32)}, {})
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")


def test_unsupported_operator_is_refused_and_nothing_registered(store: Store, tmp_path: Path) -> None:
    sym, params = _unsupported_checkpoint(tmp_path / "odd" / "odd")
    with pytest.raises(InvalidInputError, match=r"odd-symbol.json: operator softsign in layer 'act' is not supported"):
        export_onnx(sym, params, INCEPTION.preprocess, ["global_pool"])
    with store.writing(), pytest.raises(InvalidInputError, match="operator softsign"):
        add_model(store, "odd", sym, params)
    assert store.catalog.model("odd") is None and not (store.root / "models" / "odd").exists()
    r = runner.invoke(app, ["models", "add", "odd", "--symbol", str(sym), "--params", str(params)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: ") and "odd-symbol.json: operator softsign" in r.output


def test_model_registered_by_0_1_without_export_says_to_use_mxnet(store: Store, tmp_path: Path) -> None:
    """Release 0.1 registered checkpoints MXNet could not export, without an export: onnxruntime names the fix."""
    sym, params = _unsupported_checkpoint(tmp_path / "odd" / "odd")
    folder = store.root / "models" / "odd"
    folder.mkdir(parents=True)
    for f in (sym, params):
        (folder / f.name).write_bytes(f.read_bytes())
    store.catalog.save_model(
        "odd", symbol_path=f"models/odd/{sym.name}", params_path=f"models/odd/{params.name}",
        symbol_sha256=hashlib.sha256(sym.read_bytes()).hexdigest(),
        params_sha256=hashlib.sha256(params.read_bytes()).hexdigest(), preprocess=INCEPTION.preprocess.to_params(),
        taps=["global_pool"], default_tap="global_pool", source="0.1", onnx_path=None, onnx_sha256=None)
    with raises_cli(RuntimeUnavailableError, match="model odd cannot run on onnxruntime: .*--runtime mxnet"):
        cnn_extractor(store, "odd", runtime="onnxruntime")


@pytest.mark.mxnet
def test_model_registered_by_0_1_without_export_runs_on_mxnet(store: Store, tmp_path: Path) -> None:
    test_model_registered_by_0_1_without_export_says_to_use_mxnet(store, tmp_path)
    ex = cnn_extractor(store, "odd", runtime="mxnet")
    assert ex.runtime == "mxnet" and ex.outputs()[0].dim == 4


# ---------------------------------------------------------------- runtime


@pytest.mark.mxnet
def test_grid_pooling_on_onnx_equals_mxnet(tiny_ckpt, tiny_onnx: bytes) -> None:
    """--grid on onnxruntime: the session returns the taps' maps, pooled like MXNet's; 1x1 taps refused."""
    pre, taps = INCEPTION.preprocess, ["ch_concat_5b_chconcat", "ch_concat_3c_chconcat"]  # 7x7 and 28x28
    ref = CheckpointModel.load(*tiny_ckpt, pre, taps, batch_size=2, grid=3)
    ort_model = OnnxModel.load(tiny_onnx, pre, taps, batch_size=2, threads=1, grid=3)
    assert ort_model.tap_dims() == ref.tap_dims() == {"ch_concat_5b_chconcat": 32 * 9, "ch_concat_3c_chconcat": 16 * 9}
    assert ort_model.tap_pooling() == ref.tap_pooling() == dict.fromkeys(taps, "grid-average")
    x = np.stack([ort_model.prepare(p) for p in _photos()])
    got, want = ort_model.forward(x), ref.forward(x)
    for tap in taps:
        _close(got[tap], want[tap])
    assert ort_model.forward(x[:0])["ch_concat_3c_chconcat"].shape == (0, 16 * 9)
    with pytest.raises(InvalidInputError, match="layer global_pool gives 32x1x1 values"):
        OnnxModel.load(tiny_onnx, pre, ["global_pool"], threads=1, grid=2)
    with pytest.raises(InvalidInputError, match="layer fc1 gives 10 values"):  # not a map at all
        OnnxModel.load(tiny_onnx, pre, ["fc1"], threads=1, grid=2)


@pytest.mark.mxnet
def test_onnx_equals_mxnet_on_real_photos_tiny_inception(tiny_ckpt, tiny_onnx: bytes) -> None:
    """Every tap, a batch size that leaves a partial batch, real photos."""
    pre = INCEPTION.preprocess
    ref = CheckpointModel.load(*tiny_ckpt, pre, TAPS + ["fc1"], batch_size=2)
    ort_model = OnnxModel.load(tiny_onnx, pre, TAPS + ["fc1"], batch_size=2, threads=1)
    assert ort_model.tap_dims() == ref.tap_dims() and ort_model.tap_pooling() == ref.tap_pooling()
    x = np.stack([ort_model.prepare(p) for p in _photos()])
    got, want = ort_model.forward(x), ref.forward(x)
    # The tiny random network's activations reach a few hundred (its random batch-norm statistics do
    # not normalise the 0..255-scale input), so the 1e-4 bound is relative to the largest value there.
    for tap in TAPS + ["fc1"]:
        _close(got[tap], want[tap])
    assert ort_model.forward(x[:0])["global_pool"].shape == (0, TINY_INCEPTION_DIMS["global_pool"])


def test_session_is_pruned_to_requested_taps(tiny_onnx: bytes) -> None:
    model = onnx.load_from_string(tiny_onnx)
    taps, _ = read_metadata(model, "tiny")
    out_3c = next(t.output for t in taps if t.tap == "ch_concat_3c_chconcat")
    pruned = _prune(model, [out_3c])
    names = {n.name for n in pruned.graph.node}
    assert [o.name for o in pruned.graph.output] == [out_3c]
    assert not any("5b" in n or "4e" in n or "fc1" in n for n in names), names  # later layers are gone
    assert {t.name for t in pruned.graph.initializer} < {t.name for t in model.graph.initializer}
    onnx.checker.check_model(pruned)
    full = OnnxModel.load(tiny_onnx, INCEPTION.preprocess, TAPS, threads=1)
    one = OnnxModel.load(tiny_onnx, INCEPTION.preprocess, ["ch_concat_3c_chconcat"], threads=1)
    x = np.stack([one.prepare(p) for p in _photos()[:2]])
    assert np.array_equal(one.forward(x)["ch_concat_3c_chconcat"], full.forward(x)["ch_concat_3c_chconcat"])


def test_onnx_model_refuses_bad_input(tiny_onnx: bytes) -> None:
    pre = INCEPTION.preprocess
    with pytest.raises(NotFoundError, match="unknown tap 'fc9'; available: ch_concat_3c_chconcat"):
        OnnxModel.load(tiny_onnx, pre, ["fc9"], where="tiny.onnx")
    with pytest.raises(InvalidInputError, match=r"tiny.onnx was exported for \(224, 224\) input, not \(112, 112\)"):
        OnnxModel.load(tiny_onnx, type(pre)(size=(112, 112), mean=pre.mean), ["global_pool"], where="tiny.onnx")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        OnnxModel.load(b"not a model", pre, ["global_pool"], where="x.onnx")
    foreign = onnx.load_from_string(tiny_onnx)
    del foreign.metadata_props[:]
    with pytest.raises(InvalidInputError, match="x.onnx was not exported by featurestore"):
        OnnxModel.load(foreign.SerializeToString(), pre, ["global_pool"], where="x.onnx")
    model = OnnxModel.load(tiny_onnx, pre, ["global_pool"], threads=1)
    with pytest.raises(InvalidInputError, match=r"expected a batch of shape \(n, 3, 224, 224\)"):
        model.forward(np.zeros((1, 3, 10, 10), np.float32))


def test_session_threads_follow_fs_workers(tiny_ckpt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FS_WORKERS", "1")
    store = Store.open(Settings.from_env(store=tmp_path / "s"), create=True)
    with store.writing():
        add_model(store, "inception21k", *tiny_ckpt)
    ex = cnn_extractor(store, "inception21k")
    assert ex.runtime == "onnxruntime" and ex.model.threads == 1  # type: ignore[attr-defined]
    opts = ex.model._session.get_session_options()  # type: ignore[attr-defined]
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    store.close()


# ---------------------------------------------------------------- registry and store


@pytest.mark.parametrize("name", ["inception21k", "inception-bn"])
def test_registration_stores_verified_export(store: Store, tiny_ckpt, tmp_path: Path, name: str) -> None:
    with store.writing():
        row = add_model(store, name, *tiny_ckpt)
    path = store.root / str(row.onnx_path)
    assert path.parent == store.root / "models" / name and path.suffix == ".onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == row.onnx_sha256
    taps, _ = read_metadata(onnx.load(str(path)), name)
    assert [t.tap for t in taps] == row.taps == TAPS  # one file for every registered tap
    ort_ex = cnn_extractor(store, name, TAPS, batch_size=2, runtime="onnxruntime")
    got = ort_ex.compute([ort_ex.prepare(p) for p in _photos()])
    assert {k: v.shape for k, v in got.items()} == {s.name: (3, s.dim) for s in ort_ex.outputs()}
    # A replaced model gets a new export; the old file goes.
    other = build_tiny_inception_checkpoint(tmp_path / "other" / "Inception", seed=1)
    with store.writing():
        new = add_model(store, name, *other, replace=True)
    assert new.onnx_sha256 != row.onnx_sha256 and (store.root / str(new.onnx_path)).is_file()
    assert not path.exists()


@pytest.mark.mxnet
@pytest.mark.parametrize("name", ["inception21k", "inception-bn"])
def test_registered_export_equals_mxnet(store: Store, tiny_ckpt, name: str) -> None:
    """Every registered layer runs from the stored export; equal to MXNet on real photos."""
    with store.writing():
        add_model(store, name, *tiny_ckpt)
    ort_ex = cnn_extractor(store, name, TAPS, batch_size=2, runtime="onnxruntime")
    mx_ex = cnn_extractor(store, name, TAPS, batch_size=2, runtime="mxnet")
    assert ort_ex.outputs() == mx_ex.outputs()  # same feature-set params: the runtime is not one of them
    got = ort_ex.compute([ort_ex.prepare(p) for p in _photos()])
    want = mx_ex.compute([mx_ex.prepare(p) for p in _photos()])
    for key in want:
        _close(got[key], want[key])


def test_export_checked_before_use(store: Store, tiny_ckpt) -> None:
    with store.writing():
        row = add_model(store, "inception21k", *tiny_ckpt)
    path = store.root / str(row.onnx_path)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=f"{path.name} does not match the sha256 recorded"):
        cnn_extractor(store, "inception21k", runtime="onnxruntime")
    path.unlink()
    with pytest.raises(ModelFilesMissingError, match=f"{path.name} .*is missing from the store"):
        cnn_extractor(store, "inception21k", runtime="onnxruntime")
    path.write_bytes(good)
    assert cnn_extractor(store, "inception21k", runtime="onnxruntime").runtime == "onnxruntime"


def test_model_registered_before_exports_gets_one(store: Store, tiny_ckpt) -> None:
    """A catalog upgraded from before exports: readers export in memory, `fs extract` stores the export."""
    with store.writing():
        add_model(store, "inception21k", *tiny_ckpt)
    store.catalog.save_model("inception21k", onnx_path=None, onnx_sha256=None)
    folder = store.root / "models" / "inception21k"
    for p in folder.glob("*.onnx"):
        p.unlink()
    reader = cnn_extractor(store, "inception21k", runtime="onnxruntime")
    assert reader.runtime == "onnxruntime" and not list(folder.glob("*.onnx"))
    assert model_record(store, "inception21k").onnx_path is None  # a reader never writes
    with store.writing():
        writer = cnn_extractor(store, "inception21k", runtime="onnxruntime", save_export=True)
    row = model_record(store, "inception21k")
    assert row.onnx_path and hashlib.sha256((store.root / row.onnx_path).read_bytes()).hexdigest() == row.onnx_sha256
    x = [reader.prepare(p) for p in _photos()]
    assert np.array_equal(reader.compute(x)["inception21k"], writer.compute(x)["inception21k"])


@pytest.mark.mxnet
def test_layer_outside_registered_taps_is_exported_for_the_session(store: Store, tiny_ckpt) -> None:
    with store.writing():
        row = add_model(store, "inception21k", *tiny_ckpt)
    files = sorted((store.root / "models" / "inception21k").iterdir())
    ort_ex = cnn_extractor(store, "inception21k", ["fc1"], runtime="onnxruntime")
    mx_ex = cnn_extractor(store, "inception21k", ["fc1"], runtime="mxnet")
    x = [ort_ex.prepare(p) for p in _photos()]
    _close(ort_ex.compute(x)["inception21k.fc1"], mx_ex.compute(x)["inception21k.fc1"])
    assert sorted((store.root / "models" / "inception21k").iterdir()) == files  # nothing stored
    assert model_record(store, "inception21k").onnx_sha256 == row.onnx_sha256


def _shards(store: Store, name: str) -> list[tuple[str, str | None]]:
    fs = store.feature_set(name)
    with store.session() as s:
        rows = s.execute(select(FeatureShard.path, FeatureShard.runtime).where(
            FeatureShard.feature_set_id == fs.id).order_by(FeatureShard.id)).all()
    return [(path, runtime) for path, runtime in rows]


@pytest.mark.mxnet
def test_set_continued_on_the_other_runtime_records_each_shard(store: Store, image_tree: Path, tiny_ckpt) -> None:
    with store.writing():
        ingest(store, image_tree)
        add_model(store, "inception21k", *tiny_ckpt)
        ids = [r[0] for r in store.select_images()]
        first = extract(store, [cnn_extractor(store, "inception21k", runtime="onnxruntime")], image_ids=ids[:5])
        rest = extract(store, [cnn_extractor(store, "inception21k", runtime="mxnet")], batch_size=4)
    assert first.written == {"inception21k": 5} and rest.written == {"inception21k": 7}  # no params mismatch
    shards = _shards(store, "inception21k")
    assert [r for _, r in shards] == ["onnxruntime", "mxnet"]
    for path, runtime in shards:
        with h5py.File(store.root / path) as fh:
            assert fh.attrs["runtime"] == runtime
    # The onnxruntime rows equal what MXNet computes for the same images.
    fm = store.read_matrix(["inception21k"])
    mx_ex = cnn_extractor(store, "inception21k", runtime="mxnet")
    want = mx_ex.compute([mx_ex.prepare(Image.open(p).convert("RGB")) for p in fm.paths[:5]])["inception21k"]
    _close(fm.X[:5], want)
    with store.writing():
        assert store.compact("inception21k", min_rows=100) == [("inception21k", 2, 12)]
    assert [r for _, r in _shards(store, "inception21k")] == ["mxnet,onnxruntime"]


@pytest.mark.mxnet
def test_search_predict_serve_runtime_comes_from_settings(tmp_path: Path, image_tree: Path, tiny_ckpt,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    store = Store.open(Settings.from_env(store=root), create=True)
    with store.writing():
        ingest(store, image_tree)
        add_model(store, "inception21k", *tiny_ckpt)
        extract(store, [cnn_extractor(store, "inception21k", runtime="mxnet")])
    assert extractor_for(store, "inception21k").runtime == "onnxruntime"  # the default
    store.close()
    monkeypatch.setenv("FS_CNN_RUNTIME", "mxnet")
    store = Store.open(Settings.from_env(store=root))
    assert extractor_for(store, "inception21k").runtime == "mxnet"
    store.close()
    monkeypatch.setenv("FS_CNN_RUNTIME", "tensorflow")
    with pytest.raises(InvalidInputError, match="FS_CNN_RUNTIME='tensorflow' is invalid .*'onnxruntime' or 'mxnet'"):
        Settings.from_env()


def test_one_session_per_extractor(store: Store, image_tree: Path, tiny_ckpt,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Search by image, predict and serve share the store's cached extractor: one onnxruntime session."""
    import onnxruntime as ort

    with store.writing():
        ingest(store, image_tree)
        add_model(store, "inception21k", *tiny_ckpt)
        extract(store, [cnn_extractor(store, "inception21k")])
    sessions = []
    real = ort.InferenceSession

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        sessions.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    ex, _ = store.extractor("inception21k")
    for p in _photos():
        ex.compute([ex.prepare(p)])
    assert len(sessions) == 1 and ex.runtime == "onnxruntime"
    for p in _photos():
        embedder_for(store, "inception21k")(p)
    assert store.extractor("inception21k")[0] is ex and len(sessions) == 1


# ---------------------------------------------------------------- CLI


@pytest.mark.mxnet
def test_cli_runtime_option_and_models_add(tmp_path: Path, image_tree: Path, tiny_ckpt) -> None:
    assert runner.invoke(app, ["ingest", str(image_tree / "footwear")]).exit_code == 0
    added = runner.invoke(app, ["models", "add", "inception21k", "--symbol", str(tiny_ckpt[0]),
                                "--params", str(tiny_ckpt[1])])
    assert added.exit_code == 0, added.output
    assert "exported to ONNX for onnxruntime: models/inception21k/inception21k-" in added.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--runtime", "mxnet"])
    assert r.exit_code == 0 and "inception21k: 8 vectors written" in r.output, r.output
    assert runner.invoke(app, ["ingest", str(image_tree / "tops")]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "inception21k"])
    assert r.exit_code == 0 and "inception21k: 4 vectors written" in r.output, r.output
    store = Store.open(Settings.from_env())
    assert [r for _, r in _shards(store, "inception21k")] == ["mxnet", "onnxruntime"]
    store.close()
    bad = runner.invoke(app, ["extract", "--model", "inception21k", "--runtime", "tensorflow"])
    assert bad.exit_code == 2 and "use onnxruntime or mxnet" in bad.output
    helped = runner.invoke(app, ["extract", "--help"])
    assert "--runtime" in helped.output and "Example: fs extract" in helped.output


def test_serve_shares_the_thread_budget_among_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fs serve --workers 2` with FS_WORKERS=4 gives each worker process 2 threads (no env writing)."""
    import os
    import socket

    from featurestore.http import server

    seen = {}
    monkeypatch.setattr(server, "run_workers", lambda settings, workers, *a, **k: seen.update(
        workers=settings.workers, processes=workers))
    monkeypatch.setenv("FS_WORKERS", "4")
    Store.open(Settings.from_env(), create=True).close()
    before = dict(os.environ)
    with socket.socket() as sock:  # a port nothing listens on (other services may hold a fixed one)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = runner.invoke(app, ["serve", "--workers", "2", "--port", str(port)])
    assert r.exit_code == 0, r.output
    assert seen == {"workers": 2, "processes": 2}
    assert dict(os.environ) == before


# ---------------------------------------------------------------- the built-in model


@pytest.mark.realmodel
@pytest.mark.mxnet
def test_efficientnet_lite0_onnx_equals_mxnet_on_real_photos(store: Store) -> None:
    row = model_record(store, "efficientnet-lite0")  # converted and exported on first use
    assert row.onnx_path and (store.root / row.onnx_path).is_file()
    taps = list(row.taps)
    assert taps == BUILTIN_MODELS["efficientnet-lite0"].taps
    ort_ex = cnn_extractor(store, "efficientnet-lite0", taps, batch_size=2, runtime="onnxruntime")
    mx_ex = cnn_extractor(store, "efficientnet-lite0", taps, batch_size=2, runtime="mxnet")
    assert ort_ex.outputs() == mx_ex.outputs()
    x = [ort_ex.prepare(p) for p in _photos()]
    got, want = ort_ex.compute(x), mx_ex.compute(x)
    assert set(got) == {"efficientnet-lite0"} | {f"efficientnet-lite0.{t}" for t in taps[1:]}
    for key in want:  # absolute: these activations are O(1)-O(10)
        err = float(np.abs(got[key] - want[key]).max())
        assert err <= 1e-4, (key, err)
    # The logits (not a registered tap: exported for the session) classify the cat and the coffee.
    fc = cnn_extractor(store, "efficientnet-lite0", ["fc"], runtime="onnxruntime").compute(x)["efficientnet-lite0.fc"]
    assert set(np.argsort(-fc[0])[:5].tolist()) & set(range(281, 286))
    assert int(np.argmax(fc[1])) == 967  # espresso


@pytest.mark.realmodel
@pytest.mark.mxnet
def test_efficientnet_lite0_extract_default_runtime(image_tree: Path) -> None:
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "efficientnet-lite0", "--layers", "global_pool,block15_out"])
    assert r.exit_code == 0, r.output
    store = Store.open(Settings.from_env())
    assert {r for _, r in _shards(store, "efficientnet-lite0.block15_out")} == {"onnxruntime"}
    stored = store.read_matrix(["efficientnet-lite0"])
    mx_ex = cnn_extractor(store, "efficientnet-lite0", runtime="mxnet", batch_size=8)
    want = mx_ex.compute([mx_ex.prepare(Image.open(p).convert("RGB")) for p in stored.paths])["efficientnet-lite0"]
    assert float(np.abs(stored.X - want).max()) <= 1e-4
    models = json.loads(runner.invoke(app, ["models", "list", "-f", "json"]).stdout)
    assert {m["name"]: m["status"] for m in models}["efficientnet-lite0"] == "ready"
    store.close()
