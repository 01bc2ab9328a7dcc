"""Label history and out-of-fold probabilities: every SQL statement on ``label_changes`` and ``run_oof``.

A label change is a row that is never updated or deleted; ``images.label`` is
kept equal to the newest change in the same transaction that adds it. The
label *version* of the catalog is the id of its last change (0 before any), which
each run records so two runs that saw different labels can be told apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from featurestore.catalog.common import Repository, chunks
from featurestore.catalog.schema import DatasetMember, Image, LabelChange, LabelReview, Run, RunOutOfFold, utcnow
from featurestore.errors import FeatureStoreError, ImageNotFoundError, NotFoundError

# -- label changes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedChange:
    """One image's new label, before it is written."""

    image_id: int
    new_label: str
    new_superclass: str | None
    reason: str | None = None
    undoes: int | None = None


@dataclass(frozen=True)
class LabelChangeRow:
    """A stored change."""

    id: int
    image_id: int
    old_label: str | None
    old_superclass: str | None
    new_label: str
    new_superclass: str | None
    changed_at: datetime
    changed_by: str
    source: str
    reason: str | None
    undoes: int | None


class LaterChangeError(FeatureStoreError, ValueError):
    """An undo of a change that a later change of the same image overwrote."""

    def __init__(self, change_id: int, image_id: int, later_id: int):
        super().__init__(f"change {change_id} of image {image_id} was overwritten by change {later_id}; "
                         f"undo {later_id} first", remedy="or-labels-set", change_id=change_id, image_id=image_id,
                         later_id=later_id)


_COLUMNS = (LabelChange.id, LabelChange.image_id, LabelChange.old_label, LabelChange.old_superclass,
            LabelChange.new_label, LabelChange.new_superclass, LabelChange.changed_at, LabelChange.changed_by,
            LabelChange.source, LabelChange.reason, LabelChange.undoes)


def _row(r: Sequence[object]) -> LabelChangeRow:
    return LabelChangeRow(*r)  # type: ignore[arg-type]


# -- out-of-fold probabilities --------------------------------------------------------------------


@dataclass(frozen=True)
class RunOOF:
    """A K-fold run's out-of-fold probabilities, rows ordered by image id."""

    run_id: int
    classes: list[str]
    image_ids: np.ndarray
    folds: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    neighbours: np.ndarray | None = None
    """The out-of-fold neighbour votes, same shape as ``probabilities``; None when the run kept none."""


def oof_rows(image_ids: Sequence[int] | np.ndarray, folds: Sequence[int] | np.ndarray,
             labels: Sequence[str] | np.ndarray, probabilities: np.ndarray,
             neighbours: np.ndarray | None = None) -> list[dict[str, Any]]:
    """``run_oof`` rows (without run_id, for ``Catalog.add_run``) from aligned arrays."""
    probabilities = np.asarray(probabilities)
    votes = [None] * len(probabilities) if neighbours is None else [[float(v) for v in row] for row in neighbours]
    return [{"image_id": int(i), "fold": int(f), "label": str(lb), "probabilities": [float(p) for p in row],
             "neighbours": vote}
            for i, f, lb, row, vote in zip(image_ids, folds, labels, probabilities, votes, strict=True)]


class Labels(Repository):
    """Queries on label changes, reviews and out-of-fold probabilities."""

    def label_version(self, s: Session | None = None) -> int:
        """The id of the last label change (0 when labels were never changed), in ``s`` if given."""
        with self._within(s) as s:
            return int(s.scalar(select(func.max(LabelChange.id))) or 0)

    def apply_changes(self, changes: Sequence[PlannedChange], changed_by: str, source: str,
                      before_each: Callable[[int], None] | None = None) -> list[int]:
        """Write ``changes`` in ONE transaction: a history row each and ``images.label`` updated.

        Either every change lands or none (an error or a killed process rolls the
        whole transaction back). Changes that would not change anything (same label
        and superclass) are skipped. ``before_each(k)`` is called before the k-th
        write (tests inject a failure there). Returns the new change ids.
        """
        ids: list[int] = []
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            current = {}
            for part in chunks([c.image_id for c in changes]):
                for i, lb, sc in s.execute(select(Image.id, Image.label, Image.superclass).where(Image.id.in_(part))):
                    current[int(i)] = (lb, sc)
            for k, c in enumerate(changes):
                if c.image_id not in current:
                    raise ImageNotFoundError(c.image_id)
                old = current[c.image_id]
                if old == (c.new_label, c.new_superclass):
                    continue
                if before_each is not None:
                    before_each(k)
                new_id = s.scalar(insert(LabelChange).returning(LabelChange.id).values(
                    image_id=c.image_id, old_label=old[0], old_superclass=old[1], new_label=c.new_label,
                    new_superclass=c.new_superclass, changed_at=now, changed_by=changed_by, source=source,
                    reason=c.reason, undoes=c.undoes))
                s.execute(update(Image).where(Image.id == c.image_id)
                          .values(label=c.new_label, superclass=c.new_superclass))
                current[c.image_id] = (c.new_label, c.new_superclass)
                ids.append(int(new_id or 0))
        return ids

    def label_history(self, image_id: int | None = None, limit: int | None = None) -> list[LabelChangeRow]:
        """Changes, newest first (of one image when ``image_id`` is given)."""
        q = select(*_COLUMNS).order_by(LabelChange.id.desc())
        if image_id is not None:
            q = q.where(LabelChange.image_id == image_id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def label_change(self, change_id: int) -> LabelChangeRow:
        """One change (NotFoundError when there is no such id)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(*_COLUMNS).where(LabelChange.id == change_id)).first()
            if row is None:
                last = conn.execute(select(func.max(LabelChange.id))).scalar()
                hint = f"change ids run from 1 to {last}" if last else "no label was changed yet"
                raise NotFoundError("label change", str(change_id), hint=hint, remedy="see-labels-history")
        return _row(row)

    def later_label_change(self, change_row: LabelChangeRow) -> int | None:
        """The id of the first change of the same image after ``change_row``, if any."""
        with self.engine.connect() as conn:
            found = conn.execute(select(func.min(LabelChange.id)).where(
                LabelChange.image_id == change_row.image_id, LabelChange.id > change_row.id)).scalar()
        return None if found is None else int(found)

    def run_oof(self, run_id: int) -> RunOOF | None:
        """The run's out-of-fold probabilities, or None when it kept none (not a K-fold run)."""
        with self.engine.connect() as conn:
            classes = conn.execute(select(Run.oof_classes).where(Run.id == run_id)).scalar()
            rows = conn.execute(select(RunOutOfFold.image_id, RunOutOfFold.fold, RunOutOfFold.label,
                                       RunOutOfFold.probabilities, RunOutOfFold.neighbours)
                                .where(RunOutOfFold.run_id == run_id).order_by(RunOutOfFold.image_id)).all()
        if not classes or not rows:
            return None
        votes = None
        if all(r[4] is not None for r in rows):
            votes = np.asarray([r[4] for r in rows], dtype=np.float64)
        return RunOOF(run_id=run_id, classes=[str(c) for c in classes],
                      image_ids=np.fromiter((int(r[0]) for r in rows), dtype=np.int64, count=len(rows)),
                      folds=np.fromiter((int(r[1]) for r in rows), dtype=np.int64, count=len(rows)),
                      labels=np.asarray([str(r[2]) for r in rows], dtype=object),
                      probabilities=np.asarray([r[3] for r in rows], dtype=np.float64), neighbours=votes)

    def resolve_images(self, refs: Sequence[int | str]) -> dict[int | str, int]:
        """Each ref (an image id, or a path an image was ingested from) -> the image id, for those that exist."""
        ids = sorted({r for r in refs if isinstance(r, int)})
        paths = sorted({r for r in refs if isinstance(r, str)})
        out: dict[int | str, int] = {}
        with self.engine.connect() as conn:
            for part in chunks(ids):
                out.update({int(i): int(i) for i in conn.execute(select(Image.id).where(Image.id.in_(part))).scalars()})
            for part in chunks(paths):
                for p, i in conn.execute(select(Image.source_path, Image.id).where(Image.source_path.in_(part))):
                    out[str(p)] = int(i)
                for p, i in conn.execute(select(DatasetMember.source_path, DatasetMember.image_id)
                                         .where(DatasetMember.source_path.in_(part))):
                    out.setdefault(str(p), int(i))
        return out

    def reviewed(self, run_id: int) -> set[int]:
        """Images a reviewer marked "label is right" for ``run_id``."""
        with self.engine.connect() as conn:
            return {int(i) for i in conn.execute(select(LabelReview.image_id).where(LabelReview.run_id == run_id))
                    .scalars()}

    def mark_reviewed(self, run_id: int, image_id: int, label: str, reviewed_by: str) -> None:
        """Record "the label is right" (again: the newest verdict replaces the older one)."""
        with Session(self.engine) as s, s.begin():
            s.execute(delete(LabelReview).where(LabelReview.run_id == run_id, LabelReview.image_id == image_id))
            s.execute(insert(LabelReview).values(run_id=run_id, image_id=image_id, label=label, reviewed_by=reviewed_by,
                                                 reviewed_at=utcnow()))

    def oof_runs(self) -> list[int]:
        """Ids of the runs that kept out-of-fold probabilities, newest first."""
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(select(Run.id).where(Run.oof_classes.is_not(None))
                                                 .order_by(Run.id.desc())).scalars()]

    def known_labels(self) -> dict[str, list[str | None]]:
        """label -> the superclasses its images have (most images first), over every labelled image."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Image.label, Image.superclass, func.count()).where(Image.label.is_not(None))
                                .group_by(Image.label, Image.superclass)).all()
        out: dict[str, list[tuple[int, str | None]]] = {}
        for label, superclass, n in rows:
            out.setdefault(str(label), []).append((int(n), superclass))
        return {k: [sc for _, sc in sorted(v, key=lambda t: (-t[0], str(t[1])))] for k, v in out.items()}
