"""A featurestore plugin adding the feature kind ``colour-moments``.

Colour moments (Stricker and Orengo, 1995) summarise an image's colour
distribution by the mean, standard deviation and skewness of each channel in a
colour space: 9 numbers per image. ``fs extract --feature colour-moments`` (RGB)
or ``--feature colour-moments:space=hsv`` computes them for every image in the store.

This module is imported when the ``fs`` command starts, so it imports nothing
heavy: numpy and the extractor are imported when the hook is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurestore.plugins import hookimpl

__version__ = "0.1.0"
KIND = "colour-moments"


@hookimpl
def register_feature_kinds(register: Callable[[Any], None]) -> None:
    from featurestore.features.registry import FeatureKind
    from featurestore_colour_moments.extractor import ColourMomentsExtractor

    register(FeatureKind(
        KIND, ColourMomentsExtractor,
        build=lambda store, name, params, batch_size: ColourMomentsExtractor.from_params(name, params),
        command=lambda name, params, dim: f"fs extract --feature {KIND}:space={params.get('space', 'rgb')}",
        create=lambda store, options: ColourMomentsExtractor.from_options(options),
        description="per-channel mean, std and skewness in RGB, HSV or YCbCr (9 dims; options space, size)",
    ))
