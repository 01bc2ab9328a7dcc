"""Feature-set versions: which ``feature_sets`` row is version N of a set, and which runs read it.

``fs extract --replace`` no longer deletes a set's vectors: :func:`retire` renames
the current row to ``<name>@v<N>`` (``@`` is refused in user names, so it cannot
clash) and the caller registers a new row under the set's name, which
:func:`record_new` numbers N + 1. Everything that reads by name therefore reads
the newest version; an older one is reached through :func:`resolve`, and its
shards, rows and index stay registered to its row, so the orphan sweep keeps
them. A run's versions are in ``run_feature_versions`` (:func:`record_run`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.orm import Session

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import (
    AnnIndex,
    FeatureRow,
    FeatureSet,
    FeatureSetVersion,
    FeatureShard,
    RunFeatureVersion,
)
from featurestore.errors import FeatureStoreError, NotFoundError

RETIRED = "@v"


def retired_name(name: str, version: int) -> str:
    """The row name an older version of ``name`` is kept under."""
    return f"{name}{RETIRED}{int(version)}"


def newest_only() -> ColumnElement[bool]:
    """A condition on ``feature_sets`` keeping only each set's newest version (what listings show)."""
    return FeatureSet.name.not_like(f"%{RETIRED}%")


def public_name(stored: str) -> str:
    """The set name users give for a row name (``rp128@v1`` -> ``rp128``)."""
    return stored.split(RETIRED, 1)[0] if RETIRED in stored else stored


class VersionNotFoundError(NotFoundError):
    """A feature set has no such version."""

    def __init__(self, name: str, version: int, existing: Sequence[int]):
        have = ", ".join(str(v) for v in existing) or "none"
        FeatureStoreError.__init__(self, f"feature set {name!r} has no version {version}; its versions: {have}",
                                   remedy="see-versions", feature_set=name)
        self.name = name
        self.available = [str(v) for v in existing]


@dataclass(frozen=True)
class VersionInfo:
    """One version of a feature set, as ``fs versions`` lists it.

    ``stored_as`` is the catalog row's name (the set's name for the newest
    version, ``<name>@v<N>`` for an older one); ``runs`` the ids of the runs that
    read this version.
    """

    name: str
    version: int
    latest: bool
    feature_set_id: int
    stored_as: str
    created_at: datetime | None
    kind: str
    dim: int
    params: dict[str, Any]
    rows: int
    shards: int
    runtime: str | None
    runs: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``fs versions --format json``)."""
        return {"feature_set": self.name, "version": self.version, "latest": self.latest,
                "stored_as": self.stored_as,
                "created_at": self.created_at.isoformat(timespec="seconds") if self.created_at else None,
                "kind": self.kind, "dim": self.dim, "params": self.params, "rows": self.rows,
                "shards": self.shards, "runtime": self.runtime, "runs": list(self.runs)}


# -- writing (inside the caller's session, under the store lock) ----------------------------------------


def record_new(s: Session, row: FeatureSet) -> int:
    """Number a newly added set row: one more than the newest version of its name (1 for a new set)."""
    name = public_name(row.name)
    newest = s.scalar(select(func.max(FeatureSetVersion.version)).where(FeatureSetVersion.name == name))
    version = int(newest or 0) + 1
    s.add(FeatureSetVersion(feature_set_id=row.id, name=name, version=version, created_at=row.created_at))
    s.flush()
    return version


def retire(s: Session, row: FeatureSet) -> int:
    """Keep ``row`` (the newest version of its set) as an older version: rename it ``<name>@v<N>``.

    Its vectors stay; its approximate index is dropped (an index only speeds up searching, and an older
    version is read to reproduce a run, not served: searching it scores every vector; the next writer's
    sweep deletes the index file). Returns N. The caller then adds the new row under the set's name.
    """
    version = s.scalar(select(FeatureSetVersion.version).where(FeatureSetVersion.feature_set_id == row.id))
    if version is None:  # a row added by code that did not number it: number it now
        version = record_new(s, row)
    s.execute(delete(AnnIndex).where(AnnIndex.feature_set_id == row.id))
    row.name = retired_name(row.name, int(version))
    s.flush()
    return int(version)


def record_run(s: Session, run_id: int, pins: Mapping[str, int]) -> None:
    """Record that run ``run_id`` read version ``pins[name]`` of each set."""
    s.add_all([RunFeatureVersion(run_id=int(run_id), feature_set=n, version=int(v)) for n, v in pins.items()])
    s.flush()


# -- reading ---------------------------------------------------------------------------------------------


class StoredVersion(NamedTuple):
    """Version ``version`` of a set and the ``feature_sets`` row name holding it."""

    version: int
    row_name: str


class FeatureVersions(Repository):
    """Reading feature-set versions and the versions runs read."""

    def versions_of(self, name: str) -> list[StoredVersion]:
        """Every version of ``name`` and the row holding it, oldest first (empty: no such set)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(FeatureSetVersion.version, FeatureSet.name)
                                .join(FeatureSet, FeatureSet.id == FeatureSetVersion.feature_set_id)
                                .where(FeatureSetVersion.name == name).order_by(FeatureSetVersion.version)).all()
        return [StoredVersion(int(v), str(n)) for v, n in rows]


    def resolve_version(self, name: str, version: int | None) -> str:
        """The row name holding version ``version`` of set ``name`` (``None``: the newest, i.e. ``name``).

        Raises
        ------
        VersionNotFoundError
            The set exists but has no such version (the message lists the ones it has).
        NotFoundError
            No set of that name has any version.
        """
        if version is None:
            return name
        have = self.versions_of(name)
        for found in have:
            if found.version == int(version):
                return found.row_name
        if not have:
            raise NotFoundError("feature set", name, [], remedy="create-set")
        raise VersionNotFoundError(name, int(version), [v.version for v in have])


    def pin_versions(self, names: Iterable[str], version: int | Mapping[str, int] | None) -> dict[str, int]:
        """The version each of ``names`` is to be read at: ``version`` (one number for all, or per name),
        else the newest. Every pinned version is checked to exist."""
        out: dict[str, int] = {}
        for name in dict.fromkeys(names):
            want = version.get(name) if isinstance(version, Mapping) else version
            have = self.versions_of(name)
            current = [v.version for v in have if v.row_name == name]
            if want is None:
                if not current:  # a set without a version row (not expected): read as it is, unpinned
                    continue
                out[name] = current[0]
            elif int(want) in {v.version for v in have}:
                out[name] = int(want)
            elif not have:
                raise NotFoundError("feature set", name, [], remedy="create-set")
            else:
                raise VersionNotFoundError(name, int(want), [v.version for v in have])
        return out


    def run_pins(self, run_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """run id -> {feature set: version read} for the given runs (runs without a record are left out)."""
        out: dict[int, dict[str, int]] = {}
        ids = [int(i) for i in run_ids]
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                q = (select(RunFeatureVersion.run_id, RunFeatureVersion.feature_set, RunFeatureVersion.version)
                     .where(RunFeatureVersion.run_id.in_(ids[start:start + 500])))
                for r, n, v in conn.execute(q):
                    out.setdefault(int(r), {})[str(n)] = int(v)
        return out


    def list_versions(self, name: str | None = None) -> list[VersionInfo]:
        """Every version of set ``name`` (or of every set), by set name then version.

        Rows count the image vectors the catalog points at; ``runtime`` joins the
        distinct runtimes recorded on its shards.
        """
        with self.engine.connect() as conn:
            q = (select(FeatureSetVersion.name, FeatureSetVersion.version, FeatureSetVersion.feature_set_id,
                        FeatureSet.name, FeatureSetVersion.created_at, FeatureSet.kind, FeatureSet.dim,
                        FeatureSet.params)
                 .join(FeatureSet, FeatureSet.id == FeatureSetVersion.feature_set_id)
                 .order_by(FeatureSetVersion.name, FeatureSetVersion.version))
            if name is not None:
                q = q.where(FeatureSetVersion.name == name)
            rows = conn.execute(q).all()
            ids = [int(r[2]) for r in rows]
            counts = dict(conn.execute(select(FeatureRow.feature_set_id, func.count())
                                       .where(FeatureRow.feature_set_id.in_(ids)).group_by(FeatureRow.feature_set_id))
                          .all()) if ids else {}
            shards: dict[int, list[str | None]] = {}
            if ids:
                for fid, runtime in conn.execute(select(FeatureShard.feature_set_id, FeatureShard.runtime)
                                                 .where(FeatureShard.feature_set_id.in_(ids))):
                    shards.setdefault(int(fid), []).append(runtime)
            names = sorted({str(r[0]) for r in rows})
            used: dict[tuple[str, int], list[int]] = {}
            if names:
                for run_id, n, v in conn.execute(select(RunFeatureVersion.run_id, RunFeatureVersion.feature_set,
                                                        RunFeatureVersion.version)
                                                 .where(RunFeatureVersion.feature_set.in_(names))
                                                 .order_by(RunFeatureVersion.run_id)):
                    used.setdefault((str(n), int(v)), []).append(int(run_id))
        out = []
        for pub, version, fid, stored, created, kind, dim, params in rows:
            runtimes = sorted({part for rt in shards.get(int(fid), []) if rt for part in str(rt).split(",")})
            out.append(VersionInfo(str(pub), int(version), str(stored) == str(pub), int(fid), str(stored), created,
                                   str(kind), int(dim), dict(params or {}), int(counts.get(int(fid), 0)),
                                   len(shards.get(int(fid), [])), ",".join(runtimes) or None,
                                   tuple(used.get((str(pub), int(version)), []))))
        return out
