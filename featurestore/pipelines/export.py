"""Parquet exports: feature sets and a run's predictions, written in bounded memory and atomically.

Rows are streamed from :mod:`featurestore.arrow` one record batch at a time,
each written as one Parquet row group, into a temp file beside the
destination that is renamed over it only when complete. The files are plain
Parquet (zstd), readable by pandas, polars, DuckDB and Hugging Face ``datasets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.errors import InvalidInputError
from featurestore.io.atomic import atomic_path
from featurestore.store import Store

if TYPE_CHECKING:
    import pyarrow as pa

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: the file, its rows and row groups, and the selected images left out per set."""

    path: Path
    rows: int
    row_groups: int
    bytes: int
    lacking: dict[str, int] = field(default_factory=dict)


def export_features(store: Store, feature_sets: Sequence[str], dest: Path | str, *, dataset: str | None = None,
                    where: str | None = None, batch_rows: int | None = None,
                    progress: Progress | None = None,
                    version: int | Mapping[str, int] | None = None) -> ExportSummary:
    """Write feature sets to one Parquet file: one row per image that has a vector in every set.

    Parameters
    ----------
    feature_sets : sequence of str
        One ``fixed_size_list<float32>`` column per set, named after it.
    dataset, where : str, optional
        Select the images (a dataset; a SQL condition as in ``--where``).
    batch_rows : int, optional
        Rows per row group (default: as many as fit in about 32 MiB of vectors).
    version : int or mapping, optional
        Export older versions (``fs versions``): one number for every set, or per set; columns keep the
        sets' names and the file's metadata records each version. Default: the newest.
    """
    from featurestore import arrow

    target = _destination(dest)
    pins = store.pin_versions(feature_sets, version) if version is not None else {}
    stored = {n: store.feature_set(n, pins[n]).name if n in pins else n for n in feature_sets}
    plan = arrow.plan_features(store.catalog, store.settings, [stored[n] for n in feature_sets], dataset=dataset,
                               where=where)
    if pins:  # an older version is read through its own row: name the columns after the sets again
        columns = tuple(replace(c, name=n, version=pins.get(n)) for c, n in zip(plan.columns, feature_sets,
                                                                                 strict=True))
        plan = replace(plan, columns=columns, lacking={n: plan.lacking[stored[n]] for n in feature_sets})
    total = len(plan.image_ids)
    rows, groups, size = _write(target, arrow.feature_schema(plan.columns),
                                arrow.feature_batches(store.catalog, store.root, plan, batch_rows), total, progress)
    return ExportSummary(target, rows, groups, size, plan.lacking)


def export_predictions(store: Store, run_id: int, dest: Path | str, *, batch_rows: int = 50_000,
                       progress: Progress | None = None) -> ExportSummary:
    """Write a run's stored predictions to one Parquet file (one row per predicted image, by id)."""
    from featurestore import arrow

    target = _destination(dest)
    store.catalog.run(run_id)  # NotFoundError lists the runs there are
    rows, groups, size = _write(target, arrow.prediction_schema(run_id),
                                arrow.prediction_batches(store.catalog, run_id, batch_rows), 0, progress)
    return ExportSummary(target, rows, groups, size)


def _destination(dest: Path | str) -> Path:
    target = Path(dest)
    if target.is_dir():
        raise InvalidInputError(f"{target} is a folder; give a file name such as {target / 'export.parquet'}")
    return target


def _write(target: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], total: int,
           progress: Progress | None) -> tuple[int, int, int]:
    import pyarrow.parquet as pq

    rows = groups = 0
    with atomic_path(target) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch, row_group_size=max(1, batch.num_rows))
                rows += batch.num_rows
                groups += 1
                if progress:
                    progress(rows, total or rows)
    return rows, groups, target.stat().st_size
