"""``fs db``: catalog schema management."""

from __future__ import annotations

import typer

from featurestore.catalog import database
from featurestore.cli import common

app = typer.Typer(help="Manage the catalog schema (Alembic migrations).", no_args_is_help=True)


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or upgrade the catalog schema to the latest revision.

    Example: fs db upgrade
    """
    s = common.settings()
    s.store.mkdir(parents=True, exist_ok=True)
    engine = database.make_engine(s.catalog_url)
    try:
        before, after = database.upgrade(engine, s.catalog_url, revision)
    finally:
        engine.dispose()
    if before == after:
        common.err(f"catalog already at {after}; nothing to do")
    else:
        common.err(f"catalog upgraded from {before or 'empty'} to {after}")


@app.command("current")
def current() -> None:
    """Print the catalog's schema revision and the latest one this version knows.

    Example: fs db current
    """
    s = common.settings()
    engine = database.make_engine(s.catalog_url)
    try:
        cur = database.current_revision(engine) if (s.database_url or s.store.exists()) else None
    finally:
        engine.dispose()
    typer.echo(f"current: {cur or 'none'}\nhead: {database.head_revision(s.catalog_url)}")
