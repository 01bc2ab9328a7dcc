"""Catalog access for approximate nearest-neighbour indexes (the ``vector_indexes`` table).

All SQL of :mod:`featurestore.search.index` lives here (to be folded into the
catalog repository module with the rest). Functions take the catalog
:class:`~sqlalchemy.Engine` and run their own short transactions; rows come
back as plain frozen dataclasses, never as ORM objects bound to a session.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, select

from featurestore.catalog.schema import AnnIndex, FeatureRow, FeatureSet, FeatureShard

# Ids per IN (...) list: far below SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK = 5_000


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
            cur.execute(f"SELECT id, path, rows FROM feature_shards WHERE feature_set_id = {fid} ORDER BY id")
            shards = cur.fetchall()
        finally:
            cur.close()
    params = row[2] if isinstance(row[2], str) else json.dumps(row[2], sort_keys=True)
    return (int(row[0]), str(row[1]), params), [LiveShard(int(i), str(p), int(n), int(n)) for i, p, n in shards]


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
        shards = conn.execute(select(FeatureShard.id, FeatureShard.path, FeatureShard.rows).where(
            FeatureShard.feature_set_id == fid).order_by(FeatureShard.id)).all()
        counts: dict[int, int] = {}
        if counted is None or counted:
            q = select(FeatureRow.shard_id, func.count()).where(FeatureRow.feature_set_id == fid)
            if counted is not None:
                q = q.where(FeatureRow.shard_id.in_(sorted(counted)))
            counts = {int(i): int(c) for i, c in conn.execute(q.group_by(FeatureRow.shard_id)).all()}
    return [LiveShard(int(i), str(p), int(n), counts.get(int(i), 0) if counted is None or int(i) in counted
                      else int(n)) for i, p, n in shards]


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
        for start in range(0, len(ids), _CHUNK):
            chunk = [int(i) for i in ids[start : start + _CHUNK]]
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
    from sqlalchemy.orm import Session

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
    from sqlalchemy import update

    with engine.begin() as conn:
        conn.execute(update(AnnIndex).where(AnnIndex.id == int(index_id)).values(params=params))


def drop_index(engine: Engine, feature_set_id: int) -> str | None:
    """Unregister a feature set's index; returns its store-relative path (None when there was none)."""
    with engine.begin() as conn:
        path = conn.execute(select(AnnIndex.path).where(AnnIndex.feature_set_id == int(feature_set_id))).scalar()
        conn.execute(delete(AnnIndex).where(AnnIndex.feature_set_id == int(feature_set_id)))
    return str(path) if path is not None else None
