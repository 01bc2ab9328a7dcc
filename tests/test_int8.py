"""int8 CNN models with an accuracy guard, and draft JPEG decode for CNN-only passes (issue 29)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.features.cnn.quantize import (
    Calibration,
    CalibrationTooSmallError,
    mean_cosine,
    read_int8_record,
)
from featurestore.features.cnn.registration import add_model
from featurestore.features.cnn.registry import cnn_extractor, model_record
from featurestore.features.cnn.testing import build_tiny_inception_checkpoint
from featurestore.features.cnn.views import extract_command
from featurestore.features.registry import extractor_for, extractor_for_sets
from featurestore.io.images import decode_bytes
from featurestore.store import Store

onnx = pytest.importorskip("onnx")
runner = CliRunner()


def _photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth, photo-like image: blurred blobs of colour (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w / 8, w / 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _photos(root: Path, n: int, start: int = 0, size: tuple[int, int] = (160, 120)) -> Path:
    for k in range(start, start + n):
        path = root / "cls" / f"p{k:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(k, size).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_inception_checkpoint(tmp_path_factory.mktemp("tiny") / "Inception")


def _setup(tmp_path: Path, tiny_ckpt, n: int = 24) -> Path:
    root = _photos(tmp_path / "photos", n)
    assert runner.invoke(app, ["ingest", str(root)]).exit_code == 0
    added = runner.invoke(app, ["models", "add", "inception21k", "--symbol", str(tiny_ckpt[0]),
                                "--params", str(tiny_ckpt[1])])
    assert added.exit_code == 0, added.output
    return root


def _int8_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / ".fs" / "models" / "inception21k").glob("inception21k+int8-*.onnx"))


# ---------------------------------------------------------------- quantisation and the guard


def test_int8_extract_records_calibration_and_cosine_and_reuses_the_model(tmp_path: Path, tiny_ckpt) -> None:
    root = _setup(tmp_path, tiny_ckpt)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20"])
    assert r.exit_code == 0, r.output
    assert "inception21k+int8: int8 model" in r.output
    # 1.0000 since the convolutions' bias correction: the tiny network's int8 copy rounds to fp32's
    assert re.search(r"\(calibrated on 16 images, seed 0\); mean cosine to fp32 on 4 held-back images: "
                     r"global_pool (0\.9\d{3}|1\.0000)", r.output), r.output
    assert "inception21k+int8: 24 vectors written" in r.output
    assert "(after the tap bias correction)" in r.output
    [path] = _int8_files(tmp_path)
    store = Store.open(Settings.from_env())
    fs = store.feature_set("inception21k+int8")
    q = fs.params["quantization"]
    assert fs.params["precision"] == "int8" and fs.params["decode"] == "draft"
    assert q["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"inception21k+int8-{q['sha256'][:12]}.onnx"
    assert q["calibration"] == {"images": 16, "held_back": 4, "seed": 0, "requested": 20}
    assert q["format"] == "QDQ" and q["weights"] == "int8 per-channel" and q["activations"] == "uint8"
    assert q["correction"] == "tap-mean" and set(q["cosine_uncorrected"]) == set(q["cosine"])
    assert set(q["cosine"]) == set(model_record(store, "inception21k").taps)  # every tap of the export
    assert q["cosine"]["global_pool"] >= 0.98
    record = read_int8_record(onnx.load(str(path)), str(path))
    assert record.source_sha256 == model_record(store, "inception21k").onnx_sha256  # made from the stored export
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert extract_command("inception21k+int8", fs.params) == "fs extract --model inception21k --precision int8"
    store.close()
    # fp32 beside it: another set, never mixed; the int8 vectors are close to the fp32 ones
    r = runner.invoke(app, ["extract", "--model", "inception21k"])
    assert r.exit_code == 0 and "inception21k: 24 vectors written" in r.output, r.output
    store = Store.open(Settings.from_env())
    fp32, int8 = store.read_matrix(["inception21k"]).X, store.read_matrix(["inception21k+int8"]).X
    assert "precision" not in store.feature_set("inception21k").params
    assert mean_cosine(int8, fp32) >= 0.98 and not np.array_equal(int8, fp32)
    # rebuilt from its params (search, predict, the cluster's workers): the same model and vectors
    ex = extractor_for(store, "inception21k+int8")
    assert ex.runtime == "onnxruntime"
    store.close()
    # more images: the stored int8 model is reused (no new file, no new calibration)
    _photos(root, 4, start=100)
    assert runner.invoke(app, ["ingest", str(root)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20"])
    assert r.exit_code == 0 and "inception21k+int8: 4 vectors written" in r.output, r.output
    assert _int8_files(tmp_path) == [path]
    # even with another calibration asked for, an existing set continues with its own model
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "24"])
    assert r.exit_code == 0 and "up to date" in r.output and _int8_files(tmp_path) == [path], r.output


def test_int8_model_refused_below_min_cosine_and_no_set_made(tmp_path: Path, tiny_ckpt) -> None:
    _setup(tmp_path, tiny_ckpt)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20",
                            "--min-cosine", "1"])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith("Error: int8 inception21k refused: mean cosine to fp32 on 4 "
                                                "held-back images is 0.9")
    assert "below the threshold 1 (--min-cosine)" in line
    [refused] = _int8_files(tmp_path)  # kept with its figures, so a second run does not calibrate again
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20",
                            "--min-cosine", "1"])
    assert r.exit_code == 1 and "refused" in r.output and _int8_files(tmp_path) == [refused]
    store = Store.open(Settings.from_env())
    assert "inception21k+int8" not in {fs.name for fs in store.feature_sets()}
    store.close()


def test_int8_bad_input(tmp_path: Path, tiny_ckpt) -> None:
    _setup(tmp_path, tiny_ckpt, n=12)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--runtime", "mxnet"])
    assert r.exit_code == 2 and "int8 models run on onnxruntime only" in r.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "5"])
    assert r.exit_code == 2 and "use at least 20 images" in r.output
    r = runner.invoke(app, ["extract", "--rp", "8", "--precision", "int8"])
    assert r.exit_code == 2 and "--precision int8 needs --model" in r.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "fp16"])
    assert r.exit_code == 2 and "use fp32 or int8" in r.output
    # the store holds 12 images: too few to calibrate
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8"])
    assert r.exit_code == 1, r.output
    assert r.output.strip() == ("Error: int8 calibration of inception21k needs at least 20 readable images in the "
                                "store, found 12; ingest more images or keep --precision fp32")
    store = Store.open(Settings.from_env())
    with pytest.raises(InvalidInputError, match="int8 models run on onnxruntime only"):
        cnn_extractor(store, "inception21k", precision="int8", runtime="mxnet")
    store.close()


def test_quantised_graph_that_fails_to_load_names_the_model_and_leaves_fp32(
        tmp_path: Path, tiny_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as oq

    _setup(tmp_path, tiny_ckpt)
    store = Store.open(Settings.from_env())
    fp32_path = tmp_path / ".fs" / str(model_record(store, "inception21k").onnx_path)
    fp32_bytes = fp32_path.read_bytes()
    store.close()
    real = oq.quantize_static

    def broken(model_input, model_output, *a, **k):  # type: ignore[no-untyped-def]
        real(model_input, model_output, *a, **k)
        model = onnx.load(str(model_output))
        next(n for n in model.graph.node if n.op_type == "Conv").op_type = "ConvThatDoesNotExist"
        onnx.save(model, str(model_output))

    monkeypatch.setattr(oq, "quantize_static", broken)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: the int8 graph of model inception21k cannot be loaded by onnxruntime (")
    assert "its fp32 export is unchanged: extract with --precision fp32" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert fp32_path.read_bytes() == fp32_bytes and _int8_files(tmp_path) == []
    r = runner.invoke(app, ["extract", "--model", "inception21k"])
    assert r.exit_code == 0 and "inception21k: 24 vectors written" in r.output, r.output


def test_stored_int8_model_checked_before_use(store: Store, tmp_path: Path, tiny_ckpt) -> None:
    from featurestore.pipelines.extract import extract
    from featurestore.pipelines.ingest import ingest

    with store.writing():
        ingest(store, _photos(tmp_path / "photos", 20))
        add_model(store, "inception21k", *tiny_ckpt)
        ex = cnn_extractor(store, "inception21k", ["global_pool", "ch_concat_4e_chconcat"], precision="int8",
                           save_export=True)
        extract(store, [ex])
    assert [s.name for s in ex.outputs()] == ["inception21k+int8", "inception21k.ch_concat_4e_chconcat+int8"]
    sets = [store.feature_set(s.name) for s in ex.outputs()]
    both = extractor_for_sets(store, sets)  # one int8 session for both taps (the cluster path)
    assert {s.name for s in both.outputs()} == {s.name for s in sets}
    [path] = sorted((store.root / "models" / "inception21k").glob("*+int8-*.onnx"))
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    tampered = re.escape(f"{path.name} does not match the sha256 recorded with the int8")
    with pytest.raises(IntegrityError, match=tampered):
        extractor_for(store, "inception21k+int8")
    path.write_bytes(good)
    assert extractor_for(store, "inception21k+int8").outputs()[0].params == sets[0].params


def test_tap_bias_correction_removes_the_mean_difference_at_every_tap(tiny_ckpt) -> None:
    """The correction subtracts int8 - fp32's mean over the calibration images at each tap, nothing else."""
    import onnxruntime as ort

    from featurestore.features.cnn.onnx_export import INPUT_NAME, export_onnx, read_metadata
    from featurestore.features.cnn.quantize import quantize_export, subtract_at_outputs, tap_bias
    from featurestore.features.cnn.specs import BUILTIN_MODELS

    spec = BUILTIN_MODELS["inception21k"]
    fp32 = export_onnx(*tiny_ckpt, spec.preprocess, list(spec.taps))
    taps, _ = read_metadata(onnx.load_from_string(fp32), "tiny")
    outputs = [t.output for t in taps]
    rng = np.random.default_rng(1)
    calibrate = rng.uniform(-1, 1, (24, 3, 224, 224)).astype(np.float32)
    held = rng.uniform(-1, 1, (6, 3, 224, 224)).astype(np.float32)
    data, record = quantize_export(fp32, calibrate, held, Calibration.split(30, 0), "tiny")
    assert record.correction == "tap-mean" and set(record.cosine) == set(record.cosine_uncorrected) == set(spec.taps)

    def run(model: bytes, x: np.ndarray) -> list[np.ndarray]:
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(outputs, {INPUT_NAME: x})

    # over the calibration images the corrected int8 vectors have the fp32 mean, tap by tap
    for got, want in zip(run(data, calibrate), run(fp32, calibrate), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.mean(axis=0), want.mean(axis=0), atol=1e-4)
    # the graph edit alone: the outputs keep their names and are shifted by exactly the bias
    model = onnx.load_from_string(fp32)
    shift = {o: np.full(v.shape[1:], 0.5, np.float32) for o, v in zip(outputs, run(fp32, held), strict=True)}
    subtract_at_outputs(model, shift)
    assert [o.name for o in model.graph.output] == [o.name for o in onnx.load_from_string(fp32).graph.output]
    for got, want in zip(run(model.SerializeToString(), held), run(fp32, held), strict=True):
        np.testing.assert_allclose(got, want - 0.5, atol=1e-5)
    bias = tap_bias(fp32, fp32, outputs, held)  # a model against itself: nothing to correct
    assert all(float(np.abs(b).max()) == 0.0 for b in bias.values())


def test_stored_uncorrected_int8_model_is_not_reused() -> None:
    """An int8 model made before the tap correction (its record says "none") is not picked for a new set."""
    from featurestore.features.cnn.quantize import CORRECTION, Int8Options, Int8Record

    cal = Calibration.split(20, 0, 20)
    old = Int8Record("abc", cal, {"global_pool": 0.97})
    assert old.correction == "none" and not old.matches("abc", Int8Options(sample=20))
    new = Int8Record("abc", cal, {"global_pool": 0.99}, correction=CORRECTION)
    assert new.matches("abc", Int8Options(sample=20))
    assert not new.matches("abd", Int8Options(sample=20)) and not new.matches("abc", Int8Options(sample=21))
    assert not new.matches("abc", Int8Options(sample=20, seed=1))


def test_old_int8_records_read_and_recognised() -> None:
    """A stored record from before the correction inside the network reads as "none" there (taps' correction only)."""
    import json
    from dataclasses import asdict

    from featurestore.features.cnn.quantize import BIAS_CORRECTION, INT8_FORMAT, INT8_KEY, Int8Options, Int8Record

    cal = Calibration.split(20, 0, 20)
    raw = {"format_version": INT8_FORMAT, "source_sha256": "abc", "calibration": {"images": 16, "held_back": 4,
           "seed": 0, "requested": 20}, "cosine": {"global_pool": 0.97}, "correction": "tap-mean",
           "cosine_uncorrected": {"global_pool": 0.96}}  # written by the tap correction's version
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.helper.set_model_props(model, {INT8_KEY: json.dumps(raw)})
    old = read_int8_record(model, "old.onnx")
    assert (old.correction, old.bias_correction, old.convs_corrected) == ("tap-mean", "none", 0)
    assert old.cosine == {"global_pool": 0.97} and old.calibration == cal
    # the taps' correction alone is still a valid model: reused for requests whose guard it passes
    # (registry._find_int8 checks the taps), the convolutions corrected only when one fails
    assert old.matches("abc", Int8Options(sample=20))
    assert not old.matches("abc", Int8Options(sample=20, seed=1))
    assert old.to_params("f" * 64)["bias_correction"] == "none"  # the sets that use it say what it is
    new = Int8Record("abc", cal, {"global_pool": 0.99}, correction="tap-mean", convs_corrected=3)
    assert new.bias_correction == BIAS_CORRECTION == "conv-sequential" and new.matches("abc", Int8Options(sample=20))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {INT8_KEY: json.dumps({"format_version": INT8_FORMAT, **asdict(new)})})
    assert read_int8_record(model, "new.onnx") == new  # as finish_int8 writes it


def test_int8_convolutions_corrected_only_when_the_guard_needs_it(tmp_path: Path, tiny_ckpt) -> None:
    """The taps' correction alone is made and used while it passes the guard; a stricter guard gets the model
    corrected inside too (made beside it), and the first is still reused for the requests it passes."""
    _setup(tmp_path, tiny_ckpt)
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20"])
    assert r.exit_code == 0, r.output
    [plain] = _int8_files(tmp_path)
    first = read_int8_record(onnx.load(str(plain)), str(plain))
    assert (first.bias_correction, first.convs_corrected) == ("none", 0)
    assert "convolution biases corrected" not in r.output
    strict = min(1.0, first.cosine["global_pool"] + 1e-6)  # just above what the taps' correction reached
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20",
                            "--replace", "--min-cosine", str(strict)])
    [inside_path] = set(_int8_files(tmp_path)) - {plain}
    inside = read_int8_record(onnx.load(str(inside_path)), str(inside_path))
    assert inside.bias_correction == "conv-sequential" and inside.convs_corrected > 0
    assert inside.cosine_uncorrected == first.cosine_uncorrected  # the same quantised graph underneath
    if r.exit_code == 0:  # the correction inside reached the stricter guard: the new version uses it
        assert "convolution biases corrected one by one" in r.output, r.output
        store = Store.open(Settings.from_env())
        assert store.feature_set("inception21k+int8").params["quantization"]["bias_correction"] == "conv-sequential"
        store.close()
    else:
        assert "refused" in r.output, r.output
    # the default guard again: the taps-only model passes it and is picked, nothing new is made
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--precision", "int8", "--calibration", "20",
                            "--replace"])
    assert r.exit_code == 0, r.output
    assert set(_int8_files(tmp_path)) == {plain, inside_path}
    store = Store.open(Settings.from_env())
    q = store.feature_set("inception21k+int8").params["quantization"]
    assert q["bias_correction"] == "none" and q["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    store.close()


def test_refusal_never_prints_a_cosine_equal_to_the_threshold() -> None:
    from featurestore.features.cnn.quantize import LowCosineError

    assert "images is 0.99999 for tap t, below the threshold 1" in str(LowCosineError("m", "t", 0.999994, 4, 1.0))
    assert "images is 0.9712 for tap t" in str(LowCosineError("m", "t", 0.97123, 4, 0.98))


def test_conv_bias_correction_sequential_on_a_small_network() -> None:
    """Each convolution's bias is corrected after the ones before it: the mean error at every quantised
    convolution's output nearly vanishes on the calibration images, and the int32 biases are what changed."""
    from onnx import TensorProto, helper, numpy_helper

    from featurestore.features.cnn.quantize import _biased_convs, _channel_means, _with_outputs, correct_conv_biases

    rng = np.random.default_rng(0)
    # a chain of convolutions with ReLU6, depthwise in the middle (EfficientNet's shape, small); each
    # depthwise kernel has one large weight, so its 8 others round coarsely per channel and, over the
    # positive inputs ReLU6 gives, their rounding errors add up to a shift of the channel's mean
    shapes = {"w1": (8, 3, 3, 3), "w2": (8, 1, 3, 3), "w3": (6, 8, 1, 1)}
    weights = {k: rng.normal(0, 0.6, s).astype(np.float32) for k, s in shapes.items()}
    weights["w2"] = rng.uniform(0.02, 0.3, shapes["w2"]).astype(np.float32)
    weights["w2"][:, 0, 1, 1] = 4.0
    inits = [numpy_helper.from_array(w, k) for k, w in weights.items()]
    inits += [numpy_helper.from_array(rng.normal(0, 0.2, s[0]).astype(np.float32), f"b{k[1]}")
              for k, s in shapes.items()]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["data", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["out"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                             [None, 3, 24, 24])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    x = rng.uniform(-1, 1, (24, 3, 24, 24)).astype(np.float32)
    quantised = _quantise(fp32, x)
    before = onnx.load_from_string(quantised)
    after = onnx.load_from_string(quantised)
    names = {o for n in onnx.load_from_string(fp32).graph.node for o in n.output}
    assert correct_conv_biases(after, fp32, x) == len(_biased_convs(after, names)) >= 2

    def errors(model) -> list[float]:  # type: ignore[no-untyped-def]
        convs = _biased_convs(model, names)
        want = _channel_means(_session_of(_with_outputs(onnx.load_from_string(fp32), [c.output for c in convs],
                                                        prune=False)), [c.output for c in convs], x)
        got = _channel_means(_session_of(_with_outputs(model, [c.quantized for c in convs], prune=True)),
                             [c.quantized for c in convs], x)
        return [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]

    err_before, err_after = errors(before), errors(after)
    assert max(err_before) > 0.01  # 8-bit rounding does shift these channels' means
    assert max(err_after) < max(err_before) and sum(err_after) < 0.5 * sum(err_before), (err_before, err_after)
    changed = [t.name for t, u in zip(before.graph.initializer, after.graph.initializer, strict=True)
               if t.SerializeToString() != u.SerializeToString()]
    assert changed and all(numpy_helper.to_array(next(u for u in after.graph.initializer if u.name == n)).dtype
                           == np.int32 for n in changed)  # only int32 biases
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]  # same graph


def _session_of(data: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _quantise(fp32: bytes, x: np.ndarray) -> bytes:
    """The QDQ copy quantize_export makes (MinMax, per-channel int8 weights, uint8 activations), no correction."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"data": x[i : i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "a.onnx"), Path(tmp, "b.onnx")
        src.write_bytes(fp32)
        quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def test_calibration_sample_is_seeded_and_split() -> None:
    assert Calibration.split(20, 3) == Calibration(16, 4, 3, 20)
    assert Calibration.split(100, 0) == Calibration(80, 20, 0, 100)
    assert Calibration.split(30, 0, requested=100) == Calibration(24, 6, 0, 100)  # a store of 30 images
    assert str(CalibrationTooSmallError("m", 7)).startswith("int8 calibration of m needs at least 20")
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert mean_cosine(a, a) == 1.0 and mean_cosine(a, np.array([[0.0, 1.0], [0.0, 0.0]])) == 0.5


# ---------------------------------------------------------------- draft decode


def _jpeg(img: Image.Image, orientation: int = 1) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def test_draft_decode_covers_the_network_input() -> None:
    photo = _photo(1, (640, 480))
    data = _jpeg(photo)
    full = decode_bytes(data)
    assert (full.width, full.height) == (640, 480)
    small = decode_bytes(data, draft=(224, 224))
    assert small.image.size == (320, 240)  # 1/2 scale: still covers 224x224; 1/4 (160x120) would not
    assert decode_bytes(data, draft=(100, 100)).image.size == (160, 120)
    # the draft is asked of the stored (unrotated) image: a quarter turn swaps the sides
    rotated = decode_bytes(_jpeg(photo, orientation=6), draft=(200, 300))
    assert rotated.image.size == (240, 320)  # 480x640 upright: at 1/2 scale 240x320 covers 200x300
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_bytes(png.getvalue(), draft=(224, 224)).image.size == (640, 480)  # only JPEG drafts
    # what the network sees differs little from the full decode
    a, b = (np.asarray(im.resize((224, 224), Image.Resampling.BILINEAR), np.float32)
            for im in (full.image, small.image))
    assert float(np.abs(a - b).mean()) < 3.0


def test_draft_decode_only_in_cnn_only_passes(tmp_path: Path, tiny_ckpt) -> None:
    root = _photos(tmp_path / "photos", 6, size=(640, 480))
    assert runner.invoke(app, ["ingest", str(root)]).exit_code == 0
    assert runner.invoke(app, ["models", "add", "inception21k", "--symbol", str(tiny_ckpt[0]),
                               "--params", str(tiny_ckpt[1])]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "inception21k"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--tta", "flip", "--lowlevel"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--resize", "center-crop", "--exact-decode"])
    assert r.exit_code == 0, r.output
    store = Store.open(Settings.from_env())
    draft, shared, exact = (store.feature_set(n) for n in ("inception21k", "inception21k+flip",
                                                          "inception21k+center-crop"))
    assert draft.params["decode"] == "draft"
    assert "decode" not in shared.params and "decode" not in exact.params  # full decode, as before
    # the stored draft vectors are those of the draft-decoded images; close to the full decode's
    ex = extractor_for(store, "inception21k")
    assert ex.decode_size() == (224, 224)
    stored = store.read_matrix(["inception21k"])
    datas = [Path(p).read_bytes() for p in stored.paths]
    want = ex.compute([ex.prepare(decode_bytes(d, draft=(224, 224)).image) for d in datas])["inception21k"]
    full = ex.compute([ex.prepare(decode_bytes(d).image) for d in datas])["inception21k"]
    assert np.allclose(stored.X, want, atol=1e-5) and not np.allclose(stored.X, full, atol=1e-5)
    assert mean_cosine(stored.X, full) > 0.99
    store.close()
    # a set keeps the decode it started with: the exact one continues exactly in a CNN-only pass,
    # the draft one continues with its draft decode beside the left-flow's full decode
    _photos(root, 2, start=50, size=(640, 480))
    assert runner.invoke(app, ["ingest", str(root)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--resize", "center-crop"])
    assert r.exit_code == 0 and "inception21k+center-crop: 2 vectors written" in r.output, r.output
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--lowlevel"])
    assert r.exit_code == 0 and "inception21k: 2 vectors written" in r.output, r.output
    # --exact-decode on a draft set is a different set: refused, not mixed
    r = runner.invoke(app, ["extract", "--model", "inception21k", "--exact-decode"])
    assert r.exit_code == 1 and "decode" in r.output, r.output


# ---------------------------------------------------------------- the built-in model


@pytest.mark.realmodel
def test_efficientnet_lite0_int8_close_to_fp32_on_real_photos(tmp_path: Path) -> None:
    """lite0's int8 copy passes the default guard on crops of real photos, and its vectors match fp32's."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path / "real"
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    k = 0
    for arr in photos:
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        for box in [(0, 0, w, h), (0, 0, w * 2 // 3, h * 2 // 3), (w // 3, h // 3, w, h),
                    (w // 6, 0, w * 5 // 6, h), (0, h // 6, w, h * 5 // 6), (w // 4, h // 4, w * 3 // 4, h * 3 // 4)]:
            for mirror in (False, True):
                crop = img.crop(box)
                (root / "cls").mkdir(parents=True, exist_ok=True)
                (crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop).save(
                    root / "cls" / f"r{k:02d}.jpg", quality=92)
                k += 1
    assert runner.invoke(app, ["ingest", str(root)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "efficientnet-lite0", "--precision", "int8", "--calibration", "40"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["extract", "--model", "efficientnet-lite0"])
    assert r.exit_code == 0, r.output
    store = Store.open(Settings.from_env())
    q = store.feature_set("efficientnet-lite0+int8").params["quantization"]
    cosine = q["cosine"]
    assert q["correction"] == "tap-mean" and set(q["cosine_uncorrected"]) == set(cosine)
    # the taps' correction passed the guard, so the convolutions were left as quantised
    assert q["bias_correction"] == "none" and q["convs_corrected"] == 0
    assert set(cosine) == set(model_record(store, "efficientnet-lite0").taps)
    assert all(v >= 0.98 for v in cosine.values()), cosine
    fp32, int8 = store.read_matrix(["efficientnet-lite0"]).X, store.read_matrix(["efficientnet-lite0+int8"]).X
    assert len(fp32) == k == 48 and mean_cosine(int8, fp32) >= 0.98
    store.close()
    # a guard the taps' correction cannot pass: every quantised convolution's bias corrected in turn, which
    # raises the lowest tap's cosine (refused all the same at 0.9999; the model is kept with its figures)
    folder = tmp_path / ".fs" / "models" / "efficientnet-lite0"
    before = set(folder.glob("efficientnet-lite0+int8-*.onnx"))
    r = runner.invoke(app, ["extract", "--model", "efficientnet-lite0", "--precision", "int8", "--calibration", "40",
                            "--replace", "--min-cosine", "0.9999"])
    assert r.exit_code == 1 and "refused" in r.output, r.output
    [made] = set(folder.glob("efficientnet-lite0+int8-*.onnx")) - before
    inside = read_int8_record(onnx.load(str(made)), str(made))
    assert inside.bias_correction == "conv-sequential" and inside.convs_corrected == 49
    assert min(inside.cosine.values()) > min(cosine.values()), (inside.cosine, cosine)


def test_calibration_ranges_cover_every_batch(tiny_ckpt) -> None:
    """The ranges come from all calibration runs (onnxruntime's CalibMaxIntermediateOutputs dropped early ones)."""
    from onnx import numpy_helper

    from featurestore.features.cnn.onnx_export import export_onnx
    from featurestore.features.cnn.quantize import quantize_export
    from featurestore.features.cnn.specs import BUILTIN_MODELS

    spec = BUILTIN_MODELS["inception21k"]
    fp32 = export_onnx(*tiny_ckpt, spec.preprocess, list(spec.taps))
    rng = np.random.default_rng(0)
    calibrate = rng.uniform(-1, 1, (32, 3, 224, 224)).astype(np.float32)  # 4 runs of 8 images
    calibrate[:8] *= 100  # only the first run reaches +-100
    data, record = quantize_export(fp32, calibrate, calibrate[-4:], Calibration.split(36, 0), "tiny")
    model = onnx.load_from_string(data)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "data")
    scale = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[q.input[1]]
    assert float(scale) == pytest.approx(float(calibrate.max() - calibrate.min()) / 255, rel=1e-3)
    assert record.calibration == Calibration(29, 7, 0, 36) and set(record.cosine) == set(spec.taps)

