"""Export an MXNet checkpoint, with its taps as graph outputs, to one ONNX graph for onnxruntime.

MXNet checkpoints stay a model format; the ONNX file is a derived copy made
once when a model is registered (:mod:`featurestore.features.cnn.registry`)
and run by :mod:`featurestore.features.cnn.onnx_backend`. The graph is built
by featurestore's own reader (:mod:`featurestore.features.cnn.mx2onnx`), so no
MXNet is needed; MXNet (``pip install "featurestore[mxnet]"``) remains the
reference runtime the parity tests compare against.

The requested internal layers ("taps") are outputs of one graph and 4-D taps
are averaged over height and width *inside* the graph (``GlobalAveragePool`` +
``Flatten``), so one ``session.run`` returns every ``(n, C)`` matrix. The batch
dimension is dynamic. Weights are initializers only (not graph inputs), so
onnxruntime may constant-fold them (batch-norm into the convolutions).

A JSON record under the ``featurestore`` metadata key names, for every tap, its
graph output, dimension and pooling, plus the preprocessing and the sha256 of
the checkpoint files it was exported from (the format featurestore 0.1 wrote
with MXNet's exporter; its exports are read unchanged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from featurestore.errors import InvalidInputError
from featurestore.features.cnn.mx2onnx import INPUT_NAME, ONNX_OPSET, MxNetwork, OnnxTap
from featurestore.features.cnn.mxnet_backend import Preprocess
from featurestore.io.atomic import sha256_file, write_bytes_atomic

__all__ = ["ONNX_OPSET", "INPUT_NAME", "METADATA_KEY", "OnnxTap", "export_onnx", "read_metadata", "store_onnx"]

METADATA_KEY = "featurestore"
FORMAT = "featurestore-onnx/1"
EXPORTER = "featurestore-mx2onnx/1"


def export_onnx(
    symbol_path: str | Path,
    params_path: str | Path,
    preprocess: Preprocess,
    taps: Sequence[str],
) -> bytes:
    """Export a checkpoint's taps to a serialized ONNX model (opset 13, dynamic batch), without MXNet.

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
    UnsupportedOperatorError
        The symbol uses an operator the reader cannot translate (an ``InvalidInputError``).
    InvalidInputError
        A file is unreadable or truncated, or the params do not fit the symbol.
    """
    import onnx
    from onnx import helper

    symbol_path, params_path = Path(symbol_path), Path(params_path)
    taps = list(dict.fromkeys(taps))
    if not taps:
        raise InvalidInputError("at least one tap (layer name) is needed")
    model, described = MxNetwork.load(symbol_path, params_path, preprocess.size).to_onnx(taps)
    record = {
        "format": FORMAT,
        "taps": [asdict(t) for t in described],
        "preprocess": preprocess.to_params(),
        "symbol_sha256": sha256_file(symbol_path),
        "params_sha256": sha256_file(params_path),
        "exporter": EXPORTER,
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(record, sort_keys=True)})
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # a translation bug, not the user's: say which file
        raise InvalidInputError(f"{symbol_path.name}: the ONNX graph built from it is invalid ({exc})") from None
    return bytes(model.SerializeToString())


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

