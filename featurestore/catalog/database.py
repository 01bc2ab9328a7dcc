"""Engines, schema migrations and read-only access for the catalog."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from featurestore.errors import (
    CatalogCorruptError,
    FeatureStoreError,
    InvalidInputError,
    SchemaOutdatedError,
    StoreBusyError,
)

# Two store folders may initialise one empty PostgreSQL database at once (their write locks are
# per folder): migrations take this transaction-level advisory lock, so the second waits and finds
# the schema made. The number is arbitrary but fixed ("featurestore" in ASCII, truncated).
_MIGRATION_LOCK = 0x6665617475726573


class CatalogUnavailableError(FeatureStoreError, ConnectionError):
    """The catalog database cannot be reached or opened."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot open the catalog at {_safe(url)} ({reason})", remedy="catalog-unreachable",
                         url=_safe(url), reason=reason)


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
    """An engine for the catalog; SQLite gets WAL and foreign keys.

    Raises
    ------
    InvalidInputError
        ``url`` is not a URL SQLAlchemy can parse, or names a database featurestore does not support.
    """
    try:
        dialect = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        raise InvalidInputError(f"the catalog URL {_safe(url)} cannot be parsed; {_URL_HINT}") from None
    if dialect not in ("sqlite", "postgresql"):
        raise InvalidInputError(f"the catalog URL {_safe(url)} names a {dialect} database; {_URL_HINT}")
    try:
        engine = create_engine(url, future=True, pool_pre_ping=url.startswith("postgresql"),
                               **({"connect_args": {"connect_timeout": 10}} if dialect == "postgresql" else {}))
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        raise InvalidInputError(f"the catalog URL {_safe(url)} cannot be used ({_first_line(exc)}); "
                                f"{_URL_HINT}") from None
    configure_sqlite(engine)
    return engine


_URL_HINT = "FS_DATABASE_URL must be sqlite:///PATH or postgresql+psycopg2://USER@HOST:PORT/DATABASE"


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
        if isinstance(exc, OperationalError):  # server down, wrong port or password, unwritable folder
            raise CatalogUnavailableError(engine.url.render_as_string(hide_password=True), _first_line(exc)) \
                from None
        raise


def upgrade(engine: Engine, url: str, revision: str = "head") -> tuple[str | None, str]:
    """Run migrations up to ``revision``; returns (before, after) revisions."""
    from alembic import command

    before = current_revision(engine)
    cfg = alembic_config(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # another store folder may be migrating this database
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except DBAPIError as exc:
        # e.g. a table that already exists: the recorded revision is older than the tables
        raise SchemaOutdatedError(
            f"the catalog at {_safe(url)} could not be upgraded from revision {before or 'empty'} "
            f"({_first_line(exc)}); its alembic_version may not match its tables (was it changed by hand?): "
            "restore the catalog from a backup, or set alembic_version to the revision its tables have"
        ) from None
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
        if tables - {"alembic_version"} and current_revision(engine) != head:  # (not another store's first use)
            raise FeatureStoreError(f"the database at {_safe(url)} has tables but no featurestore schema version",
                                    remedy="not-a-catalog", url=_safe(url))
        if tables - {"alembic_version"}:
            return
        if not create:
            raise FeatureStoreError(f"the catalog at {_safe(url)} is empty", remedy="empty-catalog", url=_safe(url))
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
        f"the catalog at {_safe(url)} is at revision {current}, older than this featurestore (head {head})",
        remedy="db-upgrade", url=_safe(url), revision=current, head=head)


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
    """The URL without its password, for messages (an unparsable one is cut at its first ``@``)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return repr(url.rpartition("@")[2] if "@" in url else url[:80])


def driver_rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    """All rows of one SQL statement as plain DB-API tuples, through the driver's own cursor.

    For hot paths where SQLAlchemy's per-statement and per-row overhead dominates.
    Only for SQL whose rendered values are integers or names we produced.
    """
    with engine.connect() as conn:
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(sql)
            return list(cur.fetchall())
        finally:
            cur.close()


# -- the write lock of a store in a bucket --------------------------------------------------------
# A bucket has no flock; every machine writing to the store reaches the same PostgreSQL catalog, so the
# lock lives there: a session-level advisory lock on a key derived from the store's URL, held by a
# connection kept open for the duration. PostgreSQL releases it when that connection closes, including
# when the process is killed (the server notices the dropped socket).


def lock_key(url: str) -> int:
    """The signed 64-bit advisory-lock key of a store URL."""
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(engine: Any, url: str, timeout: float) -> Iterator[None]:
    """Hold the advisory lock of store ``url`` for the block; :class:`StoreBusyError` after ``timeout`` seconds."""
    key = lock_key(url)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        while not conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar():
            if time.monotonic() >= deadline:
                raise StoreBusyError(None, f"the catalog's advisory lock of {url}")
            time.sleep(0.1)
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()
