"""Feature sets and run predictions as Arrow record batches: what ``fs export`` writes and ``to_arrow`` returns.

A feature export has one row per image: ``image_id``, ``sha256``, ``label``,
``superclass``, ``datasets`` (the names of every dataset the image belongs to)
and one ``fixed_size_list<float32>[dim]`` column per feature set, named after
the set. Rows come in batches of a bounded size (one Parquet row group each):
the ids of a batch are located in the catalog and read from their shards as
contiguous slices, so memory does not grow with the set.

The schema's metadata key ``featurestore`` holds each set's kind, dim and
params as JSON, so a Parquet file says how its vectors were made.

Importing this module imports pyarrow; the store imports it only when asked for Arrow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featurestore.catalog.readonly import ReadOnlyCatalog
from featurestore.catalog.repository import Catalog
from featurestore.config import Settings
from featurestore.errors import DimensionMismatchError, FeatureStoreError, IntegrityError, InvalidInputError
from featurestore.shards import read_span_rows

IMAGE_COLUMNS = ("image_id", "sha256", "label", "superclass", "datasets")
# A batch (one row group) holds at most this many rows and about this many bytes of vectors.
MAX_BATCH_ROWS = 65_536
BATCH_BYTES = 32 << 20


@dataclass(frozen=True)
class VectorColumn:
    """A feature set as one column of an export."""

    name: str
    feature_set_id: int
    kind: str
    dim: int
    params: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the set's version when one was asked for (`--version`)


@dataclass(frozen=True)
class FeaturePlan:
    """What a feature export will write: its columns, the image ids (ascending) and what was left out.

    ``lacking`` counts, per set, the selected images without a vector in it
    (they are not exported: every row has every column).
    """

    columns: tuple[VectorColumn, ...]
    image_ids: np.ndarray
    lacking: dict[str, int]

    @property
    def batch_rows(self) -> int:
        width = 4 * sum(c.dim for c in self.columns)
        return max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // max(1, width)))


def plan_features(catalog: Catalog, settings: Settings, names: Sequence[str], *, dataset: str | None = None,
                  where: str | None = None) -> FeaturePlan:
    """The rows and columns of a feature export.

    Parameters
    ----------
    names : sequence of str
        Feature sets, one vector column each, in this order.
    dataset : str, optional
        Only images that belong to this dataset.
    where : str, optional
        Only images matching this SQL condition (the ``--where`` of ``fs search``).
    """
    if not names:
        raise InvalidInputError("no feature sets given; name one or more, e.g. rp128,efficientnet-lite0")
    clash = sorted({n for n in names if n in IMAGE_COLUMNS} | {n for n in names if list(names).count(n) > 1})
    if clash:
        raise InvalidInputError(f"feature set(s) {', '.join(clash)} named twice or named like an image column "
                                f"({', '.join(IMAGE_COLUMNS)}); name each set once")
    rows = [catalog.feature_set(n) for n in names]  # NotFoundError lists the sets there are
    columns = tuple(VectorColumn(r.name, int(r.id), r.kind, int(r.dim), dict(r.params or {})) for r in rows)
    selected = np.unique(catalog.image_ids_where(dataset=dataset))
    if where is not None:
        matched = np.asarray(ReadOnlyCatalog.from_settings(settings).image_ids_where(where), dtype=np.int64)
        selected = np.intersect1d(selected, matched)
    ids, lacking = selected, {}
    for col in columns:
        have = np.asarray(catalog.live_image_ids(col.feature_set_id), dtype=np.int64)
        lacking[col.name] = int(len(selected) - np.isin(selected, have).sum())
        ids = np.intersect1d(ids, have)
    return FeaturePlan(columns, ids, lacking)


def feature_schema(columns: Sequence[VectorColumn]) -> pa.Schema:
    """The Arrow schema of a feature export (with each set's kind, dim and params as metadata)."""
    fields = [pa.field("image_id", pa.int64(), nullable=False), pa.field("sha256", pa.string()),
              pa.field("label", pa.string()), pa.field("superclass", pa.string()),
              pa.field("datasets", pa.list_(pa.string()))]
    fields += [pa.field(c.name, pa.list_(pa.float32(), c.dim)) for c in columns]
    meta = {"feature_sets": {c.name: {"kind": c.kind, "dim": c.dim, "params": c.params,
                                      **({"version": c.version} if c.version is not None else {})}
                             for c in columns}}
    return pa.schema(fields, metadata={"featurestore": json.dumps(meta, sort_keys=True, default=str)})


def feature_batches(catalog: Catalog, root: Path, plan: FeaturePlan, batch_rows: int | None = None
                    ) -> Iterator[pa.RecordBatch]:
    """The rows of ``plan`` in record batches of at most ``batch_rows`` rows (default: ``plan.batch_rows``)."""
    schema = feature_schema(plan.columns)
    step = max(1, batch_rows or plan.batch_rows)
    for start in range(0, len(plan.image_ids), step):
        chunk = plan.image_ids[start : start + step]
        facts = catalog.export_facts(chunk)
        if len(facts) != len(chunk):
            raise FeatureStoreError("images were removed from the catalog during the export; run it again")
        arrays: list[pa.Array] = [
            pa.array(chunk, pa.int64()), pa.array([f.sha256 for f in facts], pa.string()),
            pa.array([f.label for f in facts], pa.string()), pa.array([f.superclass for f in facts], pa.string()),
            pa.array([list(f.datasets) for f in facts], pa.list_(pa.string())),
        ]
        for col in plan.columns:
            mat = _vectors_replanned(catalog, root, col, chunk)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), col.dim))
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def feature_table(catalog: Catalog, root: Path, plan: FeaturePlan) -> pa.Table:
    """All rows of ``plan`` as one in-memory table."""
    return pa.Table.from_batches(list(feature_batches(catalog, root, plan)), schema=feature_schema(plan.columns))


def _vectors_replanned(catalog: Catalog, root: Path, col: VectorColumn, image_ids: np.ndarray) -> np.ndarray:
    try:
        return _vectors(catalog, root, col, image_ids)
    except IntegrityError:
        # `fs compact` commits the merged shard, then deletes the old ones: locate again once.
        return _vectors(catalog, root, col, image_ids)


def _vectors(catalog: Catalog, root: Path, col: VectorColumn, image_ids: np.ndarray) -> np.ndarray:
    """The vectors of ``image_ids`` (ascending) in one set, read shard by shard as contiguous slices."""
    loc = catalog.locate(col.feature_set_id, image_ids)  # (image_id, shard_id, row) by shard, row
    if len(loc) != len(image_ids):
        raise FeatureStoreError(f"{len(image_ids) - len(loc)} image(s) lost their vector in {col.name} during the "
                                "export (the set was replaced or re-extracted); run the export again")
    paths = {ref.id: root / ref.path for ref in catalog.shards(col.feature_set_id)}
    out = np.empty((len(image_ids), col.dim), dtype=np.float32)
    bounds = np.flatnonzero(np.diff(loc[:, 1])) + 1
    for part in np.split(loc, bounds):
        path = paths.get(int(part[0, 1]))
        if path is None:
            raise IntegrityError(f"a shard of {col.name} was replaced during the export")
        block = read_span_rows(path, part[:, 2])
        if block.shape[1] != col.dim:
            raise DimensionMismatchError(f"feature shard {path} has dim {block.shape[1]}, catalog says {col.dim}")
        out[np.searchsorted(image_ids, part[:, 0])] = block
    return out


# -- predictions ---------------------------------------------------------------------------------

_TOP = pa.list_(pa.struct([pa.field("label", pa.string()), pa.field("probability", pa.float64())]))


def prediction_schema(run_id: int) -> pa.Schema:
    """The Arrow schema of a prediction export: one row per image the run predicted."""
    fields = [pa.field("run_id", pa.int64(), nullable=False), pa.field("image_id", pa.int64(), nullable=False),
              pa.field("sha256", pa.string()), pa.field("label", pa.string()), pa.field("superclass", pa.string()),
              pa.field("predicted", pa.string()), pa.field("probability", pa.float64()), pa.field("top5", _TOP),
              pa.field("predicted_at", pa.timestamp("us"))]
    return pa.schema(fields, metadata={"featurestore": json.dumps({"run_id": int(run_id)})})


def prediction_batches(catalog: Catalog, run_id: int, batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """A run's stored predictions by image id, in record batches of at most ``batch_rows`` rows.

    ``label`` and ``superclass`` are the image's at export time (the truth to compare ``predicted`` with).
    """
    schema = prediction_schema(run_id)
    after = 0
    while page := catalog.prediction_page(run_id, after, max(1, batch_rows)):
        yield pa.RecordBatch.from_arrays([
            pa.array([int(run_id)] * len(page), pa.int64()), pa.array([r.image_id for r in page], pa.int64()),
            pa.array([r.sha256 for r in page], pa.string()), pa.array([r.label for r in page], pa.string()),
            pa.array([r.superclass for r in page], pa.string()), pa.array([r.predicted for r in page], pa.string()),
            pa.array([r.probability for r in page], pa.float64()),
            pa.array([[{"label": t.label, "probability": t.probability} for t in r.top5] for r in page], _TOP),
            pa.array([r.predicted_at for r in page], pa.timestamp("us")),
        ], schema=schema)
        after = page[-1].image_id
