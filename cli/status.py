"""``fs status``, ``fs sql`` and ``fs compact``: look into the store."""

from __future__ import annotations

import json

import typer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from featurestore.catalog.database import make_readonly_engine
from featurestore.cli import common
from featurestore.errors import FeatureStoreError, InvalidInputError


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
    if fmt == common.Format.json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    if fmt == common.Format.csv:
        common.emit(info["feature_sets"], fmt, ["feature_set", "kind", "dim", "images", "coverage", "shards"])
        return
    typer.echo(f"store: {common.settings().store}  images: {info['images']}\n")
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
    query: str = typer.Argument(..., help="One read-only SQL statement (SELECT/WITH)."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Run a read-only SQL query on the catalog and print the result.

    The catalog is opened read-only (SQLite mode=ro; PostgreSQL read-only
    transaction), so writes are refused. Tables: datasets, images, ingest_errors,
    feature_sets, feature_shards, feature_rows, models, runs, run_splits, predictions.

    Example: fs sql "SELECT label, count(*) AS n FROM images GROUP BY label" --format csv
    """
    s = common.settings()
    if not s.database_url and not (s.store / "catalog.db").exists():
        raise FeatureStoreError(f"no catalog at {s.store}: run `fs ingest PATH` first, or pass --store")
    engine = make_readonly_engine(s.catalog_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(text(query))
            if not result.returns_rows:
                raise InvalidInputError("fs sql runs read-only queries only; the statement returned no rows")
            cols = list(result.keys())
            rows = [dict(zip(cols, r, strict=True)) for r in result]
            conn.rollback()
    except (OperationalError, ProgrammingError, DBAPIError) as exc:
        msg = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "readonly" in msg.replace(" ", "").lower() or "read-only" in msg.lower():
            raise InvalidInputError(f"fs sql is read-only: the statement tries to write ({msg})") from None
        raise InvalidInputError(f"SQL error: {msg}") from None
    finally:
        engine.dispose()
    common.emit(rows, fmt, cols)


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
