"""Which images each run was evaluated on, and each split's test images (issue 25).

Written with the run in :meth:`featurestore.catalog.repository.Catalog.add_run`'s
transaction, so anyone can check a protocol with ``fs sql`` (e.g. that no test
image of split 0 is a near copy of a training image) and ``fs audit leaks --run``
can list the near-duplicate pairs across a run's splits. A split's training
part is the run's images minus its test images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import RunImage, RunSplitImage

_ROWS = 5_000  # rows per INSERT (bound parameters stay under SQLite's limit)


@dataclass(frozen=True)
class RunImages:
    """Every image a run used and, per split (in order), its test images."""

    image_ids: Sequence[int]
    tests: Sequence[Sequence[int]]


def insert_run_images(s: Session, run_id: int, images: RunImages) -> None:
    """Insert ``images`` for ``run_id`` in the caller's transaction."""
    rows = [{"run_id": run_id, "image_id": int(i)} for i in images.image_ids]
    for start in range(0, len(rows), _ROWS):
        s.execute(insert(RunImage), rows[start : start + _ROWS])
    split_rows = [{"run_id": run_id, "split": split, "image_id": int(i)}
                  for split, test in enumerate(images.tests) for i in test]
    for start in range(0, len(split_rows), _ROWS):
        s.execute(insert(RunSplitImage), split_rows[start : start + _ROWS])


class RunImageSets(Repository):
    """Which images each run used."""

    def run_image_ids(self, run_id: int) -> np.ndarray:
        """Ids of the images run ``run_id`` was evaluated on, ascending (empty for runs recorded before 0010)."""
        with self.engine.connect() as conn:
            ids = conn.execute(select(RunImage.image_id).where(RunImage.run_id == run_id)
                               .order_by(RunImage.image_id)).scalars().all()
        return np.asarray(ids, dtype=np.int64)

    def split_test_ids(self, run_id: int) -> dict[int, np.ndarray]:
        """Split number -> ids of its test images, ascending."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(RunSplitImage.split, RunSplitImage.image_id)
                                .where(RunSplitImage.run_id == run_id)
                                .order_by(RunSplitImage.split, RunSplitImage.image_id)).all()
        out: dict[int, list[int]] = {}
        for split, image_id in rows:
            out.setdefault(int(split), []).append(int(image_id))
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
