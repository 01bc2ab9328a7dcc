"""Issue 11, replayed: every trial that broke, as an attacker or an unlucky user would run it.

Each test asserts the one-line error (or the exit code), that nothing was written
(catalog row counts, files) and that nothing hangs (runaway work runs in a
subprocess or a helper thread with a bound, and is checked to have stopped).
SQL escapes run on both catalogs (SQLite and PostgreSQL).
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from typer.testing import CliRunner

from featurestore.catalog.readonly import (
    QueryTimeoutError,
    ReadOnlyCatalog,
    ReadOnlySQLError,
    _PostgresRunner,
    catalog_tables,
)
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.features.pixels import MAX_VECTOR_BYTES, check_pixels
from featurestore.features.projection import check_projection
from featurestore.features.resize import check_size
from featurestore.io.images import ImageDecodeError, read_bytes
from helpers import make_image

runner = CliRunner()
RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
BOUND = 120  # seconds a runaway trial may take before the test calls it a hang


def fs(*args: str) -> Any:
    return runner.invoke(app, list(args))


def one_line_error(result: Any, code: int = 1) -> str:
    """The ``Error: ...`` line of a failed command (and that it is the only stderr line, with no traceback)."""
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    return err


def _url(tmp_path: Path, backend_url: str | None) -> str:
    return backend_url or f"sqlite:///{tmp_path / '.fs' / 'catalog.db'}"


def counts(url: str) -> dict[str, int]:
    """Rows of every catalog table (the trial's "nothing was written")."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one() for t in sorted(catalog_tables())}
    finally:
        engine.dispose()


def files(root: Path) -> set[Path]:
    """Files under ``root``, SQLite's own -wal/-shm journal files aside."""
    return {f for f in root.rglob("*") if not f.name.endswith(("-wal", "-shm"))}


def in_thread(fn: Callable[[], Any], bound: float = BOUND) -> Any:
    """Run ``fn`` in a helper thread; fail (instead of hanging) if it has not returned within ``bound``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"still running after {bound} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def ingested(tmp_path: Path, backend_url: str | None, image_tree: Path) -> str:
    """12 images ingested and extracted (rp8 at 16x12); returns the catalog URL."""
    assert fs("ingest", str(image_tree)).exit_code == 0
    result = fs("extract", "--rp", "8", "--size", "16x12")
    assert result.exit_code == 0, result.output
    return _url(tmp_path, backend_url)


def _server_file() -> Path:
    """A path the PostgreSQL server could write to if an escape worked (world-writable /tmp)."""
    return Path(f"/tmp/fs-adversarial-{uuid.uuid4().hex}")


# ---------------------------------------------------------------------------------------------
# 1. fs sql and --where are read-only, on both catalogs

SQL_ESCAPES = [
    "COMMIT; BEGIN READ WRITE; INSERT INTO datasets (name, created_at) VALUES ('pwned', CURRENT_TIMESTAMP); "
    "COMMIT; SELECT 1",
    "COMMIT; BEGIN READ WRITE; DELETE FROM feature_rows; COMMIT; SELECT 1",
    "SELECT 1; DELETE FROM feature_rows",
    "DELETE FROM feature_rows",
    "COPY images TO '{server}'",
    "COPY (SELECT 1) TO PROGRAM 'touch {server}'",
    "SELECT * INTO stolen FROM images",
    "WITH gone AS (DELETE FROM feature_rows RETURNING image_id) SELECT count(*) FROM gone",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '{server}')",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_sleep(3600)",
    "SELECT * FROM images FOR UPDATE",
    "ATTACH DATABASE '{tmp}/attached.db' AS other",
    "VACUUM INTO '{tmp}/vacuumed.db'",
    "PRAGMA query_only = 0",
    "SELECT load_extension('{tmp}/evil')",
    "SELECT * FROM sqlite_master",
]


@pytest.mark.parametrize("attack", SQL_ESCAPES)
def test_fs_sql_escapes_write_nothing(ingested: str, tmp_path: Path, attack: str) -> None:
    server = _server_file()
    before, here = counts(ingested), files(tmp_path)
    result = fs("sql", attack.format(tmp=tmp_path, server=server))
    err = one_line_error(result)
    assert err.startswith("Error: fs sql")
    assert counts(ingested) == before
    assert files(tmp_path) == here  # no attached, vacuumed or copied file
    assert not server.exists()


WHERE_ESCAPES = [
    "1=1; COMMIT; BEGIN READ WRITE; INSERT INTO datasets (name, created_at) VALUES ('pwned', CURRENT_TIMESTAMP); "
    "COMMIT",
    "1=1; DELETE FROM feature_rows",
    "1=1) AS x; DELETE FROM feature_rows --",
    "id IN (SELECT 1); COPY images TO '{server}'",
    "EXISTS (SELECT lo_export(1, '{server}'))",
    "pg_sleep(3600) IS NULL",
]


@pytest.mark.parametrize("attack", WHERE_ESCAPES)
def test_where_escapes_write_nothing(ingested: str, tmp_path: Path, attack: str) -> None:
    server = _server_file()
    before = counts(ingested)
    result = fs("search", "-F", "rp8", "--id", "1", "--where", attack.format(server=server))
    assert "--where" in one_line_error(result)
    assert counts(ingested) == before
    assert not server.exists()


def test_where_still_filters(ingested: str) -> None:
    result = fs("search", "-F", "rp8", "--id", "1", "-f", "json", "--where", "label = 'sandal' AND id > 0")
    assert result.exit_code == 0, result.output
    sandals = json.loads(fs("sql", "SELECT id FROM images WHERE label = 'sandal'", "-f", "json").stdout)
    assert len(sandals) == 4
    assert {r["image_id"] for r in json.loads(result.stdout)} == {r["id"] for r in sandals} - {1}


def test_runaway_query_is_stopped_by_the_timeout(ingested: str) -> None:
    result = in_thread(lambda: fs("sql", RUNAWAY, "--timeout", "1"))
    assert "1 s timeout" in one_line_error(result)


def test_runaway_where_is_stopped_by_the_sql_timeout(ingested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_SQL_TIMEOUT", "1")
    cond = "id IN (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r)"
    result = in_thread(lambda: fs("search", "-F", "rp8", "--id", "1", "--where", cond))
    assert "timeout" in one_line_error(result)


def _query_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fs-readonly-sql" and t.is_alive()]


def _running_on_server(url: str) -> int:
    if not url.startswith("postgresql"):
        return 0
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return c.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
                "AND query LIKE %s AND pid <> pg_backend_pid()", ("%RECURSIVE%",)).scalar_one()
    finally:
        engine.dispose()


def test_ctrl_c_cancels_the_running_query(ingested: str) -> None:
    ro = ReadOnlyCatalog(ingested, timeout=3600)
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ro.query(RUNAWAY, "fs sql")
    finally:
        timer.cancel()
    for t in _query_threads():
        t.join(BOUND)
    assert not _query_threads(), "the query kept running after Ctrl-C"
    assert _running_on_server(ingested) == 0


def test_timeout_holds_off_the_main_thread_too(ingested: str) -> None:
    """The HTTP service runs --where in worker threads: the database-side deadline bounds it there."""
    ro = ReadOnlyCatalog(ingested, timeout=1)
    with pytest.raises(QueryTimeoutError):
        in_thread(lambda: ro.query(RUNAWAY, "fs sql"))
    assert _running_on_server(ingested) == 0


@pytest.mark.parametrize(("sig", "code", "message"), [
    (signal.SIGTERM, 143, "Terminated (SIGTERM); everything written so far is kept."),
    (signal.SIGINT, 130, "Interrupted; everything written so far is kept."),
])
def test_signals_stop_fs_with_a_message(ingested: str, sig: int, code: int, message: str) -> None:
    script = ("import sys\nfrom featurestore.cli.main import main\n"
              f"sys.argv = ['fs', 'sql', {RUNAWAY!r}, '--timeout', '3600']\n"
              "print('ready', file=sys.stderr, flush=True)\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None and proc.stderr.readline().strip() == "ready"
        threading.Event().wait(2.0)  # main() installs its handlers, then the query runs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=BOUND)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip() == message


# ---------------------------------------------------------------------------------------------
# a SELECT-only PostgreSQL role


# Roles are a PostgreSQL feature (the SQLite case is test_readonly_role_on_sqlite_says_why).
postgres_only = pytest.mark.parametrize("backend_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                                        indirect=True)


@pytest.fixture
def role_name(backend_url: str | None) -> Iterator[str]:
    assert backend_url is not None
    name = f"fs_ro_{uuid.uuid4().hex[:10]}"
    yield name
    engine = sa.create_engine(backend_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            if c.exec_driver_sql("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).first():
                c.exec_driver_sql(f'DROP OWNED BY "{name}"')
                c.exec_driver_sql(f'DROP ROLE "{name}"')
    finally:
        engine.dispose()


ESCAPE = ("SELECT 1; COMMIT; BEGIN READ WRITE; INSERT INTO datasets (name, created_at) VALUES ('pwned', now()); "
          "COMMIT; SELECT 1")
ESCAPE_RESET = ("SELECT 1; COMMIT; RESET ROLE; BEGIN READ WRITE; INSERT INTO datasets (name, created_at) "
                "VALUES ('pwned', now()); COMMIT; SELECT 1")


def _escape_as(url: str, role: str | None, sql: str = ESCAPE) -> str:
    """A multi-statement escape sent straight to the database, past the parser: what the role alone stops."""
    with pytest.raises(ReadOnlySQLError) as info:
        _PostgresRunner(url, sql, 30, "raw", role).run()
    return str(info.value)


@postgres_only
def test_readonly_role_nologin(ingested: str, role_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = fs("db", "create-readonly-role", role_name)
    assert result.exit_code == 0, result.output
    assert f"export FS_READONLY_ROLE={role_name}" in result.stderr
    monkeypatch.setenv("FS_READONLY_ROLE", role_name)
    ok = fs("sql", "SELECT count(*) AS n FROM images", "-f", "json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == [{"n": 12}]
    before = counts(ingested)
    assert "permission denied" in _escape_as(ingested, role_name)
    assert counts(ingested) == before
    again = fs("db", "create-readonly-role", role_name)  # idempotent: run again after `fs db upgrade`
    assert again.exit_code == 0, again.output


@postgres_only
def test_readonly_role_login(ingested: str, role_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_READONLY_PASSWORD", "s3cret-" + uuid.uuid4().hex[:6])
    result = fs("db", "create-readonly-role", role_name, "--login")
    assert result.exit_code == 0, result.output
    assert "export FS_READONLY_DATABASE_URL=" in result.stderr and "s3cret" not in result.output
    ro_url = sa.engine.make_url(ingested).set(username=role_name, password=os.environ["FS_READONLY_PASSWORD"])
    ro = ro_url.render_as_string(hide_password=False)
    monkeypatch.setenv("FS_READONLY_DATABASE_URL", ro)
    ok = fs("sql", "SELECT count(*) AS n FROM feature_rows", "-f", "json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == [{"n": 12}]
    before = counts(ingested)
    assert "permission denied" in _escape_as(ro, None)
    assert "permission denied" in _escape_as(ro, None, ESCAPE_RESET)  # logged in as the role: nothing to reset to
    assert counts(ingested) == before


@postgres_only
def test_readonly_role_refuses_a_privileged_name(ingested: str, role_name: str) -> None:
    assert "already exists" in one_line_error(fs("db", "create-readonly-role", "postgres"))
    assert "plain identifier" in one_line_error(fs("db", "create-readonly-role", 'x"; DROP TABLE images; --'))


def test_readonly_role_on_sqlite_says_why(image_tree: Path) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    assert "PostgreSQL feature" in one_line_error(fs("db", "create-readonly-role", "reader"))


# ---------------------------------------------------------------------------------------------
# 3. ingest reads regular files only, with a size cap


def _special_files(folder: Path) -> list[str]:
    """pipe.jpg (FIFO), zero.jpg -> /dev/zero, link.jpg -> pipe.jpg, sock.png (socket); returns their names."""
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "link.jpg").symlink_to(folder / "pipe.jpg")
    names = ["pipe.jpg", "zero.jpg", "link.jpg"]
    cwd = os.getcwd()
    os.chdir(folder)  # a relative path: AF_UNIX paths are limited to ~100 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock.png")
        names.append("sock.png")
    finally:
        os.chdir(cwd)
    return names


def test_ingest_refuses_special_files_without_hanging(tmp_path: Path, backend_url: str | None) -> None:
    folder = tmp_path / "photos" / "shoe"
    make_image(folder / "good.jpg")
    special = _special_files(folder)
    proc = subprocess.run([sys.executable, "-m", "featurestore.cli.main", "ingest", str(tmp_path / "photos")],
                          capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(special) + 1} files: 1 new, 0 duplicates, {len(special)} failed" in proc.stderr
    reasons = {line.split(": ", 2)[1].rsplit("/", 1)[-1]: line.split(": ", 2)[2]
               for line in proc.stderr.splitlines() if line.startswith("  failed: ")}
    assert set(reasons) == set(special)
    assert reasons["pipe.jpg"].startswith("not a regular file: a FIFO")
    assert reasons["link.jpg"].startswith("not a regular file: a FIFO")
    assert reasons["zero.jpg"].startswith("not a regular file: a character device")
    if "sock.png" in reasons:
        assert reasons["sock.png"].startswith("not a regular file: a socket")
    assert counts(_url(tmp_path, backend_url))["ingest_errors"] == len(special)


def test_a_fifo_swapped_in_after_the_check_is_not_waited_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    regular = os.stat(make_image(tmp_path / "real.jpg"))
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if Path(p) == fifo else real_stat(p, *a, **k))
    done: dict[str, Any] = {}

    def read() -> None:
        try:
            read_bytes(fifo)
        except ImageDecodeError as exc:
            done["error"] = str(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # opened without O_NONBLOCK: release it by opening the write end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("read_bytes blocked on a FIFO")
    assert done["error"].startswith("not a regular file: a FIFO")


def test_size_cap_never_reads_more_than_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(10 * 2**30)  # a sparse 10 GiB file: refused from its size, unread
    with pytest.raises(ImageDecodeError, match=r"larger than the 1 MiB limit"):
        read_bytes(big, max_bytes=2**20)
    # a file that grows after the stat: reading stops at cap + 1 bytes
    read = 0
    real_read, real_stat = os.read, os.stat

    def counting_read(fd: int, n: int) -> bytes:
        nonlocal read
        data = real_read(fd, n)
        read += len(data)
        return data

    small = os.stat(make_image(tmp_path / "small.png"))
    monkeypatch.setattr(os, "read", counting_read)
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: small if Path(p) == big else real_stat(p, *a, **k))
    with pytest.raises(ImageDecodeError, match="larger than"):
        read_bytes(big, max_bytes=2**20)
    assert read == 2**20 + 1


def test_ingest_applies_fs_max_file_mb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "in" / "c" / "large.png", size=(300, 300))
    make_image(tmp_path / "in" / "c" / "small.png", size=(8, 8), seed=1)
    monkeypatch.setenv("FS_MAX_FILE_MB", "0.01")  # ~10 KiB
    result = fs("ingest", str(tmp_path / "in"))
    assert result.exit_code == 0, result.output
    assert "1 new, 0 duplicates, 1 failed" in result.stderr
    assert "large.png: file is larger than the 10.24 KiB limit" in result.stderr and "FS_MAX_FILE_MB" in result.stderr


# ---------------------------------------------------------------------------------------------
# 4. silent corruption: shards carry checksums, fs verify finds and unregisters damaged ones


def _shard(tmp_path: Path) -> Path:
    (path,) = (tmp_path / ".fs" / "features" / "rp8").glob("*.h5")
    return path


def _scramble(path: Path) -> None:
    with h5py.File(path, "r") as fh:
        info = fh["vectors"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 8)
        data = f.read(8)
        f.seek(info.byte_offset + 8)
        f.write(bytes(b ^ 0x5A for b in data))


def test_scrambled_shard_raises_naming_the_file_and_is_repaired(ingested: str, tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    _scramble(shard)
    err = one_line_error(fs("search", "-F", "rp8", "--id", "1"))
    assert f"feature shard {shard} is corrupt" in err and "fs verify" in err
    check = fs("verify")
    assert check.exit_code == 1
    assert "corrupt" in check.stdout and shard.name in check.stdout
    assert "1 damaged" in check.stderr and "fs verify --repair" in check.stderr
    repaired = fs("verify", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "rp8: unregistered 12 vector(s)" in repaired.stderr and "fs extract --rp 8" in repaired.stderr
    assert counts(ingested)["feature_rows"] == 0 and counts(ingested)["feature_shards"] == 0
    again = fs("extract", "--rp", "8", "--size", "16x12")
    assert again.exit_code == 0 and "rp8: 12 vectors written" in again.stderr
    assert fs("verify").exit_code == 0
    assert fs("search", "-F", "rp8", "--id", "1").exit_code == 0


def test_deleted_shard_is_reported_not_counted(ingested: str, tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    shard.unlink()
    assert "missing or unreadable (no such file)" in one_line_error(fs("search", "-F", "rp8", "--id", "1"))
    check = fs("verify", "rp8", "-f", "json")
    assert check.exit_code == 1
    (row,) = json.loads(check.stdout)
    assert row["problem"] == "missing" and row["rows"] == 12 and row["feature_set"] == "rp8"


def test_shard_not_matching_the_catalog_is_reported(ingested: str) -> None:
    engine = sa.create_engine(ingested)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE feature_rows SET row = 99 WHERE image_id = 1")
    engine.dispose()
    check = fs("verify", "-f", "json")
    assert check.exit_code == 1
    assert [r["problem"] for r in json.loads(check.stdout)] == ["mismatch"]


def test_old_shards_without_checksums_are_read_and_reported(ingested: str, tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    with h5py.File(shard, "r") as fh:
        ids, vecs, attrs = fh["image_ids"][...], fh["vectors"][...], dict(fh.attrs)
    with h5py.File(shard, "w") as fh:  # the layout written before checksums: contiguous, no filter
        fh.create_dataset("image_ids", data=ids)
        fh.create_dataset("vectors", data=vecs)
        fh.attrs.update(attrs)
    engine = sa.create_engine(ingested)  # and registered before sha256s were recorded (migration 0011)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE feature_shards SET sha256 = NULL")
    engine.dispose()
    assert fs("search", "-F", "rp8", "--id", "1").exit_code == 0
    check = fs("verify")
    assert check.exit_code == 0, check.output
    assert "0 damaged, 1 without checksums" in check.stderr and "--replace" in check.stderr


# ---------------------------------------------------------------------------------------------
# 5. upper bounds, checked before any work


BOUNDS = [
    (["--rp", "10000000"], "K must be at most 921,600"),
    (["--rp", "50000"], "K can be at most"),
    (["--size", "100000x100000", "--rp", "16"], "the limit is 64 MiB per resized image"),
    (["--pixels", "100000x100000"], "the limit is 64 MiB per resized image"),
    (["--pixels", "4000x3000"], "the limit is 64 MiB per vector"),
    (["--pixels", "2000x2000", "--batch", "64"], "use a batch of at most 35"),
]


def test_bounds_are_refused_before_any_work(tmp_path: Path, image_tree: Path) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    before = counts(_url(tmp_path, None))
    # All in one subprocess with a bound: a missing check would run for hours and eat the memory.
    script = (
        "import json, sys\nfrom typer.testing import CliRunner\nfrom featurestore.cli.main import app\n"
        "out = []\nfor args in json.loads(sys.argv[1]):\n"
        "    r = CliRunner().invoke(app, ['extract', *args])\n"
        "    out.append([r.exit_code, r.stderr])\nprint(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([a for a, _ in BOUNDS])],
                          capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    for (args, expected), (code, err) in zip(BOUNDS, json.loads(proc.stdout), strict=True):
        assert code == 1, (args, err)
        assert err.startswith("Error: ") and err.count("\n") == 1 and expected in err, (args, err)
    assert counts(_url(tmp_path, None)) == before
    assert not list((tmp_path / ".fs").glob("projections/*"))


def test_bound_functions_say_the_limit() -> None:
    check_size((4096, 4096))
    with pytest.raises(ValueError, match="64 MiB per resized image"):
        check_size((4096, 6000))
    assert check_pixels((2560, 2160)) == (2560, 2160)
    with pytest.raises(ValueError, match=f"{MAX_VECTOR_BYTES // 12:,} pixels"):
        check_pixels((2600, 2200))
    check_projection(640 * 480 * 3, 1024)
    with pytest.raises(ValueError, match="K can be at most 34,952"):
        check_projection(640 * 480 * 3, 40_000)


# ---------------------------------------------------------------------------------------------
# 7. tracebacks that became one-line errors


def test_label_csv_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    make_image(tmp_path / "d" / "ok.png")
    (tmp_path / "labels.csv").write_bytes(b"path,label\nok.png,shoe\nok.png,caf\xe9\n")
    err = one_line_error(fs("ingest", str(tmp_path / "d"), "--labels", f"csv:{tmp_path / 'labels.csv'}"))
    assert f"{tmp_path / 'labels.csv'} line 3: not UTF-8 (byte 0xe9)" in err
    assert counts(_url(tmp_path, None))["images"] == 0


def test_nul_byte_in_a_label_names_file_and_line(tmp_path: Path, backend_url: str | None) -> None:
    make_image(tmp_path / "d" / "ok.png")
    (tmp_path / "labels.csv").write_text("path,label\nok.png,sne\0aker\n")
    err = one_line_error(fs("ingest", str(tmp_path / "d"), "--labels", f"csv:{tmp_path / 'labels.csv'}"))
    assert f"{tmp_path / 'labels.csv'} line 2: a field contains a NUL byte" in err
    assert counts(_url(tmp_path, backend_url))["images"] == 0


def test_quoted_csv_path_with_a_newline_is_kept_exactly(tmp_path: Path, backend_url: str | None) -> None:
    odd = make_image(tmp_path / "d" / "two\nlines .png")
    (tmp_path / "labels.csv").write_text('path,label\n"two\nlines .png",shoe\n')
    result = fs("ingest", str(tmp_path / "d"), "--labels", f"csv:{tmp_path / 'labels.csv'}")
    assert result.exit_code == 0, result.output
    assert "1 new, 0 duplicates, 0 failed" in result.stderr
    engine = sa.create_engine(_url(tmp_path, backend_url))
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT source_path, label FROM images").all() == [(str(odd.resolve()), "shoe")]
    engine.dispose()


@pytest.mark.parametrize("args", [
    ["search", "-F", "rp8", "--id", "99999999999999999999999"],
    ["compare", "99999999999999999999999", "1"],
    ["predict", "--run", "99999999999999999999999", "--unlabelled"],
])
def test_huge_ids_are_usage_errors(args: list[str]) -> None:
    result = fs(*args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "9223372036854775807" in result.output
    assert "Traceback" not in result.output and "OverflowError" not in result.output


def test_catalog_with_garbage_bytes_names_the_file(tmp_path: Path, image_tree: Path) -> None:
    catalog = tmp_path / ".fs" / "catalog.db"
    catalog.parent.mkdir()
    garbage = np.random.default_rng(0).bytes(8192)
    catalog.write_bytes(garbage)
    for args in (["status"], ["sql", "SELECT 1"], ["ingest", str(image_tree)]):
        err = one_line_error(fs(*args))
        assert f"the catalog {catalog} is not a readable SQLite database (file is not a database)" in err, err
        assert f"mv {catalog} {catalog}.bad" in err
    assert catalog.read_bytes() == garbage


def test_max_image_pixels_above_pillows_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2,000 pixels in Image.open
    make_image(tmp_path / "in" / "c" / "wide.png", size=(50, 50))  # 2,500 pixels
    monkeypatch.setenv("FS_MAX_IMAGE_PIXELS", "2400")
    refused = fs("ingest", str(tmp_path / "in"))
    assert refused.exit_code == 1
    assert "50x50 = 2,500 pixels exceeds the limit of 2,400 (raise FS_MAX_IMAGE_PIXELS" in refused.stderr
    monkeypatch.setenv("FS_MAX_IMAGE_PIXELS", "10000")
    accepted = fs("ingest", str(tmp_path / "in"))
    assert accepted.exit_code == 0, accepted.output
    assert "1 new, 0 duplicates, 0 failed" in accepted.stderr


def test_settings_read_the_new_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_SQL_TIMEOUT", "2.5")
    monkeypatch.setenv("FS_MAX_FILE_MB", "3")
    monkeypatch.setenv("FS_READONLY_ROLE", "reader")
    s = Settings()
    assert (s.sql_timeout, s.max_file_bytes, s.readonly_role) == (2.5, 3 * 2**20, "reader")
    monkeypatch.setenv("FS_SQL_TIMEOUT", "0")
    with pytest.raises(ValueError, match="FS_SQL_TIMEOUT"):
        Settings()



# =============================================================================================
# Issue 32, replayed: files bound to their set, a damaged index, FIFOs in a shard's place.


@pytest.fixture
def two_sets(tmp_path: Path, image_tree: Path) -> Path:
    """Two sets of the same dimension and count (rp12 and pixels2x2, 12 vectors each); returns the store."""
    assert fs("ingest", str(image_tree)).exit_code == 0
    result = fs("extract", "--rp", "12", "--pixels", "2x2", "--size", "16x12")
    assert result.exit_code == 0, result.output
    return tmp_path / ".fs"


def _only(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def _fs_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    """``fs`` in its own process: a crash in native code is an exit code here, not a dead test run."""
    return subprocess.run([sys.executable, "-m", "featurestore.cli.main", *args], capture_output=True, text=True,
                          timeout=BOUND)


def _subprocess_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_damaged_index_bytes_never_reach_usearch(two_sets: Path) -> None:
    assert fs("index", "build", "--features", "rp12").exit_code == 0
    index = _only(two_sets / "indexes" / "rp12", "*.usearch")
    data = bytearray(index.read_bytes())
    for k in range(1, 64, 7):  # a few bytes inside the file; its size and header stay as recorded
        data[-k] ^= 0x5A
    index.write_bytes(bytes(data))
    for args in (["duplicates", "--features", "rp12", "--threshold", "0.99"], ["search", "-F", "rp12", "--id", "1"]):
        err = _subprocess_error(_fs_subprocess(*args))
        assert f"index file {index} is corrupt or was replaced" in err and "--rebuild" in err, err


def test_a_shard_of_another_set_swapped_in_is_an_integrity_error(two_sets: Path) -> None:
    rp = _only(two_sets / "features" / "rp12", "*.h5")
    px = _only(two_sets / "features" / "pixels2x2", "*.h5")
    expected = fs("search", "-F", "rp12", "--id", "1", "-f", "json").stdout
    rp.unlink()
    rp.symlink_to(px)  # same dim, same count, same image ids: only the recorded sha256 tells them apart
    err = one_line_error(fs("search", "-F", "rp12", "--id", "1"))
    assert f"feature shard {rp} is corrupt or was replaced" in err and "fs verify" in err
    check = fs("verify", "-f", "json")
    assert check.exit_code == 1
    assert [(r["feature_set"], r["problem"]) for r in json.loads(check.stdout)] == [("rp12", "corrupt")]
    rp.unlink()
    rp.write_bytes(px.read_bytes())  # a copy instead of a link
    assert "is corrupt or was replaced" in one_line_error(fs("search", "-F", "rp12", "--id", "1"))
    repaired = fs("verify", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert fs("extract", "--rp", "12", "--size", "16x12").exit_code == 0
    assert fs("search", "-F", "rp12", "--id", "1", "-f", "json").stdout == expected


def test_a_value_rewritten_through_h5py_is_detected(two_sets: Path) -> None:
    rp = _only(two_sets / "features" / "rp12", "*.h5")
    with h5py.File(rp, "r+") as fh:  # h5py recomputes the Fletcher-32 checksum of the chunk it writes
        fh["vectors"][0, 0] = fh["vectors"][0, 0] + 1.0
    assert "is corrupt or was replaced" in one_line_error(fs("search", "-F", "rp12", "--id", "1"))
    check = fs("verify", "rp12", "-f", "json")
    assert check.exit_code == 1
    assert [r["problem"] for r in json.loads(check.stdout)] == ["corrupt"]


def test_an_index_of_another_set_swapped_in_is_refused_and_rebuilt(two_sets: Path) -> None:
    for name in ("rp12", "pixels2x2"):
        assert fs("index", "build", "--features", name).exit_code == 0
    rp = _only(two_sets / "indexes" / "rp12", "*.usearch")
    px = _only(two_sets / "indexes" / "pixels2x2", "*.usearch")
    rp.unlink()
    rp.symlink_to(px)
    assert f"index file {rp} is corrupt or was replaced" in one_line_error(fs("search", "-F", "rp12", "--id", "1"))
    check = fs("verify", "-f", "json")
    assert check.exit_code == 1
    assert [(r["feature_set"], r["kind"]) for r in json.loads(check.stdout)] == [("rp12", "index")]
    build = fs("index", "build", "--features", "rp12", "-f", "json")
    assert build.exit_code == 0, build.output
    assert "does not match the sha256" in build.output and "rebuilt" in build.output
    assert fs("verify").exit_code == 0
    assert fs("search", "-F", "rp12", "--id", "1").exit_code == 0


def test_verify_repair_drops_a_damaged_index(two_sets: Path) -> None:
    assert fs("index", "build", "--features", "rp12").exit_code == 0
    index = _only(two_sets / "indexes" / "rp12", "*.usearch")
    data = index.read_bytes()
    index.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    repaired = fs("verify", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "rp12: dropped its damaged index" in repaired.stderr
    assert not index.exists()
    assert fs("search", "-F", "rp12", "--id", "1").exit_code == 0  # exact search until the next build


def test_a_damaged_run_artifact_is_reported_by_verify(two_sets: Path) -> None:
    result = fs("train", "--features", "rp12", "--splits", "2", "--classifier", "logreg")
    assert result.exit_code == 0, result.output
    artifact = _only(two_sets / "artifacts", "*.pkl")
    artifact.write_bytes(artifact.read_bytes() + b"x")
    check = fs("verify", "-f", "json")
    assert check.exit_code == 1
    assert [r["kind"] for r in json.loads(check.stdout)] == ["artifact"]
    assert "cannot be repaired here" in fs("verify", "--repair").stderr


def _replace_with(path: Path, how: str) -> None:
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


@pytest.mark.parametrize("how", ["fifo", "zero", "directory"])
def test_a_shard_replaced_by_a_special_file_never_hangs(two_sets: Path, how: str) -> None:
    rp = _only(two_sets / "features" / "rp12", "*.h5")
    _replace_with(rp, how)
    err = one_line_error(in_thread(lambda: fs("search", "-F", "rp12", "--id", "1")))
    assert f"feature shard {rp}" in err and ("not a regular file" in err or "missing" in err), err
    check = in_thread(lambda: fs("verify", "-f", "json"))
    assert check.exit_code == 1, check.output
    assert [(r["feature_set"], r["problem"]) for r in json.loads(check.stdout)] == [("rp12", "corrupt")]
    repaired = in_thread(lambda: fs("verify", "--repair"))
    assert repaired.exit_code == 0, repaired.output
    assert "rp12: unregistered 12 vector(s)" in repaired.stderr
    assert in_thread(lambda: fs("verify")).exit_code == 0
    again = in_thread(lambda: fs("extract", "--rp", "12", "--size", "16x12"))
    assert again.exit_code == 0 and "rp12: 12 vectors written" in again.stderr


def test_an_artifact_replaced_by_a_fifo_never_hangs(tmp_path: Path) -> None:
    from featurestore.errors import IntegrityError
    from featurestore.training.artifacts import load_artifact

    os.mkfifo(tmp_path / "model.pkl")
    with pytest.raises(IntegrityError, match="not a regular file"):
        in_thread(lambda: load_artifact(tmp_path / "model.pkl", "0" * 64), bound=30)


# --- fs serve without a token answers only Host names of this machine (DNS rebinding)


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400), ("", 400),
    ("localhost", 200), ("LOCALHOST:8000", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200), ("[::1]", 200),
    ("photos.lan:8000", 200),
])
def test_tokenless_server_answers_only_local_host_names(ingested: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, host: str,
                                                        status: int) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    monkeypatch.setenv("FS_ALLOWED_HOSTS", "photos.lan")  # what `fs serve --allowed-host photos.lan` sets
    with TestClient(create_app(Settings.from_env()), base_url="http://127.0.0.1") as client:
        got = client.get("/v1/images/1", headers={"Host": host})
    assert got.status_code == status, got.text
    if status == 400:
        assert "is not this server" in got.json()["detail"] and str(tmp_path) not in got.text


def test_a_token_turns_the_host_check_off(ingested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    monkeypatch.setenv("FS_API_TOKEN", "t" * 32)
    with TestClient(create_app(Settings.from_env())) as client:
        got = client.get("/v1/images/1", headers={"Host": "photos.example", "Authorization": "Bearer " + "t" * 32})
        assert got.status_code == 200
        assert client.get("/v1/images/1", headers={"Host": "photos.example"}).status_code == 401


def test_fs_serve_passes_allowed_hosts(monkeypatch: pytest.MonkeyPatch, image_tree: Path) -> None:
    from featurestore.http import server

    assert fs("ingest", str(image_tree)).exit_code == 0
    seen: list[Settings] = []
    monkeypatch.setattr(server, "serve", lambda settings, **kw: seen.append(settings))
    monkeypatch.setenv("FS_ALLOWED_HOSTS", "a.lan")
    result = fs("serve", "--allowed-host", "b.lan", "--allowed-host", "c.lan")
    assert result.exit_code == 0, result.output
    assert seen[0].allowed_hosts == "a.lan,b.lan,c.lan"


# --- one top-level handler: no fs command prints a traceback without --debug


def _leaf_commands() -> list[tuple[list[str], Any]]:
    import typer

    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(None):
                yield from walk(cmd.get_command(None, name), [*path, name])
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), []))


def _required_args(cmd: Any, tmp_path: Path) -> list[str]:
    """Plausible values for a command's required arguments and options (ids 1, existing files, names)."""
    make_image(tmp_path / "photos" / "c" / "a.png")
    (tmp_path / "file.bin").write_bytes(b"x")
    values = {"path": str(tmp_path / "photos"), "run": "1", "run_a": "1", "run_b": "2", "symbol": "file.bin",
              "params": "file.bin", "dest": str(tmp_path / "export"), "out": str(tmp_path / "report.html"),
              "features": "rp8", "query": "SELECT 1"}
    args: list[str] = []
    for p in cmd.params:
        if not p.required:
            continue
        value = values.get(p.name, "x")
        args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return args


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(path) for path, _ in _leaf_commands()}
    assert {"status", "sql", "serve", "db upgrade", "index build", "datasets export", "models add"} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://postgres@127.0.0.1:1/x",  # nothing listens on port 1
    "mysql://root:pw@127.0.0.1/x",
    "postgresql://u:secret@host:notaport/x",
])
def test_every_command_fails_in_one_line_when_the_catalog_cannot_open(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       url: str) -> None:
    (tmp_path / ".fs").mkdir()
    monkeypatch.setenv("FS_DATABASE_URL", url)
    for path, cmd in _leaf_commands():
        args = [*path, *_required_args(cmd, tmp_path)]
        result = in_thread(lambda args=args: fs(*args), bound=60)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output and "secret" not in result.output, (args, result.output)
        if path == ["plugins"]:  # lists the installed plugins: the only command that never opens the catalog
            assert result.exit_code == 0 and "featurestore.plugins" in result.output, (args, result.output)
            continue
        assert result.exit_code in (1, 2), (args, result.exit_code, result.output)
        if result.exit_code == 1:
            err = result.stderr.strip()
            assert err.startswith("Error: ") and "\n" not in err, (args, err)


def test_catalog_errors_say_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".fs").mkdir()
    monkeypatch.setenv("FS_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/x")
    err = one_line_error(fs("status"))
    assert "cannot open the catalog at postgresql+psycopg2://postgres@127.0.0.1:1/x" in err and "FS_DATABASE_URL" in err
    monkeypatch.setenv("FS_DATABASE_URL", "mysql://root:pw@127.0.0.1/x")
    assert "names a mysql database" in one_line_error(fs("status"))
    monkeypatch.setenv("FS_DATABASE_URL", "not a url")
    assert "cannot be parsed" in one_line_error(fs("status"))
    monkeypatch.delenv("FS_DATABASE_URL")
    for args in (["status"], ["ingest", str(tmp_path)], ["sql", "SELECT 1"]):
        result = fs("--store", "/proc/self", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr


def test_unexpected_errors_are_one_line_and_debug_shows_them(image_tree: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from featurestore.store import Store

    assert fs("ingest", str(image_tree)).exit_code == 0
    monkeypatch.setattr(Store, "status", lambda self: {}["boom"])
    err = one_line_error(fs("status"))
    assert err.startswith("Error: unexpected KeyError: 'boom'") and "--debug" in err
    with pytest.raises(KeyError):
        runner.invoke(app, ["--debug", "status"], catch_exceptions=False)


NESTED = "(" * 3000 + "1" + ")" * 3000


def test_deeply_nested_sql_is_a_one_line_error(ingested: str) -> None:
    assert "nested too deeply" in one_line_error(fs("sql", f"SELECT {NESTED}"))
    assert "nested too deeply" in one_line_error(fs("search", "-F", "rp8", "--id", "1", "--where", f"id = {NESTED}"))


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e12"])
def test_infinite_timeouts_are_refused(ingested: str, timeout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = fs("sql", "SELECT 1", "--timeout", timeout)
    assert result.exit_code == 2 and "2,147,483" in result.output, result.output
    monkeypatch.setenv("FS_SQL_TIMEOUT", timeout)
    err = one_line_error(fs("sql", "SELECT 1"))
    assert "FS_SQL_TIMEOUT" in err or "up to 2,147,483" in err


@postgres_only
def test_two_stores_initialise_one_empty_postgres_database(tmp_path: Path, backend_url: str) -> None:
    script = ("import sys\nfrom featurestore.config import Settings\nfrom featurestore.store import Store\n"
              "Store.open(Settings(store=sys.argv[1], database_url=sys.argv[2]), create=True).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"s{i}"), backend_url],
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=BOUND)
        assert p.returncode == 0, err
    assert counts(backend_url)["images"] == 0


def test_db_upgrade_on_a_version_set_back_is_one_line(image_tree: Path, tmp_path: Path) -> None:
    assert fs("ingest", str(image_tree)).exit_code == 0
    engine = sa.create_engine(_url(tmp_path, None))
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0005'")
    engine.dispose()
    err = one_line_error(fs("db", "upgrade"))
    assert "could not be upgraded from revision 0005" in err and "alembic_version" in err


def test_ctrl_c_while_fs_starts_is_one_line() -> None:
    # Ctrl-C arriving while the CLI's modules load, made deterministic: an import hook raises it when
    # featurestore.cli.common is first imported (the CLI loads it with every command module; the store and
    # its numpy, h5py and SQLAlchemy load later, when a command runs).
    script = (
        "import sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'featurestore.cli.common':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv = ['fs', 'status']\n"
        "from featurestore.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "Interrupted while starting; nothing was done.\n"


# --- re-ingesting photos after their folder moved updates their paths


@pytest.mark.parametrize("rename", [False, True])
def test_reingesting_moved_photos_updates_their_paths(tmp_path: Path, image_tree: Path, backend_url: str | None,
                                                     rename: bool) -> None:
    first = tmp_path / "a" / "shoes"
    first.parent.mkdir()
    image_tree.rename(first)
    assert fs("ingest", str(first)).exit_code == 0
    assert fs("extract", "--rp", "8", "--size", "16x12").exit_code == 0
    moved = tmp_path / "b" / ("footwear" if rename else "shoes")  # a new folder name is a new dataset
    moved.parent.mkdir()
    first.rename(moved)
    result = fs("ingest", str(moved))
    assert result.exit_code == 0, result.output
    assert "12 moved (their recorded path now points here)" in result.stderr
    url = _url(tmp_path, backend_url)
    engine = sa.create_engine(url)
    with engine.connect() as c:
        paths = [r[0] for r in c.exec_driver_sql("SELECT source_path FROM images")]
        members = [r[0] for r in c.exec_driver_sql("SELECT source_path FROM dataset_members")]
    engine.dispose()
    assert len(paths) == 12 and all(p.startswith(str(moved.resolve())) for p in paths), paths
    assert all(p.startswith(str(moved.resolve())) for p in members), members
    again = fs("extract", "--rp", "16", "--size", "16x12")  # the images can be read again
    assert again.exit_code == 0 and "rp16: 12 vectors written" in again.stderr, again.output
    copy = tmp_path / "c" / "shoes"  # a second copy while the first still exists: a duplicate, not a move
    copy.parent.mkdir()
    import shutil

    shutil.copytree(moved, copy)
    dup = fs("ingest", str(copy), "--dataset", "shoes" if not rename else "footwear")
    assert dup.exit_code == 0 and "moved" not in dup.stderr and "12 duplicates" in dup.stderr, dup.stderr


# --- sizes bounded before the work: fs sql results, datasets export --size


def test_fs_sql_results_are_capped(ingested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from featurestore.catalog import readonly

    monkeypatch.setattr(readonly, "MAX_RESULT_BYTES", 2**20)
    rows = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {}) SELECT n FROM r"
    err = one_line_error(fs("sql", rows.format(200_000)))
    assert "the result is larger than the 1 MiB limit" in err and "LIMIT" in err
    ok = fs("sql", rows.format(1000), "-f", "json")
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)) == 1000


def test_export_size_is_bounded_before_reading(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "featurestore.cli.main", "datasets", "export", "fashion-mnist",
                           str(tmp_path / "out"), "--size", "100000x100000", "--limit", "10"],
                          capture_output=True, text=True, timeout=BOUND)
    err = _subprocess_error(proc)
    assert "the limit is 64 MiB per image" in err and "100000x100000" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- no absolute server path in an error body for a caller who may not see paths


def test_error_bodies_hide_server_paths_from_remote_callers(ingested: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http.app import create_app

    engine = sa.create_engine(ingested)
    with engine.connect() as c:
        image_id, path = c.exec_driver_sql("SELECT id, source_path FROM images ORDER BY id").first()
    engine.dispose()
    Path(path).rename(tmp_path / "moved.jpg")
    _scramble(_shard(tmp_path))  # and a shard whose error names its file
    app = create_app(Settings.from_env())
    with TestClient(app) as remote:  # TestClient's peer address is "testclient": not loopback
        for url in (f"/v1/images/{image_id}/file", "/v1/feature-sets/rp8/search?image_id=1&k=3"):
            got = remote.get(url, headers={"X-Forwarded-For": "203.0.113.9"})
            assert got.status_code >= 400, (url, got.status_code)
            assert str(tmp_path) not in got.text and "/tmp/" not in got.text, (url, got.text)
    with TestClient(app, client=("127.0.0.1", 50000)) as local:  # a loopback caller still gets the facts
        got = local.get(f"/v1/images/{image_id}/file")
        assert got.status_code == 404 and path in got.json()["detail"], got.text


def test_projection_gathers_a_few_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurestore.features import projection, sparse_projection

    proj = projection.SparseRandomProjection.generate(3000, 40, seed=1)
    X = np.random.default_rng(0).integers(0, 256, size=(9, 3000), dtype=np.uint8)
    whole = proj.transform(X)
    widest: list[int] = []
    real = projection.SparseRandomProjection._project

    def spy(self: Any, rows: np.ndarray, acc: Any, out: np.ndarray) -> None:
        widest.append(rows.shape[0])
        real(self, rows, acc, out)

    monkeypatch.setattr(sparse_projection, "_GATHER_BYTES", 2 * proj.nnz * 2)  # two rows of gathered values
    monkeypatch.setattr(projection.SparseRandomProjection, "_project", spy)
    assert np.array_equal(proj.transform(X), whole)
    assert max(widest) == 2 and sum(widest) == 9


# --- /ui/login slows down token guessing


def test_login_is_throttled_after_wrong_tokens(ingested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from featurestore.http import throttle
    from featurestore.http.app import create_app

    now = [1000.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    token = "s" * 32
    monkeypatch.setenv("FS_API_TOKEN", token)
    with TestClient(create_app(Settings.from_env())) as client:
        codes = [client.post("/ui/login", data={"token": f"guess{i}"}, follow_redirects=False).status_code
                 for i in range(throttle.MAX_FAILURES + 5)]
        assert codes[: throttle.MAX_FAILURES] == [401] * throttle.MAX_FAILURES
        assert set(codes[throttle.MAX_FAILURES :]) == {429}
        right = client.post("/ui/login", data={"token": token}, follow_redirects=False)
        assert right.status_code == 429 and "too many wrong tokens" in right.text  # even the right one, for now
        now[0] += throttle.WINDOW_SECONDS + 1
        right = client.post("/ui/login", data={"token": token}, follow_redirects=False)
        assert right.status_code == 303 and "fs_session" in right.headers.get("set-cookie", "")


def test_predict_on_a_fifo_leaves_no_empty_dataset(ingested: str, tmp_path: Path) -> None:
    trained = fs("train", "--features", "rp8", "--splits", "2")
    assert trained.exit_code == 0, trained.output
    os.mkfifo(tmp_path / "pipe.jpg")
    before = counts(ingested)
    result = in_thread(lambda: fs("predict", "--run", "1", str(tmp_path / "pipe.jpg")))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "not a regular file" in result.stderr
    engine = sa.create_engine(ingested)
    with engine.connect() as c:
        assert "predict" not in {r[0] for r in c.exec_driver_sql("SELECT name FROM datasets")}
    engine.dispose()
    after = counts(ingested)
    assert {t: n for t, n in after.items() if t != "ingest_errors"} == \
        {t: n for t, n in before.items() if t != "ingest_errors"}


# --- Ray: an address nothing listens at fails in one line, at once


def test_ray_address_nothing_listens_at_fails_at_once(ingested: str) -> None:
    result = in_thread(lambda: fs("extract", "--rp", "16", "--size", "16x12", "--ray", "127.0.0.1:1"), bound=30)
    err = one_line_error(result)
    assert "cannot connect to the Ray cluster at '127.0.0.1:1'" in err and "ray start --head" in err
    assert "--ray 'nonsense' is not HOST:PORT" in one_line_error(fs("extract", "--rp", "16", "--ray", "nonsense"))


