"""Feature sets and their shards: the ``feature_sets``, ``feature_shards`` and ``feature_rows`` tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.orm import Session

from featurestore.catalog.common import CHUNK, Repository, chunks
from featurestore.catalog.feature_versions import newest_only
from featurestore.catalog.schema import FeatureRow, FeatureSet, FeatureShard
from featurestore.errors import NotFoundError


@dataclass(frozen=True)
class ShardRef:
    """A registered shard: id, path relative to the store, and how many rows it holds."""

    id: int
    path: str
    rows: int
    runtime: str | None = None  # what computed the vectors (CNN sets)
    sha256: str | None = None  # of the file's bytes at registration (None: registered before 0011)


@dataclass(frozen=True)
class LiveShard:
    """A feature shard of a set: ``rows`` in the file, ``live`` of them pointed at by the catalog."""

    id: int
    path: str
    rows: int
    live: int
    sha256: str | None = None  # of the file's bytes at registration (None: registered before 0011)


class SetCoverage(NamedTuple):
    """One feature set's coverage: images with a vector, shards (``Store.coverage`` counts readable ones)."""

    name: str
    kind: str
    dim: int
    images: int
    shards: int


class ShardTally(NamedTuple):
    """Catalog rows and shards of one feature set among some shards."""

    rows: int
    shards: int


class ShardSize(NamedTuple):
    """A shard's id and how many rows its file holds."""

    id: int
    rows: int


def _live_counts(conn: Connection, feature_set_id: int, shard_ids: set[int] | None = None) -> dict[int, int]:
    """shard id -> rows the catalog points at, of the set's shards (only ``shard_ids`` if given)."""
    q = select(FeatureRow.shard_id, func.count()).where(FeatureRow.feature_set_id == feature_set_id)
    if shard_ids is not None:
        q = q.where(FeatureRow.shard_id.in_(sorted(shard_ids)))
    return {int(i): int(c) for i, c in conn.execute(q.group_by(FeatureRow.shard_id)).all()}


class FeatureSets(Repository):
    """Queries on feature sets, their shards and the rows that point into them."""

    def feature_set(self, name: str) -> FeatureSet:
        """The feature set named ``name``; NotFoundError (listing the others) when there is none."""
        with self.session() as s:
            fs = self.find_feature_set(s, name)
            if fs is None:
                names = list(s.scalars(select(FeatureSet.name).where(newest_only())))
                raise NotFoundError(
                    "feature set", name, names, remedy="create-set"
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
        """Ids of the images with a vector in the feature set named ``feature_set`` (empty if there is none)."""
        with self.session() as s:
            fs_id = s.scalar(select(FeatureSet.id).where(FeatureSet.name == feature_set))
        return set() if fs_id is None else set(self.live_image_ids(int(fs_id)))

    def has_vector(self, feature_set_id: int, image_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(FeatureRow.image_id).where(
                FeatureRow.feature_set_id == feature_set_id, FeatureRow.image_id == int(image_id))).first() is not None

    def coverage(self) -> list[SetCoverage]:
        """(name, kind, dim, images with a vector, shards) per feature set."""
        with self.session() as s:
            rows = s.execute(select(
                FeatureSet.name, FeatureSet.kind, FeatureSet.dim,
                select(func.count()).where(FeatureRow.feature_set_id == FeatureSet.id).scalar_subquery(),
                select(func.count()).where(FeatureShard.feature_set_id == FeatureSet.id).scalar_subquery(),
            ).where(newest_only()).order_by(FeatureSet.name))
            return [SetCoverage(str(n), str(k), int(d), int(c), int(sh)) for n, k, d, c, sh in rows]

    # -- shards ---------------------------------------------------------------------------
    def shard_refs(self) -> dict[int, str]:
        """Every registered shard: id -> path relative to the store."""
        with self.session() as s:
            return {int(i): str(p) for i, p in s.execute(select(FeatureShard.id, FeatureShard.path))}

    def rows_in_shards(self, shard_ids: Sequence[int]) -> dict[str, ShardTally]:
        """feature set name -> its catalog rows and shards among ``shard_ids``."""
        out: dict[str, ShardTally] = {}
        with self.session() as s:
            for part in chunks(list(shard_ids)):
                for name, rows, shards in s.execute(
                        select(FeatureSet.name, func.count(FeatureRow.image_id),
                               func.count(func.distinct(FeatureShard.id)))
                        .join(FeatureShard, FeatureShard.feature_set_id == FeatureSet.id)
                        .join(FeatureRow, FeatureRow.shard_id == FeatureShard.id, isouter=True)
                        .where(FeatureShard.id.in_(part)).group_by(FeatureSet.name)):
                    before = out.get(str(name), ShardTally(0, 0))
                    out[str(name)] = ShardTally(before.rows + int(rows), before.shards + int(shards))
        return out

    def shard_paths(self) -> set[str]:
        """Paths of every registered shard (relative to the store)."""
        return set(self.shard_refs().values())

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
            return _live_counts(conn, int(feature_set_id))

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

    def live_image_ids(self, feature_set_id: int) -> list[int]:
        """Ids of the images with a vector in the feature set, ascending."""
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(select(FeatureRow.image_id).where(
                FeatureRow.feature_set_id == feature_set_id).order_by(FeatureRow.image_id)).scalars()]

    def shard_fingerprint(self, feature_set_id: int) -> list[ShardSize]:
        """Id and rows of the set's shards: changes whenever vectors are added, replaced or compacted."""
        return [ShardSize(s.id, s.rows) for s in self.shards(feature_set_id)]

    def live_shards(self, feature_set_id: int, count: Sequence[int] | None = None) -> list[LiveShard]:
        """The shards of a feature set with their live row counts, in shard order.

        Counting live rows groups the set's ``feature_rows`` (slow at millions of
        rows); with ``count`` only those shards are counted and the others are
        reported with ``live = rows``, which holds unless rows were dropped from a
        shard without removing the shard (nothing in featurestore does that).
        """
        fid = int(feature_set_id)
        counted = None if count is None else {int(i) for i in count}
        with self.engine.connect() as conn:
            shards = conn.execute(select(FeatureShard.id, FeatureShard.path, FeatureShard.rows, FeatureShard.sha256)
                                  .where(FeatureShard.feature_set_id == fid).order_by(FeatureShard.id)).all()
            counts = _live_counts(conn, fid, counted) if counted is None or counted else {}
        return [LiveShard(int(i), str(p), int(n), counts.get(int(i), 0) if counted is None or int(i) in counted
                          else int(n), h) for i, p, n, h in shards]

    def shard_exists(self, shard_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(FeatureShard.id).where(FeatureShard.id == int(shard_id))).first() is not None

    def locate(self, feature_set_id: int, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(image_id, shard_id, row)`` of the given images' vectors in a feature set (images without one are
        left out).

        Returns an int64 array of shape (m, 3), ordered by shard then row.
        """
        ids = np.unique(np.asarray(image_ids, dtype=np.int64))
        out: list[Any] = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                chunk = [int(i) for i in ids[start : start + CHUNK]]
                out += conn.execute(select(FeatureRow.image_id, FeatureRow.shard_id, FeatureRow.row).where(
                    FeatureRow.feature_set_id == int(feature_set_id), FeatureRow.image_id.in_(chunk))).all()
        arr = np.array(out, dtype=np.int64).reshape(-1, 3)
        return arr[np.lexsort((arr[:, 2], arr[:, 1]))]
