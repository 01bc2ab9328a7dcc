"""Engines, schema migrations and read-only access for the catalog."""

from __future__ import annotations

import re
import sqlite3
import sys
from importlib import resources
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from featurestore.errors import CatalogCorruptError, FeatureStoreError, SchemaOutdatedError


def configure_sqlite(engine: Engine) -> None:
    """WAL journal, foreign keys and a busy timeout on every SQLite connection."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if not _is_readonly(dbapi_conn):
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def _is_readonly(dbapi_conn: Any) -> bool:
    try:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only")
        row = cur.fetchone()
        cur.close()
        return bool(row and row[0])
    except sqlite3.Error:
        return False


def make_engine(url: str) -> Engine:
    """An engine for the catalog; SQLite gets WAL and foreign keys."""
    engine = create_engine(url, future=True, pool_pre_ping=url.startswith("postgresql"))
    configure_sqlite(engine)
    return engine


def alembic_config(url: str) -> Any:
    """An Alembic config pointing at the migrations shipped inside the package."""
    from alembic.config import Config

    # Config's default stdout is bound when alembic is first imported; pass the current one.
    cfg = Config(stdout=sys.stdout)
    location = resources.files("featurestore.migrations")
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The catalog's schema revision; a SQLite file that is not a database gets an error naming it."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DBAPIError as exc:
        orig = exc.orig
        msg = str(orig).strip() if orig is not None else ""
        if isinstance(orig, sqlite3.DatabaseError) and ("not a database" in msg or "malformed" in msg):
            raise CatalogCorruptError(engine.url.database, msg) from None
        raise


def upgrade(engine: Engine, url: str, revision: str = "head") -> tuple[str | None, str]:
    """Run migrations up to ``revision``; returns (before, after) revisions."""
    from alembic import command

    before = current_revision(engine)
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current_revision(engine) or ""


def is_current(engine: Engine, url: str) -> bool:
    """Whether the catalog is at this featurestore's schema head (no migration needed)."""
    return _at_shipped_head(engine) or current_revision(engine) == head_revision(url)


def ensure_schema(engine: Engine, url: str, create: bool) -> None:
    """Create the schema on first use; refuse an outdated or foreign catalog.

    Parameters
    ----------
    create:
        Whether an empty database may be initialised (writers may, readers
        report that there is nothing yet).
    """
    if _at_shipped_head(engine):
        return
    from alembic.script import ScriptDirectory

    current = current_revision(engine)
    head = head_revision(url)
    if current == head:
        return
    if current is None:
        tables = set(inspect(engine).get_table_names())
        if tables - {"alembic_version"}:
            raise FeatureStoreError(
                f"the database at {_safe(url)} has tables but no featurestore schema version; "
                "point FS_DATABASE_URL/--store at an empty database or a featurestore catalog"
            )
        if not create:
            raise FeatureStoreError(
                f"the catalog at {_safe(url)} is empty: run `fs ingest PATH` (or `fs db upgrade`) first"
            )
        upgrade(engine, url)
        return
    script = ScriptDirectory.from_config(alembic_config(url))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaOutdatedError(
            f"the catalog at {_safe(url)} is at revision {current}, newer than this featurestore "
            f"(head {head}); upgrade featurestore"
        )
    raise SchemaOutdatedError(
        f"the catalog at {_safe(url)} is at revision {current}, older than this featurestore "
        f"(head {head}): run `fs db upgrade`"
    )


# `revision = "0008"` / `down_revision = "0007"` (or None) lines of the shipped migration files.
_REVISION_LINE = re.compile(r"""^revision\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]\s*$""", re.M)
_DOWN_LINE = re.compile(r"""^down_revision\s*(?::[^=]*)?=\s*(?:None|['"]([^'"]+)['"])\s*$""", re.M)


def shipped_head() -> str | None:
    """The head revision of the shipped migrations, read from their ``revision`` lines without Alembic.

    None when the files are not a plain chain (a merge revision, a line this
    does not recognise): then Alembic itself decides. Opening a store whose
    catalog is at this head (every command does) thus skips importing Alembic
    and loading each migration script, about a third of ``fs status``'s CPU time.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for entry in (resources.files("featurestore.migrations") / "versions").iterdir():
        if not entry.name.endswith(".py") or entry.name.startswith("_"):
            continue
        text = entry.read_text(encoding="utf-8")
        rev, down = _REVISION_LINE.findall(text), _DOWN_LINE.findall(text)
        if len(rev) != 1 or len(down) != 1:
            return None
        revisions.add(rev[0])
        if down[0]:
            parents.add(down[0])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def _at_shipped_head(engine: Engine) -> bool:
    """Whether the catalog's recorded revision is :func:`shipped_head` (plain SQL; False when unsure)."""
    head = shipped_head()
    if head is None:
        return False
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except DBAPIError:
        return False  # no table yet, or not a database: the full check below says which
    return len(rows) == 1 and rows[0][0] == head


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)
