"""Approximate nearest-neighbour indexes: the ``vector_indexes`` table (``featurestore.search.index``).

Rows come back as frozen dataclasses, never as ORM objects bound to a session.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from featurestore.catalog.common import Repository
from featurestore.catalog.feature_sets import LiveShard
from featurestore.catalog.schema import AnnIndex, FeatureSet


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


class IndexKey(NamedTuple):
    """What a search compares to tell whether its loaded index is still the registered one."""

    id: int
    sha256: str
    params: str  # as JSON text


class IndexState(NamedTuple):
    """What a search checks before each use of a set's index (:meth:`Indexes.index_state`)."""

    key: IndexKey | None  # None: the set has no index
    shards: list[LiveShard]


def index_key(row: Sequence[Any]) -> IndexKey:
    """The key of an index row read as (id, sha256, params) (PostgreSQL returns JSON decoded, SQLite as text)."""
    params = row[2] if isinstance(row[2], str) else json.dumps(row[2], sort_keys=True)
    return IndexKey(int(row[0]), str(row[1]), params)


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


class Indexes(Repository):
    """Queries on the registered vector indexes."""

    def get_index(self, feature_set_id: int) -> IndexRecord | None:
        """The index registered for a feature set, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(_select().where(AnnIndex.feature_set_id == int(feature_set_id))).first()
        return _record(row) if row is not None else None

    def index_state(self, feature_set_id: int) -> IndexState:
        """What a search checks before each use of an index, in one cheap round trip.

        Returns the key of the set's index (None when it has none) and the set's
        shards with ``live = rows`` (not counted; none when there is no index). Plain driver
        SQL: the ORM's per-statement overhead was most of an indexed query's time. The
        only values rendered into the SQL are integers.
        """
        fid = int(feature_set_id)
        with self.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(f"SELECT id, sha256, params FROM vector_indexes WHERE feature_set_id = {fid}")
                row = cur.fetchone()
                if row is None:
                    return IndexState(None, [])
                cur.execute("SELECT id, path, rows, sha256 FROM feature_shards "
                            f"WHERE feature_set_id = {fid} ORDER BY id")
                shards = cur.fetchall()
            finally:
                cur.close()
        live = [LiveShard(int(i), str(p), int(n), int(n), h) for i, p, n, h in shards]
        return IndexState(index_key(row), live)

    def list_indexes(self) -> list[IndexRecord]:
        """Every registered index, by feature set name."""
        with self.engine.connect() as conn:
            rows = conn.execute(_select().order_by(FeatureSet.name)).all()
        return [_record(r) for r in rows]

    def registered_paths(self) -> set[str]:
        """Store-relative paths of every registered index file."""
        with self.engine.connect() as conn:
            return {str(p) for p in conn.execute(select(AnnIndex.path)).scalars()}

    def replace_index(self, feature_set_id: int, expected_id: int | None, *, params: dict[str, Any],
                      vectors: int, shard_ids: Sequence[int], nbytes: int, sha256: str, path: str) -> str | None:
        """Register a new index for a feature set in one transaction, replacing the current one.

        ``expected_id`` is the id of the index the new one was built from (None: there
        was none). If another index was registered meanwhile, or the feature set was
        dropped, nothing changes and :class:`IndexChangedError` is raised.
        Returns the store-relative path of the replaced index file, if any.
        """
        with Session(self.engine) as s, s.begin():
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

    def update_params(self, index_id: int, params: dict[str, Any]) -> None:
        """Change the recorded params of an index in place (search-time settings only)."""
        with self.engine.begin() as conn:
            conn.execute(update(AnnIndex).where(AnnIndex.id == int(index_id)).values(params=params))

    def drop_index(self, feature_set_id: int) -> str | None:
        """Unregister a feature set's index; returns its store-relative path (None when there was none)."""
        with self.engine.begin() as conn:
            path = conn.execute(select(AnnIndex.path).where(AnnIndex.feature_set_id == int(feature_set_id))).scalar()
            conn.execute(delete(AnnIndex).where(AnnIndex.feature_set_id == int(feature_set_id)))
        return str(path) if path is not None else None
