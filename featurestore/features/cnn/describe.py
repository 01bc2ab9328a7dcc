"""The tap-able layers of a model and their output shapes (``fs models show``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.catalog.schema import Model
from featurestore.errors import ModelFilesMissingError, NotFoundError
from featurestore.features.cnn.mx2onnx import MxNetwork
from featurestore.features.cnn.onnx_import import onnx_layers
from featurestore.features.cnn.registry import (
    _preprocess,
    is_onnx_model,
    model_record,
    spec_taps,
    verify_files,
)
from featurestore.features.cnn.specs import BUILTIN_MODELS, model_files

if TYPE_CHECKING:
    from featurestore.vectors import StoreView as Store


def describe_layers(store: Store | None, name: str) -> tuple[Model, list[tuple[str, tuple[int, ...]]]]:
    """All tap-able layers of a model with their output shapes; never writes to the store.

    A built-in model that the store has not converted yet (or without a store)
    is converted into a temporary folder for the look and discarded.
    """
    row = store.catalog.model(name) if store is not None else None
    if row is not None:
        assert store is not None
        symbol, params = verify_files(store, row)
        if is_onnx_model(row):
            return row, [(layer.tap, layer.shape) for layer in onnx_layers(symbol, _preprocess(row).size)]
        return row, MxNetwork.load(symbol, params, _preprocess(row).size).layers()
    spec = BUILTIN_MODELS.get(name)
    if spec is None or not spec.builtin:
        if store is None and spec is None:
            raise NotFoundError("model", name, BUILTIN_MODELS, remedy="models-add")
        model_record(store, name) if store is not None else None  # raises the helpful error
        raise ModelFilesMissingError(f"model {name} is not registered", remedy="models-add-it", model=name)
    with tempfile.TemporaryDirectory(prefix="fs-model-") as tmp:
        symbol, params = model_files(spec, Path(tmp))
        layers = MxNetwork.load(symbol, params, spec.preprocess.size).layers()
        info = Model(name=spec.name, taps=spec_taps(spec), default_tap=spec.default_tap,
                     preprocess=spec.preprocess.to_params(), source=spec.source)
        return info, layers
