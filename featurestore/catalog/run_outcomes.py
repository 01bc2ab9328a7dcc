"""Per-image outcomes of fixed-test runs (``run_test_predictions``): counts per run, and two runs side by side."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import aliased

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import Image, RunTestPrediction


@dataclass(frozen=True)
class ClassPair:
    """One class of the test set: images, and how many of them run A and run B got right."""

    label: str
    images: int
    a_right: int
    b_right: int

    @property
    def a_accuracy(self) -> float:
        return self.a_right / self.images if self.images else 0.0

    @property
    def b_accuracy(self) -> float:
        return self.b_right / self.images if self.images else 0.0

    @property
    def difference(self) -> float:
        return self.a_accuracy - self.b_accuracy


class RunOutcomes(Repository):
    """Two fixed-test runs compared class by class."""

    def per_class_pair(self, run_a: int, run_b: int, target: str = "label") -> list[ClassPair]:
        """Per true class (label, or superclass for ``target="superclass"``), the test images both runs predicted and
        how many each got right, by class name."""
        a, b = aliased(RunTestPrediction), aliased(RunTestPrediction)
        truth = Image.superclass if target == "superclass" else Image.label
        q = (select(truth, func.count(), func.sum(case((a.correct.is_(True), 1), else_=0)),
                    func.sum(case((b.correct.is_(True), 1), else_=0)))
             .select_from(a).join(b, and_(b.image_id == a.image_id, b.run_id == run_b))
             .join(Image, Image.id == a.image_id).where(a.run_id == run_a).group_by(truth).order_by(truth))
        with self.engine.connect() as conn:
            return [ClassPair("(no label)" if t is None else str(t), int(n), int(ra or 0), int(rb or 0))
                    for t, n, ra, rb in conn.execute(q)]
