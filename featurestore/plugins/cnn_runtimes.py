"""The built-in CNN runtimes, registered through the plugin hook ``register_cnn_runtimes``.

onnxruntime (the default: each model's ONNX export) and mxnet (the checkpoint on
MXNet 1.9.1, the reference; ``pip install "featurestore[mxnet]"``). Their code is
imported when the hook is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurestore.plugins import hookimpl


@hookimpl
def register_cnn_runtimes(register: Callable[[Any], None]) -> None:
    from featurestore.features.cnn import runtimes
    from featurestore.features.cnn.registry import CNNRuntime

    register(CNNRuntime("onnxruntime", runtimes.load_onnx_model,
                        "the model's ONNX export on onnxruntime (the default, about 2x faster)"))
    register(CNNRuntime(
        "mxnet",
        lambda store, name, layers, batch_size, *, save_export, resize, grid: runtimes.load_model(
            store, name, layers, batch_size, resize=resize, grid=grid),
        "the checkpoint on MXNet 1.9.1, the reference (pip install \"featurestore[mxnet]\")",
    ))
