"""Read-only SQL typed by people: ``fs sql`` queries and ``--where`` conditions.

This module is the one owner of running user-written SQL on the catalog. Three
independent layers each refuse a write on their own:

1. **The statement.** The text is parsed with sqlglot in the catalog's dialect.
   It must be exactly one query (``SELECT``, ``WITH ... SELECT``, ``UNION`` /
   ``INTERSECT`` / ``EXCEPT``, ``VALUES``) built only from allow-listed syntax:
   the catalog's tables and the query's own CTEs, columns, literals, operators,
   ``CASE``/``CAST``, subqueries, window functions and an allow-list of pure
   functions (aggregates, string, math, date, JSON). Everything else is
   refused by name (``COPY``, ``SELECT INTO``, ``FOR UPDATE``, ``pg_read_file``,
   ``set_config``, ``pg_sleep``, ``ATTACH``, ``PRAGMA``, ``VACUUM``...). What
   runs is the SQL regenerated from the checked tree without comments, and
   that text must parse back to the same tree: the user's text itself never
   reaches the database, so a parser difference cannot smuggle in a second
   statement. A ``--where`` condition is parsed as one expression and put into
   a fixed ``SELECT`` as a tree, never pasted as text.
2. **The connection.** SQLite: opened ``mode=ro`` with ``query_only``, no
   attached databases allowed (``SQLITE_LIMIT_ATTACHED`` = 0) and an
   authorizer that allows reads and allow-listed functions only, so even
   ``ATTACH``/``VACUUM INTO`` reaching the engine create no file. PostgreSQL:
   a ``READ ONLY`` transaction with ``standard_conforming_strings`` on, the
   query run through ``DECLARE CURSOR`` (which the server accepts only for a
   plain query), optionally as a role that can only ``SELECT`` the catalog
   tables (:func:`create_readonly_role`). ``FS_READONLY_DATABASE_URL`` logs in
   as such a role: the database then refuses writes whatever text reaches it.
   ``FS_READONLY_ROLE`` only switches to it with ``SET ROLE`` on the catalog's
   own connection, which narrows what one statement may touch but could be
   undone by a second statement (``RESET ROLE``) if one ever got past layer 1.
3. **Time.** A deadline (``timeout`` seconds; SQLite: a progress handler,
   PostgreSQL: ``statement_timeout`` set to the time left before each fetch)
   and Ctrl-C (or SIGTERM turned into ``KeyboardInterrupt``) cancels the
   running statement instead of waiting for it.

Layer 1 (what a statement may contain) lives in :mod:`featurestore.catalog.readonly_rules`; its public
names are re-exported here.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from featurestore.catalog.readonly_rules import (
    _SQLITE_FUNCTIONS,
    ALLOWED_FUNCTIONS,
    QueryTimeoutError,
    ReadOnlySQLError,
    catalog_tables,
    check_query,
    dialect_of,
    where_is_cacheable,
    where_query,
)
from featurestore.errors import CatalogCorruptError, FeatureStoreError, InvalidInputError

if TYPE_CHECKING:
    from featurestore.config import Settings

__all__ = ["ALLOWED_FUNCTIONS", "QueryTimeoutError", "ReadOnlySQLError", "catalog_tables", "check_query",
           "dialect_of", "where_is_cacheable", "where_query"]

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 2_147_483  # seconds: PostgreSQL's statement_timeout is an int of milliseconds
"""Seconds a user query may run (``fs sql --timeout``, ``FS_SQL_TIMEOUT``)."""

# ---------------------------------------------------------------------------
# running a checked query


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a user query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_FETCH = 5000
MAX_RESULT_BYTES = 256 * 2**20
"""Largest result a user query may return (about: values' lengths plus 16 bytes each), held in memory."""
MAX_VALUE_BYTES = 64 * 2**20  # SQLite: largest string or blob a query may build (SQLITE_LIMIT_LENGTH)


class ResultTooLargeError(ReadOnlySQLError):
    """A user query returned more than :data:`MAX_RESULT_BYTES`."""


class _Budget:
    """Counts a result's size while it is fetched, and stops it past :data:`MAX_RESULT_BYTES`."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.used = 0
        self.rows = 0

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            self.used += sum(len(v) + 16 if isinstance(v, str | bytes | bytearray | memoryview) else 16
                             for v in row)
        self.rows += len(rows)
        if self.used > MAX_RESULT_BYTES:
            raise ResultTooLargeError(
                f"{self.label}: the result is larger than the {MAX_RESULT_BYTES // 2**20} MiB limit "
                f"(stopped after {self.rows:,} rows); narrow it with WHERE or LIMIT, select fewer columns, "
                "or aggregate")


def check_role_name(name: str) -> str:
    """A PostgreSQL role name we create or switch to: a plain identifier."""
    if not _ROLE_NAME.match(name or ""):
        raise InvalidInputError(f"role name {name!r} must be a plain identifier (letters, digits, _; "
                                "not starting with a digit; at most 63 characters)")
    return name


@dataclass(frozen=True)
class ReadOnlyCatalog:
    """Runs checked user SQL on the catalog, read-only and under a timeout.

    Parameters
    ----------
    url : str
        The catalog's SQLAlchemy URL (the store's SQLite file or PostgreSQL).
    readonly_url : str, optional
        PostgreSQL only: connect with this URL instead, e.g. as a role made by
        :func:`create_readonly_role` (``FS_READONLY_DATABASE_URL``).
    role : str, optional
        PostgreSQL only: ``SET ROLE`` to this SELECT-only role before the query
        (``FS_READONLY_ROLE``); weaker than ``readonly_url``, see the module docstring.
    timeout : float
        Seconds a query may run before it is stopped (``FS_SQL_TIMEOUT``).
    """

    url: str
    readonly_url: str | None = None
    role: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float | None = None) -> ReadOnlyCatalog:
        return cls(settings.catalog_url, readonly_url=settings.readonly_database_url,
                   role=settings.readonly_role, timeout=settings.sql_timeout if timeout is None else timeout)

    @property
    def dialect(self) -> str:
        return dialect_of(self.url)

    def query(self, sql: str, label: str = "read-only SQL") -> QueryResult:
        """Check and run one user query; see :func:`check_query` for what is allowed."""
        return self._run(check_query(sql, self.dialect, label), label)

    def image_ids_where(self, condition: str, label: str = "--where") -> list[int]:
        """Ids of the images matching a user condition; see :func:`where_query`."""
        result = self._run(where_query(condition, self.dialect, label),
                           f"bad {label} condition {(condition or '').strip()[:200]!r}")
        return [int(r[0]) for r in result.rows]

    def _run(self, sql: str, label: str) -> QueryResult:
        if not 0 < self.timeout <= MAX_TIMEOUT:  # also refuses NaN and inf
            raise InvalidInputError(f"the query timeout must be a positive number of seconds up to {MAX_TIMEOUT:,} "
                                    f"(PostgreSQL's statement_timeout limit, about 24 days), got {self.timeout}")
        runner: _SQLiteRunner | _PostgresRunner
        if self.dialect == "sqlite":
            if self.readonly_url or self.role:
                raise InvalidInputError("FS_READONLY_DATABASE_URL / FS_READONLY_ROLE apply to a PostgreSQL "
                                        "catalog; the catalog is SQLite (opened read-only already): unset them")
            runner = _SQLiteRunner(Path(make_url(self.url).database or ""), sql, self.timeout, label)
        else:
            ro = self.readonly_url or self.url
            if dialect_of(ro) != "postgres":
                raise InvalidInputError("FS_READONLY_DATABASE_URL must be a postgresql+psycopg2:// URL")
            runner = _PostgresRunner(ro, sql, self.timeout, label,
                                     check_role_name(self.role) if self.role else None)
        return _interruptible(runner.run, runner.cancel)


T = TypeVar("T")


def _interruptible(fn: Callable[[], T], cancel: Callable[[], None]) -> T:
    """Run ``fn`` so that Ctrl-C (KeyboardInterrupt) in the main thread cancels it promptly.

    The database call blocks in C, where Python cannot deliver the signal; so on
    the main thread it runs in a helper thread while this one waits, and on
    KeyboardInterrupt calls ``cancel`` and waits for the helper to stop. Other
    threads (the HTTP service) run it directly: their bound is the timeout.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="fs-readonly-sql", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        cancel()
        worker.join(10)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


class _SQLiteRunner:
    def __init__(self, path: Path, sql: str, timeout: float, label: str):
        self.path, self.sql, self.timeout, self.label = path, sql, timeout, label
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()  # seen by the progress handler within a few thousand VM steps

    def run(self) -> QueryResult:
        conn = self._connect()
        deadline = time.monotonic() + self.timeout
        conn.set_progress_handler(lambda: int(self._cancelled.is_set() or time.monotonic() > deadline), 2000)
        try:
            cur = conn.execute(self.sql)
            columns = [d[0] for d in cur.description or ()]
            rows: list[tuple[Any, ...]] = []
            budget = _Budget(self.label)
            while batch := [tuple(r) for r in cur.fetchmany(_FETCH)]:
                budget.add(batch)
                rows.extend(batch)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()
        return QueryResult(columns, rows)

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise FeatureStoreError(f"no catalog at {self.path}", remedy="ingest-first-or-store", path=self.path)
        try:
            conn = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True,
                                   check_same_thread=False)
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)  # zeroblob(1e9) and the like
            conn.execute("PRAGMA query_only=ON")
            conn.execute(f"PRAGMA busy_timeout={int(min(self.timeout, 30) * 1000)}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header: is it SQLite?
        except sqlite3.DatabaseError as exc:
            raise _sqlite_open_error(self.path, exc) from None
        conn.set_authorizer(_sqlite_authorizer)
        return conn

    def _error(self, exc: sqlite3.Error) -> FeatureStoreError:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "interrupted" in msg:
            if self._cancelled.is_set():
                raise KeyboardInterrupt
            return QueryTimeoutError(f"{self.label}: the query ran longer than its {self.timeout:g} s timeout "
                                     "and was stopped; narrow it (WHERE, LIMIT) or raise the timeout")
        if "not authorized" in msg or "authorization denied" in msg or "readonly" in msg or "too many attached" in msg:
            return ReadOnlySQLError(f"{self.label} is read-only: the statement tries to write or to reach outside "
                                    f"the catalog ({msg})")
        if isinstance(exc, sqlite3.DatabaseError) and "file is not a database" in msg:
            return _sqlite_open_error(self.path, exc)
        return ReadOnlySQLError(f"{self.label}: SQL error: {msg}")


def _sqlite_open_error(path: Path, exc: sqlite3.Error) -> FeatureStoreError:
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "not a database" in msg or "malformed" in msg:
        return CatalogCorruptError(path, msg)
    return FeatureStoreError(f"cannot open the catalog {path} read-only ({msg}); check the path and permissions")


def _sqlite_authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None
                       ) -> int:
    """Allow reading tables and calling allow-listed functions; deny everything else."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _SQLITE_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class _PostgresRunner:
    def __init__(self, url: str, sql: str, timeout: float, label: str, role: str | None):
        self.url, self.sql, self.timeout, self.label, self.role = url, sql, timeout, label, role
        self._conn: Any = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.cancel()  # psycopg2: asks the server to stop the running statement (thread-safe)
            except Exception:  # already finished or closed
                pass

    def run(self) -> QueryResult:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            try:
                raw = engine.raw_connection()
            except Exception as exc:
                orig = getattr(exc, "orig", exc)
                first = (str(orig).strip().splitlines() or [type(exc).__name__])[0]
                raise FeatureStoreError(f"cannot connect to the catalog database for read-only SQL: {first}") from None
            try:
                self._conn = raw.driver_connection
                return self._query(self._conn)
            finally:
                self._conn = None
                raw.close()
        finally:
            engine.dispose()

    def _query(self, conn: Any) -> QueryResult:
        import psycopg2

        deadline = time.monotonic() + self.timeout
        conn.autocommit = False
        try:
            cur = conn.cursor()
            cur.execute("SET TRANSACTION READ ONLY")  # the transaction's first statement
            cur.execute("SET LOCAL standard_conforming_strings = on")  # backslashes are not escapes
            cur.execute(f"SET LOCAL lock_timeout = {self._ms(deadline)}")
            if self.role:
                # Session-level (not LOCAL): a COMMIT does not drop it; the connection is closed afterwards.
                cur.execute(f'SET ROLE "{self.role}"')
            # A named cursor is DECLARE ... CURSOR FOR <query>: the server itself accepts only a plain
            # query there (no second statement, no data-modifying WITH). Fetch in batches, each under
            # the time left, so the whole query is bounded by the timeout.
            named = conn.cursor(name="fs_readonly_query")
            cur.execute(f"SET LOCAL statement_timeout = {self._ms(deadline)}")
            named.execute(self.sql)
            rows: list[tuple[Any, ...]] = []
            budget = _Budget(self.label)
            while True:
                cur.execute(f"SET LOCAL statement_timeout = {self._ms(deadline)}")
                batch = [tuple(r) for r in named.fetchmany(_FETCH)]
                budget.add(batch)
                rows.extend(batch)
                if len(batch) < _FETCH:
                    break
            columns = [d.name for d in named.description or ()]
            return QueryResult(columns, rows)
        except psycopg2.Error as exc:
            raise self._error(exc) from None
        finally:
            if not conn.closed:
                conn.rollback()  # never commits; also closes the cursors

    def _ms(self, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout()
        return max(1, int(left * 1000))

    def _timeout(self) -> QueryTimeoutError:
        return QueryTimeoutError(f"{self.label}: the query ran longer than its {self.timeout:g} s timeout and was "
                                 "stopped; narrow it (WHERE, LIMIT) or raise the timeout")

    def _error(self, exc: Exception) -> FeatureStoreError:
        code = getattr(exc, "pgcode", None)
        msg = (str(getattr(exc, "pgerror", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        msg = msg.removeprefix("ERROR:").strip()
        if code == "57014":  # query_canceled: our cancel() or statement_timeout
            if self._cancelled.is_set():
                raise KeyboardInterrupt
            return self._timeout()
        if code in ("25006", "42501"):  # read_only_sql_transaction, insufficient_privilege
            return ReadOnlySQLError(f"{self.label} is read-only: the statement tries to write or to read "
                                    f"outside the catalog ({msg})")
        return ReadOnlySQLError(f"{self.label}: SQL error: {msg}")


# ---------------------------------------------------------------------------
# a SELECT-only PostgreSQL role


def create_readonly_role(url: str, name: str, password: str | None = None,
                         timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Create (or update) a PostgreSQL role that can only ``SELECT`` the catalog tables.

    The role gets ``CONNECT`` on the database, ``USAGE`` on the schema holding
    the catalog and ``SELECT`` on its tables, nothing else; its sessions are
    read-only by default and their statements time out after ``timeout``
    seconds. With ``password`` it can log in (use it in
    ``FS_READONLY_DATABASE_URL``); without, it is ``NOLOGIN`` and is used with
    ``FS_READONLY_ROLE`` (the connecting user is made a member so it may
    ``SET ROLE`` to it). Run it again after ``fs db upgrade`` adds tables.

    Returns the statements run (passwords masked), for the record.
    """
    import psycopg2.extensions

    check_role_name(name)
    if dialect_of(url) != "postgres":
        raise InvalidInputError("a read-only role is a PostgreSQL feature; the catalog is SQLite",
                                remedy="sql-reads-sqlite")
    engine = create_engine(url, poolclass=NullPool)
    done: list[str] = []
    try:
        with engine.begin() as conn:
            db = conn.exec_driver_sql("SELECT current_database()").scalar_one()
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
            me = conn.exec_driver_sql("SELECT current_user").scalar_one()
            present = {r[0] for r in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
            tables = sorted(catalog_tables() & present)
            if not tables:
                raise FeatureStoreError(f"no catalog tables in schema {schema} of {db}", remedy="db-upgrade-first")
            found = conn.exec_driver_sql(
                "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR rolreplication "
                "FROM pg_roles WHERE rolname = %s", (name,)).first()
            if found is not None and (found[0] or name == me):
                raise InvalidInputError(f"role {name!r} already exists with more rights than reading (or is the "
                                        "user connected); choose a new name for the read-only role")
            exists = found is not None
            login = "LOGIN PASSWORD " + psycopg2.extensions.adapt(password).getquoted().decode() if password \
                else "NOLOGIN"
            ident = f'"{name}"'
            stmts = [
                f"{'ALTER' if exists else 'CREATE'} ROLE {ident} {login} NOSUPERUSER NOCREATEDB NOCREATEROLE "
                "NOINHERIT NOREPLICATION NOBYPASSRLS",
                f"REVOKE ALL ON ALL TABLES IN SCHEMA \"{schema}\" FROM {ident}",
                f'GRANT CONNECT ON DATABASE "{db}" TO {ident}',
                f'GRANT USAGE ON SCHEMA "{schema}" TO {ident}',
                *(f'GRANT SELECT ON TABLE "{schema}"."{t}" TO {ident}' for t in tables),
                f"ALTER ROLE {ident} SET default_transaction_read_only = on",
                f"ALTER ROLE {ident} SET statement_timeout = {int(timeout * 1000)}",
            ]
            if not password:
                stmts.append(f'GRANT {ident} TO "{me}"')
            for stmt in stmts:
                conn.exec_driver_sql(stmt.replace("%", "%%"))
                done.append(stmt.replace(login, "LOGIN PASSWORD '***'") if password else stmt)
    finally:
        engine.dispose()
    return done
