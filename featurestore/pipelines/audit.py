"""``fs audit``: near-duplicate leaks, outliers and bad photos, stored as ``audit_findings`` rows (issue 25).

Each audit returns its rows worst first and replaces, in one transaction under
the store's write lock (call them without holding it), the
findings it made before about the images it examined, so the web grid's
``/ui/browse?finding=KIND`` filter always shows the latest audit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.catalog.audits import Finding
from featurestore.errors import FeatureStoreError, InvalidParameterError
from featurestore.io import quality
from featurestore.io.thumbnails import thumbnail
from featurestore.search.groups import check_threshold, cross_pairs, group_near_duplicates
from featurestore.search.outliers import outlier_scores
from featurestore.store import Store

Progress = Callable[[int, int], None]


def default_feature_set(store: Store, preferred: list[str] | None = None) -> str:
    """The first CNN set among ``preferred`` (a run's features), else the store's first CNN set."""
    names = preferred or [fs.name for fs in store.feature_sets()]
    for name in names:
        if store.feature_set(name).kind == "cnn":
            return name
    raise InvalidParameterError("no CNN feature set among {names}: name one with {feature_set} SET", "feature_set",
                                names=", ".join(names) or "the store (it has none)", remedy="extract-cnn")


# -- leaks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """A near-duplicate pair across two sides: ``a`` on the first (dataset A, a split's training part)."""

    a: int
    b: int
    similarity: float
    a_label: str | None
    b_label: str | None
    where: str  # "A vs B", or "split N"


@dataclass
class LeakReport:
    leaks: list[Leak]
    feature_set: str
    threshold: float
    method: str
    seconds: float
    examined: int
    notes: list[str] = field(default_factory=list)


def audit_leaks(store: Store, threshold: float, dataset: str | None = None, against: str | None = None,
                run: int | None = None, feature_set: str | None = None, exact: bool = False,
                progress: Progress | None = None) -> LeakReport:
    """Near-duplicate pairs (cosine >= ``threshold``) between ``dataset`` and ``against``, inside ``dataset``
    alone, or between each split's training and test images of ``run``; stored as ``leak`` findings."""
    threshold = check_threshold(threshold)
    if (run is None) == (dataset is None):
        raise InvalidParameterError("give {dataset} A (with {against} B, or alone for pairs inside A) or {run} R",
                                    "dataset", "against", "run")
    if run is not None and against is not None:
        raise InvalidParameterError("{against} compares two datasets; {run} compares the splits of one run",
                                    "against", "run")
    sides: list[tuple[str, np.ndarray, np.ndarray]]
    if run is not None:
        r = store.catalog.run(run)
        ids = store.catalog.run_image_ids(run)
        if ids.size == 0:
            raise FeatureStoreError(f"run {run} was recorded before featurestore stored each split's images; "
                                    "evaluate it again to audit its splits")
        name = feature_set or r.group_features or default_feature_set(store, list(r.features))
        tests = store.catalog.split_test_ids(run)
        sides = [(f"split {s}", ids[~np.isin(ids, test)], test) for s, test in tests.items()]
    else:
        assert dataset is not None
        a_ids = np.asarray(sorted(store.catalog.dataset_image_ids(dataset)), dtype=np.int64)
        b_ids = (a_ids if against is None else
                 np.asarray(sorted(store.catalog.dataset_image_ids(against)), dtype=np.int64))
        ids = np.union1d(a_ids, b_ids)
        name = feature_set or default_feature_set(store)
        sides = [(f"{dataset} vs {against}" if against else f"inside {dataset}", a_ids, b_ids)]
    if ids.size == 0:
        raise FeatureStoreError("no images to compare: the dataset is empty", remedy="see-datasets")
    grouping = group_near_duplicates(store, name, ids, threshold, exact=exact, progress=progress)
    info = store.catalog.image_paths_labels(grouping.image_ids[np.isin(grouping.image_ids, np.asarray(
        [i for g in grouping.groups for i in g], dtype=np.int64))].tolist())
    leaks: list[Leak] = []
    for where, a, b in sides:
        pairs = cross_pairs(store, grouping, a, b)
        if against is None and run is None:
            pairs = [p for p in pairs if p.a < p.b]  # one dataset: each pair once
        leaks += [Leak(p.a, p.b, p.similarity, info[p.a].label if p.a in info else None,
                       info[p.b].label if p.b in info else None, where) for p in pairs]
    leaks.sort(key=lambda x: (-x.similarity, x.a, x.b))
    rows = [Finding("leaks", "leak", x.a, x.similarity, {"threshold": threshold, "where": x.where,
                                                          **({"run": run} if run is not None else {})},
                    other_image_id=x.b, feature_set=name) for x in leaks]
    with store.writing():
        store.catalog.replace_findings("leaks", ids.tolist(), rows)
    return LeakReport(leaks, name, threshold, grouping.method, grouping.seconds, int(ids.size), [grouping.note])


# -- outliers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutlierRow:
    image_id: int
    label: str | None
    to_class: float | None
    to_all: float
    score: float
    outlier: bool


@dataclass
class OutlierReport:
    rows: list[OutlierRow]  # every image examined, worst first
    feature_set: str
    k: int
    fence_all: float
    fence_class: float

    @property
    def n_outliers(self) -> int:
        return sum(r.outlier for r in self.rows)


def audit_outliers(store: Store, feature_set: str, dataset: str | None = None, k: int = 10,
                   skip_missing: bool = False) -> OutlierReport:
    """kNN outlier scores of the images (of ``dataset``) in ``feature_set``; outliers stored as findings.

    See :mod:`featurestore.search.outliers` for the definition. Every image must
    have a vector in the set (the error names ``fs extract``) unless ``skip_missing`` leaves them out.
    """
    fs = store.feature_set(feature_set)
    need = store.catalog.image_count() * fs.dim * 4
    if need > store.settings.search_memory_mb * 2**20 and dataset is None:
        raise FeatureStoreError("the outlier audit is exact and {feature_set} needs {need_mib:,.0f} MiB, more than the "
                                "search memory budget ({budget_mib} MiB): audit one {dataset} at a time or raise "
                                "FS_SEARCH_MEMORY_MB", params=("dataset",), feature_set=fs.name,
                                need_mib=need / 2**20, budget_mib=store.settings.search_memory_mb)
    fm = store.read_matrix([fs.name], dataset=dataset, skip_missing=skip_missing)
    s = outlier_scores(fm.image_ids, fm.X, fm.labels, k)
    order = np.argsort(-s.score, kind="stable")
    rows = [OutlierRow(int(s.image_ids[i]), fm.labels[i], None if np.isnan(s.to_class[i]) else float(s.to_class[i]),
                       float(s.to_all[i]), float(s.score[i]), bool(s.score[i] > 1.0)) for i in order]
    detail: dict[str, Any] = {"k": k, "fence_all": s.fence_all, "fence_class": s.fence_class,
                              "definition": "score = max(to_all / fence_all, to_class / fence_class); "
                                            "fence = Q3 + 3 IQR of the mean cosine distance to the k nearest"}
    found = [Finding("outliers", "outlier", r.image_id, r.score,
                     {**detail, "to_all": r.to_all, "to_class": r.to_class}, feature_set=fs.name)
             for r in rows if r.outlier]
    with store.writing():
        store.catalog.replace_findings("outliers", fm.image_ids.tolist(), found)
    return OutlierReport(rows, fs.name, k, s.fence_all, s.fence_class)


# -- photos ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoRow:
    image_id: int
    path: str
    kind: str
    value: float
    definition: str


@dataclass
class PhotoReport:
    rows: list[PhotoRow]
    examined: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): counted, never skipped silently


def audit_images(store: Store, dataset: str | None = None, progress: Progress | None = None) -> PhotoReport:
    """Blurred, dark, bright, near-constant, tiny and oddly shaped photos (:mod:`featurestore.io.quality`)."""
    facts = store.catalog.audit_facts(dataset)
    rows: list[PhotoRow] = []
    unreadable: list[tuple[str, str]] = []
    for n, f in enumerate(facts, start=1):
        try:
            jpeg = thumbnail(store.root, Path(f.source_path), f.sha256, f.bytes, 256, store.settings.max_image_pixels,
                             store.files.bucket)
            m: quality.PhotoMeasures | None = quality.measure(jpeg)
        except (FeatureStoreError, OSError, ValueError) as exc:
            unreadable.append((f.source_path, str(exc)))
            m = None
        rows += [PhotoRow(f.id, f.source_path, kind, value, quality.DEFINITIONS[kind])
                 for kind, value in quality.problems(m, f.width, f.height)]
        if progress is not None:
            progress(n, len(facts))
    order = list(quality.DEFINITIONS)
    rows.sort(key=lambda r: (order.index(r.kind), r.value if r.kind not in ("bright", "aspect") else -r.value,
                             r.image_id))
    found = [Finding("images", r.kind, r.image_id, r.value, {"definition": r.definition}) for r in rows]
    with store.writing():
        store.catalog.replace_findings("images", [f.id for f in facts], found)
    return PhotoReport(rows, len(facts), unreadable)
