"""The built-in CNN runtimes: onnxruntime (the model's ONNX export) and MXNet (its checkpoint, the reference).

Both return a verified model with the ``TapModel`` interface of
:mod:`featurestore.features.cnn.mxnet_backend`; they are registered as
:class:`~featurestore.features.cnn.registry.CNNRuntime` by the plugin module
:mod:`featurestore.plugins.cnn_runtimes`, and :func:`~featurestore.features.cnn.registry.cnn_extractor`
looks the chosen one up by name, as it does a runtime a plugin adds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from featurestore.catalog.schema import Model
from featurestore.errors import RuntimeUnavailableError
from featurestore.features.cnn.mxnet_backend import CheckpointModel
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.registry import (
    _fp32_export,
    _preprocess,
    _resized,
    is_onnx_model,
    model_record,
    verify_files,
)
from featurestore.features.cnn.views import check_cnn_resize

if TYPE_CHECKING:
    from featurestore.vectors import StoreView as Store


def load_model(store: Store, name: str, layers: list[str] | None = None, batch_size: int = 32,
               resize: str | None = None, grid: int = 1) -> tuple[CheckpointModel, Model]:
    """A verified, bound model with the requested taps (default: the model's default tap).

    ``resize`` overrides the model's resize rule (``stretch`` / ``center-crop``); ``grid``
    pools the taps' maps over a grid (:meth:`CheckpointModel.load`).
    """
    row = model_record(store, name)
    if is_onnx_model(row):
        raise RuntimeUnavailableError(
            "model {model} was registered from an ONNX file: it runs on onnxruntime only (leave out "
            "{runtime} mxnet, or set FS_CNN_RUNTIME=onnxruntime)", params=("runtime",), model=name)
    symbol, params = verify_files(store, row)
    taps = list(dict.fromkeys(layers)) if layers else [row.default_tap]
    pre = _preprocess(row)
    if resize is not None:
        pre = replace(pre, resize=check_cnn_resize(resize))
    return CheckpointModel.load(symbol, params, pre, taps, batch_size=batch_size, grid=grid), row


def load_onnx_model(store: Store, name: str, layers: list[str] | None = None, batch_size: int = 32,
                    save_export: bool = False, resize: str | None = None, grid: int = 1
                    ) -> tuple[OnnxModel, Model]:
    """A verified onnxruntime session with the requested taps (default: the model's default tap).

    Registered taps come from the stored export; other layers are exported from the
    verified checkpoint for this session only. The checkpoint files are verified
    too, whatever runs: the feature sets record them as their lineage.
    Intra-op threads: ``FS_WORKERS``. ``save_export``: see :func:`cnn_extractor`.
    """
    row = model_record(store, name)
    taps = list(dict.fromkeys(layers)) if layers else [row.default_tap]
    data, where = _fp32_export(store, row, taps, save_export)
    model = OnnxModel.load(data, _resized(row, resize), taps, batch_size=batch_size, threads=store.settings.workers,
                           where=where, grid=grid)
    return model, row
