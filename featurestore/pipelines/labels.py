"""Label mistakes: find them from a K-fold run's out-of-fold probabilities, correct them with history.

One implementation for the CLI (``fs audit labels``, ``fs labels ...``) and the
web app. Every correction is a row of ``label_changes`` written in one
transaction with the new ``images.label``; callers hold the store's write lock
(``store.writing()``), which serialises them with every other writer.
"""

from __future__ import annotations

import csv
import getpass
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.catalog.labels import LabelChangeRow, LaterChangeError, PlannedChange
from featurestore.catalog.repository import check_ids
from featurestore.errors import FeatureStoreError, ImageNotFoundError, InvalidInputError
from featurestore.store import Store
from featurestore.training.label_issues import (
    DEFAULT_FILTER,
    DEFAULT_NEIGHBOUR_WEIGHT,
    find_label_issues,
    judged_probabilities,
)

SOURCES = ("cli", "import", "undo", "http")


# -- audit ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One labelled image of a K-fold run, judged from its out-of-fold probabilities."""

    image_id: int
    label: str
    suggested: str
    quality: float
    flagged: bool
    fold: int
    confidence: float
    """Out-of-fold probability of the suggested class."""


@dataclass(frozen=True)
class LabelAudit:
    run_id: int
    rows: list[AuditRow]
    """Every image of the run, worst (lowest quality) first."""
    estimated_issues: int
    n_flagged: int
    classes: list[str]
    target: str = "label"
    """What the run predicted: "label", or "superclass" (then the rows judge superclasses)."""
    neighbour_weight: float = 0.0
    """Share of the neighbour votes in the probabilities judged (0 when the run kept none)."""


class NoOutOfFoldError(FeatureStoreError, LookupError):
    """A run without out-of-fold probabilities."""

    def __init__(self, run_id: int):
        super().__init__(f"run {run_id} kept no out-of-fold probabilities", remedy="evaluate-folds", run_id=run_id)


def audit_labels(store: Store, run_id: int, filter_by: str = DEFAULT_FILTER,
                 min_confidence: float = 0.0, neighbour_weight: float = DEFAULT_NEIGHBOUR_WEIGHT) -> LabelAudit:
    """cleanlab's label issues on the stored out-of-fold probabilities of ``run_id`` (no model is fitted).

    The labels judged are the ones the run saw (``run_oof.label``), not later corrections. The
    probabilities judged are the fold models' averaged with the stored neighbour votes
    (``neighbour_weight`` of them; :func:`featurestore.training.label_issues.judged_probabilities`),
    or the models' alone for a run that kept no votes. ``filter_by`` and ``min_confidence``: see
    :func:`featurestore.training.label_issues.find_label_issues`.
    """
    run = store.catalog.run(run_id)  # NotFoundError lists the runs
    oof = store.catalog.run_oof(run_id)
    if oof is None:
        raise NoOutOfFoldError(run_id)
    column = {c: j for j, c in enumerate(oof.classes)}
    given = np.asarray([column[str(lb)] for lb in oof.labels], dtype=np.int64)
    probabilities = judged_probabilities(oof.probabilities, oof.neighbours, neighbour_weight)
    issues = find_label_issues(given, probabilities, filter_by, min_confidence)
    rows = [AuditRow(image_id=int(oof.image_ids[i]), label=oof.classes[given[i]],
                     suggested=oof.classes[int(issues.suggested[i])], quality=float(issues.quality[i]),
                     flagged=bool(issues.flagged[i]), fold=int(oof.folds[i]),
                     confidence=float(issues.confidence[i]))
            for i in issues.order(oof.image_ids)]
    return LabelAudit(run_id, rows, issues.estimated_issues, int(issues.flagged.sum()), oof.classes, run.target,
                      neighbour_weight if oof.neighbours is not None else 0.0)


# -- changes --------------------------------------------------------------------------------------


def cli_user() -> str:
    """Who changes labels from the command line: the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


@dataclass(frozen=True)
class LabelTarget:
    """A label to give: the label and the superclass to store with it."""

    label: str
    superclass: str | None


def resolve_label(known: dict[str, list[str | None]], label: str, superclass: str | None, new_label: bool,
                  where: str = "") -> LabelTarget:
    """Check ``label`` against the labels in use and pick its superclass.

    An unknown label is refused (a typo would create a class) unless
    ``new_label``. Without ``superclass`` the label keeps the superclass its
    images have (the most common one); a new label without one gets none.
    """
    label = (label or "").strip()
    if not label or len(label) > 200:
        raise InvalidInputError(f"{where}a label must have 1 to 200 characters, got {label!r}")
    if superclass is not None and (not superclass.strip() or len(superclass) > 200):
        raise InvalidInputError(f"{where}a superclass must have 1 to 200 characters, got {superclass!r}")
    if label not in known and not new_label:
        close = sorted(known, key=lambda k: (k.lower() != label.lower(), k))[:8]
        raise InvalidInputError(f"{where}unknown label {label!r} (labels in use: {', '.join(close)}"
                                f"{' ...' if len(known) > 8 else ''})", remedy="new-label", label=label)
    if superclass is None and label in known:
        superclass = known[label][0]
    return LabelTarget(label, superclass)


def set_labels(store: Store, image_ids: Sequence[int], label: str, superclass: str | None = None,
               reason: str | None = None, new_label: bool = False, changed_by: str | None = None,
               source: str = "cli") -> list[int]:
    """Give ``image_ids`` the label ``label``; one history row per image whose label changes.

    Returns the new change ids (empty when every image already had that label).
    """
    ids = check_ids(image_ids)
    if not ids:
        raise InvalidInputError("no images selected", remedy="select-images")
    target = resolve_label(store.catalog.known_labels(), label, superclass, new_label)
    found = store.catalog.labels_of(ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ImageNotFoundError(missing[0], len(missing), remedy="find-ids")
    changes = [PlannedChange(i, target.label, target.superclass, reason) for i in dict.fromkeys(ids)]
    return store.catalog.apply_changes(changes, changed_by or cli_user(), source)


@dataclass(frozen=True)
class ImportPlan:
    """The checked rows of a label CSV, before anything is written."""

    changes: list[PlannedChange]
    unchanged: int


def plan_import(store: Store, path: Path, new_label: bool = False) -> ImportPlan:
    """Read and check a label CSV (``image,label[,reason[,superclass]]``); refuse it whole on any bad row.

    ``image`` is an image id or the path the image was ingested from (as in
    ``images.source_path``; a relative path is resolved from the current folder). A header
    row whose first cell is ``image``, ``image_id``, ``id`` or ``path`` is skipped.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] and rows[0][0].strip().lower() in ("image", "image_id", "id", "path"):
        rows = [[]] + rows[1:]  # keep line numbers
    catalog = store.catalog
    known = catalog.known_labels()
    lines = [(n, row) for n, row in enumerate(rows, start=1) if row and any(c.strip() for c in row)]
    for n, row in lines:
        if len(row) < 2 or len(row) > 4:
            raise InvalidInputError(f"{path} line {n}: expected image,label[,reason[,superclass]], "
                                    f"got {','.join(row)!r}")
    found = catalog.resolve_images([_ref(row[0]) for _, row in lines])
    wanted: list[tuple[int, int, str, str | None, str | None]] = []  # line, image id, label, reason, superclass
    for n, row in lines:
        where = f"{path} line {n}: "
        image_id = found.get(_ref(row[0]))
        if image_id is None:
            raise InvalidInputError(f"{where}no stored image has the id or path {row[0].strip()!r}", remedy="find-ids")
        reason = (row[2].strip() or None) if len(row) > 2 else None
        superclass = (row[3].strip() or None) if len(row) > 3 else None
        target = resolve_label(known, row[1], superclass, new_label, where)
        wanted.append((n, image_id, target.label, reason, target.superclass))
    if not wanted:
        raise InvalidInputError(f"{path} has no rows; expected image,label[,reason[,superclass]] per line")
    seen: dict[int, int] = {}
    for n, image_id, *_ in wanted:
        if image_id in seen:
            raise InvalidInputError(f"{path} line {n}: image {image_id} is already relabelled on line "
                                    f"{seen[image_id]}; keep one row per image")
        seen[image_id] = n
    current = catalog.labels_of([w[1] for w in wanted])
    changes = [PlannedChange(i, lb, sc, reason) for _, i, lb, reason, sc in wanted if current[i] != (lb, sc)]
    return ImportPlan(changes, len(wanted) - len(changes))


def _ref(cell: str) -> int | str:
    """An image id, or the absolute path the image was ingested from."""
    ref = cell.strip()
    if ref.isdigit():
        return int(ref)
    return str(Path(ref).expanduser().resolve())


def import_labels(store: Store, path: Path, new_label: bool = False, changed_by: str | None = None,
                  before_each: Callable[[int], None] | None = None) -> tuple[list[int], int]:
    """Apply a label CSV: every row or none (one transaction). Returns (change ids, rows already so)."""
    plan = plan_import(store, path, new_label)
    ids = store.catalog.apply_changes(plan.changes, changed_by or cli_user(), "import",
                                       before_each)
    return ids, plan.unchanged


def history(store: Store, image_id: int | None = None, limit: int | None = None) -> list[LabelChangeRow]:
    """Label changes, newest first (of one image with ``image_id``)."""
    if image_id is not None:
        check_ids([image_id])
        if not store.catalog.image_exists(image_id):
            raise ImageNotFoundError(image_id, remedy="find-ids")
    return store.catalog.label_history(image_id, limit)


def undo(store: Store, change_ids: Sequence[int], changed_by: str | None = None, source: str = "undo"
         ) -> list[int]:
    """Put back the labels that ``change_ids`` replaced, as new changes (history keeps both).

    Refused (nothing written) when a later change of the same image overwrote
    one of them: :class:`LaterChangeError` names the later change.
    """
    catalog = store.catalog
    planned = []
    for cid in dict.fromkeys(check_ids(change_ids, "change id")):
        row = catalog.label_change(cid)
        later = catalog.later_label_change(row)
        if later is not None:
            raise LaterChangeError(row.id, row.image_id, later)
        if row.old_label is None:
            raise InvalidInputError(f"change {row.id} labelled the unlabelled image {row.image_id}; an image cannot "
                                    "be made unlabelled again", remedy="labels-set-instead", change_id=row.id,
                                    image_id=row.image_id)
        planned.append(PlannedChange(row.image_id, row.old_label, row.old_superclass, f"undo of change {row.id}",
                                     undoes=row.id))
    return catalog.apply_changes(planned, changed_by or cli_user(), source)
