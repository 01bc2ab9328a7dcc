"""A tiny random MXNet checkpoint shaped like the gallery's Inception-BN, for tests.

The real ``Inception-symbol.json`` / ``Inception-0009.params`` (ImageNet-21k)
cannot be downloaded here; this builds a few-kilobyte network whose layer names
match the ones the ``inception21k`` spec taps, so the whole path (spec ->
ONNX export -> CNNExtractor -> catalog) can run in tests. It is written
without MXNet (:mod:`featurestore.features.cnn.mxnet_format`), in the files'
standard format, so MXNet loads it too (the parity tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore.features.cnn.mx2onnx import param_shapes
from featurestore.features.cnn.mxnet_format import SymbolBuilder, write_params
from featurestore.io.atomic import write_bytes_atomic

__all__ = ["build_tiny_inception_checkpoint", "TINY_INCEPTION_DIMS"]

# Channels of the tapped layers in the tiny network (the real one: 1024 for global_pool).
TINY_INCEPTION_DIMS = {
    "ch_concat_3c_chconcat": 16,
    "ch_concat_4e_chconcat": 24,
    "ch_concat_5b_chconcat": 32,
    "global_pool": 32,
}


def _conv_bn_relu(b: SymbolBuilder, x: int, name: str, channels: int, kernel: int = 1, stride: int = 1) -> int:
    pad = kernel // 2
    x = b.op("Convolution", f"conv_{name}", [x], kernel=(kernel, kernel), num_filter=channels, pad=(pad, pad),
             stride=(stride, stride))
    x = b.op("BatchNorm", f"bn_{name}", [x], eps=2e-5, fix_gamma=False)
    return b.op("Activation", f"relu_{name}", [x], act_type="relu")


def _inception(b: SymbolBuilder, x: int, name: str, channels: int, stride: int = 1) -> int:
    """Two branches concatenated, named like Inception-BN's ``ch_concat_<name>_chconcat``."""
    one = _conv_bn_relu(b, x, f"{name}_1x1", channels // 2, 1, stride)
    three = _conv_bn_relu(b, x, f"{name}_3x3", channels - channels // 2, 3, stride)
    return b.op("Concat", f"ch_concat_{name}_chconcat", [one, three], dim=1, num_args=2)


def build_tiny_inception_symbol(num_classes: int = 10) -> str:
    """The tiny graph as symbol JSON: data 3x224x224 -> ... -> global_pool -> fc1 -> softmax."""
    b = SymbolBuilder()
    x = _conv_bn_relu(b, b.var("data"), "1", 8, 3, 4)  # 56x56
    x = b.op("Pooling", "max_pool_1", [x], kernel=(2, 2), pool_type="max", stride=(2, 2))  # 28x28
    x = _inception(b, x, "3c", TINY_INCEPTION_DIMS["ch_concat_3c_chconcat"])
    x = _inception(b, x, "4e", TINY_INCEPTION_DIMS["ch_concat_4e_chconcat"], stride=2)  # 14x14
    x = _inception(b, x, "5b", TINY_INCEPTION_DIMS["ch_concat_5b_chconcat"], stride=2)  # 7x7
    x = b.op("Pooling", "global_pool", [x], global_pool=True, kernel=(7, 7), pool_type="avg")
    x = b.op("Flatten", "flatten", [x])
    x = b.op("FullyConnected", "fc1", [x], num_hidden=num_classes)
    return b.to_json(b.op("SoftmaxOutput", "softmax", [x]))


def random_params(symbol_path: Path, size: tuple[int, int] = (224, 224), seed: int = 0
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random ``(arg, aux)`` weights of the right shapes for a symbol: He-scaled weights, gammas and
    variances in 0.5..1.5, small biases and means. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    arg: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    shapes = param_shapes(symbol_path, size)
    for name, (shape, is_aux) in shapes.items():  # learned weights first, then the statistics
        if is_aux:
            continue
        if name.endswith("_gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("_beta", "_bias")):
            value = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:])) or 1
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        arg[name] = value.astype(np.float32)
    for name, (shape, is_aux) in shapes.items():
        if is_aux:
            value = rng.uniform(0.5, 1.5, shape) if name.endswith("_var") else rng.normal(0.0, 0.1, shape)
            aux[name] = value.astype(np.float32)
    return arg, aux


def build_tiny_inception_checkpoint(prefix: Path, num_classes: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<prefix>-symbol.json`` and ``<prefix>-0009.params`` with random weights.

    Returns the two paths. Deterministic for a given ``seed``.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    symbol_path = Path(f"{prefix}-symbol.json")
    params_path = Path(f"{prefix}-0009.params")
    write_bytes_atomic(symbol_path, build_tiny_inception_symbol(num_classes).encode("utf-8"))
    write_params(params_path, *random_params(symbol_path, seed=seed))
    return symbol_path, params_path
