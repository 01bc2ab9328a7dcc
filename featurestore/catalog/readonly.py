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
"""

from __future__ import annotations

import logging
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import sqlglot
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from featurestore.errors import CatalogCorruptError, FeatureStoreError, InvalidInputError

if TYPE_CHECKING:
    from featurestore.config import Settings

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 2_147_483  # seconds: PostgreSQL's statement_timeout is an int of milliseconds
"""Seconds a user query may run (``fs sql --timeout``, ``FS_SQL_TIMEOUT``)."""

# sqlglot logs a warning when it falls back to an opaque Command (VACUUM, EXPLAIN...); such
# statements are refused below with a message of our own, so its warning would only be noise.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


class ReadOnlySQLError(InvalidInputError):
    """User SQL that is not one read-only query, or that the database refused."""


class QueryTimeoutError(FeatureStoreError, TimeoutError):
    """A user query ran longer than its timeout and was stopped."""


# ---------------------------------------------------------------------------
# what a query may contain

_QUERY_ROOTS: tuple[type[exp.Expr], ...] = (exp.Select, exp.Union, exp.Intersect, exp.Except,
                                                  exp.Values, exp.Subquery)

# Exact node types (not subclasses) a query may be built from.
_STRUCTURE = {
    exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Values, exp.Subquery, exp.From, exp.Join,
    exp.Where, exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit, exp.Offset, exp.Fetch,
    exp.Column, exp.Identifier, exp.Table, exp.TableAlias, exp.Alias, exp.Star, exp.Literal,
    exp.Boolean, exp.Null, exp.Paren, exp.Tuple, exp.With, exp.CTE, exp.Distinct, exp.Window,
    exp.WindowSpec, exp.Interval, exp.Var, exp.DataType, exp.DataTypeParam, exp.Filter, exp.WithinGroup,
    exp.Case, exp.If, exp.Cast, exp.TryCast, exp.Escape, exp.Bracket,
    # operators
    exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.And, exp.Or,
    exp.Xor, exp.Not, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.IntDiv, exp.Mod, exp.Neg, exp.DPipe,
    exp.Like, exp.ILike, exp.Glob, exp.SimilarTo, exp.RegexpLike, exp.RegexpILike, exp.In, exp.Between,
    exp.Is, exp.Exists, exp.Any, exp.All, exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseXor, exp.BitwiseNot,
    exp.BitwiseLeftShift, exp.BitwiseRightShift,
    # JSON paths (params->>'k', json_extract(params, '$.k'))
    exp.JSONPath, exp.JSONPathKey, exp.JSONPathRoot, exp.JSONPathSubscript, exp.JSONPathWildcard,
}

# Functions sqlglot knows by type: pure computations on their arguments.
_FUNCTIONS = {
    # aggregates
    exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Stddev, exp.StddevPop, exp.StddevSamp,
    exp.Variance, exp.VariancePop, exp.GroupConcat, exp.ArrayAgg, exp.PercentileCont, exp.PercentileDisc,
    exp.Median, exp.AnyValue, exp.CountIf, exp.LogicalAnd, exp.LogicalOr, exp.Corr, exp.CovarPop,
    exp.CovarSamp,
    # window
    exp.RowNumber, exp.Rank, exp.DenseRank, exp.PercentRank, exp.CumeDist, exp.Ntile, exp.Lag, exp.Lead,
    exp.FirstValue, exp.LastValue, exp.NthValue,
    # strings
    exp.Lower, exp.Upper, exp.Length, exp.Substring, exp.Trim, exp.Replace, exp.Concat, exp.ConcatWs,
    exp.StrPosition, exp.Left, exp.Right, exp.Pad, exp.SplitPart, exp.RegexpExtract, exp.RegexpReplace,
    exp.Initcap, exp.Reverse, exp.Chr, exp.Unicode, exp.Hex,
    # numbers
    exp.Abs, exp.Round, exp.Floor, exp.Ceil, exp.Sqrt, exp.Ln, exp.Log, exp.Exp, exp.Pow, exp.Sign,
    exp.Greatest, exp.Least, exp.Cbrt, exp.Rand,
    # conditionals and types
    exp.Coalesce, exp.Nullif, exp.Typeof,
    # dates
    exp.CurrentDate, exp.CurrentTimestamp, exp.CurrentTime, exp.Extract, exp.DateTrunc, exp.TimestampTrunc,
    exp.TimeToStr, exp.StrToTime, exp.StrToDate, exp.Date, exp.Datetime, exp.TsOrDsToTimestamp,
    exp.TsOrDsToDate, exp.DateDiff, exp.DateAdd, exp.DateSub, exp.TimeStrToTime, exp.UnixToTime,
    exp.TimeToUnix,
    # JSON
    exp.JSONExtract, exp.JSONExtractScalar, exp.JSONBExtract, exp.JSONBExtractScalar, exp.ParseJSON,
}

ALLOWED_FUNCTIONS = frozenset({
    # Functions sqlglot does not model, by lowercase name. Pure: they read nothing but their
    # arguments and write nothing (no file, setting, lock, sleep, large object or remote call).
    "now", "age", "date_part", "to_char", "to_date", "to_timestamp", "to_number", "justify_interval",
    "make_date", "format", "lpad", "rpad", "ltrim", "rtrim", "btrim", "strpos", "position", "char_length",
    "octet_length", "bit_length", "md5", "regexp_match", "regexp_matches", "regexp_split_to_array",
    "string_to_array", "array_to_string", "array_length", "cardinality",
    "jsonb_typeof", "json_typeof", "jsonb_array_length", "json_array_length", "jsonb_object_keys_count",
    "width_bucket", "trunc", "div", "log10", "log2", "degrees", "radians", "pi", "power", "mod",
    "bool_and", "bool_or", "every", "string_agg", "regr_slope", "regr_intercept", "mode",
    "printf", "strftime", "julianday", "datetime", "time", "unixepoch", "instr", "ifnull", "iif",
    "total", "substr", "quote", "char", "unicode", "like", "glob", "likely", "unlikely", "likelihood",
    "json", "json_valid", "json_type", "json_extract", "json_object", "json_array",
    "json_quote", "json_group_array", "json_group_object",
})

# Names the SQLite authorizer lets a query call (what SQLite sees after sqlglot regenerated the SQL).
_SQLITE_FUNCTIONS = frozenset({
    "abs", "avg", "char", "coalesce", "count", "date", "datetime", "format", "glob", "group_concat",
    "hex", "ifnull", "iif", "instr", "json", "json_array", "json_array_length", "json_extract",
    "json_group_array", "json_group_object", "json_object", "json_quote", "json_type", "json_valid",
    "julianday", "length", "like", "likelihood", "likely", "lower", "ltrim", "max", "min", "nullif",
    "printf", "quote", "random", "replace", "round", "rtrim", "sign", "strftime", "string_agg", "substr",
    "substring", "sum", "time", "total", "trim", "typeof", "unicode", "unixepoch", "unlikely", "upper",
    "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead",
    "first_value", "last_value", "nth_value", "acos", "asin", "atan", "ceil", "ceiling", "cos", "exp",
    "floor", "ln", "log", "log10", "log2", "mod", "pi", "pow", "power", "sin", "sqrt", "tan", "trunc",
    "concat", "concat_ws", "->", "->>",
})

# The one statement kinds people try, named in the refusal.
_STATEMENT_NAMES: dict[type[exp.Expr], str] = {
    exp.Insert: "INSERT", exp.Update: "UPDATE", exp.Delete: "DELETE", exp.Merge: "MERGE", exp.Copy: "COPY",
    exp.Create: "CREATE", exp.Drop: "DROP", exp.Alter: "ALTER", exp.Into: "SELECT INTO",
    exp.Lock: "FOR UPDATE/FOR SHARE", exp.Pragma: "PRAGMA", exp.Attach: "ATTACH", exp.Detach: "DETACH",
    exp.Set: "SET", exp.Transaction: "BEGIN", exp.Commit: "COMMIT", exp.Rollback: "ROLLBACK",
    exp.Use: "USE", exp.Grant: "GRANT", exp.Lateral: "LATERAL", exp.Placeholder: "a parameter placeholder",
    exp.Parameter: "a parameter", exp.Dot: "a schema-qualified function",
}

_TOP_LEVEL = "one read-only query (SELECT, WITH ... SELECT, UNION/INTERSECT/EXCEPT or VALUES)"


# The tables of catalog/schema.py, named here so that checking a query needs no ORM import (`fs sql`
# starts in less time); tests/test_cli_imports.py fails when this and the schema disagree.
_SCHEMA_TABLES = frozenset({
    "dataset_members", "datasets", "feature_rows", "feature_sets", "feature_shards", "images", "ingest_errors",
    "models", "predictions", "run_splits", "run_test_predictions", "runs", "vector_indexes",
    "audit_findings", "catalog_version", "label_changes", "label_reviews", "run_images", "run_notes", "run_oof",
    "run_split_images",
    "feature_set_versions", "run_feature_versions",
})


def catalog_tables() -> frozenset[str]:
    """The tables user SQL may read: the catalog's own (see ``fs sql --help``)."""
    return _SCHEMA_TABLES | {"alembic_version"}


def dialect_of(url: str) -> str:
    """sqlglot dialect of a catalog URL: ``"sqlite"`` or ``"postgres"``."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return "sqlite"
    if backend == "postgresql":
        return "postgres"
    raise InvalidInputError(f"read-only SQL supports SQLite and PostgreSQL catalogs, not {backend}")


def _describe(node: exp.Expr) -> str:
    for kind, name in _STATEMENT_NAMES.items():
        if type(node) is kind:
            return name
    if isinstance(node, exp.Command):
        return str(node.this).upper()
    if isinstance(node, exp.GenerateSeries):  # sqlglot writes FROM generate_series(...) as unnest(...)
        return "function generate_series()"
    if isinstance(node, exp.Unnest | exp.Explode) and node.expressions:
        return _describe(node.expressions[0])
    if isinstance(node, exp.Anonymous):
        return f"function {node.name}()"
    if isinstance(node, exp.Func):
        return f"function {node.sql().split('(')[0].strip().lower()}()"
    return f"{type(node).__name__} syntax"


def _refuse(label: str, what: str) -> ReadOnlySQLError:
    return ReadOnlySQLError(f"{label} is read-only: {what} is not allowed; it runs {_TOP_LEVEL} on the catalog "
                            "tables, with plain functions only (aggregates, string, math, date, JSON)")


def _check_tree(tree: exp.Expr, label: str, tables: frozenset[str]) -> None:
    """Refuse any node outside the allow-lists, and tables other than the catalog's and the CTEs."""
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        kind = type(node)
        if isinstance(node, exp.Anonymous):
            if str(node.this).lower() not in ALLOWED_FUNCTIONS:
                raise _refuse(label, _describe(node))
        elif kind not in _STRUCTURE and kind not in _FUNCTIONS:
            raise _refuse(label, _describe(node))
        if kind is exp.Table:
            _check_table(node, label, tables, ctes)


def _check_table(node: exp.Expr, label: str, tables: frozenset[str], ctes: set[str]) -> None:
    name = node.this
    if not isinstance(name, exp.Identifier):  # a function in FROM: generate_series(), pg_ls_dir()...
        raise _refuse(label, _describe(name) if isinstance(name, exp.Expr) else "this FROM item")
    if node.args.get("db") or node.args.get("catalog"):
        raise _refuse(label, f"table {node.sql()} (schema-qualified)")
    table = name.name.lower()
    if table not in tables and table not in ctes:
        raise ReadOnlySQLError(
            f"{label}: unknown table {name.name!r}; the catalog tables are {', '.join(sorted(tables))}"
        )


def _parse_error(label: str, exc: Exception) -> ReadOnlySQLError:
    errors = getattr(exc, "errors", None) or []
    if errors:
        e = errors[0]
        where = f" (line {e.get('line')}, column {e.get('col')})" if e.get("line") else ""
        return ReadOnlySQLError(f"{label}: SQL error: {e.get('description', 'invalid SQL')}{where}")
    first = str(exc).strip().splitlines()
    return ReadOnlySQLError(f"{label}: SQL error: {first[0] if first else type(exc).__name__}")


def _regenerate(tree: exp.Expr, dialect: str, label: str, tables: frozenset[str]) -> str:
    """SQL text of a checked tree, itself re-checked as the database will read it.

    The text must parse back to exactly one statement that passes the same
    allow-lists and generates the same text again (a fixpoint), so what runs
    is what was checked even where sqlglot normalises (``round(1.5, 0)`` gains
    a cast on PostgreSQL).
    """
    sql = tree.sql(dialect=dialect, comments=False)
    try:
        again = [t for t in sqlglot.parse(sql, read=dialect) if t is not None]
    except (ParseError, TokenError):
        again = []
    if len(again) != 1 or not isinstance(again[0], _QUERY_ROOTS) \
            or again[0].sql(dialect=dialect, comments=False) != sql:
        raise ReadOnlySQLError(f"{label}: the query cannot be checked reliably (it does not round-trip through "
                               "the SQL parser); rewrite it more plainly")
    _check_tree(again[0], label, tables)
    return sql


def _too_deep(label: str) -> ReadOnlySQLError:
    return ReadOnlySQLError(f"{label}: SQL error: the expression is nested too deeply for the SQL parser "
                            f"(more than about {sys.getrecursionlimit() // 10:,} levels); write it more plainly")


def check_query(sql: str, dialect: str, label: str = "read-only SQL", tables: Iterable[str] | None = None
                ) -> str:
    """Check that ``sql`` is one allow-listed query and return the SQL text to run.

    Parameters
    ----------
    sql : str
        What the user typed.
    dialect : {"sqlite", "postgres"}
    label : str
        How messages name the input (e.g. ``"fs sql"``).
    tables : iterable of str, optional
        Tables the query may read; default :func:`catalog_tables`.

    Raises
    ------
    ReadOnlySQLError
        Not exactly one statement, not a query, or a construct outside the
        allow-lists; the message names it.
    """
    try:
        return _check_query(sql, dialect, label, tables)
    except RecursionError:  # the parser and the tree checks recurse once per nesting level
        raise _too_deep(label) from None


def _check_query(sql: str, dialect: str, label: str, tables: Iterable[str] | None) -> str:
    allowed = frozenset(t.lower() for t in tables) if tables is not None else catalog_tables()
    try:
        trees = [t for t in sqlglot.parse(sql or "", read=dialect) if t is not None]
    except (ParseError, TokenError) as exc:
        raise _parse_error(label, exc) from None
    if not trees:
        raise ReadOnlySQLError(f"{label}: no SQL given; write {_TOP_LEVEL}")
    if len(trees) > 1:
        kinds = ", ".join(_describe(t) if not isinstance(t, _QUERY_ROOTS) else "SELECT" for t in trees)
        raise ReadOnlySQLError(f"{label} is read-only: it runs exactly one statement, got {len(trees)} "
                               f"({kinds}); remove the semicolons")
    tree = trees[0]
    if not isinstance(tree, _QUERY_ROOTS):
        if type(tree) in _STATEMENT_NAMES or isinstance(tree, exp.Command):
            raise _refuse(label, _describe(tree))
        raise ReadOnlySQLError(f"{label}: SQL error: not a query: {sql.strip()[:80]!r}")
    _check_tree(tree, label, allowed)
    return _regenerate(tree, dialect, label, allowed)


# Images as --where sees them: one row per dataset an image belongs to (dataset_members), with the
# dataset's id and name; the ids are returned once each.
_WHERE_COLUMNS = ("id", "sha256", "source_path", "width", "height", "format", "mode", "bytes", "label",
                  "superclass", "ingested_at")


def where_query(condition: str, dialect: str, label: str = "--where") -> str:
    """The fixed ``SELECT DISTINCT id`` of the images matching ``condition``, as SQL text to run.

    The condition is parsed as one SQL expression over the columns of
    ``images`` plus ``dataset_id`` and ``dataset`` (the name) of each dataset
    the image belongs to; it is placed into the
    query as a syntax tree, so it cannot close a parenthesis or start another
    statement.
    """
    cond = (condition or "").strip()
    if not cond:
        raise ReadOnlySQLError(f"{label} needs a SQL condition, e.g. label = 'sneaker'")
    bad = f"bad {label} condition {cond[:200]!r}"
    try:
        return _where_query(cond, dialect, bad)
    except RecursionError:
        raise _too_deep(bad) from None


def _where_query(cond: str, dialect: str, bad: str) -> str:
    try:
        tokens = sqlglot.tokenize(cond, read=dialect)
    except TokenError as exc:
        raise _parse_error(bad, exc) from None
    if any(t.token_type == TokenType.SEMICOLON for t in tokens):
        raise ReadOnlySQLError(f"{bad}: a condition is one SQL expression; ';' (a second statement) is not allowed")
    try:
        tree = sqlglot.condition(cond, dialect=dialect)
    except (ParseError, TokenError) as exc:
        raise _parse_error(bad, exc) from None
    _check_tree(tree, bad, catalog_tables())
    columns = [exp.column(c, table="i") for c in _WHERE_COLUMNS]
    member = exp.EQ(this=exp.column("image_id", table="m"), expression=exp.column("id", table="i"))
    named = exp.EQ(this=exp.column("id", table="d"), expression=exp.column("dataset_id", table="m"))
    images = (exp.select(*columns, exp.column("dataset_id", table="m"),
                         exp.alias_(exp.column("name", table="d"), "dataset"))
              .from_(exp.table_("images", alias="i"))
              .join(exp.table_("dataset_members", alias="m"), on=member)
              .join(exp.table_("datasets", alias="d"), on=named))
    query = (exp.select(exp.column("id", table="images")).distinct()
             .from_(images.subquery("images")).where(tree))
    return _regenerate(query, dialect, bad, catalog_tables())


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
            raise FeatureStoreError(f"no catalog at {self.path}: run `fs ingest PATH` first, or pass --store")
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
        raise InvalidInputError("a read-only role is a PostgreSQL feature; the catalog is SQLite, which "
                                "`fs sql` already opens read-only")
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
                raise FeatureStoreError(f"no catalog tables in schema {schema} of {db}: run `fs db upgrade` first")
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


# ---------------------------------------------------------------------------
# whether a --where result may be cached (issue 31)

# Tables the catalog's change counter covers (migration 0012) and that where_query reads itself.
_VERSIONED = frozenset({"images", "datasets", "dataset_members"})
_VOLATILE_NODES = (exp.Rand, exp.CurrentDate, exp.CurrentTimestamp, exp.CurrentTime)
_VOLATILE_NAMES = frozenset({"now", "age", "random", "clock_timestamp", "statement_timestamp",
                             "transaction_timestamp", "timeofday"})
# date('now'), 'now'::timestamp, julianday(): the clock through a literal or a call without arguments
_CLOCK_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})
_CLOCK_FUNCTIONS = frozenset({"date", "datetime", "time", "julianday", "unixepoch", "strftime"})


def where_is_cacheable(condition: str, dialect: str) -> bool:
    """Whether a checked ``--where`` condition gives the same ids until the catalog's change counter moves.

    False when it reads a table the counter does not cover (a subquery on
    ``predictions``, ``runs``...) or the clock or a random number; such a
    condition is run again for every search. Call after :func:`where_query`
    accepted it.
    """
    try:
        tree = sqlglot.condition(condition.strip(), dialect=dialect)
    except (ParseError, TokenError):
        return False
    for node in tree.walk():
        if isinstance(node, exp.Table) and node.name.lower() not in _VERSIONED:
            return False
        if isinstance(node, _VOLATILE_NODES):
            return False
        if isinstance(node, exp.Literal) and node.is_string and node.this.strip().lower() in _CLOCK_WORDS:
            return False
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name in _VOLATILE_NAMES:
                return False
            given = node.expressions if isinstance(node, exp.Anonymous) else [v for v in node.args.values() if v]
            if name in _CLOCK_FUNCTIONS and not given:
                return False
    return True
