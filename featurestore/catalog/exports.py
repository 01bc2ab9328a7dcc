"""Catalog reads for exporting rows to other tools (Parquet, Arrow): image facts and a run's predictions.

Both are read in pages so an export of millions of rows never holds them all:
:func:`image_facts` takes one batch of ids, :func:`prediction_page` returns the
predictions after an image id (keyset pagination, stable while others write).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import select

from featurestore.catalog.common import CHUNK, Repository
from featurestore.catalog.schema import Dataset, DatasetMember, Image, Prediction


@dataclass(frozen=True)
class ImageFacts:
    """What an export says about one image besides its vectors."""

    image_id: int
    sha256: str
    label: str | None
    superclass: str | None
    datasets: tuple[str, ...]


class LabelProbability(NamedTuple):
    """One of a prediction's top labels and its probability."""

    label: str
    probability: float


@dataclass(frozen=True)
class PredictionRow:
    """One stored prediction of a run, with the image's facts at export time."""

    image_id: int
    sha256: str
    label: str | None
    superclass: str | None
    predicted: str
    probability: float
    top5: tuple[LabelProbability, ...]
    predicted_at: datetime | None


def _top5(value: Any) -> tuple[LabelProbability, ...]:
    return tuple(LabelProbability(str(t["label"]), float(t["probability"])) for t in (value or []))


class Exports(Repository):
    """Rows read for Arrow exports."""

    def export_facts(self, image_ids: Sequence[int] | np.ndarray) -> list[ImageFacts]:
        """Facts of the given images in ascending id order (ids not in the catalog are left out)."""
        ids = sorted({int(i) for i in image_ids})
        base: list[Any] = []
        names: dict[int, list[str]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                base += conn.execute(select(Image.id, Image.sha256, Image.label, Image.superclass)
                                     .where(Image.id.in_(chunk)).order_by(Image.id)).all()
                for image_id, name in conn.execute(
                        select(DatasetMember.image_id, Dataset.name)
                        .join(Dataset, Dataset.id == DatasetMember.dataset_id)
                        .where(DatasetMember.image_id.in_(chunk)).order_by(DatasetMember.image_id, Dataset.name)):
                    names.setdefault(int(image_id), []).append(str(name))
        return [ImageFacts(int(i), str(sha), lb, sc, tuple(names.get(int(i), ()))) for i, sha, lb, sc in base]

    def prediction_page(self, run_id: int, after: int = 0, limit: int = 10_000) -> list[PredictionRow]:
        """Up to ``limit`` stored predictions of ``run_id`` for images with an id above ``after``, by image id."""
        q = (select(Prediction.image_id, Image.sha256, Image.label, Image.superclass, Prediction.label,
                    Prediction.probability, Prediction.top5, Prediction.predicted_at)
             .join(Image, Image.id == Prediction.image_id)
             .where(Prediction.run_id == int(run_id), Prediction.image_id > int(after))
             .order_by(Prediction.image_id).limit(int(limit)))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [PredictionRow(int(i), str(sha), lb, sc, str(pred), float(p), _top5(top), at)
                for i, sha, lb, sc, pred, p, top, at in rows]
