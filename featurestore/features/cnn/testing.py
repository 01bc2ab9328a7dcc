"""A tiny random MXNet checkpoint shaped like the gallery's Inception-BN, for tests.

The real ``Inception-symbol.json`` / ``Inception-0009.params`` (ImageNet-21k)
cannot be downloaded here; this builds a few-kilobyte network whose layer names
match the ones the ``inception21k`` spec taps, so the whole path (spec ->
CheckpointModel -> CNNExtractor -> catalog) can run in tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore.features.cnn.mxnet_backend import import_mxnet

__all__ = ["build_tiny_inception_checkpoint", "TINY_INCEPTION_DIMS"]

# Channels of the tapped layers in the tiny network (the real one: 1024 for global_pool).
TINY_INCEPTION_DIMS = {
    "ch_concat_3c_chconcat": 16,
    "ch_concat_4e_chconcat": 24,
    "ch_concat_5b_chconcat": 32,
    "global_pool": 32,
}


def _conv_bn_relu(mx, x, name: str, channels: int, kernel: int = 1, stride: int = 1):
    pad = kernel // 2
    x = mx.sym.Convolution(
        x,
        num_filter=channels,
        kernel=(kernel, kernel),
        stride=(stride, stride),
        pad=(pad, pad),
        name=f"conv_{name}",
    )
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name=f"bn_{name}")
    return mx.sym.Activation(x, act_type="relu", name=f"relu_{name}")


def _inception(mx, x, name: str, channels: int, stride: int = 1):
    """Two branches concatenated, named like Inception-BN's ``ch_concat_<name>_chconcat``."""
    a = _conv_bn_relu(mx, x, f"{name}_1x1", channels // 2, 1, stride)
    b = _conv_bn_relu(mx, x, f"{name}_3x3", channels - channels // 2, 3, stride)
    return mx.sym.Concat(a, b, dim=1, name=f"ch_concat_{name}_chconcat")


def build_tiny_inception_symbol(num_classes: int = 10):
    """The tiny graph: data 3x224x224 -> ... -> global_pool -> fc1 -> softmax."""
    mx = import_mxnet()
    x = mx.sym.Variable("data")
    x = _conv_bn_relu(mx, x, "1", 8, 3, 4)  # 56x56
    x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name="max_pool_1")  # 28x28
    x = _inception(mx, x, "3c", TINY_INCEPTION_DIMS["ch_concat_3c_chconcat"])
    x = _inception(mx, x, "4e", TINY_INCEPTION_DIMS["ch_concat_4e_chconcat"], stride=2)  # 14x14
    x = _inception(mx, x, "5b", TINY_INCEPTION_DIMS["ch_concat_5b_chconcat"], stride=2)  # 7x7
    x = mx.sym.Pooling(x, kernel=(7, 7), global_pool=True, pool_type="avg", name="global_pool")
    x = mx.sym.Flatten(x, name="flatten")
    x = mx.sym.FullyConnected(x, num_hidden=num_classes, name="fc1")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def build_tiny_inception_checkpoint(prefix: Path, num_classes: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<prefix>-symbol.json`` and ``<prefix>-0009.params`` with random weights.

    Returns the two paths. Deterministic for a given ``seed``.
    """
    mx = import_mxnet()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sym = build_tiny_inception_symbol(num_classes)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 224, 224))
    rng = np.random.default_rng(seed)
    payload = {}
    for name, shape in zip(sym.list_arguments(), arg_shapes, strict=True):
        if name in ("data", "softmax_label"):
            continue
        if name.endswith("_gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("_beta", "_bias")):
            value = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:])) or 1
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        payload[f"arg:{name}"] = mx.nd.array(value.astype(np.float32))
    for name, shape in zip(sym.list_auxiliary_states(), aux_shapes, strict=True):
        value = rng.uniform(0.5, 1.5, shape) if name.endswith("_var") else rng.normal(0.0, 0.1, shape)
        payload[f"aux:{name}"] = mx.nd.array(value.astype(np.float32))
    symbol_path = Path(f"{prefix}-symbol.json")
    params_path = Path(f"{prefix}-0009.params")
    sym.save(str(symbol_path))
    mx.nd.save(str(params_path), payload)
    return symbol_path, params_path
