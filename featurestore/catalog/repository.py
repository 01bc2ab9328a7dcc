"""The catalog repository: every SQL statement featurestore runs on its own tables.

:class:`Catalog` wraps the engine of one catalog (SQLite or PostgreSQL) and
offers the queries the rest of the library needs, each in its own short
transaction unless a session is passed in. Nothing outside ``featurestore.catalog``
builds SQL; user-written SQL (``fs sql``, ``--where``) runs on a separate
read-only connection, never through this class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, case, delete, exists, func, insert, not_, null, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker
from sqlalchemy.sql import ColumnElement, Select

from featurestore.catalog.audits import KINDS as FINDING_KINDS
from featurestore.catalog.database import driver_rows
from featurestore.catalog.feature_versions import newest_only, record_run
from featurestore.catalog.run_images import RunImages, insert_run_images
from featurestore.catalog.schema import (
    AnnIndex,
    AuditFinding,
    Dataset,
    DatasetMember,
    FeatureRow,
    FeatureSet,
    FeatureShard,
    Image,
    IngestError,
    Model,
    Prediction,
    Run,
    RunOutOfFold,
    RunSplit,
    RunTestPrediction,
    utcnow,
)
from featurestore.errors import InvalidInputError, NotFoundError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
# Bound parameters per statement: SQLite allows 32,766, PostgreSQL 65,535.
CHUNK = 5_000
# A few requested ids are picked by the database; more are filtered after reading.
_PICK_IN_SQL = 10_000


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass(frozen=True)
class ShardRef:
    """A registered shard: id, path relative to the store, and how many rows it holds."""

    id: int
    path: str
    rows: int
    runtime: str | None = None  # what computed the vectors (CNN sets)
    sha256: str | None = None  # of the file's bytes at registration (None: registered before 0011)


class Catalog:
    """All queries on the catalog tables."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def _within(self, s: Session | None) -> Iterator[Session]:
        """The caller's transaction ``s`` when given (it commits), else a new one of its own."""
        if s is not None:
            yield s
        else:
            with self.session() as new:
                yield new

    def _raw_rows(self, query: Any) -> list[tuple[Any, ...]]:
        """Rows as plain DB-API tuples (ORM rows cost seconds per million images).

        Only for queries whose bound values are integers or names we produced,
        which are rendered inline.
        """
        sql = str(query.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        return driver_rows(self.engine, sql)

    # -- datasets ------------------------------------------------------------------
    def dataset_id(self, s: Session, name: str, create: bool = False) -> int:
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None:
            if not create:
                raise NotFoundError("dataset", name, s.scalars(select(Dataset.name)))
            ds = Dataset(name=name)
            s.add(ds)
            s.flush()
        return ds.id

    def dataset_counts(self) -> list[tuple[str, int, Any]]:
        """(name, member images, created_at) per dataset, by name."""
        with self.session() as s:
            rows = s.execute(select(Dataset.name, func.count(DatasetMember.image_id), Dataset.created_at)
                             .join(DatasetMember, DatasetMember.dataset_id == Dataset.id, isouter=True)
                             .group_by(Dataset.id, Dataset.name, Dataset.created_at).order_by(Dataset.name)).all()
        return [(str(n), int(c), t) for n, c, t in rows]

    def dataset_labels(self, name: str) -> list[tuple[str | None, str | None, int]]:
        """(superclass, label, images) of one dataset's members."""
        with self.session() as s:
            ds = self.dataset_id(s, name)
            rows = s.execute(select(Image.superclass, Image.label, func.count())
                             .join(DatasetMember, DatasetMember.image_id == Image.id)
                             .where(DatasetMember.dataset_id == ds)
                             .group_by(Image.superclass, Image.label).order_by(Image.superclass, Image.label)).all()
        return [(sc, lb, int(n)) for sc, lb, n in rows]

    def dataset_overlaps(self, name: str) -> list[tuple[str, int]]:
        """(other dataset, images in both) for every dataset sharing images with ``name``."""
        other = DatasetMember.__table__.alias("other")
        with self.session() as s:
            ds = self.dataset_id(s, name)
            rows = s.execute(select(Dataset.name, func.count())
                             .select_from(DatasetMember)
                             .join(other, other.c.image_id == DatasetMember.image_id)
                             .join(Dataset, Dataset.id == other.c.dataset_id)
                             .where(DatasetMember.dataset_id == ds, other.c.dataset_id != ds)
                             .group_by(Dataset.name).order_by(Dataset.name)).all()
        return [(str(n), int(c)) for n, c in rows]

    def dataset_overlap(self, a: str, b: str) -> int:
        """How many images belong to both datasets."""
        other = DatasetMember.__table__.alias("other")
        with self.session() as s:
            ida, idb = self.dataset_id(s, a), self.dataset_id(s, b)
            return int(s.scalar(select(func.count()).select_from(DatasetMember)
                                .join(other, other.c.image_id == DatasetMember.image_id)
                                .where(DatasetMember.dataset_id == ida, other.c.dataset_id == idb)) or 0)

    def dataset_image_ids(self, name: str) -> set[int]:
        with self.session() as s:
            ds = self.dataset_id(s, name)
            return {int(i) for i in s.scalars(select(DatasetMember.image_id).where(DatasetMember.dataset_id == ds))}

    # -- images ----------------------------------------------------------------------
    def image_rows(self, dataset: str | None, labelled_only: bool, image_ids: Sequence[int] | None,
                   ids_only: bool) -> list[Any]:
        """(id,) or (id, source_path, label, superclass) of the selected images, by id."""
        cols = [Image.id] if ids_only else [Image.id, Image.source_path, Image.label, Image.superclass]
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

    def image_exists(self, image_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(Image.id).where(Image.id == int(image_id))).first() is not None

    def image_id_by_sha256(self, sha256: str) -> int | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(Image.id).where(Image.sha256 == sha256)).scalar()
        return None if found is None else int(found)

    def image_paths_labels(self, image_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """image id -> (source path, label)."""
        out: dict[int, tuple[str, str | None]] = {}
        ids = [int(i) for i in image_ids]
        with self.engine.connect() as conn:
            for part in chunks(ids, 500):
                for i, p, lb in conn.execute(select(Image.id, Image.source_path, Image.label)
                                             .where(Image.id.in_(part))):
                    out[int(i)] = (str(p), lb)
        return out

    def image_detail(self, image_id: int) -> tuple[Image, list[str], list[str]] | None:
        """The image row, the datasets it belongs to and the feature sets it has a vector in."""
        with self.session() as s:
            img = s.get(Image, image_id)
            if img is None:
                return None
            datasets = list(s.scalars(select(Dataset.name).join(DatasetMember, DatasetMember.dataset_id == Dataset.id)
                                      .where(DatasetMember.image_id == image_id).order_by(Dataset.name)))
            sets = list(s.scalars(select(FeatureSet.name).join(FeatureRow, FeatureRow.feature_set_id == FeatureSet.id)
                                  .where(FeatureRow.image_id == image_id, newest_only()).order_by(FeatureSet.name)))
            return img, datasets, sets

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
                        ) -> dict[str, tuple[int, str | None, str | None, str, bool]]:
        """sha256 -> (image id, label, superclass, source path, member of ``dataset_id``) of stored contents."""
        out: dict[str, tuple[int, str | None, str | None, str, bool]] = {}
        member = select(DatasetMember.image_id).where(DatasetMember.dataset_id == dataset_id,
                                                      DatasetMember.image_id == Image.id).exists()
        for part in chunks(list(dict.fromkeys(shas))):
            for sha, i, lb, sc, path, is_member in s.execute(
                    select(Image.sha256, Image.id, Image.label, Image.superclass, Image.source_path, member)
                    .where(Image.sha256.in_(part))):
                out[str(sha)] = (int(i), lb, sc, str(path), bool(is_member))
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
        """Datasets, label counts, ingest failures and the number of images."""
        with self.session() as s:
            datasets = [{"dataset": name, "images": n} for name, n in s.execute(
                select(Dataset.name, func.count(DatasetMember.image_id))
                .join(DatasetMember, DatasetMember.dataset_id == Dataset.id, isouter=True)
                .group_by(Dataset.name).order_by(Dataset.name))]
            labels = [{"superclass": sc, "label": lb, "images": n} for sc, lb, n in s.execute(
                select(Image.superclass, Image.label, func.count()).group_by(Image.superclass, Image.label)
                .order_by(Image.superclass, Image.label))]
            errors = [{"path": p, "reason": r} for p, r in s.execute(
                select(IngestError.path, IngestError.reason).order_by(IngestError.path))]
            total = int(s.scalar(select(func.count(Image.id))) or 0)
        return {"images": total, "datasets": datasets, "labels": labels, "ingest_errors": errors}

    # -- feature sets ------------------------------------------------------------------
    def feature_set(self, name: str) -> FeatureSet:
        with self.session() as s:
            fs = s.scalar(select(FeatureSet).where(FeatureSet.name == name))
            if fs is None:
                names = list(s.scalars(select(FeatureSet.name).where(newest_only())))
                raise NotFoundError(
                    "feature set", name, names, "Create it with `fs extract` (see `fs extract --help`)"
                )
            return fs

    def find_feature_set(self, s: Session, name: str) -> FeatureSet | None:
        return s.scalar(select(FeatureSet).where(FeatureSet.name == name))

    def feature_sets(self) -> list[FeatureSet]:
        with self.session() as s:
            return list(s.scalars(select(FeatureSet).where(newest_only()).order_by(FeatureSet.name)))

    def add_feature_set(self, s: Session, name: str, kind: str, params: dict[str, Any], dim: int,
                        dtype: str) -> FeatureSet:
        fs = FeatureSet(name=name, kind=kind, params=params, dim=dim, dtype=dtype)
        s.add(fs)
        s.flush()
        return fs

    def delete_feature_set(self, s: Session, fs: FeatureSet) -> list[str]:
        """Delete a feature set's rows, shards and record; returns its shard paths (delete them after commit)."""
        paths = list(s.scalars(select(FeatureShard.path).where(FeatureShard.feature_set_id == fs.id)))
        s.execute(delete(FeatureRow).where(FeatureRow.feature_set_id == fs.id))
        s.execute(delete(FeatureShard).where(FeatureShard.feature_set_id == fs.id))
        s.delete(fs)
        s.flush()
        return [str(p) for p in paths]

    def image_ids_with_vector(self, feature_set: str) -> set[int]:
        with self.session() as s:
            fs_id = s.scalar(select(FeatureSet.id).where(FeatureSet.name == feature_set))
            if fs_id is None:
                return set()
            return {int(i) for i in s.scalars(select(FeatureRow.image_id).where(FeatureRow.feature_set_id == fs_id))}

    def all_image_ids(self) -> list[int]:
        with self.session() as s:
            return [int(i) for i in s.scalars(select(Image.id).order_by(Image.id))]

    def has_vector(self, feature_set_id: int, image_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(FeatureRow.image_id).where(
                FeatureRow.feature_set_id == feature_set_id, FeatureRow.image_id == int(image_id))).first() is not None

    def vector_location(self, feature_set_id: int, image_id: int) -> tuple[str, int, str | None] | None:
        """(shard path, row, shard sha256) of one image's vector, or None."""
        with self.engine.connect() as conn:
            loc = conn.execute(
                select(FeatureShard.path, FeatureRow.row, FeatureShard.sha256)
                .join(FeatureShard, FeatureShard.id == FeatureRow.shard_id)
                .where(FeatureRow.feature_set_id == feature_set_id, FeatureRow.image_id == int(image_id))
            ).first()
        return None if loc is None else (str(loc[0]), int(loc[1]), loc[2])

    def coverage(self) -> list[tuple[str, str, int, int, int]]:
        """(name, kind, dim, images with a vector, shards) per feature set."""
        with self.session() as s:
            rows = s.execute(select(
                FeatureSet.name, FeatureSet.kind, FeatureSet.dim,
                select(func.count()).where(FeatureRow.feature_set_id == FeatureSet.id).scalar_subquery(),
                select(func.count()).where(FeatureShard.feature_set_id == FeatureSet.id).scalar_subquery(),
            ).where(newest_only()).order_by(FeatureSet.name))
            return [tuple(r) for r in rows]  # type: ignore[misc]

    # -- shards ---------------------------------------------------------------------------
    def shard_refs(self) -> dict[int, str]:
        """Every registered shard: id -> path relative to the store."""
        with self.session() as s:
            return {int(i): str(p) for i, p in s.execute(select(FeatureShard.id, FeatureShard.path))}

    def rows_in_shards(self, shard_ids: Sequence[int]) -> dict[str, tuple[int, int]]:
        """feature set name -> (catalog rows, shards) among ``shard_ids``."""
        out: dict[str, tuple[int, int]] = {}
        with self.session() as s:
            for part in chunks(list(shard_ids)):
                for name, rows, shards in s.execute(
                        select(FeatureSet.name, func.count(FeatureRow.image_id),
                               func.count(func.distinct(FeatureShard.id)))
                        .join(FeatureShard, FeatureShard.feature_set_id == FeatureSet.id)
                        .join(FeatureRow, FeatureRow.shard_id == FeatureShard.id, isouter=True)
                        .where(FeatureShard.id.in_(part)).group_by(FeatureSet.name)):
                    r0, s0 = out.get(str(name), (0, 0))
                    out[str(name)] = (r0 + int(rows), s0 + int(shards))
        return out

    def shard_paths(self) -> set[str]:
        """Paths of every registered shard (relative to the store)."""
        with self.session() as s:
            return {str(p) for p in s.scalars(select(FeatureShard.path))}

    def shards(self, feature_set_id: int, max_rows: int | None = None) -> list[ShardRef]:
        """The shards of a feature set in id order (only those with fewer than ``max_rows`` rows if given)."""
        q = select(FeatureShard.id, FeatureShard.path, FeatureShard.rows, FeatureShard.runtime, FeatureShard.sha256
                   ).where(FeatureShard.feature_set_id == int(feature_set_id)).order_by(FeatureShard.id)
        if max_rows is not None:
            q = q.where(FeatureShard.rows < max_rows)
        with self.engine.connect() as conn:
            return [ShardRef(int(i), str(p), int(n), r, h) for i, p, n, r, h in conn.execute(q)]

    def live_row_counts(self, feature_set_id: int) -> dict[int, int]:
        """shard id -> rows the catalog points at."""
        with self.engine.connect() as conn:
            return {int(k): int(v) for k, v in conn.execute(select(FeatureRow.shard_id, func.count()).where(
                FeatureRow.feature_set_id == int(feature_set_id)).group_by(FeatureRow.shard_id))}

    def live_rows_of_shard(self, shard_id: int) -> np.ndarray:
        """(image_id, row) pairs of one shard the catalog points at, by row."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(FeatureRow.image_id, FeatureRow.row).where(
                FeatureRow.shard_id == int(shard_id)).order_by(FeatureRow.row)).all()
        return np.array(rows, dtype=np.int64).reshape(-1, 2)

    def register_shard(self, feature_set_id: int, path: str, image_ids: np.ndarray,
                       replaces: set[int] | None = None, s: Session | None = None,
                       runtime: str | None = None, sha256: str | None = None) -> int:
        """Register a written shard and point its images' rows at it, in one transaction (``s`` if given).

        ``replaces``: shards whose rows this one takes over (compaction); they
        are unregistered in the same transaction. ``runtime``: what computed the
        vectors; ``sha256``: of the file's bytes. Returns the new shard's id.
        """
        with self._within(s) as s:
            shard = FeatureShard(feature_set_id=feature_set_id, path=path, rows=len(image_ids), runtime=runtime,
                                 sha256=sha256)
            s.add(shard)
            s.flush()
            if replaces:
                s.execute(delete(FeatureRow).where(FeatureRow.shard_id.in_(replaces)))
            s.execute(insert(FeatureRow), [
                {"feature_set_id": feature_set_id, "image_id": int(i), "shard_id": shard.id, "row": r}
                for r, i in enumerate(image_ids.tolist())])
            if replaces:
                s.execute(delete(FeatureShard).where(FeatureShard.id.in_(replaces)))
            return int(shard.id)

    def unregister_shards(self, paths: dict[int, str]) -> dict[int, int]:
        """Unregister shards (id -> expected path) and their rows in one transaction (``fs verify --repair``).

        A shard is removed only if it is still registered under that path.
        Returns shard id -> catalog rows dropped.
        """
        with self.session() as s:
            current = dict(s.execute(select(FeatureShard.id, FeatureShard.path).where(
                FeatureShard.id.in_(list(paths)))).all())
            ids = [i for i, p in paths.items() if current.get(i) == p]
            if not ids:
                return {}
            counts = {int(k): int(v) for k, v in s.execute(select(FeatureRow.shard_id, func.count()).where(
                FeatureRow.shard_id.in_(ids)).group_by(FeatureRow.shard_id))}
            s.execute(delete(FeatureRow).where(FeatureRow.shard_id.in_(ids)))
            s.execute(delete(FeatureShard).where(FeatureShard.id.in_(ids)))
        return {i: counts.get(i, 0) for i in ids}

    # -- models ----------------------------------------------------------------------------
    def models(self) -> dict[str, Model]:
        with self.session() as s:
            return {m.name: m for m in s.scalars(select(Model))}

    def model(self, name: str) -> Model | None:
        with self.session() as s:
            return s.scalar(select(Model).where(Model.name == name))

    def save_model(self, name: str, **fields: Any) -> Model:
        """Insert or update the model named ``name``."""
        with self.session() as s:
            row = s.scalar(select(Model).where(Model.name == name)) or Model(name=name)
            for key, value in fields.items():
                setattr(row, key, value)
            s.add(row)
            s.flush()
            return row

    # -- runs ------------------------------------------------------------------------------
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
                ids = [str(i) for i in s.scalars(select(Run.id).order_by(Run.id))]
                raise NotFoundError("run", str(run_id), ids, "See `fs runs`")
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


def check_ids(ids: Iterable[int], what: str = "image id") -> list[int]:
    """Ids as ints within SQL BIGINT range (a larger one cannot exist and would overflow the driver)."""
    out = []
    for i in ids:
        value = int(i)
        if not 1 <= value <= 2**63 - 1:
            raise InvalidInputError(f"{what} {value} is out of range; ids are positive integers below 2**63")
        out.append(value)
    return out


def check_name(what: str, name: str) -> str:
    """``name`` if it is a valid dataset / feature set / model name (letters, digits, '.', '_', '+', '-')."""
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_', '+' or '-' (max 200 characters)"
        )
    return name


# -- browsing: the web app and run reports ---------------------------------------------------------
# All filters reach SQL as bound parameters. Pages are keyset-paged on the image id
# (``id > :after ORDER BY id LIMIT n``), never with OFFSET, so page 1,000 costs what page 1 costs;
# the filters use the indexes on ``images.label``, ``images.superclass`` (migration 0005),
# ``dataset_members (dataset_id, image_id)`` and ``predictions (run_id, image_id)``.

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


@dataclass
class Facets:
    """Values offered by the grid's filter menus."""

    datasets: list[str] = field(default_factory=list)
    superclasses: list[str] = field(default_factory=list)
    labels: list[tuple[str, int]] = field(default_factory=list)
    runs: list[tuple[int, str, int]] = field(default_factory=list)  # id, features, stored predictions
    predicted: list[str] = field(default_factory=list)
    superclass_counts: list[tuple[str, int]] = field(default_factory=list)  # under the other filters
    predicted_counts: list[tuple[str, int]] = field(default_factory=list)  # under the other filters


def run_facts(engine: Engine, run_id: int) -> RunFacts:
    with engine.connect() as conn:
        row = conn.execute(select(Run.id, Run.target, Run.dataset, Run.test_dataset, Run.created_at)
                           .where(Run.id == run_id)).first()
        if row is None:
            ids = [str(i) for i in conn.execute(select(Run.id).order_by(Run.id)).scalars()]
            raise NotFoundError("run", str(run_id), ids, "See `fs runs`")
        tested = 0
        if row[3] is not None:
            tested = int(conn.execute(select(func.count()).select_from(RunTestPrediction)
                                      .where(RunTestPrediction.run_id == run_id)).scalar() or 0)
    return RunFacts(int(row[0]), str(row[1]), row[2], row[3], row[4], tested)


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


def browse_page(engine: Engine, f: ImageFilter, *, after: int | None = None, before: int | None = None,
                limit: int = 100, at: int | None = None) -> Page:
    """One page of images matching ``f`` in its order: the first, the one after ``after``, before ``before``, or
    the one starting at ``at``.

    Keyset paging: the cursor is an image id; with a sort other than id its sort key is looked up first, so one
    range scan of ``limit + 1`` rows serves any page.
    """
    f.check()
    limit = max(1, min(int(limit), MAX_PAGE))
    run = run_facts(engine, f.run) if f.run is not None else None
    q, key = _filtered(f, run, _tile_columns(f, run))
    sort = _sort_key(f, _Source(run, f.source) if run is not None else None, key)
    backwards = before is not None and after is None and at is None
    cursor = before if backwards else after if after is not None else at
    with engine.connect() as conn:
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
                q = q.where(key >= cursor if sort is None else or_(sort > bound, and_(sort == bound, key >= cursor)))
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


def count_images(engine: Engine, f: ImageFilter) -> int:
    f.check()
    run = run_facts(engine, f.run) if f.run is not None else None
    q, _ = _filtered(f, run, [func.count()])
    with engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def matching_ids(engine: Engine, f: ImageFilter) -> list[int]:
    """Ids of every image matching ``f``, ascending (for exports and saved selections)."""
    f.check()
    run = run_facts(engine, f.run) if f.run is not None else None
    q, key = _filtered(f, run, [Image.id])
    with engine.connect() as conn:
        return [int(i) for i in conn.execute(q.order_by(key)).scalars()]


def facets(engine: Engine, run_id: int | None = None, f: ImageFilter | None = None) -> Facets:
    """Datasets, superclasses, labels (with counts), runs (with their stored predictions) and, for a run,
    its predicted labels.

    With ``f``, the menus narrow to the current view: each menu's counts are those of the images matching the
    other filters (the label menu under the dataset and superclass chosen, and so on).
    """
    with engine.connect() as conn:
        out = Facets(
            datasets=list(conn.execute(select(Dataset.name).order_by(Dataset.name)).scalars()),
            superclasses=[s for s in conn.execute(select(Image.superclass).distinct().order_by(Image.superclass))
                          .scalars() if s is not None],
            labels=[(str(lb), int(n)) for lb, n in conn.execute(
                select(Image.label, func.count()).where(Image.label.is_not(None)).group_by(Image.label)
                .order_by(Image.label))],
        ) if f is None else Facets(datasets=list(conn.execute(select(Dataset.name).order_by(Dataset.name)).scalars()))
        if f is not None:
            run = run_facts(engine, f.run) if f.run is not None else None

            def counts(column: Any, **drop: Any) -> list[tuple[str, int]]:
                q, _ = _filtered(replace(f, **drop), run, [column, func.count()])
                rows = conn.execute(q.where(column.is_not(None)).group_by(column).order_by(column))
                return [(str(v), int(n)) for v, n in rows]

            out.superclass_counts = counts(Image.superclass, superclass=None, label=None)
            out.superclasses = [v for v, _ in out.superclass_counts]
            out.labels = counts(Image.label, label=None)
            if run is not None:
                out.predicted_counts = counts(_Source(run, f.source).label, predicted=None)
    counts_ = prediction_counts(engine)
    with engine.connect() as conn:
        out.runs = [(int(i), ",".join(feats), int(counts_.get(i, 0)))
                    for i, feats in conn.execute(select(Run.id, Run.features).order_by(Run.id.desc()))]
        if run_id is not None and f is None:
            out.predicted = list(conn.execute(select(Prediction.label).where(Prediction.run_id == run_id)
                                              .distinct().order_by(Prediction.label)).scalars())
        elif f is not None:
            out.predicted = [v for v, _ in out.predicted_counts]
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
        for chunk in chunks(ids, 500):
            for i, lb, sc in conn.execute(select(Image.id, Image.label, Image.superclass)
                                          .where(Image.id.in_(chunk))):
                out[int(i)] = (lb, sc)
    return out


def run_predictions_of(engine: Engine, run_id: int, image_ids: Iterable[int]) -> dict[int, tuple[str, float]]:
    """(predicted label, probability) of the images that have a stored prediction of ``run_id``."""
    ids = [int(i) for i in image_ids]
    out: dict[int, tuple[str, float]] = {}
    with engine.connect() as conn:
        for chunk in chunks(ids, 500):
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


def confusion_counts(engine: Engine, run: RunFacts, held_out_only: bool = False, source: str = "stored"
                     ) -> list[tuple[str, str, int]]:
    """(true label, predicted label, images) over the run's predictions of labelled images.

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
    with engine.connect() as conn:
        return [(str(t), str(p), int(n)) for t, p, n in conn.execute(q)]


@dataclass(frozen=True)
class PredictionCoverage:
    stored: int  # prediction rows of the run
    labelled: int  # ... of images with a truth value
    maybe_trained_on: int  # ... of images its training selection may have held


def prediction_coverage(engine: Engine, run: RunFacts, source: str = "stored") -> PredictionCoverage:
    truth = _truth(run.target)
    src = _Source(run, source)
    base = select(func.count()).select_from(src.table).join(Image, Image.id == src.image_id).where(
        src.run_id == run.id)
    with engine.connect() as conn:
        stored = conn.execute(base).scalar() or 0
        labelled = conn.execute(base.where(truth.is_not(None))).scalar() or 0
        seen = 0 if src.kind == "test" else conn.execute(base.where(truth.is_not(None), _seen_in_training(run))
                                                          ).scalar() or 0
    return PredictionCoverage(int(stored), int(labelled), int(seen))


def confident_mistakes(engine: Engine, run: RunFacts, limit: int = 12, held_out_only: bool = False,
                       source: str = "stored") -> list[tuple[int, str, str, float | None]]:
    """(image id, truth, predicted, probability) of the run's most confident wrong predictions (test-set
    predictions keep no probability: those come by image id, probability None)."""
    truth = _truth(run.target)
    src = _Source(run, source)
    q = (select(Image.id, truth, src.label, src.probability).select_from(src.table)
         .join(Image, Image.id == src.image_id)
         .where(src.run_id == run.id, truth.is_not(None), src.label != truth).limit(limit))
    q = q.order_by(Image.id) if src.kind == "test" else q.order_by(Prediction.probability.desc(), Image.id)
    if held_out_only and src.kind == "stored":
        q = q.where(not_(_seen_in_training(run)))
    with engine.connect() as conn:
        return [(int(i), str(t), str(p), None if pr is None else float(pr)) for i, t, p, pr in conn.execute(q)]


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


# -- approximate nearest-neighbour indexes (the vector_indexes table; featurestore.search.index) --
# Functions take the engine and run their own short transactions; rows come back as frozen
# dataclasses, never as ORM objects bound to a session.


class IndexChangedError(Exception):
    """The catalog changed under a build (see :func:`replace_index`)."""


@dataclass(frozen=True)
class IndexRecord:
    """One registered index (``path`` relative to the store)."""

    id: int
    feature_set_id: int
    feature_set: str
    params: dict[str, Any]
    vectors: int
    shard_ids: tuple[int, ...]
    bytes: int
    sha256: str
    path: str
    created_at: datetime


@dataclass(frozen=True)
class LiveShard:
    """A feature shard of a set: ``rows`` in the file, ``live`` of them pointed at by the catalog."""

    id: int
    path: str
    rows: int
    live: int
    sha256: str | None = None  # of the file's bytes at registration (None: registered before 0011)


def _select() -> Any:
    return select(*AnnIndex.__table__.columns, FeatureSet.name.label("feature_set_name")).join(
        FeatureSet, FeatureSet.id == AnnIndex.feature_set_id)


def _record(row: Any) -> IndexRecord:
    m = row._mapping
    return IndexRecord(
        id=int(m["id"]), feature_set_id=int(m["feature_set_id"]), feature_set=m["feature_set_name"],
        params=dict(m["params"]), vectors=int(m["vectors"]), shard_ids=tuple(int(i) for i in m["shard_ids"]),
        bytes=int(m["bytes"]), sha256=m["sha256"], path=m["path"], created_at=m["created_at"],
    )


def get_index(engine: Engine, feature_set_id: int) -> IndexRecord | None:
    """The index registered for a feature set, if any."""
    with engine.connect() as conn:
        row = conn.execute(_select().where(AnnIndex.feature_set_id == int(feature_set_id))).first()
    return _record(row) if row is not None else None


def index_state(engine: Engine, feature_set_id: int) -> tuple[tuple[int, str, str] | None, list[LiveShard]]:
    """What a search checks before each use of an index, in one cheap round trip.

    Returns ``(id, sha256, params as JSON text)`` of the set's index (None when it
    has none) and the set's shards with ``live = rows`` (not counted). Plain driver
    SQL: the ORM's per-statement overhead was most of an indexed query's time. The
    only values rendered into the SQL are integers.
    """
    fid = int(feature_set_id)
    with engine.connect() as conn:
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(f"SELECT id, sha256, params FROM vector_indexes WHERE feature_set_id = {fid}")
            row = cur.fetchone()
            if row is None:
                return None, []
            cur.execute(f"SELECT id, path, rows, sha256 FROM feature_shards WHERE feature_set_id = {fid} ORDER BY id")
            shards = cur.fetchall()
        finally:
            cur.close()
    params = row[2] if isinstance(row[2], str) else json.dumps(row[2], sort_keys=True)
    return (int(row[0]), str(row[1]), params), [LiveShard(int(i), str(p), int(n), int(n), h) for i, p, n, h in shards]


def list_indexes(engine: Engine) -> list[IndexRecord]:
    """Every registered index, by feature set name."""
    with engine.connect() as conn:
        rows = conn.execute(_select().order_by(FeatureSet.name)).all()
    return [_record(r) for r in rows]


def registered_paths(engine: Engine) -> set[str]:
    """Store-relative paths of every registered index file."""
    with engine.connect() as conn:
        return {str(p) for p in conn.execute(select(AnnIndex.path)).scalars()}


def live_shards(engine: Engine, feature_set_id: int, count: Sequence[int] | None = None) -> list[LiveShard]:
    """The shards of a feature set with their live row counts, in shard order.

    Counting live rows groups the set's ``feature_rows`` (slow at millions of
    rows); with ``count`` only those shards are counted and the others are
    reported with ``live = rows``, which holds unless rows were dropped from a
    shard without removing the shard (nothing in featurestore does that).
    """
    fid = int(feature_set_id)
    counted = None if count is None else {int(i) for i in count}
    with engine.connect() as conn:
        shards = conn.execute(select(FeatureShard.id, FeatureShard.path, FeatureShard.rows, FeatureShard.sha256)
                              .where(FeatureShard.feature_set_id == fid).order_by(FeatureShard.id)).all()
        counts: dict[int, int] = {}
        if counted is None or counted:
            q = select(FeatureRow.shard_id, func.count()).where(FeatureRow.feature_set_id == fid)
            if counted is not None:
                q = q.where(FeatureRow.shard_id.in_(sorted(counted)))
            counts = {int(i): int(c) for i, c in conn.execute(q.group_by(FeatureRow.shard_id)).all()}
    return [LiveShard(int(i), str(p), int(n), counts.get(int(i), 0) if counted is None or int(i) in counted
                      else int(n), h) for i, p, n, h in shards]


def shard_live_rows(engine: Engine, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, rows) the catalog points at in one shard, by row."""
    with engine.connect() as conn:
        got = conn.execute(select(FeatureRow.image_id, FeatureRow.row).where(
            FeatureRow.shard_id == int(shard_id)).order_by(FeatureRow.row)).all()
    arr = np.array(got, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def shard_exists(engine: Engine, shard_id: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(FeatureShard.id).where(FeatureShard.id == int(shard_id))).first() is not None


def locate(engine: Engine, feature_set_id: int, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``(image_id, shard_id, row)`` of the given images' vectors in a feature set (images without one are left out).

    Returns an int64 array of shape (m, 3), ordered by shard then row.
    """
    ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    out: list[Any] = []
    with engine.connect() as conn:
        for start in range(0, len(ids), CHUNK):
            chunk = [int(i) for i in ids[start : start + CHUNK]]
            out += conn.execute(select(FeatureRow.image_id, FeatureRow.shard_id, FeatureRow.row).where(
                FeatureRow.feature_set_id == int(feature_set_id), FeatureRow.image_id.in_(chunk))).all()
    arr = np.array(out, dtype=np.int64).reshape(-1, 3)
    return arr[np.lexsort((arr[:, 2], arr[:, 1]))]


def replace_index(engine: Engine, feature_set_id: int, expected_id: int | None, *, params: dict[str, Any],
                  vectors: int, shard_ids: Sequence[int], nbytes: int, sha256: str, path: str) -> str | None:
    """Register a new index for a feature set in one transaction, replacing the current one.

    ``expected_id`` is the id of the index the new one was built from (None: there
    was none). If another index was registered meanwhile, or the feature set was
    dropped, nothing changes and :class:`IndexChangedError` is raised.
    Returns the store-relative path of the replaced index file, if any.
    """
    with Session(engine) as s, s.begin():
        current = s.scalar(select(AnnIndex).where(AnnIndex.feature_set_id == int(feature_set_id)))
        if (current.id if current is not None else None) != expected_id:
            raise IndexChangedError("another index was registered for this feature set meanwhile")
        if s.scalar(select(FeatureSet.id).where(FeatureSet.id == int(feature_set_id))) is None:
            raise IndexChangedError("the feature set was dropped meanwhile")
        old = current.path if current is not None else None
        if current is not None:
            s.delete(current)
            s.flush()
        s.add(AnnIndex(feature_set_id=int(feature_set_id), params=params, vectors=int(vectors),
                       shard_ids=[int(i) for i in shard_ids], bytes=int(nbytes), sha256=sha256, path=path))
    return old


def update_params(engine: Engine, index_id: int, params: dict[str, Any]) -> None:
    """Change the recorded params of an index in place (search-time settings only)."""
    with engine.begin() as conn:
        conn.execute(update(AnnIndex).where(AnnIndex.id == int(index_id)).values(params=params))


def drop_index(engine: Engine, feature_set_id: int) -> str | None:
    """Unregister a feature set's index; returns its store-relative path (None when there was none)."""
    with engine.begin() as conn:
        path = conn.execute(select(AnnIndex.path).where(AnnIndex.feature_set_id == int(feature_set_id))).scalar()
        conn.execute(delete(AnnIndex).where(AnnIndex.feature_set_id == int(feature_set_id)))
    return str(path) if path is not None else None
