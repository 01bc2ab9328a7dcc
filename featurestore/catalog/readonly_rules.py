"""What user-written SQL may contain: layer 1 of :mod:`featurestore.catalog.readonly`.

``fs sql`` queries and ``--where`` conditions are parsed with sqlglot in the catalog's dialect and checked
against allow-lists of syntax, functions and the catalog's tables; what runs is SQL regenerated from the
checked tree. :func:`where_is_cacheable` tells whether a checked ``--where`` result may be cached.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import sqlglot
from sqlalchemy.engine import make_url
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from featurestore.errors import FeatureStoreError, InvalidInputError

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
    "run_split_images", "feature_set_versions", "run_feature_versions",
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
