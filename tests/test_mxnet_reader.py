"""MXNet checkpoints read without MXNet (issue 27): the .params and symbol formats, every operator against MXNet."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.errors import InvalidInputError, ModelFilesMissingError, RuntimeUnavailableError
from featurestore.features.cnn.mx2onnx import MxNetwork
from featurestore.features.cnn.mxnet_backend import CheckpointModel, Preprocess, import_mxnet
from featurestore.features.cnn.mxnet_format import SymbolBuilder, params_bytes, read_params, read_symbol, write_params
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.onnx_export import export_onnx
from featurestore.features.cnn.specs import BUILTIN_MODELS, model_files
from featurestore.features.cnn.testing import build_tiny_inception_checkpoint, random_params
from featurestore.store import Store

runner = CliRunner()


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    """Max |got - want| scaled by the largest |want| when that exceeds 1, at most ``tol``."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
    assert err <= tol, err


# ---------------------------------------------------------------- the .params file


def test_params_round_trip_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arg = {"conv_weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "fc_bias": np.arange(5, dtype=np.float32)}
    aux = {"bn_moving_var": np.ones(4, np.float32), "scalar": np.array([2.5], np.float32)}
    path = write_params(tmp_path / "m-0000.params", arg, aux)
    got = read_params(path)
    assert list(got.arg) == list(arg) and list(got.aux) == list(aux)
    for name, value in {**arg, **aux}.items():
        assert got.get(name) is not None and np.array_equal(got.get(name), value)
    assert not list(tmp_path.glob(".tmp*"))  # written atomically
    # float64 / float16 arrays, and the pre-v1 layout (uint32 ndim + uint32 dims, no magic)
    raw = struct.pack("<QQQ", 0x112, 0, 2)
    raw += struct.pack("<Iii2qiii", 0xF993FAC9, 0, 2, 1, 2, 1, 0, 1) + np.array([[1.5, -2.0]], "<f8").tobytes()
    raw += struct.pack("<I2Iiii", 2, 2, 1, 1, 0, 2) + np.array([[0.5], [4.0]], "<f2").tobytes()
    raw += struct.pack("<Q", 2) + struct.pack("<Q", 5) + b"arg:a" + struct.pack("<Q", 5) + b"aux:b"
    (tmp_path / "old.params").write_bytes(raw)
    old = read_params(tmp_path / "old.params")
    assert old.arg["a"].dtype == np.float64 and old.arg["a"].tolist() == [[1.5, -2.0]]
    assert old.aux["b"].tolist() == [[0.5], [4.0]]


def test_truncated_or_foreign_params_are_one_line_errors(tmp_path: Path) -> None:
    data = params_bytes({"w": np.ones((8, 8), np.float32)}, {"m": np.zeros(3, np.float32)})
    path = tmp_path / "cut.params"
    for cut in (8, 20, 40, 60, len(data) - 30, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidInputError, match=r"cut.params: (truncated|not an MXNet params)") as exc:
            read_params(path)
        assert "\n" not in str(exc.value)
    path.write_bytes(data + b"xx")
    with pytest.raises(InvalidInputError, match="2 unexpected bytes after the last name"):
        read_params(path)
    path.write_bytes(b"PK\x03\x04 a zip, not params")
    with pytest.raises(InvalidInputError, match="not an MXNet params file"):
        read_params(path)
    path.write_bytes(data.replace(b"arg:w", b"xyz:w"))
    with pytest.raises(InvalidInputError, match="key 'xyz:w' lacks an arg:/aux: prefix"):
        read_params(path)
    with pytest.raises(ModelFilesMissingError, match="nope.params"):
        read_params(tmp_path / "nope.params")


# ---------------------------------------------------------------- the symbol and the graph


def _write(tmp_path: Path, name: str, doc: object) -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_symbol_refusals_name_the_file(tmp_path: Path) -> None:
    sym, params = build_tiny_inception_checkpoint(tmp_path / "Inception")
    with pytest.raises(InvalidInputError, match=r"bad-symbol.json: not a readable MXNet symbol file \(invalid JSON"):
        read_symbol(_write(tmp_path, "bad-symbol.json", "{nope"))
    with pytest.raises(InvalidInputError, match=r"x-symbol.json: not a readable .*node f has an input \[5, 0, 0\]"):
        read_symbol(_write(tmp_path, "x-symbol.json", {"nodes": [
            {"op": "null", "name": "data", "inputs": []}, {"op": "Flatten", "name": "f", "inputs": [[5, 0, 0]]}]}))
    doc = json.loads(sym.read_text())
    nodata = dict(doc, nodes=[dict(n, name="image") if n["name"] == "data" else n for n in doc["nodes"]])
    with pytest.raises(InvalidInputError, match="nodata-symbol.json: the symbol has no 'data' input"):
        MxNetwork.load(_write(tmp_path, "nodata-symbol.json", nodata), params, (224, 224))
    last = doc["nodes"][-1]
    multi = dict(doc, nodes=[*doc["nodes"][:-1], dict(last, inputs=[[last["inputs"][0][0], 1, 0]])])
    with pytest.raises(InvalidInputError, match="multi-symbol.json: operator SoftmaxOutput .*uses output 1 of a multi"):
        MxNetwork.load(_write(tmp_path, "multi-symbol.json", multi), params, (224, 224))
    with pytest.raises(InvalidInputError, match=r"Inception-symbol.json: layer 'max_pool_1' \(Pooling\): a \(2, 2\) "
                                                "window does not fit the 1x1 input"):
        MxNetwork.load(sym, params, (1, 1))
    lyr = dict(MxNetwork.load(sym, params, (224, 224)).layers())
    assert lyr["conv_1"] == (8, 56, 56) and lyr["max_pool_1"] == (8, 28, 28) and lyr["fc1"] == (10,)
    assert lyr["softmax"] == (10,) and "data" not in lyr


def test_symbol_saved_by_mxnet_before_0_9(tmp_path: Path) -> None:
    """Old files spell attributes ``param`` and leave batch norm's moving statistics out of the inputs."""
    sym, params = build_tiny_inception_checkpoint(tmp_path / "Inception")
    doc = json.loads(sym.read_text())
    for node in doc["nodes"]:
        if "attrs" in node:
            node["param"] = node.pop("attrs")
        node["inputs"] = [ref[:2] for ref in node["inputs"] if not doc["nodes"][ref[0]]["name"].endswith(
            ("_moving_mean", "_moving_var"))]
    old = _write(tmp_path, "old-symbol.json", doc)
    pre = BUILTIN_MODELS["inception21k"].preprocess
    taps = list(BUILTIN_MODELS["inception21k"].taps)
    x = np.random.default_rng(0).uniform(-117, 138, (2, 3, 224, 224)).astype(np.float32)
    new_out = OnnxModel.load(export_onnx(sym, params, pre, taps), pre, taps, threads=1).forward(x)
    old_out = OnnxModel.load(export_onnx(old, params, pre, taps), pre, taps, threads=1).forward(x)
    for tap in taps:
        np.testing.assert_array_equal(old_out[tap], new_out[tap])


def test_params_not_matching_the_symbol_register_nothing(tmp_path: Path) -> None:
    sym, params = build_tiny_inception_checkpoint(tmp_path / "a" / "Inception")
    _, wide = build_tiny_inception_checkpoint(tmp_path / "b" / "Inception", num_classes=7)
    r = runner.invoke(app, ["models", "add", "tiny", "--symbol", str(sym), "--params", str(wide)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "Inception-0009.params does not match Inception-symbol.json: fc1_weight has shape (7, 32), the symbol " \
           "expects (10, 32); fc1_bias has shape (7,)" in r.output
    cut = tmp_path / "cut-0009.params"
    cut.write_bytes(params.read_bytes()[:-100])
    r = runner.invoke(app, ["models", "add", "tiny", "--symbol", str(sym), "--params", str(cut)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "cut-0009.params: truncated" in r.output, r.output
    store = Store.open()
    assert store.catalog.models() == {} and not (store.root / "models" / "tiny").exists()
    store.close()


def test_mxnet_runtime_without_mxnet_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mxnet", None)  # what an install without the extra sees
    with pytest.raises(RuntimeUnavailableError, match=r'pip install "featurestore\[mxnet\]"'):
        import_mxnet()
    sym, params = build_tiny_inception_checkpoint(tmp_path / "ckpt" / "Inception")
    assert runner.invoke(app, ["models", "add", "tiny", "--symbol", str(sym), "--params", str(params)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "tiny", "--runtime", "mxnet"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: the mxnet runtime needs MXNet") and "featurestore[mxnet]" in r.output


# ---------------------------------------------------------------- every operator against MXNet


def _every_operator_symbol() -> str:
    """One small network using every translated operator (and MXNet's defaults where attributes are left out)."""
    b = SymbolBuilder()
    x = b.op("Convolution", "c1", [b.var("data")], kernel=(3, 3), num_filter=8, pad=(1, 1))  # with bias
    x = b.op("BatchNorm", "bn1", [x])  # fix_gamma defaults to True: the file's gamma is ignored
    x = b.op("Activation", "relu1", [x], act_type="relu")
    dw = b.op("Convolution", "dw", [x], kernel=(3, 3), num_filter=8, num_group=8, stride=(2, 2), pad=(1, 1),
              no_bias=True)
    dil = b.op("Convolution", "dil", [x], kernel=(3, 3), num_filter=8, dilate=(2, 2), pad=(2, 2), stride=(2, 2),
               no_bias=True)
    x = b.op("BatchNorm", "bn2", [b.op("elemwise_add", "sum1", [dw, dil])], fix_gamma=False, eps=1e-5)
    acts = [b.op("Activation", f"act_{a}", [x], act_type=a) for a in ("sigmoid", "tanh", "softrelu", "softsign")]
    leaky = [b.op("LeakyReLU", f"lr_{a}", [x], act_type=a, slope=0.2) for a in ("leaky", "elu", "selu", "prelu")]
    y = b.op("broadcast_mul", "gate", [leaky[0], acts[0]])
    y = b.op("_Plus", "plus", [y, b.op("elemwise_sub", "sub", [acts[1], leaky[1]])])
    y = b.op("broadcast_div", "div", [y, b.op("_plus_scalar", "one_plus", [acts[0]], scalar=1.0)])
    y = b.op("add_n", "addn", [y, acts[2], b.op("elemwise_mul", "mul", [acts[3], leaky[2]])], num_args=3)
    y = b.op("Concat", "cat", [y, b.op("_mul_scalar", "half", [leaky[3]], scalar=0.5)], dim=1, num_args=2)
    y = b.op("clip", "relu6", [b.op("Dropout", "drop", [y], p=0.5)], a_min=0.0, a_max=6.0)
    pads = [b.op("Pad", f"pad_{m}", [y], mode=m, pad_width=(0, 0, 0, 0, 1, 2, 2, 1)) for m in ("constant", "edge")]
    avg = b.op("Pooling", "avg_full", [pads[0]], kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="avg",
               pooling_convention="full", count_include_pad=False)
    avg2 = b.op("Pooling", "avg_valid", [pads[1]], kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="avg")
    mx_ = b.op("Pooling", "max_full", [pads[1]], kernel=(2, 2), stride=(2, 2), pooling_convention="full")
    z = b.op("Concat", "cat2", [avg, avg2, mx_], dim=1, num_args=3)
    gmax = b.op("Pooling", "gmax", [z], global_pool=True, kernel=(1, 1), pool_type="max")
    fc_map = b.op("FullyConnected", "fc_map", [z], num_hidden=6, flatten=False)  # over the last axis
    fc = b.op("FullyConnected", "fc", [b.op("Flatten", "flat", [gmax])], num_hidden=5)
    probs = b.op("softmax", "probs", [fc])
    b.op("Activation", "dead", [probs], act_type="relu")  # not an output: neither MXNet nor the reader lists it
    return b.to_json(b.op("SoftmaxOutput", "softmax", [b.op("FullyConnected", "fc2", [fc_map], num_hidden=4)]), probs)


EVERY_TAP = ["relu1", "bn2", "gate", "div", "addn", "cat", "relu6", "pad_edge", "avg_full", "avg_valid", "max_full",
             "gmax", "fc_map", "fc", "probs", "softmax"]


@pytest.mark.mxnet
def test_every_operator_equals_mxnet(tmp_path: Path) -> None:
    sym = tmp_path / "every-symbol.json"
    sym.write_text(_every_operator_symbol())
    pre = Preprocess(size=(23, 19), mean=(120.0,) * 3, std=(60.0,) * 3)  # odd sizes: "full" pooling rounds up
    params = write_params(tmp_path / "every-0000.params", *random_params(sym, pre.size, seed=3))
    ref = CheckpointModel.load(sym, params, pre, EVERY_TAP, batch_size=3)
    ours = OnnxModel.load(export_onnx(sym, params, pre, EVERY_TAP), pre, EVERY_TAP, batch_size=3, threads=1)
    assert ours.tap_dims() == ref.tap_dims() and ours.tap_pooling() == ref.tap_pooling()
    assert dict(MxNetwork.load(sym, params, pre.size).layers()) == dict(ref.layers())
    rng = np.random.default_rng(0)
    x = np.stack([pre.apply(Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))) for _ in range(5)])
    got, want = ours.forward(x), ref.forward(x)
    for tap in EVERY_TAP:
        _close(got[tap], want[tap])


@pytest.mark.mxnet
def test_params_written_here_are_mxnets_bytes(tmp_path: Path) -> None:
    mx = import_mxnet()
    arg, aux = random_params(_write(tmp_path, "e-symbol.json", _every_operator_symbol()), (23, 19))
    mx.nd.save(str(tmp_path / "mx.params"), {**{f"arg:{k}": mx.nd.array(v) for k, v in arg.items()},
                                             **{f"aux:{k}": mx.nd.array(v) for k, v in aux.items()}})
    assert params_bytes(arg, aux) == (tmp_path / "mx.params").read_bytes()
    mx.nd.save(str(tmp_path / "f64.params"), {"arg:w": mx.nd.array(arg["c1_weight"], dtype="float64")})
    assert np.array_equal(read_params(tmp_path / "f64.params").arg["w"], arg["c1_weight"].astype(np.float64))


# ---------------------------------------------------------------- the built-ins against MXNet


@pytest.mark.realmodel
@pytest.mark.mxnet
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_builtin_export_equals_mxnet(name: str, tmp_path: Path) -> None:
    """Converted from .pth and exported without MXNet; every tap and the logits within 1e-4 of MXNet's forward."""
    skdata = pytest.importorskip("skimage.data")
    spec = BUILTIN_MODELS[name]
    sym, params = model_files(spec, tmp_path)
    taps = [*spec.taps, "fc"]
    ref = CheckpointModel.load(sym, params, spec.preprocess, taps, batch_size=3)
    ours = OnnxModel.load(export_onnx(sym, params, spec.preprocess, taps), spec.preprocess, taps, batch_size=3)
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut()]
    x = np.stack([ours.prepare(Image.fromarray(a)) for a in photos])
    got, want = ours.forward(x), ref.forward(x)
    for tap in taps:
        _close(got[tap], want[tap])
    assert int(np.argmax(got["fc"][1])) == int(np.argmax(want["fc"][1]))


def test_nothing_imports_mxnet_until_its_runtime_is_asked_for(tmp_path: Path) -> None:
    """The CLI, the registry, the built-ins' conversion and an export run without importing mxnet."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path\n"
        "import featurestore.cli.main, featurestore.features.cnn.registry, featurestore.http.app\n"
        "from featurestore.features.cnn.testing import build_tiny_inception_checkpoint\n"
        "from featurestore.features.cnn.onnx_export import export_onnx\n"
        "from featurestore.features.cnn.specs import BUILTIN_MODELS\n"
        f"s, p = build_tiny_inception_checkpoint(Path({str(tmp_path)!r}) / 'Inception')\n"
        "export_onnx(s, p, BUILTIN_MODELS['inception21k'].preprocess, ['global_pool'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mxnet'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
