"""`fs --help`, `fs status` and `fs sql` start without the heavy libraries and pipelines they do not use.

Each command runs in a fresh interpreter (a test process has imported everything
already); the check is which modules are loaded afterwards, not how long it took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from featurestore.catalog import database
from featurestore.cli.main import app
from helpers import make_image

# Never needed by these commands: machine learning, serving, CNN runtimes, clusters, and our code above the store.
HEAVY = ("sklearn", "onnxruntime", "onnx", "fastapi", "uvicorn", "ray", "mxnet", "scipy", "pyarrow", "usearch",
         "alembic", "featurestore.pipelines", "featurestore.http", "featurestore.training", "featurestore.search")
# Help does not open a store: no numpy or SQLAlchemy either (nor pydantic for `fs --help`; typer itself
# imports it to parse a subcommand's parameters).
HELP_HEAVY = (*HEAVY, "numpy", "sqlalchemy", "h5py", "PIL", "sqlglot", "featurestore.store", "featurestore.config")

_PROBE = """
import json, sys
from featurestore.cli.main import app
try:
    app(sys.argv[1:], prog_name="fs")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded_after(*args: str, cwd: Path) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    return last["code"], set(last["modules"])


def _offending(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def test_help_imports_neither_heavy_libraries_nor_the_store(tmp_path: Path) -> None:
    code, modules = _loaded_after("--help", cwd=tmp_path)
    assert code == 0
    assert "typer" in modules and "featurestore.cli.train" in modules  # the probe saw the real app
    assert _offending(modules, (*HELP_HEAVY, "pydantic")) == []
    for sub in (["train", "--help"], ["export", "features", "--help"], ["search", "--help"]):
        code, modules = _loaded_after(*sub, cwd=tmp_path)
        assert code == 0 and _offending(modules, HELP_HEAVY) == [], sub


def test_status_and_sql_import_only_what_they_use(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / "shoes" / "a" / "b" / f"{i}.png", seed=i)
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "shoes")], ["extract", "--rp", "8", "--size", "32x24"]):
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    code, modules = _loaded_after("status", cwd=tmp_path)
    assert code in (0, None)
    assert "featurestore.store" in modules and "sqlalchemy" in modules  # it did open the store
    assert _offending(modules, (*HEAVY, "sqlglot", "h5py")) == []  # counts come from the catalog, no shard opened
    code, modules = _loaded_after("sql", "SELECT count(*) FROM images", cwd=tmp_path)
    assert code in (0, None)
    assert "sqlglot" in modules
    assert _offending(modules, (*HEAVY, "h5py", "featurestore.store", "sqlalchemy.orm")) == []


def test_search_by_id_imports_no_scipy_or_learning_libraries(tmp_path: Path) -> None:
    for i in range(3):
        make_image(tmp_path / "shoes" / "a" / "b" / f"{i}.png", seed=i)
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "shoes")], ["extract", "--rp", "8", "--size", "32x24"]):
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    code, modules = _loaded_after("search", "--features", "rp8", "--id", "1", "-k", "2", cwd=tmp_path)
    assert code in (0, None)
    assert "featurestore.search.service" in modules and "h5py" in modules  # it did read the stored vector
    # scipy only groups dense duplicate tiles; the rest never serves a search from the command line
    assert _offending(modules, ("scipy", "sklearn", "onnxruntime", "fastapi", "ray", "mxnet", "pyarrow",
                                "featurestore.pipelines", "featurestore.http", "featurestore.training")) == []


def test_entry_point_spares_the_exit_a_collection(tmp_path: Path) -> None:
    # main() freezes what the command built, so the interpreter's shutdown does not walk every object
    script = ("import atexit, gc, sys\n"
              "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
              "sys.argv = ['fs', '--version']\n"
              "from featurestore.cli.main import main\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "featurestore" in done.stdout
    assert int(done.stdout.split("frozen")[-1]) > 1000


def test_sql_allow_list_is_the_schema() -> None:
    # readonly.py names the tables so that `fs sql` need not import the ORM schema; a new table goes in both.
    from featurestore.catalog.readonly import catalog_tables
    from featurestore.catalog.schema import Base

    assert catalog_tables() == frozenset(Base.metadata.tables) | {"alembic_version"}, (
        "add the new table to _SCHEMA_TABLES in featurestore/catalog/readonly_rules.py")


def test_shipped_head_matches_alembic() -> None:
    # Opening a store compares the catalog with this head instead of loading Alembic (database.shipped_head).
    assert database.shipped_head() == database.head_revision("sqlite://")
