"""The catalog's change counter and the per-set facts a search caches against it (issue 31).

``catalog_version`` holds one row whose ``version`` triggers bump in the same
transaction as every write to the tables a search reads (images, datasets and
their members, feature sets, shards, vector indexes; feature rows are written
only together with their shards; migration 0012). A reader that caches
something read *after* seeing version ``v`` may use it for as long as the
counter still reads ``v``: any committed change since would have moved it.
:func:`set_snapshot` reads the counter first and then the set's facts, so a
write racing with it at worst makes the copy look older than it is (the next
check reloads it), never newer.

The hot path of a search is :func:`rows_at_version`: the hits' paths and labels
and the counter in one statement, so a search that used cached state costs one
catalog round trip, and sees a write committed before it finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import select

from featurestore.catalog.common import Repository
from featurestore.catalog.database import driver_rows
from featurestore.catalog.images import PathLabel
from featurestore.catalog.indexes import IndexKey, index_key
from featurestore.catalog.schema import AnnIndex, CatalogVersion, FeatureSet, FeatureShard


@dataclass(frozen=True)
class ShardFacts:
    """A registered shard of a set: id, store-relative path, rows in the file."""

    id: int
    path: str
    rows: int


@dataclass(frozen=True)
class SetSnapshot:
    """A feature set's catalog facts as of ``version``.

    ``index_key`` names its vector index (None when it has none); ``shards`` are in id order.
    """

    version: int
    id: int
    name: str
    kind: str
    dim: int
    dtype: str
    params: dict[str, Any]
    index_key: IndexKey | None
    shards: tuple[ShardFacts, ...]


class RowsAtVersion(NamedTuple):
    """The change counter and some images' paths and labels, read in one statement."""

    version: int
    rows: dict[int, PathLabel]


class VectorAt(NamedTuple):
    """Where an image's vector is: its shard's path and sha256 (None: registered before 0011), the row in it."""

    path: str
    row: int
    sha256: str | None


class VectorLocation(NamedTuple):
    """Whether an image exists, and where its vector is (None: it has none in the set)."""

    exists: bool
    vector: VectorAt | None


class Versions(Repository):
    """The change counter and what a search caches against it."""

    def catalog_version(self) -> int:
        """The catalog's change counter now."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(CatalogVersion.version).where(CatalogVersion.id == 1)).scalar_one())

    def set_snapshot(self, name: str) -> SetSnapshot | None:
        """The counter, then the set ``name``'s row, index key and shards (None: no such set)."""
        with self.engine.connect() as conn:
            version = int(conn.execute(select(CatalogVersion.version).where(CatalogVersion.id == 1)).scalar_one())
            row = conn.execute(select(FeatureSet.id, FeatureSet.kind, FeatureSet.dim, FeatureSet.dtype,
                                      FeatureSet.params).where(FeatureSet.name == name)).first()
            if row is None:
                return None
            fid = int(row[0])
            idx = conn.execute(select(AnnIndex.id, AnnIndex.sha256, AnnIndex.params)
                               .where(AnnIndex.feature_set_id == fid)).first()
            shards = conn.execute(select(FeatureShard.id, FeatureShard.path, FeatureShard.rows)
                                  .where(FeatureShard.feature_set_id == fid).order_by(FeatureShard.id)).all()
        key = None if idx is None else index_key(idx)
        return SetSnapshot(version, fid, name, str(row[1]), int(row[2]), str(row[3]), dict(row[4] or {}), key,
                           tuple(ShardFacts(int(i), str(p), int(n)) for i, p, n in shards))

    def rows_at_version(self, image_ids: Sequence[int]) -> RowsAtVersion:
        """The counter and image id -> (source path, label), in one statement.

        Plain driver SQL: the only values rendered into it are integers. The
        counter comes as the row whose image id is NULL (a ``UNION ALL``: both parts
        are primary-key lookups, which a join ``ON i.id IN (...)`` was not in SQLite).
        """
        ids = ",".join(str(int(i)) for i in image_ids) or "NULL"
        sql = ("SELECT version, NULL, NULL, NULL FROM catalog_version WHERE id = 1 UNION ALL "
               f"SELECT NULL, id, source_path, label FROM images WHERE id IN ({ids})")
        got = driver_rows(self.engine, sql)
        version = next(int(v) for v, i, _, _ in got if i is None)
        return RowsAtVersion(version, {int(i): PathLabel(str(p), lb) for _, i, p, lb in got if i is not None})

    def vector_location(self, feature_set_id: int, image_id: int
                        ) -> VectorLocation:
        """Whether the image exists and where its vector is, in one statement."""
        sql = ("SELECT i.id, s.path, r.\"row\", s.sha256 FROM images i LEFT JOIN feature_rows r ON r.image_id = i.id "
               f"AND r.feature_set_id = {int(feature_set_id)} LEFT JOIN feature_shards s ON s.id = r.shard_id "
               f"WHERE i.id = {int(image_id)}")
        rows = driver_rows(self.engine, sql)
        if not rows:
            return VectorLocation(False, None)
        got = rows[0]
        return VectorLocation(True, None if got[1] is None else VectorAt(str(got[1]), int(got[2]), got[3]))
