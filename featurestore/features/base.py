"""The contract between the extract pipeline and the feature families.

The pipeline (``featurestore.pipelines.extract``) decodes each image once into an RGB
``PIL.Image`` and hands it to every requested extractor:

* :meth:`Extractor.prepare` runs in a worker thread, once per image. It should do
  the per-image work that releases the GIL (Pillow resize, numpy conversion) and
  return something small enough to keep for one batch.
* :meth:`Extractor.compute` runs in the main thread on a list of prepared values
  (one batch) and returns, for each feature set the extractor produces, an
  ``(n, dim)`` float32 matrix whose rows follow the batch order.

An extractor may produce several feature sets from one pass (a CNN with several
taps does). :meth:`Extractor.outputs` names them with their dims and the params
that the catalog records (JSON-serialisable, enough to reproduce the vectors).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class FeatureSpec:
    """What the catalog records about one feature set."""

    name: str
    kind: str
    dim: int
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"


class Extractor(abc.ABC):
    """One feature family computed from decoded RGB images."""

    #: What computed the vectors (e.g. ``"onnxruntime"``), recorded with each shard; not a feature-set
    #: param, so a set may be continued on another runtime. None for plain numpy extractors.
    runtime: str | None = None

    def decode_size(self) -> tuple[int, int] | None:
        """``(width, height)`` a JPEG may be decoded down to for this extractor (``Image.draft``), or None.

        None (the default) asks for the full decode. A CNN extractor recording
        ``decode: draft`` returns its input size (issue 29).
        """
        return None

    @abc.abstractmethod
    def outputs(self) -> list[FeatureSpec]:
        """Feature sets produced, in a stable order."""

    @abc.abstractmethod
    def prepare(self, image: Image.Image) -> Any:
        """Per-image preprocessing; called from worker threads."""

    @abc.abstractmethod
    def compute(self, prepared: list[Any]) -> dict[str, np.ndarray]:
        """Batch computation: feature set name -> ``(len(prepared), dim)`` float32."""
