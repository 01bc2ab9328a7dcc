"""Images and datasets: the ``images``, ``datasets``, ``dataset_members`` and ``ingest_errors`` tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.orm import Session

from featurestore.catalog.common import CHUNK, Repository, check_name, chunks
from featurestore.catalog.feature_versions import newest_only
from featurestore.catalog.schema import Dataset, DatasetMember, FeatureRow, FeatureSet, Image, IngestError, utcnow
from featurestore.errors import InvalidInputError, NotFoundError

# A few requested ids are picked by the database; more are filtered after reading.
_PICK_IN_SQL = 10_000


class DatasetExistsError(InvalidInputError):
    """A selection would be saved under the name of an existing dataset."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a dataset named {name!r} already exists: pick another name", remedy="see-datasets",
                         name=name)


@dataclass(frozen=True)
class ImageFile:
    """Where a catalogued image's bytes are, and what they must hash to."""

    id: int
    source_path: str
    sha256: str
    bytes: int
    format: str


class ImageRow(NamedTuple):
    """One image as the store lists it (``Store.select_images``)."""

    id: int
    source_path: str
    label: str | None
    superclass: str | None


class DatasetCount(NamedTuple):
    """A dataset, how many images are its members and when it was made."""

    name: str
    images: int
    created_at: datetime | None


class LabelCount(NamedTuple):
    """How many images carry one (superclass, label) pair."""

    superclass: str | None
    label: str | None
    images: int


class DatasetOverlap(NamedTuple):
    """Another dataset and how many images it shares with the one asked about."""

    dataset: str
    images: int


class PathLabel(NamedTuple):
    """Where an image was ingested from, and its label."""

    source_path: str
    label: str | None


class ImageLabels(NamedTuple):
    """An image's label and superclass."""

    label: str | None
    superclass: str | None


class StoredContent(NamedTuple):
    """A catalogued image found by its content hash (``fs ingest`` meeting bytes it has seen)."""

    image_id: int
    label: str | None
    superclass: str | None
    source_path: str
    member: bool  # already a member of the dataset being ingested


class ImageDetail(NamedTuple):
    """One image's catalog row, the datasets it belongs to and the feature sets it has a vector in."""

    image: Image
    datasets: list[str]
    feature_sets: list[str]


class Images(Repository):
    """Queries on images, datasets and their members."""

    def dataset_id(self, s: Session, name: str, create: bool = False) -> int:
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None:
            if not create:
                raise NotFoundError("dataset", name, s.scalars(select(Dataset.name)))
            ds = Dataset(name=name)
            s.add(ds)
            s.flush()
        return ds.id

    def dataset_counts(self) -> list[DatasetCount]:
        """Name, member images and creation time of each dataset, by name."""
        with self.session() as s:
            rows = s.execute(select(Dataset.name, func.count(DatasetMember.image_id), Dataset.created_at)
                             .join(DatasetMember, DatasetMember.dataset_id == Dataset.id, isouter=True)
                             .group_by(Dataset.id, Dataset.name, Dataset.created_at).order_by(Dataset.name)).all()
        return [DatasetCount(str(n), int(c), t) for n, c, t in rows]

    def dataset_labels(self, name: str) -> list[LabelCount]:
        """Images per (superclass, label) among one dataset's members."""
        with self.session() as s:
            ds = self.dataset_id(s, name)
            rows = s.execute(select(Image.superclass, Image.label, func.count())
                             .join(DatasetMember, DatasetMember.image_id == Image.id)
                             .where(DatasetMember.dataset_id == ds)
                             .group_by(Image.superclass, Image.label).order_by(Image.superclass, Image.label)).all()
        return [LabelCount(sc, lb, int(n)) for sc, lb, n in rows]

    def dataset_overlaps(self, name: str) -> list[DatasetOverlap]:
        """Every other dataset sharing images with ``name``, with how many images are in both."""
        other = DatasetMember.__table__.alias("other")
        with self.session() as s:
            ds = self.dataset_id(s, name)
            rows = s.execute(select(Dataset.name, func.count())
                             .select_from(DatasetMember)
                             .join(other, other.c.image_id == DatasetMember.image_id)
                             .join(Dataset, Dataset.id == other.c.dataset_id)
                             .where(DatasetMember.dataset_id == ds, other.c.dataset_id != ds)
                             .group_by(Dataset.name).order_by(Dataset.name)).all()
        return [DatasetOverlap(str(n), int(c)) for n, c in rows]

    def dataset_overlap(self, a: str, b: str) -> int:
        """How many images belong to both datasets."""
        other = DatasetMember.__table__.alias("other")
        with self.session() as s:
            ida, idb = self.dataset_id(s, a), self.dataset_id(s, b)
            return int(s.scalar(select(func.count()).select_from(DatasetMember)
                                .join(other, other.c.image_id == DatasetMember.image_id)
                                .where(DatasetMember.dataset_id == ida, other.c.dataset_id == idb)) or 0)

    def dataset_image_ids(self, name: str) -> set[int]:
        """Ids of the members of dataset ``name``."""
        return {int(i) for i in self.image_ids_where(dataset=name)}

    # -- images ----------------------------------------------------------------------
    def image_rows(self, dataset: str | None, labelled_only: bool, image_ids: Sequence[int] | None
                   ) -> list[ImageRow]:
        """The selected images, by id."""
        return [ImageRow(*r) for r in self._selected(dataset, labelled_only, image_ids,
                                                     [Image.id, Image.source_path, Image.label, Image.superclass])]

    def selected_image_ids(self, dataset: str | None, labelled_only: bool, image_ids: Sequence[int] | None
                           ) -> list[int]:
        """Ids of the images :meth:`image_rows` would return, ascending."""
        return [int(r[0]) for r in self._selected(dataset, labelled_only, image_ids, [Image.id])]

    def _selected(self, dataset: str | None, labelled_only: bool, image_ids: Sequence[int] | None,
                  cols: list[Any]) -> list[tuple[Any, ...]]:
        q = select(*cols).order_by(Image.id)
        if dataset is not None:
            with self.session() as s:
                ds = self.dataset_id(s, dataset)
            q = q.join(DatasetMember, DatasetMember.image_id == Image.id).where(DatasetMember.dataset_id == ds)
        if labelled_only:
            q = q.where(Image.label.is_not(None))
        wanted = {int(i) for i in image_ids} if image_ids is not None else None
        if wanted is not None and len(wanted) <= _PICK_IN_SQL:
            q = q.where(Image.id.in_(sorted(wanted)))
        rows = self._raw_rows(q)
        if wanted is not None and len(wanted) > _PICK_IN_SQL:
            rows = [r for r in rows if r[0] in wanted]
        return rows

    def image_count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count(Image.id))) or 0)

    def all_image_ids(self) -> list[int]:
        with self.session() as s:
            return [int(i) for i in s.scalars(select(Image.id).order_by(Image.id))]

    def image_exists(self, image_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(Image.id).where(Image.id == int(image_id))).first() is not None

    def image_id_by_sha256(self, sha256: str) -> int | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(Image.id).where(Image.sha256 == sha256)).scalar()
        return None if found is None else int(found)

    def image_paths_labels(self, image_ids: Sequence[int]) -> dict[int, PathLabel]:
        """image id -> its source path and label."""
        out: dict[int, PathLabel] = {}
        ids = [int(i) for i in image_ids]
        with self.engine.connect() as conn:
            for part in chunks(ids, 500):
                for i, p, lb in conn.execute(select(Image.id, Image.source_path, Image.label)
                                             .where(Image.id.in_(part))):
                    out[int(i)] = PathLabel(str(p), lb)
        return out

    def image_detail(self, image_id: int) -> ImageDetail | None:
        """The image row, the datasets it belongs to and the feature sets it has a vector in."""
        with self.session() as s:
            img = s.get(Image, image_id)
            if img is None:
                return None
            datasets = list(s.scalars(select(Dataset.name).join(DatasetMember, DatasetMember.dataset_id == Dataset.id)
                                      .where(DatasetMember.image_id == image_id).order_by(Dataset.name)))
            sets = list(s.scalars(select(FeatureSet.name).join(FeatureRow, FeatureRow.feature_set_id == FeatureSet.id)
                                  .where(FeatureRow.image_id == image_id, newest_only()).order_by(FeatureSet.name)))
            return ImageDetail(img, datasets, sets)

    def image_ids_where(self, label: str | None = None, dataset: str | None = None) -> np.ndarray:
        """Ids of the images with ``label`` and/or in ``dataset`` (bound parameters only)."""
        q = select(Image.id)
        with self.session() as s:
            if dataset is not None:
                q = q.join(DatasetMember, DatasetMember.image_id == Image.id).where(
                    DatasetMember.dataset_id == self.dataset_id(s, dataset))
            if label is not None:
                q = q.where(Image.label == label)
            ids = s.scalars(q).all()
        return np.fromiter((int(i) for i in ids), dtype=np.int64, count=len(ids))

    def unlabelled_image_ids(self) -> list[int]:
        with self.session() as s:
            return [int(i) for i in s.scalars(select(Image.id).where(Image.label.is_(None)).order_by(Image.id))]

    def add_images(self, s: Session, rows: list[dict[str, Any]]) -> list[int]:
        """Insert new image rows (one per distinct content); returns their ids in order."""
        return [int(i) for i in s.scalars(insert(Image).returning(Image.id), rows).all()]

    def stored_contents(self, s: Session, shas: Sequence[str], dataset_id: int
                        ) -> dict[str, StoredContent]:
        """sha256 -> the stored image with that content (and whether it is a member of ``dataset_id``)."""
        out: dict[str, StoredContent] = {}
        member = select(DatasetMember.image_id).where(DatasetMember.dataset_id == dataset_id,
                                                      DatasetMember.image_id == Image.id).exists()
        for part in chunks(list(dict.fromkeys(shas))):
            for sha, i, lb, sc, path, is_member in s.execute(
                    select(Image.sha256, Image.id, Image.label, Image.superclass, Image.source_path, member)
                    .where(Image.sha256.in_(part))):
                out[str(sha)] = StoredContent(int(i), lb, sc, str(path), bool(is_member))
        return out

    def add_members(self, s: Session, dataset_id: int, members: Sequence[tuple[int, str]], now: Any) -> None:
        """Make the images (image id, path it was ingested from) members of a dataset."""
        if members:
            s.execute(insert(DatasetMember), [{"dataset_id": dataset_id, "image_id": i, "source_path": p,
                                               "added_at": now} for i, p in members])

    def set_labels(self, s: Session, labels: dict[int, tuple[str, str | None]]) -> None:
        """Give unlabelled images their (label, superclass)."""
        for image_id, (label, superclass) in labels.items():
            img = s.get(Image, image_id)
            if img is not None and img.label is None:
                img.label, img.superclass = label, superclass

    def record_ingest_errors(self, s: Session, dataset_id: int, attempted: Sequence[str],
                             failed: Sequence[tuple[str, str]]) -> None:
        """Keep only the latest attempt per path: clear ``attempted``, record ``failed`` (path, reason)."""
        for part in chunks(list(attempted)):
            s.execute(delete(IngestError).where(IngestError.path.in_(part)))
        for path, reason in failed:
            s.add(IngestError(path=path, reason=reason, dataset_id=dataset_id))

    def status(self) -> dict[str, Any]:
        """Datasets, label counts, ingest failures and the number of images.

        Aggregates only, on one connection and without an ORM session (``fs status`` runs this on every
        call): members are counted per dataset id on the primary key's index before the join.
        """
        members = (select(DatasetMember.dataset_id, func.count().label("n"))
                   .group_by(DatasetMember.dataset_id).subquery())
        with self.engine.connect() as conn:
            datasets = [{"dataset": str(name), "images": int(n or 0)} for name, n in conn.execute(
                select(Dataset.name, members.c.n).join(members, members.c.dataset_id == Dataset.id, isouter=True)
                .order_by(Dataset.name))]
            labels = [{"superclass": sc, "label": lb, "images": int(n)} for sc, lb, n in conn.execute(
                select(Image.superclass, Image.label, func.count()).group_by(Image.superclass, Image.label)
                .order_by(Image.superclass, Image.label))]
            errors = [{"path": p, "reason": r} for p, r in conn.execute(
                select(IngestError.path, IngestError.reason).order_by(IngestError.path))]
            images = int(conn.scalar(select(func.count()).select_from(Image)) or 0)
        return {"images": images, "datasets": datasets, "labels": labels, "ingest_errors": errors}

    def dataset_exists(self, s: Session, name: str) -> bool:
        return s.scalar(select(exists().where(Dataset.name == name))) is True

    def drop_if_empty(self, s: Session, dataset_id: int) -> bool:
        """Delete a dataset with no members and no images first ingested into it; its ingest errors are kept
        (without the dataset). Returns whether it was deleted."""
        used = s.scalar(select(exists().where(DatasetMember.dataset_id == dataset_id))) or \
            s.scalar(select(exists().where(Image.dataset_id == dataset_id)))
        if used:
            return False
        s.execute(update(IngestError).where(IngestError.dataset_id == dataset_id).values(dataset_id=None))
        s.execute(delete(Dataset).where(Dataset.id == dataset_id))
        return True

    def record_moves(self, s: Session, moves: Mapping[int, tuple[str, str]]) -> None:
        """Point images (id -> (old path, new path)) at their new file, in the caller's transaction.

        The image's ``source_path`` changes, and so does each dataset membership that
        recorded the old path (memberships recorded from another copy keep theirs).
        """
        for image_id, (old, new) in moves.items():
            s.execute(update(Image).where(Image.id == int(image_id)).values(source_path=new))
            s.execute(update(DatasetMember).where(DatasetMember.image_id == int(image_id),
                                                  DatasetMember.source_path == old).values(source_path=new))

    def paths_of(self, image_ids: Sequence[int]) -> dict[int, str]:
        """Image id -> the path it was ingested from."""
        return {i: found.source_path for i, found in self.image_paths_labels(image_ids).items()}

    def save_as_dataset(self, name: str, image_ids: Sequence[int]) -> int:
        """Create dataset ``name`` whose members are ``image_ids`` (one transaction); returns its member count.

        The members keep the path each image was ingested from, as ``fs ingest`` records them. Callers hold the
        store's write lock.

        Raises
        ------
        InvalidInputError
            A bad name, or no images.
        DatasetExistsError
            The name is taken (a selection never changes an existing dataset).
        """
        check_name("dataset", name)
        ids = sorted({int(i) for i in image_ids})
        if not ids:
            raise InvalidInputError("no images match this view: nothing to save")
        now = utcnow()
        with self.engine.begin() as conn:
            if conn.execute(select(Dataset.id).where(Dataset.name == name)).first() is not None:
                raise DatasetExistsError(name)
            dataset_id = conn.execute(insert(Dataset).values(name=name, created_at=now)
                                      .returning(Dataset.id)).scalar_one()
            for part in chunks(ids, CHUNK):
                rows = conn.execute(select(Image.id, Image.source_path).where(Image.id.in_(part))).all()
                if rows:
                    conn.execute(insert(DatasetMember), [{"dataset_id": dataset_id, "image_id": int(i),
                                                          "source_path": str(p), "added_at": now} for i, p in rows])
        return len(ids)

    def image_file(self, image_id: int) -> ImageFile | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(Image.id, Image.source_path, Image.sha256, Image.bytes, Image.format)
                               .where(Image.id == image_id)).first()
        return None if row is None else ImageFile(int(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4]))

    def labels_of(self, image_ids: Iterable[int]) -> dict[int, ImageLabels]:
        """Label and superclass of each image id."""
        ids = [int(i) for i in image_ids]
        out: dict[int, ImageLabels] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(ids, 500):
                for i, lb, sc in conn.execute(select(Image.id, Image.label, Image.superclass)
                                              .where(Image.id.in_(chunk))):
                    out[int(i)] = ImageLabels(lb, sc)
        return out
