"""Any ONNX backbone as a model (issue 27): `fs models add NAME --onnx FILE --input-size N`, on graphs built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import IntegrityError, InvalidInputError, NotFoundError, RuntimeUnavailableError
from featurestore.features.cnn.mxnet_backend import Preprocess, grid_pool
from featurestore.features.cnn.onnx_import import export_onnx_backbone, onnx_layers
from featurestore.features.cnn.registration import add_onnx_model
from featurestore.features.cnn.registry import cnn_extractor
from featurestore.io.images import load_rgb
from featurestore.store import Store

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

runner = CliRunner()
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
STEM, FEATS = "/stem/conv/Conv_output_0", "/blocks/block.1/Relu_output_0"  # tensor names as torch.onnx writes them


def _backbone(path: Path, side: int | None = 32, input_name: str = "pixel_values", seed: int = 0) -> Path:
    """pixel_values (N,3,side,side) -> conv s2 -> relu -> conv -> relu (a map) -> mean -> linear 5 (the output)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.3, (6, 8, 3, 3)).astype(np.float32)
    fc, fb = rng.normal(0, 0.3, (6, 5)).astype(np.float32), rng.normal(0, 0.1, 5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [input_name, "w1", "b1"], [STEM], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        helper.make_node("Relu", [STEM], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "w2"], ["conv2"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["conv2"], [FEATS]),
        helper.make_node("ReduceMean", [FEATS], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc", "fb"], ["logits"]),
    ]
    dims: list[int | str] = ["N", 3, side, side] if side else ["N", 3, "H", "W"]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(a, n) for n, a in
                     (("w1", w1), ("b1", b1), ("w2", w2), ("fc", fc), ("fb", fb))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _reference(path: Path, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """The user's graph run as is by onnxruntime, with inner tensors exposed (outside the code under test)."""
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs
                              if o != "logits")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {model.graph.input[0].name: x})


def _photos(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_layers_and_export(tmp_path: Path) -> None:
    path = _backbone(tmp_path / "net.onnx")
    layers = {layer.tap: layer for layer in onnx_layers(path, (32, 32))}
    assert layers["stem_conv_Conv_output_0"].tensor == STEM and layers["stem_conv_Conv_output_0"].shape == (8, 16, 16)
    assert layers["blocks_block.1_Relu_output_0"].shape == (6, 16, 16) and layers["logits"].shape == (5,)
    pre = Preprocess(size=(32, 32), mean=MEAN, std=STD)
    data, taps = export_onnx_backbone(path, pre)
    assert taps == ["logits"]  # the graph's outputs by default
    data, taps = export_onnx_backbone(path, pre, [FEATS, "logits", "stem_relu"])  # tensor or tap names
    model = onnx.load_from_string(data)
    record = json.loads({p.key: p.value for p in model.metadata_props}["featurestore"])
    assert [(t["tap"], t["dim"], t["pooling"]) for t in record["taps"]] == [
        ("blocks_block.1_Relu_output_0", 6, "global-average"), ("logits", 5, "none"),
        ("stem_relu", 8, "global-average")]
    assert [i.name for i in model.graph.input] == ["data"]
    only_stem, _ = export_onnx_backbone(path, pre, ["stem_relu"])
    assert {n.op_type for n in onnx.load_from_string(only_stem).graph.node} == {"Conv", "Relu", "GlobalAveragePool",
                                                                                "Flatten"}  # the rest pruned


def test_registered_backbone_extracts_what_the_graph_computes(store: Store, tmp_path: Path) -> None:
    path = _backbone(tmp_path / "net.onnx")
    with store.writing():
        row = add_onnx_model(store, "tinynet", path, size=32, mean=MEAN, std=STD, taps=[FEATS, "logits"])
    assert row.taps == ["blocks_block.1_Relu_output_0", "logits"] and row.default_tap == row.taps[0]
    ex = cnn_extractor(store, "tinynet", list(row.taps), batch_size=3)
    pre = Preprocess(size=(32, 32), mean=MEAN, std=STD)
    x = np.stack([pre.apply(p) for p in _photos()])
    got = ex.compute(list(x))
    fmap, logits = _reference(path, x, [FEATS, "logits"])
    np.testing.assert_allclose(got["tinynet"], fmap.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["tinynet.logits"], logits, rtol=1e-5, atol=1e-5)
    assert [s.params["pooling"] for s in ex.outputs()] == ["global-average", "none"]
    # --grid pools the map over cells; --tta flip averages image and mirror; both named as for the built-ins
    grid = cnn_extractor(store, "tinynet", [row.default_tap], grid=2)
    np.testing.assert_allclose(grid.compute(list(x))["tinynet+grid2"], grid_pool(fmap, 2), rtol=1e-5, atol=1e-5)
    flip = cnn_extractor(store, "tinynet", [row.default_tap], tta="flip")
    mirrored = np.stack([pre.apply(ImageOps.mirror(p)) for p in _photos()])
    want = (fmap.mean(axis=(2, 3)) + _reference(path, mirrored, [FEATS])[0].mean(axis=(2, 3))) / 2
    np.testing.assert_allclose(flip.compute([flip.prepare(p) for p in _photos()])["tinynet+flip"], want,
                               rtol=1e-5, atol=1e-5)
    # a tensor outside the registered taps is exported for the session
    stem = cnn_extractor(store, "tinynet", ["stem_relu"]).compute(list(x))["tinynet.stem_relu"]
    np.testing.assert_allclose(stem, _reference(path, x, ["stem_relu"])[0].mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotFoundError, match="unknown layer 'nope'; available: .*stem_relu"):
        cnn_extractor(store, "tinynet", ["nope"])
    with pytest.raises(RuntimeUnavailableError, match="registered from an ONNX file: it runs on onnxruntime only"):
        cnn_extractor(store, "tinynet", runtime="mxnet")
    # the copied file is checked against its sha256 before use
    copy = store.root / row.symbol_path
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="net.onnx does not match the sha256 recorded"):
        cnn_extractor(store, "tinynet")


def test_dynamic_size_graph_takes_the_declared_size(store: Store, tmp_path: Path) -> None:
    path = _backbone(tmp_path / "dyn.onnx", side=None, input_name="image")
    with store.writing():
        row = add_onnx_model(store, "dyn", path, size=48, taps=["stem_relu"])
    assert row.preprocess["size"] == [48, 48]
    ex = cnn_extractor(store, "dyn")
    x = np.stack([ex.prepare(p) for p in _photos(2)])
    assert x.shape == (2, 3, 48, 48)
    np.testing.assert_allclose(ex.compute(list(x))["dyn"], _reference(path, x, ["stem_relu"])[0].mean(axis=(2, 3)),
                               rtol=1e-5, atol=1e-5)


def _no_image_input(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["tokens"], ["out"])], "t",
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_cli_add_extract_show_and_refusals(tmp_path: Path, image_tree: Path) -> None:
    path = _backbone(tmp_path / "net.onnx")
    add = ["models", "add", "tinynet", "--onnx", str(path)]
    r = runner.invoke(app, [*add, "--input-size", "32", "--mean", ",".join(map(str, MEAN)), "--std", "58",
                            "--taps", f"{FEATS},logits"])
    assert r.exit_code == 0, r.output
    assert "registered tinynet: taps blocks_block.1_Relu_output_0, logits" in r.output
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "tinynet", "--layers", "blocks_block.1_Relu_output_0,logits"])
    assert r.exit_code == 0 and "tinynet: 12 vectors written" in r.output and "tinynet.logits: 12" in r.output, r.output
    store = Store.open(Settings.from_env())
    fm = store.read_matrix(["tinynet"])
    pre = Preprocess(size=(32, 32), mean=MEAN, std=(58.0,) * 3)
    x = np.stack([pre.apply(load_rgb(Path(p))) for p in fm.paths])
    np.testing.assert_allclose(fm.X, _reference(path, x, [FEATS])[0].mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    store.close()
    shown = runner.invoke(app, ["models", "show", "tinynet", "-f", "json"])
    assert shown.exit_code == 0, shown.output
    rows = {r["layer"]: r for r in json.loads(shown.stdout)}
    assert rows["stem_relu"]["shape"] == "8x16x16" and rows["logits"]["tap"] == "yes"
    listed = {m["name"]: m for m in json.loads(runner.invoke(app, ["models", "list", "-f", "json"]).stdout)}
    assert listed["tinynet"]["status"] == "ready" and listed["tinynet"]["description"] == "registered ONNX model"
    # refusals: one line each, nothing registered
    for args, message in [
        ([*add[:2], "bad", "--onnx", str(_no_image_input(tmp_path / "tokens.onnx")), "--input-size", "32"],
         "tokens.onnx has no image input of shape (batch, 3, 32, 32) (its inputs: tokens ['N', 16])"),
        ([*add[:2], "bad", "--onnx", str(path), "--input-size", "64"],
         "net.onnx has no image input of shape (batch, 3, 64, 64) (its inputs: pixel_values ['N', 3, 32, 32])"),
        ([*add[:2], "bad", "--onnx", str(tmp_path / "junk.onnx"), "--input-size", "32"], "junk.onnx is not a readable"),
    ]:
        (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk")
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output
    r = runner.invoke(app, [*add[:2], "bad", "--onnx", str(path)])
    assert r.exit_code == 2 and "input size" in r.output
    r = runner.invoke(app, [*add[:2], "bad", "--onnx", str(path), "--symbol", "x-symbol.json", "--input-size", "32"])
    assert r.exit_code == 2
    store = Store.open(Settings.from_env())
    assert set(store.catalog.models()) == {"tinynet"} and not (store.root / "models" / "bad").exists()
    store.close()


def test_unknown_tap_refused_before_copying(store: Store, tmp_path: Path) -> None:
    path = _backbone(tmp_path / "net.onnx")
    with store.writing(), pytest.raises(NotFoundError, match="unknown layer 'pool5'"):
        add_onnx_model(store, "tinynet", path, size=32, taps=["pool5"])
    with store.writing(), pytest.raises(InvalidInputError, match="efficientnet-lite0 is the name of a built-in"):
        add_onnx_model(store, "efficientnet-lite0", path, size=32)
    assert store.catalog.models() == {} and not (store.root / "models" / "tinynet").exists()
