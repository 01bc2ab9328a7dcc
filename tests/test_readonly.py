"""catalog/readonly.py: what user SQL may contain, and the connection-level guards on their own.

The escapes of issue 11 replayed end to end through the CLI are in test_adversarial.py.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlglot
from conftest import PG_URL, _pg_database
from sqlglot import exp

from featurestore.catalog.readonly import (
    ReadOnlyCatalog,
    ReadOnlySQLError,
    _PostgresRunner,
    _SQLiteRunner,
    catalog_tables,
    check_query,
    dialect_of,
    where_query,
)
from featurestore.store import Store

DIALECTS = ["sqlite", "postgres"]

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_queries() -> list[str]:
    text = README.read_text()
    found = re.findall(r'fs sql "(.*?)"', text, flags=re.S)
    return [" ".join(q.split()) for q in found if "..." not in q]


ALLOWED = [
    "SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY n DESC LIMIT 5",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r",
    "SELECT DISTINCT label FROM images UNION SELECT label FROM predictions",
    "SELECT label, row_number() OVER (PARTITION BY label ORDER BY id) AS k FROM images",
    "SELECT id FROM images i WHERE NOT EXISTS (SELECT 1 FROM feature_rows f WHERE f.image_id = i.id)",
    "SELECT coalesce(label, '?') AS l, lower(source_path), length(sha256), round(1.5, 0) FROM images",
    "SELECT CASE WHEN width > height THEN 'landscape' ELSE 'portrait' END AS shape FROM images",
    "VALUES (1, 'a')",
    "SELECT 1;",
]

REFUSED = [
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("COMMIT; BEGIN READ WRITE; DELETE FROM feature_rows; COMMIT; SELECT 1", "exactly one statement"),
    ("DELETE FROM images", "DELETE"),
    ("UPDATE images SET label = 'x'", "UPDATE"),
    ("INSERT INTO datasets (name) VALUES ('x')", "INSERT"),
    ("DROP TABLE images", "DROP"),
    ("COPY images TO '/tmp/x.csv'", "COPY"),
    ("SELECT * INTO stolen FROM images", "SELECT INTO"),
    ("SELECT * FROM images FOR UPDATE", "FOR UPDATE"),
    ("WITH gone AS (DELETE FROM images RETURNING id) SELECT count(*) FROM gone", "DELETE"),
    ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "schema-qualified function"),
    ("SELECT lo_import('/etc/passwd')", "lo_import"),
    ("SELECT lo_export(1, '/tmp/x')", "lo_export"),
    ("SELECT set_config('default_transaction_read_only', 'off', false)", "set_config"),
    ("SELECT pg_sleep(100)", "pg_sleep"),
    ("SELECT dblink_exec('host=x', 'DROP TABLE images')", "dblink_exec"),
    ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
    ("SELECT * FROM generate_series(1, 10)", "generate_series"),
    ("SELECT load_extension('evil')", "load_extension"),
    ("SELECT randomblob(1000000000)", "randomblob"),
    ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
    ("VACUUM INTO '/tmp/x.db'", "VACUUM"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
    ("PRAGMA query_only = 0", "PRAGMA"),
    ("SELECT * FROM public.images", "schema-qualified"),
    ("SELECT * FROM sqlite_master", "unknown table 'sqlite_master'"),
    ("SELECT * FROM pg_authid", "unknown table 'pg_authid'"),
    ("", "no SQL given"),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("sql", ALLOWED + _readme_queries())
def test_plain_queries_and_the_readme_examples_are_allowed(dialect: str, sql: str) -> None:
    checked = check_query(sql, dialect, "fs sql")
    assert ";" not in checked.rstrip(";") or "'" in checked  # one statement (a ';' only inside a literal)


def test_the_readme_has_sql_examples() -> None:
    assert len(_readme_queries()) >= 4


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(("sql", "named"), REFUSED)
def test_everything_else_is_refused_by_name(dialect: str, sql: str, named: str) -> None:
    with pytest.raises(ReadOnlySQLError) as info:
        check_query(sql, dialect, "fs sql")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("fs sql")
    if named == "ATTACH" and dialect == "postgres":
        named = "SQL error"  # not PostgreSQL syntax at all
    assert named.lower() in msg.lower(), msg


@pytest.mark.parametrize("dialect", DIALECTS)
def test_comments_never_reach_the_database(dialect: str) -> None:
    checked = check_query("SELECT label -- a comment with ; and */\nFROM images /* another */", dialect, "fs sql")
    assert checked == "SELECT label FROM images"


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    "cond",
    [
        "1=1; DELETE FROM images",
        "1=1; COMMIT; BEGIN READ WRITE; INSERT INTO datasets (name) VALUES ('x'); COMMIT",
        "label = 'x') OR (1=1",
        "1=1) AS x; UPDATE images SET label = 'x' --",
        "pg_sleep(100) IS NULL",
        "id IN (SELECT image_id FROM predictions); DROP TABLE images",
        "EXISTS (SELECT lo_import('/etc/passwd'))",
        "",
    ],
)
def test_where_conditions_cannot_leave_their_expression(dialect: str, cond: str) -> None:
    with pytest.raises(ReadOnlySQLError) as info:
        where_query(cond, dialect)
    assert "\n" not in str(info.value) and "--where" in str(info.value)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_where_condition_is_embedded_as_a_tree(dialect: str) -> None:
    sql = where_query("label = 'sneaker' AND id IN (SELECT image_id FROM predictions WHERE run_id = 3)", dialect)
    assert sql.startswith("SELECT DISTINCT images.id FROM (SELECT i.id")
    assert sql.endswith("WHERE label = 'sneaker' AND id IN (SELECT image_id FROM predictions WHERE run_id = 3)")


def test_catalog_tables_are_the_schema() -> None:
    assert {"images", "datasets", "predictions", "feature_rows", "runs"} <= catalog_tables()


# --- the parser and the database read the same literals ------------------------------------------

_PIECES = ["'", "''", "\\", ";", "$$", "$x$", '"', "--", "/*", "*/", "E'", "\n", "a", " ", "%s", "%", "\\'"]


def _random_literal(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 8)))


def test_literals_reach_the_database_as_the_parser_read_them(store: Store) -> None:
    """Fuzz: a string literal the checker accepts is one value in the database, never code."""
    url = store.settings.catalog_url
    dialect = dialect_of(url)
    ro = ReadOnlyCatalog(url, timeout=30)
    before = _counts(url)
    rng = random.Random(11)
    for _ in range(60):  # literals as sqlglot writes them
        value = _random_literal(rng)
        sql = "SELECT " + exp.Literal.string(value).sql(dialect=dialect) + " AS v"
        assert ro.query(sql, "fs sql").rows == [(value,)], (value, sql)
    compared = 0
    for _ in range(200):  # text typed by a person, read however the parser reads it
        text = "SELECT '" + _random_literal(rng) + "' AS v"
        try:
            (tree,) = sqlglot.parse(check_query(text, dialect, "fs sql"), read=dialect)
        except (ReadOnlySQLError, ValueError):
            continue
        try:
            rows = ro.query(text, "fs sql").rows
        except ReadOnlySQLError:  # e.g. 'a' 'b' becomes CONCAT, which an older SQLite lacks: refused, not run
            continue
        assert len(rows) == 1
        literal = tree.expressions[0].this if len(tree.expressions) == 1 else None
        if isinstance(literal, exp.Literal) and literal.is_string:
            assert rows[0] == (literal.this,), (text, rows)
            compared += 1
    assert compared >= 20
    assert _counts(url) == before


# --- the connection alone, without the parser ------------------------------------------------------


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one() for t in sorted(catalog_tables())}
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "raw",
    [
        "ATTACH DATABASE '{tmp}/attached.db' AS other",
        "VACUUM INTO '{tmp}/vacuumed.db'",
        "INSERT INTO datasets (name, created_at) VALUES ('pwned', CURRENT_TIMESTAMP)",
        "DELETE FROM images",
        "PRAGMA query_only = 0",
        "SELECT load_extension('{tmp}/evil')",
        "CREATE TABLE t (x)",
    ],
)
def test_sqlite_connection_alone_refuses_writes_and_files(tmp_path: Path, raw: str) -> None:
    store = Store.open(create=True)
    store.close()
    before = _counts(store.settings.catalog_url)
    files = {f for f in tmp_path.rglob("*") if not f.name.endswith(("-wal", "-shm"))}
    runner = _SQLiteRunner(tmp_path / ".fs" / "catalog.db", raw.format(tmp=tmp_path), 30, "raw")
    with pytest.raises(ReadOnlySQLError) as info:
        runner.run()
    assert "\n" not in str(info.value)
    # no attached / vacuumed / extension file (SQLite's own -wal/-shm of the WAL catalog aside)
    assert {f for f in tmp_path.rglob("*") if not f.name.endswith(("-wal", "-shm"))} == files
    assert _counts(store.settings.catalog_url) == before


@pytest.fixture
def pg_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL catalog database (FS_DATABASE_URL points at it)."""
    if not PG_URL:
        pytest.skip("FS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    for url in _pg_database():
        monkeypatch.setenv("FS_DATABASE_URL", url)
        Store.open(create=True).close()
        yield url


@pytest.mark.postgres
@pytest.mark.parametrize(
    "raw",
    [
        "INSERT INTO datasets (name, created_at) VALUES ('pwned', now())",
        "WITH gone AS (DELETE FROM images RETURNING id) SELECT count(*) FROM gone",
        "COPY (SELECT 1) TO '/tmp/fs-readonly-copy-{uid}'",
        "SELECT 1; INSERT INTO datasets (name, created_at) VALUES ('pwned', now())",
    ],
)
def test_postgres_connection_alone_refuses_writes(pg_url: str, raw: str) -> None:
    """Without the parser: the READ ONLY transaction and DECLARE CURSOR refuse these on their own."""
    uid = uuid.uuid4().hex
    before = _counts(pg_url)
    with pytest.raises(ReadOnlySQLError) as info:
        _PostgresRunner(pg_url, raw.format(uid=uid), 30, "raw", None).run()
    assert "\n" not in str(info.value)
    assert _counts(pg_url) == before
    assert not Path(f"/tmp/fs-readonly-copy-{uid}").exists()
