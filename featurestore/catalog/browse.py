"""Catalog queries of the web app and of run reports (issue 15).

TO FOLD INTO catalog/repository.py: every SQL statement the web app, the thumbnails
and ``fs report`` need is in this one module, so the lead can move it as one section.

All filters reach SQL as bound parameters. Pages are keyset-paged on the image id
(``id > :after ORDER BY id LIMIT n``), never with OFFSET, so page 1,000 costs what
page 1 costs; the filters use the indexes on ``images.label``, ``images.dataset_id``,
``images.superclass`` (migration 0005), ``dataset_members (dataset_id, image_id)`` and
``predictions (run_id, image_id)``. Datasets are collections: "in dataset D" means a row in
``dataset_members``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, exists, func, not_, select
from sqlalchemy.sql import ColumnElement, Select

from featurestore.catalog.schema import (
    Dataset,
    DatasetMember,
    FeatureRow,
    FeatureShard,
    Image,
    Prediction,
    Run,
    RunSplit,
)
from featurestore.errors import InvalidInputError, NotFoundError

MAX_PAGE = 500
CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True)
class ImageFilter:
    """What the browse grid shows; the run-based filters need ``run``."""

    dataset: str | None = None
    superclass: str | None = None
    label: str | None = None
    run: int | None = None
    predicted: str | None = None
    correct: bool | None = None
    below: float | None = None  # the run's top probability is below this
    held_out: bool = False  # only images the run's training selection cannot have held

    def check(self) -> None:
        needs_run = [name for name, value in (("predicted label", self.predicted), ("correct/incorrect", self.correct),
                                              ("probability below", self.below),
                                              ("held-out", True if self.held_out else None)) if value is not None]
        if needs_run and self.run is None:
            raise InvalidInputError(f"the {', '.join(needs_run)} filter needs a run: pick one")
        if self.below is not None and not 0.0 <= self.below <= 1.0:
            raise InvalidInputError("probability threshold must be between 0 and 1, e.g. 0.5")
        for name, value in (("dataset", self.dataset), ("superclass", self.superclass), ("label", self.label),
                            ("predicted label", self.predicted)):
            if value is not None and "\x00" in value:
                raise InvalidInputError(f"{name} contains a NUL character")


@dataclass(frozen=True)
class Tile:
    """One image of a grid page (``predicted``/``probability``/``correct`` only with a run filter)."""

    id: int
    label: str | None
    superclass: str | None
    predicted: str | None = None
    probability: float | None = None
    correct: bool | None = None


@dataclass(frozen=True)
class Page:
    tiles: list[Tile]
    has_prev: bool
    has_next: bool

    @property
    def first(self) -> int | None:
        return self.tiles[0].id if self.tiles else None

    @property
    def last(self) -> int | None:
        return self.tiles[-1].id if self.tiles else None


@dataclass(frozen=True)
class RunFacts:
    """What the queries need to know about a run."""

    id: int
    target: str
    dataset: str | None
    test_dataset: str | None
    created_at: datetime


@dataclass
class Facets:
    """Values offered by the grid's filter menus."""

    datasets: list[str] = field(default_factory=list)
    superclasses: list[str] = field(default_factory=list)
    labels: list[tuple[str, int]] = field(default_factory=list)
    runs: list[tuple[int, str, int]] = field(default_factory=list)  # id, features, stored predictions
    predicted: list[str] = field(default_factory=list)


def run_facts(engine: Engine, run_id: int) -> RunFacts:
    with engine.connect() as conn:
        row = conn.execute(select(Run.id, Run.target, Run.dataset, Run.test_dataset, Run.created_at)
                           .where(Run.id == run_id)).first()
        if row is None:
            ids = [str(i) for i in conn.execute(select(Run.id).order_by(Run.id)).scalars()]
            raise NotFoundError("run", str(run_id), ids, "See `fs runs`")
    return RunFacts(int(row[0]), str(row[1]), row[2], row[3], row[4])


def _members(dataset: str) -> Any:
    """Ids of the images in a dataset (membership), as a subquery."""
    return select(DatasetMember.image_id).where(
        DatasetMember.dataset_id == select(Dataset.id).where(Dataset.name == dataset).scalar_subquery())


def _truth(target: str) -> Any:
    return Image.superclass if target == "superclass" else Image.label


def _filtered(f: ImageFilter, run: RunFacts | None, columns: Sequence[Any]) -> tuple[Select[Any], Any]:
    """SELECT columns FROM images [JOIN predictions] WHERE filters, and the id column to page on."""
    q = select(*columns)
    key: Any = Image.id
    if run is not None:
        q = q.select_from(Prediction).join(Image, Image.id == Prediction.image_id).where(Prediction.run_id == run.id)
        key = Prediction.image_id
        truth = _truth(run.target)
        if f.predicted is not None:
            q = q.where(Prediction.label == f.predicted)
        if f.correct is True:
            q = q.where(truth.is_not(None), Prediction.label == truth)
        elif f.correct is False:
            q = q.where(truth.is_not(None), Prediction.label != truth)
        if f.below is not None:
            q = q.where(Prediction.probability < f.below)
        if f.held_out:
            q = q.where(not_(_seen_in_training(run)))
    else:
        q = q.select_from(Image)
    if f.dataset is not None:
        # EXISTS keeps the scan in id order (a probe of the membership key per image): a join would make
        # SQLite read every member and sort them, ~80 ms at 100k images instead of ~1 ms.
        q = q.where(exists().where(DatasetMember.image_id == key, DatasetMember.dataset_id == select(Dataset.id)
                                   .where(Dataset.name == f.dataset).scalar_subquery()))
    if f.superclass is not None:
        q = q.where(Image.superclass == f.superclass)
    if f.label is not None:
        q = q.where(Image.label == f.label)
    return q, key


def _tile_columns(run: RunFacts | None) -> list[Any]:
    cols: list[Any] = [Image.id, Image.label, Image.superclass]
    if run is not None:
        cols += [Prediction.label, Prediction.probability]
    return cols


def _tile(row: Sequence[Any], run: RunFacts | None) -> Tile:
    if run is None:
        return Tile(int(row[0]), row[1], row[2])
    truth = row[2] if run.target == "superclass" else row[1]
    return Tile(int(row[0]), row[1], row[2], row[3], float(row[4]), None if truth is None else truth == row[3])


def browse_page(engine: Engine, f: ImageFilter, *, after: int | None = None, before: int | None = None,
                limit: int = 100) -> Page:
    """One page of images matching ``f``, by ascending id: the first, the one after ``after``, or before ``before``.

    Keyset paging: one indexed range scan of ``limit + 1`` rows whatever the page number.
    """
    f.check()
    limit = max(1, min(int(limit), MAX_PAGE))
    run = run_facts(engine, f.run) if f.run is not None else None
    q, key = _filtered(f, run, _tile_columns(run))
    backwards = before is not None and after is None
    if backwards:
        q = q.where(key < before).order_by(key.desc())
    else:
        if after is not None:
            q = q.where(key > after)
        q = q.order_by(key)
    with engine.connect() as conn:
        rows = list(conn.execute(q.limit(limit + 1)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
        tiles = [_tile(r, run) for r in rows]
        return Page(tiles, has_prev=more, has_next=bool(tiles))
    tiles = [_tile(r, run) for r in rows]
    return Page(tiles, has_prev=after is not None and bool(tiles), has_next=more)


def count_images(engine: Engine, f: ImageFilter) -> int:
    f.check()
    run = run_facts(engine, f.run) if f.run is not None else None
    q, _ = _filtered(f, run, [func.count()])
    with engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def facets(engine: Engine, run_id: int | None = None) -> Facets:
    """Datasets, superclasses, labels (with counts), runs (with their stored predictions) and, for a run,
    its predicted labels."""
    with engine.connect() as conn:
        out = Facets(
            datasets=list(conn.execute(select(Dataset.name).order_by(Dataset.name)).scalars()),
            superclasses=[s for s in conn.execute(select(Image.superclass).distinct().order_by(Image.superclass))
                          .scalars() if s is not None],
            labels=[(str(lb), int(n)) for lb, n in conn.execute(
                select(Image.label, func.count()).where(Image.label.is_not(None)).group_by(Image.label)
                .order_by(Image.label))],
        )
    counts = prediction_counts(engine)
    with engine.connect() as conn:
        out.runs = [(int(i), ",".join(feats), int(counts.get(i, 0)))
                    for i, feats in conn.execute(select(Run.id, Run.features).order_by(Run.id.desc()))]
        if run_id is not None:
            out.predicted = list(conn.execute(select(Prediction.label).where(Prediction.run_id == run_id)
                                              .distinct().order_by(Prediction.label)).scalars())
    return out


def prediction_counts(engine: Engine) -> dict[int, int]:
    """Stored prediction rows per run id."""
    with engine.connect() as conn:
        return {int(r): int(n) for r, n in conn.execute(select(Prediction.run_id, func.count())
                                                         .group_by(Prediction.run_id))}


# -- one image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    """Where a catalogued image's bytes are, and what they must hash to."""

    id: int
    source_path: str
    sha256: str
    bytes: int
    format: str


def image_file(engine: Engine, image_id: int) -> ImageFile | None:
    with engine.connect() as conn:
        row = conn.execute(select(Image.id, Image.source_path, Image.sha256, Image.bytes, Image.format)
                           .where(Image.id == image_id)).first()
    return None if row is None else ImageFile(int(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4]))


def image_predictions(engine: Engine, image_id: int) -> dict[int, tuple[str, float, list[Any], datetime]]:
    """Stored predictions of one image, per run id: (label, probability, top5, predicted_at)."""
    # From runs, so each run's (run_id, image_id) unique index is probed (predictions has no image_id index).
    with engine.connect() as conn:
        rows = conn.execute(select(Prediction.run_id, Prediction.label, Prediction.probability, Prediction.top5,
                                   Prediction.predicted_at).select_from(Run)
                            .join(Prediction, and_(Prediction.run_id == Run.id, Prediction.image_id == image_id)))
        return {int(r[0]): (str(r[1]), float(r[2]), list(r[3] or []), r[4]) for r in rows}


def labels_of(engine: Engine, image_ids: Iterable[int]) -> dict[int, tuple[str | None, str | None]]:
    """(label, superclass) of each image id."""
    ids = [int(i) for i in image_ids]
    out: dict[int, tuple[str | None, str | None]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for i, lb, sc in conn.execute(select(Image.id, Image.label, Image.superclass)
                                          .where(Image.id.in_(chunk))):
                out[int(i)] = (lb, sc)
    return out


def run_predictions_of(engine: Engine, run_id: int, image_ids: Iterable[int]) -> dict[int, tuple[str, float]]:
    """(predicted label, probability) of the images that have a stored prediction of ``run_id``."""
    ids = [int(i) for i in image_ids]
    out: dict[int, tuple[str, float]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for i, lb, p in conn.execute(select(Prediction.image_id, Prediction.label, Prediction.probability)
                                         .where(Prediction.run_id == run_id, Prediction.image_id.in_(chunk))):
                out[int(i)] = (str(lb), float(p))
    return out


# -- runs: confusion matrix from stored predictions -----------------------------------------------


@dataclass(frozen=True)
class SplitRow:
    split: int
    test_accuracy: float
    train_accuracy: float
    macro_f1: float
    n_train: int
    n_test: int


def run_splits(engine: Engine, run_id: int) -> list[SplitRow]:
    with engine.connect() as conn:
        rows = conn.execute(select(RunSplit.split, RunSplit.test_accuracy, RunSplit.train_accuracy, RunSplit.macro_f1,
                                   RunSplit.n_train, RunSplit.n_test).where(RunSplit.run_id == run_id)
                            .order_by(RunSplit.split))
        return [SplitRow(int(a), float(b), float(c), float(d), int(e), int(f)) for a, b, c, d, e, f in rows]


def _seen_in_training(run: RunFacts) -> ColumnElement[bool]:
    """Images the run's training selection may have held: labelled, in its dataset, ingested before it,
    and not in its fixed test dataset (those are never trained on)."""
    cond = and_(Image.label.is_not(None), Image.ingested_at <= run.created_at)
    if run.dataset is not None:
        cond = and_(cond, Image.id.in_(_members(run.dataset)))
    if run.test_dataset is not None:
        cond = and_(cond, Image.id.not_in(_members(run.test_dataset)))
    return cond


def confusion_counts(engine: Engine, run: RunFacts, held_out_only: bool = False) -> list[tuple[str, str, int]]:
    """(true label, predicted label, images) over the run's stored predictions of labelled images.

    The truth is the image's label, or its superclass for a run trained with ``--target superclass``.
    ``held_out_only`` keeps the images the run cannot have trained on (see :func:`prediction_coverage`).
    """
    truth = _truth(run.target)
    q = (select(truth, Prediction.label, func.count()).select_from(Prediction)
         .join(Image, Image.id == Prediction.image_id)
         .where(Prediction.run_id == run.id, truth.is_not(None)).group_by(truth, Prediction.label))
    if held_out_only:
        q = q.where(not_(_seen_in_training(run)))
    with engine.connect() as conn:
        return [(str(t), str(p), int(n)) for t, p, n in conn.execute(q)]


@dataclass(frozen=True)
class PredictionCoverage:
    stored: int  # prediction rows of the run
    labelled: int  # ... of images with a truth value
    maybe_trained_on: int  # ... of images its training selection may have held


def prediction_coverage(engine: Engine, run: RunFacts) -> PredictionCoverage:
    truth = _truth(run.target)
    base = select(func.count()).select_from(Prediction).join(Image, Image.id == Prediction.image_id).where(
        Prediction.run_id == run.id)
    with engine.connect() as conn:
        stored = conn.execute(base).scalar() or 0
        labelled = conn.execute(base.where(truth.is_not(None))).scalar() or 0
        seen = conn.execute(base.where(truth.is_not(None), _seen_in_training(run))).scalar() or 0
    return PredictionCoverage(int(stored), int(labelled), int(seen))


def confident_mistakes(engine: Engine, run: RunFacts, limit: int = 12, held_out_only: bool = False
                       ) -> list[tuple[int, str, str, float]]:
    """(image id, truth, predicted, probability) of the run's most confident wrong predictions."""
    truth = _truth(run.target)
    q = (select(Image.id, truth, Prediction.label, Prediction.probability).select_from(Prediction)
         .join(Image, Image.id == Prediction.image_id)
         .where(Prediction.run_id == run.id, truth.is_not(None), Prediction.label != truth)
         .order_by(Prediction.probability.desc(), Image.id).limit(limit))
    if held_out_only:
        q = q.where(not_(_seen_in_training(run)))
    with engine.connect() as conn:
        return [(int(i), str(t), str(p), float(pr)) for i, t, p, pr in conn.execute(q)]


# -- feature sets: what the embedding map samples -------------------------------------------------


def live_image_ids(engine: Engine, feature_set_id: int) -> list[int]:
    """Ids of the images with a vector in the feature set, ascending."""
    with engine.connect() as conn:
        return [int(i) for i in conn.execute(select(FeatureRow.image_id).where(
            FeatureRow.feature_set_id == feature_set_id).order_by(FeatureRow.image_id)).scalars()]


def shard_fingerprint(engine: Engine, feature_set_id: int) -> list[tuple[int, int]]:
    """(shard id, rows) of the set's shards: changes whenever vectors are added, replaced or compacted."""
    with engine.connect() as conn:
        return [(int(i), int(n)) for i, n in conn.execute(select(FeatureShard.id, FeatureShard.rows).where(
            FeatureShard.feature_set_id == feature_set_id).order_by(FeatureShard.id))]
