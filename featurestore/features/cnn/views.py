"""How a CNN sees an image: the resize rule, grid pooling and test-time augmentation (TTA).

Each option changes the vectors, so each is recorded in the feature set's
params and shows in its name.

Resize rule (``fs extract --model NAME --resize stretch|center-crop``)
    ``stretch`` resizes to the network input ignoring the aspect ratio;
    ``center-crop`` scales the shorter side to the input and crops the centre
    (see :class:`~featurestore.features.cnn.mxnet_backend.Preprocess`). The
    default is the model's own rule, recorded when it was registered
    (``stretch`` for every built-in model). The rule is recorded in
    ``params["preprocess"]["resize"]``, as before.
TTA (``--tta flip``)
    The embedding of every tap is the average of the embeddings of the image
    and of its horizontal mirror, ``(v(image) + v(mirror(image))) / 2``. The
    mirror is taken of the decoded image, before resizing, so it is exactly
    "the embedding of the mirrored image" under every resize rule. Both views
    come from the same decode and go through the network in the same batch
    (as two consecutive rows). Recorded as ``params["tta"] = "flip"``; the key
    is absent without TTA, so sets stored before the option existed still
    match their rebuilt extractor.
Grid pooling (``--grid N``, N from 2 to 8)
    A tap's feature map is averaged over each cell of an N x N grid instead of
    over the whole map, so the vector keeps *where* a pattern is (sleeve or no
    sleeve, collar, hem): C x N x N values instead of C
    (:func:`~featurestore.features.cnn.mxnet_backend.grid_pool`). Only for
    maps of at least N x N (mid-level layers such as ``block10_out``; the
    default ``global_pool`` tap is 1 x 1). Recorded as ``params["grid"] = N``
    and ``params["pooling"] = "grid-average"``; absent for the global average.

Precision (``--precision int8``, issue 29)
    The taps come from a statically quantised copy of the model's ONNX export
    (:mod:`featurestore.features.cnn.quantize`), on onnxruntime only. Recorded
    as ``params["precision"] = "int8"`` with ``params["quantization"]`` (the
    int8 file's sha256, its calibration and the mean cosine to fp32 per tap);
    absent at fp32, so fp32 and int8 vectors are never in one set.
Decode (issue 29)
    ``params["decode"] = "draft"``: JPEGs were decoded at 1/2, 1/4 or 1/8 scale
    when that still covers the network input (``fs extract`` does so when a
    pass has CNN sets only; ``--exact-decode`` turns it off). Absent for the
    full decode. It is not part of the name: a set keeps the decode it was
    started with. An image embedded for a query (search, predict) arrives
    decoded in full.

Naming rule, one feature set per tap::

    <model>[.<layer>][+<resize rule>][+grid<N>][+flip][+int8]

``.<layer>`` for a tap other than the model's default tap (as before);
``+<resize rule>`` only when the rule differs from the model's own, so the
default-rule set keeps its plain name (``efficientnet-lite0``) and a set with
another rule can never be mistaken for it (``efficientnet-lite0+center-crop``);
``+grid<N>`` with ``--grid N``; ``+flip`` with ``--tta flip``. Examples:
``efficientnet-lite0+flip``, ``efficientnet-lite2.block19_out+center-crop+flip``,
``efficientnet-lite0.block10_out+grid3``. ``+`` is the only
character feature-set names allow beyond model and dataset names, so a plain
name never contains it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, cast

import numpy as np
from PIL import Image, ImageOps

from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor, FeatureSpec

__all__ = [
    "CNN_RESIZE_RULES",
    "TTA_MODES",
    "ViewsExtractor",
    "check_cnn_resize",
    "check_tta",
    "extract_command",
    "variant_suffix",
]

CNN_RESIZE_RULES: tuple[str, ...] = ("stretch", "center-crop")
TTA_MODES: tuple[str, ...] = ("none", "flip")


def check_cnn_resize(rule: str) -> Literal["stretch", "center-crop"]:
    """Return ``rule`` if a CNN input can be resized that way, else raise ``InvalidInputError``."""
    if rule not in CNN_RESIZE_RULES:
        raise InvalidInputError(
            f"unknown CNN resize rule {rule!r}; choose one of: {', '.join(CNN_RESIZE_RULES)}"
        )
    return cast(Literal["stretch", "center-crop"], rule)


def check_tta(tta: str) -> str:
    """Return ``tta`` if it is one of :data:`TTA_MODES`, else raise ``InvalidInputError``."""
    if tta not in TTA_MODES:
        raise InvalidInputError(f"unknown test-time augmentation {tta!r}; choose one of: {', '.join(TTA_MODES)}")
    return tta


def variant_suffix(resize: str, model_resize: str, tta: str, grid: int = 1, precision: str = "fp32") -> str:
    """The name suffix of a CNN feature set: ``""``, ``"+center-crop"``, ``"+grid3"``, ``"+center-crop+flip"``,
    ``"+int8"``..."""
    parts = []
    if check_cnn_resize(resize) != model_resize:
        parts.append(resize)
    if grid > 1:
        parts.append(f"grid{grid}")
    if check_tta(tta) == "flip":
        parts.append("flip")
    if precision != "fp32":
        parts.append(precision)
    return "".join(f"+{p}" for p in parts)


def extract_command(name: str, params: dict[str, Any]) -> str:
    """The ``fs extract`` command that computes the stored CNN set ``name`` (for messages).

    ``--layers`` for a tap other than the default or with a grid, ``--resize RULE`` when the
    name carries the rule, ``--grid N`` and ``--tta flip`` when the params record them.
    """
    base, *suffixes = name.split("+")
    model = params.get("model", base)
    parts = ["fs extract --model", str(model)]
    if params.get("layer") and (base != model or params.get("grid")):  # --grid always names its layers
        parts += ["--layers", str(params["layer"])]
    rule = (params.get("preprocess") or {}).get("resize")
    if rule and rule in suffixes:
        parts += ["--resize", str(rule)]
    if params.get("grid"):
        parts += ["--grid", str(params["grid"])]
    if params.get("tta") == "flip":
        parts += ["--tta", "flip"]
    if params.get("precision", "fp32") != "fp32":
        parts += ["--precision", str(params["precision"])]
    return " ".join(parts)


class ViewsExtractor(Extractor):
    """A CNN extractor under another name suffix and, with ``flip``, averaged with the mirrored view.

    Parameters
    ----------
    inner
        The plain extractor (one row in, one row out per prepared image).
    suffix
        Appended to every feature-set name of ``inner`` (:func:`variant_suffix`).
    flip
        Average each image's vectors with those of its horizontal mirror.
    """

    def __init__(self, inner: Extractor, suffix: str = "", flip: bool = False):
        self.inner = inner
        self.suffix = suffix
        self.flip = flip
        self.runtime = inner.runtime  # recorded with the shards, like the plain extractor's

    def outputs(self) -> list[FeatureSpec]:
        extra = {"tta": "flip"} if self.flip else {}
        return [
            replace(spec, name=spec.name + self.suffix, params={**spec.params, **extra})
            for spec in self.inner.outputs()
        ]

    def decode_size(self) -> tuple[int, int] | None:
        return self.inner.decode_size()

    def prepare(self, image: Image.Image) -> Any:
        if not self.flip:
            return self.inner.prepare(image)
        return self.inner.prepare(image), self.inner.prepare(ImageOps.mirror(image))

    def compute(self, prepared: list[Any]) -> dict[str, np.ndarray]:
        if not self.flip:
            out = self.inner.compute(prepared)
        else:
            # [image 0, mirror 0, image 1, mirror 1, ...]: one batch, each pair side by side.
            both = self.inner.compute([view for pair in prepared for view in pair])
            out = {name: (v[0::2] + v[1::2]) / np.float32(2) for name, v in both.items()}
        return {name + self.suffix: np.asarray(v, dtype=np.float32) for name, v in out.items()}
