"""Runs and their predictions: ``runs``, ``run_splits``, ``run_test_predictions``, ``run_oof`` and ``predictions``.

Also the reports read from them (confusion counts, coverage, confident mistakes) and :class:`RunFacts`,
what the browse queries need to know about a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, case, delete, func, insert, not_, null, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from featurestore.catalog.common import Repository, chunks
from featurestore.catalog.feature_versions import record_run
from featurestore.catalog.run_images import RunImages, insert_run_images
from featurestore.catalog.schema import (
    Dataset,
    DatasetMember,
    Image,
    Prediction,
    Run,
    RunOutOfFold,
    RunSplit,
    RunTestPrediction,
    utcnow,
)
from featurestore.errors import InvalidInputError, NotFoundError


@dataclass(frozen=True)
class RunFacts:
    """What the queries need to know about a run."""

    id: int
    target: str
    dataset: str | None
    test_dataset: str | None
    created_at: datetime
    test_predictions: int = 0  # rows in run_test_predictions (fixed-test runs)

    def source(self, wanted: str | None = None) -> str:
        """Which predictions of the run to read: those of its fixed-test evaluation when it has them."""
        if wanted == "test" and not self.test_predictions:
            raise InvalidInputError(f"run {self.id} has no test-set predictions (it was not scored on a fixed "
                                    "test dataset); use its stored predictions")
        return wanted or ("test" if self.test_predictions else "stored")


class StoredPrediction(NamedTuple):
    """A run's stored prediction of one image."""

    label: str
    probability: float
    top5: list[dict[str, Any]]  # [{"label": ..., "probability": ...}, ...] as stored
    predicted_at: datetime


class PredictedLabel(NamedTuple):
    """A run's predicted label of an image and its probability."""

    label: str
    probability: float


class ConfusionCount(NamedTuple):
    """How many of a run's predictions of labelled images had this (truth, predicted) pair."""

    truth: str
    predicted: str
    images: int


class Mistake(NamedTuple):
    """A wrong prediction of a run (``probability`` None: a test-set prediction, which keeps none)."""

    image_id: int
    truth: str
    predicted: str
    probability: float | None


@dataclass(frozen=True)
class SplitRow:
    split: int
    test_accuracy: float
    train_accuracy: float
    macro_f1: float
    n_train: int
    n_test: int


@dataclass(frozen=True)
class PredictionCoverage:
    stored: int  # prediction rows of the run
    labelled: int  # ... of images with a truth value
    maybe_trained_on: int  # ... of images its training selection may have held


def _members(dataset: str) -> Any:
    """Ids of the images in a dataset (membership), as a subquery."""
    return select(DatasetMember.image_id).where(
        DatasetMember.dataset_id == select(Dataset.id).where(Dataset.name == dataset).scalar_subquery())


def _truth(target: str) -> Any:
    return Image.superclass if target == "superclass" else Image.label


class _Source:
    """The prediction columns of one run: its stored predictions, or the test predictions of its evaluation."""

    def __init__(self, run: RunFacts, wanted: str | None) -> None:
        self.kind = run.source(wanted)
        truth = _truth(run.target)
        if self.kind == "test":
            t = RunTestPrediction
            self.table: Any = t
            self.image_id: Any = t.image_id
            self.label: Any = t.predicted
            self.probability: Any = null()
            self.run_id: Any = t.run_id
            self.correct: Any = t.correct
            self.margin: Any = null()
        else:
            p = Prediction
            self.table, self.image_id, self.label, self.probability, self.run_id = \
                p, p.image_id, p.label, p.probability, p.run_id
            self.correct = case((truth.is_(None), null()), else_=p.label == truth)
            second = func.coalesce(p.top5[1]["probability"].as_float(), 0.0)
            self.margin = p.probability - second


def _seen_in_training(run: RunFacts) -> ColumnElement[bool]:
    """Images the run's training selection may have held: labelled, in its dataset, ingested before it,
    and not in its fixed test dataset (those are never trained on)."""
    cond = and_(Image.label.is_not(None), Image.ingested_at <= run.created_at)
    if run.dataset is not None:
        cond = and_(cond, Image.id.in_(_members(run.dataset)))
    if run.test_dataset is not None:
        cond = and_(cond, Image.id.not_in(_members(run.test_dataset)))
    return cond


def _no_such_run(run_ids: Iterable[int], run_id: int) -> NotFoundError:
    return NotFoundError("run", str(run_id), [str(i) for i in run_ids], remedy="see-runs")


class Runs(Repository):
    """Queries on runs, their scores and their predictions."""

    def add_run(self, run: Run, splits: list[dict[str, Any]], test_predictions: list[dict[str, Any]] | None = None,
                oof: list[dict[str, Any]] | None = None, images: RunImages | None = None,
                feature_versions: Mapping[str, int] | None = None) -> int:
        """Insert a run, its per-split scores, (fixed-test runs) its per-image test predictions, (K-fold runs)
        its out-of-fold probabilities, (``images``) the images it used with each split's test images and
        (``feature_versions``) the version of each feature set it read, in one transaction."""
        with self.session() as s:
            s.add(run)
            s.flush()
            s.execute(insert(RunSplit), [{"run_id": run.id, **row} for row in splits])
            for part in chunks(test_predictions or []):
                s.execute(insert(RunTestPrediction), [{"run_id": run.id, **row} for row in part])
            for part in chunks(oof or [], 1_000):
                s.execute(insert(RunOutOfFold), [{"run_id": run.id, **row} for row in part])
            if images is not None:
                insert_run_images(s, int(run.id), images)
            if feature_versions:
                record_run(s, int(run.id), feature_versions)
            return int(run.id)

    def test_correctness(self, run_id: int) -> dict[int, bool]:
        """Image id -> whether the fixed-test run ``run_id`` predicted it right (empty for other runs)."""
        with self.session() as s:
            rows = s.execute(select(RunTestPrediction.image_id, RunTestPrediction.correct)
                             .where(RunTestPrediction.run_id == run_id)).all()
        return {int(i): bool(c) for i, c in rows}

    def run(self, run_id: int) -> Run:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise _no_such_run(s.scalars(select(Run.id).order_by(Run.id)), run_id)
            return run

    def runs(self) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.id)))

    def artifact_paths(self) -> set[str]:
        with self.session() as s:
            return {str(p) for p in s.scalars(select(Run.artifact_path)) if p}

    def split_scores(self, run_id: int) -> list[float]:
        with self.session() as s:
            return [float(x) for x in s.scalars(select(RunSplit.test_accuracy).where(RunSplit.run_id == run_id)
                                                .order_by(RunSplit.split))]

    def replace_predictions(self, run_id: int, rows: list[dict[str, Any]], s: Session | None = None) -> None:
        """Replace this run's prediction rows for the images in ``rows``, in one transaction (``s`` if given)."""
        ids = [int(r["image_id"]) for r in rows]
        now = utcnow()
        with self._within(s) as s:
            for part in chunks(ids):
                s.execute(delete(Prediction).where(Prediction.run_id == run_id, Prediction.image_id.in_(part)))
            for part in chunks(rows, 1_000):
                s.execute(insert(Prediction), [{**r, "predicted_at": now} for r in part])

    def run_facts(self, run_id: int) -> RunFacts:
        with self.engine.connect() as conn:
            row = conn.execute(select(Run.id, Run.target, Run.dataset, Run.test_dataset, Run.created_at)
                               .where(Run.id == run_id)).first()
            if row is None:
                raise _no_such_run(conn.execute(select(Run.id).order_by(Run.id)).scalars(), run_id)
            tested = 0
            if row[3] is not None:
                tested = int(conn.execute(select(func.count()).select_from(RunTestPrediction)
                                          .where(RunTestPrediction.run_id == run_id)).scalar() or 0)
        return RunFacts(int(row[0]), str(row[1]), row[2], row[3], row[4], tested)

    def run_splits(self, run_id: int) -> list[SplitRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(RunSplit.split, RunSplit.test_accuracy, RunSplit.train_accuracy,
                                       RunSplit.macro_f1, RunSplit.n_train, RunSplit.n_test)
                                .where(RunSplit.run_id == run_id)
                                .order_by(RunSplit.split))
            return [SplitRow(int(a), float(b), float(c), float(d), int(e), int(f)) for a, b, c, d, e, f in rows]

    def prediction_counts(self, test: bool = False) -> dict[int, int]:
        """Stored prediction rows per run id; with ``test``, rows in ``run_test_predictions`` (only fixed-test
        runs have any)."""
        run_id = RunTestPrediction.run_id if test else Prediction.run_id
        with self.engine.connect() as conn:
            return {int(r): int(n) for r, n in conn.execute(select(run_id, func.count()).group_by(run_id))}

    def image_predictions(self, image_id: int) -> dict[int, StoredPrediction]:
        """Stored predictions of one image, per run id."""
        # From runs, so each run's (run_id, image_id) unique index is probed (predictions has no image_id index).
        with self.engine.connect() as conn:
            rows = conn.execute(select(Prediction.run_id, Prediction.label, Prediction.probability, Prediction.top5,
                                       Prediction.predicted_at).select_from(Run)
                                .join(Prediction, and_(Prediction.run_id == Run.id, Prediction.image_id == image_id)))
            return {int(r): StoredPrediction(str(lb), float(p), list(top5 or []), at) for r, lb, p, top5, at in rows}

    def run_predictions_of(self, run_id: int, image_ids: Iterable[int]) -> dict[int, PredictedLabel]:
        """Predicted label and probability of the images that have a stored prediction of ``run_id``."""
        ids = [int(i) for i in image_ids]
        out: dict[int, PredictedLabel] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(ids, 500):
                for i, lb, p in conn.execute(select(Prediction.image_id, Prediction.label, Prediction.probability)
                                             .where(Prediction.run_id == run_id, Prediction.image_id.in_(chunk))):
                    out[int(i)] = PredictedLabel(str(lb), float(p))
        return out

    def confusion_counts(self, run: RunFacts, held_out_only: bool = False, source: str = "stored"
                         ) -> list[ConfusionCount]:
        """Images per (true label, predicted label) over the run's predictions of labelled images.

        The truth is the image's label, or its superclass for a run trained with ``--target superclass``.
        ``source`` "stored" reads the predictions table, "test" the run's fixed-test evaluation.
        ``held_out_only`` keeps the images the run cannot have trained on (see :func:`prediction_coverage`).
        """
        truth = _truth(run.target)
        src = _Source(run, source)
        q = (select(truth, src.label, func.count()).select_from(src.table)
             .join(Image, Image.id == src.image_id)
             .where(src.run_id == run.id, truth.is_not(None)).group_by(truth, src.label))
        if held_out_only and src.kind == "stored":
            q = q.where(not_(_seen_in_training(run)))
        with self.engine.connect() as conn:
            return [ConfusionCount(str(t), str(p), int(n)) for t, p, n in conn.execute(q)]

    def prediction_coverage(self, run: RunFacts, source: str = "stored") -> PredictionCoverage:
        truth = _truth(run.target)
        src = _Source(run, source)
        base = select(func.count()).select_from(src.table).join(Image, Image.id == src.image_id).where(
            src.run_id == run.id)
        with self.engine.connect() as conn:
            stored = conn.execute(base).scalar() or 0
            labelled = conn.execute(base.where(truth.is_not(None))).scalar() or 0
            seen = 0 if src.kind == "test" else conn.execute(base.where(truth.is_not(None), _seen_in_training(run))
                                                              ).scalar() or 0
        return PredictionCoverage(int(stored), int(labelled), int(seen))

    def confident_mistakes(self, run: RunFacts, limit: int = 12, held_out_only: bool = False,
                           source: str = "stored") -> list[Mistake]:
        """The run's most confident wrong predictions (test-set predictions keep no probability: those come by
        image id, probability None)."""
        truth = _truth(run.target)
        src = _Source(run, source)
        q = (select(Image.id, truth, src.label, src.probability).select_from(src.table)
             .join(Image, Image.id == src.image_id)
             .where(src.run_id == run.id, truth.is_not(None), src.label != truth).limit(limit))
        q = q.order_by(Image.id) if src.kind == "test" else q.order_by(Prediction.probability.desc(), Image.id)
        if held_out_only and src.kind == "stored":
            q = q.where(not_(_seen_in_training(run)))
        with self.engine.connect() as conn:
            return [Mistake(int(i), str(t), str(p), None if pr is None else float(pr))
                    for i, t, p, pr in conn.execute(q)]
