"""Feature-set versions: list them, resolve a run's, and delete old ones (``fs versions``, ``fs gc``).

``fs extract --replace`` keeps the previous vectors as an older version
(:mod:`featurestore.catalog.feature_versions`). ``fs gc`` deletes old versions
that no run read, keeping each set's newest ``keep``; with ``force`` it deletes
those that runs read too, and names the runs that can no longer be reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from featurestore.catalog.feature_versions import VersionInfo
from featurestore.catalog.schema import Run
from featurestore.errors import FeatureStoreError, InvalidParameterError, NotFoundError
from featurestore.store import Store


def list_versions(store: Store, name: str) -> list[VersionInfo]:
    """Every version of feature set ``name``, oldest first (:class:`NotFoundError` if it has none)."""
    found = store.catalog.list_versions(name)
    if not found:
        known = sorted({v.name for v in store.catalog.list_versions()})
        raise NotFoundError("feature set", name, known, remedy="create-set")
    return found


@dataclass(frozen=True)
class GcPlan:
    """What ``fs gc`` deletes and what it keeps, and why."""

    delete: tuple[VersionInfo, ...]
    """Old versions deleted (or, with ``dry_run``, that would be)."""
    referenced: tuple[VersionInfo, ...]
    """Old versions kept because runs read them (only without ``force``)."""
    keep: int
    dry_run: bool
    deleted_files: tuple[str, ...] = field(default=())

    @property
    def orphaned_runs(self) -> list[int]:
        """The runs that read a deleted version: they can no longer be reproduced or predict."""
        return sorted({r for v in self.delete for r in v.runs})


def plan_gc(store: Store, keep: int = 1, force: bool = False, names: Sequence[str] | None = None,
            dry_run: bool = False) -> GcPlan:
    """Which versions ``fs gc`` deletes: all but each set's newest ``keep``, unless a run read them
    (``force``: those too)."""
    if keep < 1:
        raise InvalidParameterError("{keep} must be at least 1 (the newest version is always kept), got {value}",
                                    "keep", value=keep)
    every = store.catalog.list_versions()
    if names:
        known = {v.name for v in every}
        for n in names:
            if n not in known:
                raise NotFoundError("feature set", n, sorted(known))
        every = [v for v in every if v.name in set(names)]
    by_set: dict[str, list[VersionInfo]] = {}
    for v in every:
        by_set.setdefault(v.name, []).append(v)
    delete: list[VersionInfo] = []
    referenced: list[VersionInfo] = []
    for found in by_set.values():
        old = [v for v in sorted(found, key=lambda v: -v.version)[keep:] if not v.latest]
        for v in old:
            (delete if force or not v.runs else referenced).append(v)
    return GcPlan(tuple(delete), tuple(referenced), keep, dry_run)


def gc(store: Store, keep: int = 1, *, dry_run: bool = False, force: bool = False,
       names: Sequence[str] | None = None) -> GcPlan:
    """Delete old feature-set versions (see :func:`plan_gc`); planned and done under the store lock.

    The catalog forgets them in one transaction and the files go after; a crash
    in between leaves unregistered files that the next writer's sweep deletes.
    A dry run only reads: it neither waits for the lock nor sweeps.
    """
    if dry_run:
        return plan_gc(store, keep, force, names, dry_run=True)
    with store.writing():
        plan = plan_gc(store, keep, force, names)
        if not plan.delete:
            return plan
        files = store.delete_versions([v.feature_set_id for v in plan.delete])
    return GcPlan(plan.delete, plan.referenced, keep, False, tuple(files))


# -- runs ------------------------------------------------------------------------------------------------


def run_sets(store: Store, run: Run) -> dict[str, str]:
    """Feature set -> the catalog row name holding the version ``run`` read (the newest if it recorded none).

    Raises
    ------
    FeatureStoreError
        A version the run read was deleted (``fs gc --force``).
    """
    pins = store.catalog.run_pins([run.id]).get(int(run.id), {})
    out = {}
    for name in run.features:
        version = pins.get(name)
        try:
            out[name] = store.catalog.resolve_version(name, version)
        except NotFoundError:
            if version is None:
                raise
            raise FeatureStoreError(
                f"run {run.id} was trained on version {version} of feature set {name}, which was deleted",
                remedy="deleted-by-gc", features=",".join(run.features)) from None
    return out


def describe_pins(pins: dict[str, int]) -> str:
    """``rp128 v1, efficientnet-lite0 v2`` (for run listings)."""
    return ", ".join(f"{n} v{v}" for n, v in pins.items())
