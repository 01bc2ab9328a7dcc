"""``fs db``: catalog schema management."""

from __future__ import annotations

import typer

from featurestore.cli import common
from featurestore.errors import FeatureStoreError

app = typer.Typer(help="Manage the catalog schema (Alembic migrations).", no_args_is_help=True)


@app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or upgrade the catalog schema to the latest revision.

    Example: fs db upgrade
    """
    from featurestore.catalog import database

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
    from featurestore.catalog import database

    s = common.settings()
    engine = database.make_engine(s.catalog_url)
    try:
        cur = database.current_revision(engine) if (s.database_url or s.store.exists()) else None
    finally:
        engine.dispose()
    typer.echo(f"current: {cur or 'none'}\nhead: {database.head_revision(s.catalog_url)}")


@app.command("create-readonly-role")
def create_readonly_role(
    name: str = typer.Argument(..., help="Name of the role (letters, digits and _)."),
    login: bool = typer.Option(False, "--login", help="A role that logs in with a password (for "
                               "FS_READONLY_DATABASE_URL) instead of a NOLOGIN role (for FS_READONLY_ROLE)."),
    password: str | None = typer.Option(None, "--password", envvar="FS_READONLY_PASSWORD", hide_input=True,
                                        help="Password of a --login role (default: prompted).",
                                        show_default=False),
) -> None:
    """Create (or update) a PostgreSQL role that can only SELECT the catalog tables, for fs sql and --where.

    The role gets CONNECT on the database, USAGE on the catalog's schema and SELECT on
    the catalog tables, nothing else; its sessions are read-only with a statement
    timeout. With --login set FS_READONLY_DATABASE_URL to a URL logging in as it:
    the strongest setting, the database itself refuses any write. Without --login
    it cannot log in: set FS_READONLY_ROLE=NAME and user queries switch to it (SET
    ROLE; the connecting user is made a member). Run it again after `fs db upgrade`
    adds tables.

    Example: fs db create-readonly-role fs_reader && export FS_READONLY_ROLE=fs_reader
    """
    from sqlalchemy.engine import make_url

    from featurestore.catalog.readonly import create_readonly_role as create_role

    s = common.settings()
    if not s.database_url:
        raise FeatureStoreError("a read-only role is a PostgreSQL feature; set FS_DATABASE_URL to the "
                                "PostgreSQL catalog (a SQLite catalog is already opened read-only by fs sql)")
    if password and not login:
        raise typer.BadParameter("--password needs --login", param_hint="--password")
    if login and not password:
        password = typer.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    create_role(s.database_url, name, password=password if login else None, timeout=s.sql_timeout)
    if login:
        url = make_url(s.database_url).set(username=name, password="PASSWORD")
        common.err(f"role {name} can log in and only SELECT the catalog tables; to use it for fs sql and --where:\n"
                   f"  export FS_READONLY_DATABASE_URL='{url.render_as_string(hide_password=False)}'")
    else:
        common.err(f"role {name} (NOLOGIN) can only SELECT the catalog tables; to use it for fs sql and --where:\n"
                   f"  export FS_READONLY_ROLE={name}")
