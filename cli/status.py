"""``fs status``, ``fs sql`` and ``fs compact``: look into the store."""

from __future__ import annotations

import json

import typer

from featurestore.cli import common
from featurestore.errors import FeatureStoreError


def status(
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    max_errors: int = typer.Option(20, "--max-errors", help="Ingest failures to list in table format."),
) -> None:
    """Show datasets, image counts per label, ingest failures and each feature set's coverage.

    Example: fs status --format json
    """
    store = common.open_store()
    try:
        info = store.status()
    finally:
        store.close()
    where = store.settings.store  # not common.settings() again: pydantic reads the environment each time
    if fmt == common.Format.json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    if fmt == common.Format.csv:
        common.emit(info["feature_sets"], fmt, ["feature_set", "kind", "dim", "images", "coverage", "shards"])
        return
    typer.echo(f"store: {where}  images: {info['images']}\n")
    typer.echo("datasets\n" + common.table(info["datasets"], ["dataset", "images"]) + "\n")
    typer.echo("labels\n" + common.table(info["labels"], ["superclass", "label", "images"]) + "\n")
    typer.echo("feature sets\n" + common.table(
        info["feature_sets"], ["feature_set", "kind", "dim", "images", "coverage", "shards"]) + "\n")
    errors = info["ingest_errors"]
    typer.echo(f"ingest failures: {len(errors)}")
    for e in errors[:max_errors]:
        typer.echo(f"  {e['path']}: {e['reason']}")
    if len(errors) > max_errors:
        typer.echo(f"  ... and {len(errors) - max_errors} more (fs status --format json lists all)")


def sql(
    query: str = typer.Argument(..., help="One read-only query: SELECT, WITH ... SELECT, UNION or VALUES."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop the query after this many seconds "
                                         "(default FS_SQL_TIMEOUT or 30).", show_default=False),
) -> None:
    """Run one read-only query on the catalog and print the result.

    Exactly one query over the catalog tables (datasets, dataset_members, images,
    ingest_errors, feature_sets, feature_shards, feature_rows, models, runs,
    run_splits, run_test_predictions, run_notes, predictions, vector_indexes, catalog_version,
    run_oof, label_changes, label_reviews, run_images, run_split_images, audit_findings,
    feature_set_versions, run_feature_versions), with plain
    functions only (aggregates, string, math, date, JSON); anything else (several
    statements, COPY, SELECT INTO, writes, file or setting functions, PRAGMA,
    ATTACH) is refused before it reaches the database. It runs read-only (SQLite
    opened mode=ro; PostgreSQL a READ ONLY transaction, as FS_READONLY_DATABASE_URL /
    FS_READONLY_ROLE when set) and is stopped after --timeout seconds or on Ctrl-C.

    Example: fs sql "SELECT label, count(*) AS n FROM images GROUP BY label" --format csv
    """
    from featurestore.catalog.readonly import MAX_TIMEOUT, ReadOnlyCatalog

    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:  # also NaN and inf (PostgreSQL: OverflowError)
        raise typer.BadParameter(f"must be a positive number of seconds up to {MAX_TIMEOUT:,}", param_hint="--timeout")
    s = common.settings()
    if not s.database_url and not (s.store / "catalog.db").exists():
        raise FeatureStoreError(f"no catalog at {s.store}: run `fs ingest PATH` first, or pass --store")
    result = ReadOnlyCatalog.from_settings(s, timeout=timeout).query(query, label="fs sql")
    common.emit([dict(zip(result.columns, r, strict=True)) for r in result.rows], fmt, result.columns)


def compact(
    feature_set: str | None = typer.Argument(None, help="Feature set to compact (default: all)."),
    min_rows: int = typer.Option(10_000, "--min-rows", help="Shards with fewer rows are merged."),
) -> None:
    """Merge each feature set's small shards into one (crash-safe: the catalog switches in one transaction).

    Example: fs compact rp128
    """
    store = common.open_store()
    try:
        with store.writing():
            done = store.compact(feature_set, min_rows=min_rows)
    finally:
        store.close()
    if not done:
        common.err("nothing to compact")
    for name, shards, rows in done:
        common.err(f"{name}: merged {shards} shards ({rows} rows) into one")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("sql")(sql)
    app.command("compact")(compact)
