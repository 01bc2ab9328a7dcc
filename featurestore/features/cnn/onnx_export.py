"""Export an MXNet checkpoint, with its taps as graph outputs, to one ONNX graph for onnxruntime.

MXNet stays the model format and the reference runtime; the ONNX file is a
derived copy made once when a model is registered
(:mod:`featurestore.features.cnn.registry`) and run by
:mod:`featurestore.features.cnn.onnx_backend`.

The graph is built the way :class:`~featurestore.features.cnn.mxnet_backend.CheckpointModel`
builds its executor: the requested internal layers ("taps") are grouped into
one graph and 4-D taps are averaged over height and width *inside* the graph
(``GlobalAveragePool`` + ``Flatten``), so one ``session.run`` returns every
``(n, C)`` matrix. The batch dimension is dynamic. Weights are initializers
only (not also graph inputs), so onnxruntime may constant-fold them (batch-norm
into the convolutions).

MXNet 1.9.1's exporter (``mxnet.onnx``) translates to opset 13 but checks each
graph against the newest opset the ``onnx`` package knows, which rejects
opset-13 nodes whose attributes later became inputs (``ReduceMean``'s
``axes``); the check is therefore run against opset 13 here, the opset the
model declares. It also needs ``onnx.mapping``, which onnx removed after 1.15,
hence the ``onnx==1.15.0`` pin.

A JSON record under the ``featurestore`` metadata key names, for every tap, its
graph output, dimension and pooling, plus the preprocessing and the sha256 of
the checkpoint files it was exported from.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import InvalidInputError, ModelFilesMissingError, NotFoundError, RuntimeUnavailableError
from featurestore.features.cnn.mxnet_backend import Preprocess, _split_params, import_mxnet
from featurestore.io.atomic import sha256_file, write_bytes_atomic

__all__ = ["ONNX_OPSET", "METADATA_KEY", "OnnxTap", "export_onnx", "read_metadata", "store_onnx"]

ONNX_OPSET = 13
METADATA_KEY = "featurestore"
FORMAT = "featurestore-onnx/1"
INPUT_NAME = "data"

# The exporter checks graphs against onnx.checker.DEFAULT_CONTEXT, a module-level object:
# exports are serialised so its opset can be set for the duration of one export.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class OnnxTap:
    """One tap of an exported graph: its output name, vector length and how it was pooled."""

    tap: str
    output: str
    dim: int
    pooling: str


def _tap_graph(mx: Any, sym: Any, taps: Sequence[str], size: tuple[int, int], where: str
               ) -> tuple[Any, list[OnnxTap]]:
    """The symbol grouping the taps (pooled in the graph) and what each output holds."""
    w, h = size
    internals = sym.get_internals()
    try:
        _, out_shapes, _ = internals.infer_shape_partial(data=(1, 3, h, w))
    except Exception as exc:
        raise InvalidInputError(f"{where}: cannot infer layer shapes for a {w}x{h} input ({exc})") from None
    shapes = {
        name[: -len("_output")]: tuple(int(d) for d in shape[1:])
        for name, shape in zip(internals.list_outputs(), out_shapes, strict=True)
        if name.endswith("_output") and shape
    }
    outputs, described = [], []
    for tap in taps:
        if tap not in shapes:
            raise NotFoundError("layer", tap, shapes, hint=f"see the layers of {where}")
        out, shape = internals[tap + "_output"], shapes[tap]
        # Distinct node names: a tap's own name (e.g. "global_pool") is already a tensor of the graph.
        if len(shape) == 3:
            out = mx.sym.Pooling(out, kernel=(1, 1), global_pool=True, pool_type="avg", name=f"{tap}__pool")
            out, dim, pooling = mx.sym.flatten(out, name=f"{tap}__gap"), shape[0], "global-average"
        elif len(shape) == 1:
            out, dim, pooling = mx.sym.identity(out, name=f"{tap}__out"), shape[0], "none"
        else:
            out, dim, pooling = mx.sym.flatten(out, name=f"{tap}__flat"), int(np.prod(shape)), "flatten"
        outputs.append(out)
        described.append(OnnxTap(tap, out.name, int(dim), pooling))
    return mx.sym.Group(outputs), described


def _load_checkpoint(mx: Any, symbol_path: Path, params_path: Path) -> tuple[Any, dict[str, Any]]:
    """The symbol and all its params (arg and aux together), with readable errors."""
    missing = [str(p) for p in (symbol_path, params_path) if not p.is_file()]
    if missing:
        raise ModelFilesMissingError(f"model files not found: {', '.join(missing)}")
    try:
        sym = mx.sym.load(str(symbol_path))
    except Exception as exc:
        raise InvalidInputError(f"{symbol_path}: not a readable MXNet symbol file ({exc})") from None
    try:
        arg_params, aux_params = _split_params(mx.nd.load(str(params_path)), params_path)
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"{params_path}: not a readable MXNet params file ({exc})") from None
    return sym, {**arg_params, **aux_params}


def _onnx_graph(group: Any, params: dict[str, Any], size: tuple[int, int], where: str) -> Any:
    """MXNet's exporter on the tap group (opset 13, dynamic batch), weights as initializers only."""
    import onnx.checker
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph  # the graph builder behind mx.onnx.export_model
    from onnx import TensorProto

    w, h = size
    ctx = onnx.checker.DEFAULT_CONTEXT
    with _EXPORT_LOCK:
        saved = ctx.opset_imports
        ctx.opset_imports = {"": ONNX_OPSET}
        try:
            graph = MXNetGraph().create_onnx_graph_proto(
                group, params, [(1, 3, h, w)], [TensorProto.FLOAT], opset_version=ONNX_OPSET,
                dynamic=True, dynamic_input_shapes=[(None, 3, h, w)],
            )
        except Exception as exc:  # AttributeError for an operator without translation, checker errors...
            raise RuntimeUnavailableError(f"{where} cannot be exported to ONNX ({type(exc).__name__}: {exc})") from None
        finally:
            ctx.opset_imports = saved
    # Weights as graph inputs could be overridden at run time, so onnxruntime would not fold them.
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(inputs)
    if [i.name for i in graph.input] != [INPUT_NAME]:
        raise RuntimeUnavailableError(
            f"{where}: the exported graph has inputs {[i.name for i in graph.input]}, expected 'data'"
        )
    return graph


def export_onnx(
    symbol_path: str | Path,
    params_path: str | Path,
    preprocess: Preprocess,
    taps: Sequence[str],
) -> bytes:
    """Export a checkpoint's taps to a serialized ONNX model (opset 13, dynamic batch).

    Parameters
    ----------
    symbol_path, params_path
        ``<prefix>-symbol.json`` and ``<prefix>-<epoch>.params``.
    preprocess
        The network input size is taken from it (and recorded with it).
    taps
        Internal layer names, e.g. ``["global_pool", "block15_out"]``.

    Returns
    -------
    bytes
        The model, deterministic for the same files and taps.

    Raises
    ------
    ModelFilesMissingError
        A checkpoint file does not exist.
    NotFoundError
        A tap is not a layer of the symbol.
    RuntimeUnavailableError
        The graph uses an operator MXNet's ONNX exporter cannot translate.
    """
    import onnx
    from onnx import helper

    mx = import_mxnet()
    symbol_path, params_path = Path(symbol_path), Path(params_path)
    taps = list(dict.fromkeys(taps))
    if not taps:
        raise InvalidInputError("at least one tap (layer name) is needed")
    sym, all_params = _load_checkpoint(mx, symbol_path, params_path)
    group, described = _tap_graph(mx, sym, taps, preprocess.size, symbol_path.name)
    wanted = set(group.list_arguments()) | set(group.list_auxiliary_states())
    params = {k: v for k, v in all_params.items() if k in wanted}
    lacking = sorted(wanted - set(params) - {INPUT_NAME})
    if lacking:
        raise InvalidInputError(
            f"{params_path} does not match {symbol_path.name}: {', '.join(lacking[:5])} missing. "
            "Use the .params file saved with this symbol."
        )
    graph = _onnx_graph(group, params, preprocess.size, symbol_path.name)
    absent = [t.output for t in described if t.output not in {o.name for o in graph.output}]
    if absent:
        raise RuntimeUnavailableError(f"{symbol_path.name}: the exported graph lacks the outputs {absent}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="featurestore")
    record = {
        "format": FORMAT,
        "taps": [asdict(t) for t in described],
        "preprocess": preprocess.to_params(),
        "symbol_sha256": sha256_file(symbol_path),
        "params_sha256": sha256_file(params_path),
        "mxnet": mx.__version__,
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(record, sort_keys=True)})
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise RuntimeUnavailableError(f"{symbol_path.name}: the exported ONNX graph is invalid ({exc})") from None
    return model.SerializeToString()


def read_metadata(model: Any, where: str) -> tuple[list[OnnxTap], dict[str, Any]]:
    """The taps and the whole record of a model exported by :func:`export_onnx`."""
    props = {p.key: p.value for p in model.metadata_props}
    try:
        record = json.loads(props[METADATA_KEY])
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        taps = [OnnxTap(str(t["tap"]), str(t["output"]), int(t["dim"]), str(t["pooling"])) for t in record["taps"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{where} was not exported by featurestore ({exc}); re-register the model") from None
    return taps, record


def store_onnx(folder: Path, name: str, data: bytes) -> tuple[Path, str]:
    """Write ``data`` as ``<folder>/<name>-<sha256[:12]>.onnx`` (atomically); returns the path and sha256.

    The name follows the content, so exporting the same graph twice (two
    processes converting a built-in model at once) writes the same file, and
    replacing a model never overwrites the file a catalog row still points at.
    """
    sha = hashlib.sha256(data).hexdigest()
    path = Path(folder) / f"{name}-{sha[:12]}.onnx"
    if not (path.is_file() and sha256_file(path) == sha):
        write_bytes_atomic(path, data)
    return path, sha

