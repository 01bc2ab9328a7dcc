"""Any ONNX backbone as a featurestore model (``fs models add NAME --onnx FILE --input-size 224``).

A user's export (a DINOv2, ConvNeXt or CLIP vision tower...) has one NCHW
float image input; its taps are tensors of the graph. :func:`export_onnx_backbone`
turns the file into the same kind of graph featurestore builds from MXNet
checkpoints (:mod:`featurestore.features.cnn.onnx_export`): input renamed
``data`` with the declared size, every tap an output pooled in the graph
(``GlobalAveragePool`` ``<tap>__pool`` + ``Flatten`` ``<tap>__gap`` for maps,
``Identity`` ``<tap>__out`` for vectors, ``Flatten`` ``<tap>__flat``
otherwise), the nodes no tap needs dropped, and the same ``featurestore``
metadata record. So ``--layers``, ``--grid``, ``--tta``, pooling and the
sha256 checks work as for the built-ins, on onnxruntime.

Tap names are tensor names made into valid feature-set names (anything but
letters, digits, ``.``, ``_``, ``+``, ``-`` becomes ``_``): PyTorch's
``/layer4/layer4.1/relu_1/Relu_output_0`` is the tap
``layer4_layer4.1_relu_1_Relu_output_0``. Without ``--taps`` the graph's own
outputs are the taps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featurestore.errors import InvalidInputError, ModelFilesMissingError, NotFoundError
from featurestore.features.cnn.mx2onnx import INPUT_NAME, OnnxTap
from featurestore.features.cnn.mxnet_backend import Preprocess
from featurestore.features.cnn.onnx_export import FORMAT, METADATA_KEY
from featurestore.io.atomic import sha256_file

__all__ = ["OnnxLayer", "export_onnx_backbone", "onnx_layers", "tap_name"]

EXPORTER = "featurestore-onnx-import/1"
_BATCH = "batch"


@dataclass(frozen=True)
class OnnxLayer:
    """A tensor of a user's graph that can be tapped: its tap name, tensor name and per-image shape."""

    tap: str
    tensor: str
    shape: tuple[int, ...]


def tap_name(tensor: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", tensor).strip("_")[:200] or "tensor"


def _dims(value_info: Any) -> tuple[int | str, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value_info.type.tensor_type.shape.dim)


def _read(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise ModelFilesMissingError(f"{path} does not exist; give the ONNX file of the backbone")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # DecodeError, external data missing...
        raise InvalidInputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _image_input(model: Any, path: Path, size: tuple[int, int]) -> Any:
    """The graph's one image input, checked against the declared ``(width, height)``."""
    from onnx import TensorProto

    w, h = size
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    described = ", ".join(f"{i.name} {list(_dims(i))}" for i in inputs) or "none"
    ok = len(inputs) == 1 and inputs[0].type.tensor_type.elem_type == TensorProto.FLOAT
    if ok:
        dims = _dims(inputs[0])
        ok = len(dims) == 4 and all(isinstance(d, str) or d == want for d, want in zip(dims[1:], (3, h, w),
                                                                                       strict=True))
    if not ok:
        raise InvalidInputError(
            f"{path} has no image input of shape (batch, 3, {h}, {w}) (its inputs: {described}); export the "
            "model with one float NCHW image input, of the size given to {input_size}", params=("input_size",),
            path=path
        )
    return inputs[0]


def _prepared(path: Path, size: tuple[int, int]) -> tuple[Any, dict[str, OnnxLayer]]:
    """The model with its input renamed ``data`` at the declared size, and its tap-able tensors by tap name."""
    import onnx
    from onnx import TensorProto, helper

    model = _read(path)
    inp = _image_input(model, path, size)
    old, (w, h) = inp.name, size
    for node in model.graph.node:
        node.input[:] = [INPUT_NAME if i == old else i for i in node.input]
    inp.CopyFrom(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [_BATCH, 3, h, w]))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise InvalidInputError(f"{path}: ONNX shape inference fails for a {w}x{h} input ({exc})") from None
    infos = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    layers: dict[str, OnnxLayer] = {}
    for node in model.graph.node:
        for tensor in node.output:
            info = infos.get(tensor)
            if info is None or info.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            dims = _dims(info)[1:]
            if dims and all(isinstance(d, int) and d > 0 for d in dims):
                tap = tap_name(tensor)
                while tap in layers:  # two tensors that read the same once made names
                    tap += "_"
                layers[tap] = OnnxLayer(tap, tensor, tuple(int(d) for d in dims))
    return model, layers


def onnx_layers(path: str | Path, size: tuple[int, int]) -> list[OnnxLayer]:
    """Every tensor of the graph that can be a tap (float, shape known but for the batch), in graph order."""
    return list(_prepared(Path(path), size)[1].values())


def _pool(tap: OnnxLayer) -> tuple[list[Any], OnnxTap]:
    from onnx import helper

    t, shape = tap.tap, tap.shape
    if len(shape) == 3:
        nodes = [helper.make_node("GlobalAveragePool", [tap.tensor], [f"{t}__pool"], name=f"{t}__pool"),
                 helper.make_node("Flatten", [f"{t}__pool"], [f"{t}__gap"], name=f"{t}__gap", axis=1)]
        return nodes, OnnxTap(t, f"{t}__gap", shape[0], "global-average")
    if len(shape) == 1:
        return [helper.make_node("Identity", [tap.tensor], [f"{t}__out"], name=f"{t}__out")], \
            OnnxTap(t, f"{t}__out", shape[0], "none")
    dim = 1
    for d in shape:
        dim *= d
    return [helper.make_node("Flatten", [tap.tensor], [f"{t}__flat"], name=f"{t}__flat", axis=1)], \
        OnnxTap(t, f"{t}__flat", dim, "flatten")


def _resolve(layers: dict[str, OnnxLayer], taps: Sequence[str], path: Path) -> list[OnnxLayer]:
    by_tensor = {layer.tensor: layer for layer in layers.values()}
    out = []
    for tap in dict.fromkeys(taps):
        layer = layers.get(tap) or by_tensor.get(tap)
        if layer is None:
            raise NotFoundError("layer", tap, layers, hint=f"see the layers of {path.name}", remedy="models-show")
        out.append(layer)
    return out


def export_onnx_backbone(path: str | Path, preprocess: Preprocess, taps: Sequence[str] | None = None
                         ) -> tuple[bytes, list[str]]:
    """The featurestore graph of a user's ONNX model: its taps as pooled outputs, the rest pruned.

    Parameters
    ----------
    path
        The ONNX file (one float NCHW image input).
    preprocess
        Declares the input size (and is recorded with the graph).
    taps
        Tap or tensor names; default: the graph's outputs.

    Returns
    -------
    tuple
        The serialized model and the tap names, in order.

    Raises
    ------
    ModelFilesMissingError
        The file does not exist.
    InvalidInputError
        Not ONNX, or no image input of the declared size.
    NotFoundError
        A tap is not a tensor of the graph (the message lists the layers).
    """
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    model, layers = _prepared(path, preprocess.size)
    wanted = list(taps) if taps else [tap_name(o.name) for o in model.graph.output]
    chosen = _resolve(layers, wanted, path)
    extra, described = [], []
    for layer in chosen:
        nodes, tap = _pool(layer)
        extra.extend(nodes)
        described.append(tap)
    graph = model.graph
    needed = {t.output for t in described}
    kept = []
    for node in reversed([*graph.node, *extra]):  # the nodes the taps need, in order
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    pruned = helper.make_graph(
        kept, graph.name or path.stem, [i for i in graph.input if i.name == INPUT_NAME],
        [helper.make_tensor_value_info(t.output, TensorProto.FLOAT, [_BATCH, t.dim]) for t in described],
        initializer=[t for t in graph.initializer if t.name in needed],
    )
    out = helper.make_model(pruned, opset_imports=list(model.opset_import), producer_name="featurestore")
    out.ir_version = model.ir_version
    sha = sha256_file(path)
    record = {"format": FORMAT, "taps": [asdict(t) for t in described], "preprocess": preprocess.to_params(),
              "symbol_sha256": sha, "params_sha256": sha, "exporter": EXPORTER}
    helper.set_model_props(out, {METADATA_KEY: json.dumps(record, sort_keys=True)})
    try:
        onnx.checker.check_model(out)
    except Exception as exc:
        raise InvalidInputError(f"{path}: the graph with its taps as outputs is not valid ONNX ({exc})") from None
    return bytes(out.SerializeToString()), [t.tap for t in described]
