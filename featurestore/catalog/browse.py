"""Browsing: the web app's image grid and its filter menus.

All filters reach SQL as bound parameters. Pages are keyset-paged on the image id
(``id > :after ORDER BY id LIMIT n``), never with OFFSET, so page 1,000 costs what page 1 costs;
the filters use the indexes on ``images.label``, ``images.superclass`` (migration 0005),
``dataset_members (dataset_id, image_id)`` and ``predictions (run_id, image_id)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import and_, exists, func, not_, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql import Select

from featurestore.catalog.audits import KINDS as FINDING_KINDS
from featurestore.catalog.runs import RunFacts, Runs, _seen_in_training, _Source, _truth
from featurestore.catalog.schema import AuditFinding, Dataset, DatasetMember, Image, Prediction, Run, RunTestPrediction
from featurestore.errors import InvalidInputError

MAX_PAGE = 500


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
    source: str | None = None  # the run's predictions: "test" (fixed-test evaluation) or "stored"; None = auto
    sort: str = "id"  # see SORTS
    seed: int = 0  # of the "random" order
    versus: int | None = None  # a second fixed-test run, for ``outcome``
    outcome: str | None = None  # see OUTCOMES: how ``run`` and ``versus`` did on each test image
    ids: tuple[int, ...] | None = None  # only these images (a selection drawn on the map)
    finding: str | None = None  # only images with an `fs audit` finding of this kind (issue 25)

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
        if self.source not in (None, "test", "stored"):
            raise InvalidInputError(f"predictions must be test or stored, not {self.source!r}")
        if self.sort not in SORTS:
            raise InvalidInputError(f"sort by one of {', '.join(SORTS)}, not {self.sort!r}")
        if self.sort in ("confidence", "margin") and self.run is None:
            raise InvalidInputError(f"sorting by {self.sort} needs a run: pick one")
        if (self.outcome is None) != (self.versus is None):
            raise InvalidInputError("comparing two runs' outcomes needs both versus (a run) and outcome")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise InvalidInputError(f"outcome must be one of {', '.join(OUTCOMES)}, not {self.outcome!r}")
        if self.outcome is not None and self.run is None:
            raise InvalidInputError("the outcome filter needs a run: pick one")
        if self.finding is not None and self.finding not in FINDING_KINDS:
            raise InvalidInputError(f"unknown finding {self.finding!r}; choose one of {', '.join(FINDING_KINDS)}")


SORTS = ("id", "confidence", "margin", "random")
"""Grid orders: image id; the run's top probability, highest first; the gap between its two most probable
classes, smallest first (the most ambiguous images); a seeded shuffle."""
OUTCOMES = ("a_only", "b_only", "both", "neither")
"""On a fixed test set: only run A right, only run B right, both right, both wrong."""


@dataclass(frozen=True)
class Tile:
    """One image of a grid page (``predicted``/``probability``/``correct`` only with a run filter)."""

    id: int
    label: str | None
    superclass: str | None
    predicted: str | None = None
    probability: float | None = None
    correct: bool | None = None
    margin: float | None = None  # top probability minus the second (stored predictions only)


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


class MenuCount(NamedTuple):
    """One value offered by a filter menu and how many images have it."""

    value: str
    images: int


class RunChoice(NamedTuple):
    """A run offered by the grid's run menu."""

    id: int
    features: str  # comma-separated
    stored_predictions: int


@dataclass(frozen=True)
class Facets:
    """Values offered by the grid's filter menus."""

    datasets: list[str] = field(default_factory=list)
    superclasses: list[str] = field(default_factory=list)
    labels: list[MenuCount] = field(default_factory=list)
    runs: list[RunChoice] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)
    superclass_counts: list[MenuCount] = field(default_factory=list)  # under the other filters
    predicted_counts: list[MenuCount] = field(default_factory=list)  # under the other filters


def _sort_key(f: ImageFilter, src: _Source | None, key: Any) -> Any:
    """The expression the grid is ordered by (ascending, then by image id); None for plain id order."""
    if f.sort == "id":
        return None
    if f.sort == "random":
        # A seeded hash of the id, computed in SQL on any backend: an affine step, then a square modulo the
        # prime 2**31 - 1 (non-linear, so seeds give unrelated orders; every value stays below 2**62).
        mixed = (key * 48271 + f.seed * 2654435761 + 1) % 2147483647
        return (mixed * mixed) % 2147483647
    assert src is not None
    if src.kind == "test":
        raise InvalidInputError("test-set predictions keep no probabilities: sort by id or at random, or pick the "
                                "run's stored predictions")
    return -src.probability if f.sort == "confidence" else src.margin


def _run_filters(q: Select[Any], f: ImageFilter, run: RunFacts, src: _Source) -> Select[Any]:
    """The filters on the run's predictions (predicted label, right/wrong, probability, held out, outcome)."""
    truth = _truth(run.target)
    if f.predicted is not None:
        q = q.where(src.label == f.predicted)
    if src.kind == "test":
        if f.below is not None:
            raise InvalidInputError(f"run {run.id}'s test-set predictions keep no probabilities: drop the "
                                    "probability filter or pick its stored predictions")
        if f.correct is not None:
            q = q.where(src.correct.is_(f.correct))
        # held_out needs nothing: the run never trained on its test dataset
    else:
        if f.correct is True:
            q = q.where(truth.is_not(None), Prediction.label == truth)
        elif f.correct is False:
            q = q.where(truth.is_not(None), Prediction.label != truth)
        if f.below is not None:
            q = q.where(Prediction.probability < f.below)
        if f.held_out:
            q = q.where(not_(_seen_in_training(run)))
    if f.versus is not None and f.outcome is not None:
        q = _outcome(q, run, src, f.versus, f.outcome)
    return q


def _filtered(f: ImageFilter, run: RunFacts | None, columns: Sequence[Any]) -> tuple[Select[Any], Any]:
    """SELECT columns FROM images [JOIN the run's predictions] WHERE filters, and the id column to page on."""
    q = select(*columns)
    key: Any = Image.id
    if run is not None:
        src = _Source(run, f.source)
        q = q.select_from(src.table).join(Image, Image.id == src.image_id).where(src.run_id == run.id)
        key = src.image_id
        q = _run_filters(q, f, run, src)
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
    if f.ids is not None:
        q = q.where(key.in_(f.ids))
    if f.finding is not None:
        q = q.where(exists().where(AuditFinding.kind == f.finding,
                                   or_(AuditFinding.image_id == key, AuditFinding.other_image_id == key)))
    return q, key


def _outcome(q: Select[Any], run: RunFacts, src: _Source, versus: int, outcome: str) -> Select[Any]:
    """Keep the test images where run A (``run``) and run B (``versus``) were right or wrong as ``outcome`` says."""
    if src.kind != "test":
        raise InvalidInputError(f"run {run.id} has no test-set predictions: comparing outcomes image by image needs "
                                "two runs scored on the same fixed test dataset")
    other = aliased(RunTestPrediction)
    q = q.join(other, and_(other.image_id == src.image_id, other.run_id == versus))
    a, b = src.correct, other.correct
    cond = {"a_only": and_(a.is_(True), b.is_(False)), "b_only": and_(a.is_(False), b.is_(True)),
            "both": and_(a.is_(True), b.is_(True)), "neither": and_(a.is_(False), b.is_(False))}[outcome]
    return q.where(cond)


def _tile_columns(f: ImageFilter, run: RunFacts | None) -> list[Any]:
    cols: list[Any] = [Image.id, Image.label, Image.superclass]
    if run is not None:
        src = _Source(run, f.source)
        cols += [src.label, src.probability, src.correct, src.margin]
    return cols


def _tile(row: Sequence[Any], run: RunFacts | None) -> Tile:
    if run is None:
        return Tile(int(row[0]), row[1], row[2])
    return Tile(int(row[0]), row[1], row[2], row[3], None if row[4] is None else float(row[4]),
                None if row[5] is None else bool(row[5]), None if row[6] is None else float(row[6]))


class Browse(Runs):
    """The grid's pages, counts, matching ids and filter menus (they read runs' predictions)."""

    def browse_page(self, f: ImageFilter, *, after: int | None = None, before: int | None = None,
                    limit: int = 100, at: int | None = None) -> Page:
        """One page of images matching ``f`` in its order: the first, the one after ``after``, before ``before``, or
        the one starting at ``at``.

        Keyset paging: the cursor is an image id; with a sort other than id its sort key is looked up first, so one
        range scan of ``limit + 1`` rows serves any page.
        """
        f.check()
        limit = max(1, min(int(limit), MAX_PAGE))
        run = self.run_facts(f.run) if f.run is not None else None
        q, key = _filtered(f, run, _tile_columns(f, run))
        sort = _sort_key(f, _Source(run, f.source) if run is not None else None, key)
        backwards = before is not None and after is None and at is None
        cursor = before if backwards else after if after is not None else at
        with self.engine.connect() as conn:
            if cursor is not None:
                if sort is None:
                    bound: Any = None
                else:
                    kq, _ = _filtered(f, run, [sort])
                    bound = conn.execute(kq.where(key == cursor)).scalar()
                    if bound is None:  # the cursor left the view (or never was in it): nothing to page from
                        return Page([], has_prev=False, has_next=False)
                if backwards:
                    q = q.where(key < cursor if sort is None else or_(sort < bound, and_(sort == bound, key < cursor)))
                elif after is not None:
                    q = q.where(key > cursor if sort is None else or_(sort > bound, and_(sort == bound, key > cursor)))
                else:
                    q = q.where(key >= cursor if sort is None
                                else or_(sort > bound, and_(sort == bound, key >= cursor)))
            order = [key] if sort is None else [sort, key]
            q = q.order_by(*(c.desc() for c in order)) if backwards else q.order_by(*order)
            rows = list(conn.execute(q.limit(limit + 1)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        if backwards:
            rows.reverse()
            tiles = [_tile(r, run) for r in rows]
            return Page(tiles, has_prev=more, has_next=bool(tiles))
        tiles = [_tile(r, run) for r in rows]
        return Page(tiles, has_prev=cursor is not None and bool(tiles), has_next=more)

    def count_images(self, f: ImageFilter) -> int:
        f.check()
        run = self.run_facts(f.run) if f.run is not None else None
        q, _ = _filtered(f, run, [func.count()])
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def matching_ids(self, f: ImageFilter) -> list[int]:
        """Ids of every image matching ``f``, ascending (for exports and saved selections)."""
        f.check()
        run = self.run_facts(f.run) if f.run is not None else None
        q, key = _filtered(f, run, [Image.id])
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(q.order_by(key)).scalars()]

    def facets(self, run_id: int | None = None, f: ImageFilter | None = None) -> Facets:
        """Datasets, superclasses, labels (with counts), runs (with their stored predictions) and, for a run,
        its predicted labels.

        With ``f``, the menus narrow to the current view: each menu's counts are those of the images matching the
        other filters (the label menu under the dataset and superclass chosen, and so on).
        """
        superclass_counts: list[MenuCount] = []
        predicted_counts: list[MenuCount] = []
        with self.engine.connect() as conn:
            datasets = list(conn.execute(select(Dataset.name).order_by(Dataset.name)).scalars())
            if f is None:
                superclasses = [s for s in conn.execute(select(Image.superclass).distinct()
                                                        .order_by(Image.superclass)).scalars() if s is not None]
                labels = [MenuCount(str(lb), int(n)) for lb, n in conn.execute(
                    select(Image.label, func.count()).where(Image.label.is_not(None)).group_by(Image.label)
                    .order_by(Image.label))]
            else:
                run = self.run_facts(f.run) if f.run is not None else None

                def counts(column: Any, **drop: Any) -> list[MenuCount]:
                    q, _ = _filtered(replace(f, **drop), run, [column, func.count()])
                    rows = conn.execute(q.where(column.is_not(None)).group_by(column).order_by(column))
                    return [MenuCount(str(v), int(n)) for v, n in rows]

                superclass_counts = counts(Image.superclass, superclass=None, label=None)
                superclasses = [c.value for c in superclass_counts]
                labels = counts(Image.label, label=None)
                if run is not None:
                    predicted_counts = counts(_Source(run, f.source).label, predicted=None)
        counts_ = self.prediction_counts()
        predicted: list[str] = []
        with self.engine.connect() as conn:
            runs = [RunChoice(int(i), ",".join(feats), int(counts_.get(i, 0)))
                    for i, feats in conn.execute(select(Run.id, Run.features).order_by(Run.id.desc()))]
            if run_id is not None and f is None:
                predicted = list(conn.execute(select(Prediction.label).where(Prediction.run_id == run_id)
                                              .distinct().order_by(Prediction.label)).scalars())
            elif f is not None:
                predicted = [c.value for c in predicted_counts]
        return Facets(datasets, superclasses, labels, runs, predicted, superclass_counts, predicted_counts)
