"""The package as a wheel installs it: cli and migrations live inside featurestore, and migrations work from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (built,) = out.glob("featurestore-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def test_nothing_called_cli_or_migrations_at_the_top(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert not tops & {"cli", "migrations"}, tops
    assert {"featurestore/cli/main.py", "featurestore/migrations/env.py", "featurestore/migrations/script.py.mako",
            "featurestore/data/imagenet_classes.txt"} <= names
    assert any(n.startswith("featurestore/migrations/versions/0001_") for n in names)


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Run from a folder without the source tree, so only the installed copy can be imported.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")}
    env["PYTHONPATH"] = str(installed)
    return subprocess.run([sys.executable, "-c", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_db_upgrade_and_alembic_ini_work_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    code = ("import sys, featurestore.cli.main as m; print(m.__file__); sys.argv=['fs','--store','s1','db','upgrade']; "
            "m.main()")
    done = _run(installed, tmp_path, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(installed)), done.stdout  # the installed copy, not the source tree
    assert (tmp_path / "s1" / "catalog.db").is_file()
    # the repository's alembic.ini finds the migrations inside the installed package
    shutil.copy(REPO / "alembic.ini", tmp_path / "alembic.ini")
    code = ("import sys, os; os.environ['FS_STORE']='s2'; from alembic.config import main; "
            "main(argv=['-c', 'alembic.ini', 'upgrade', 'head'])")
    done = _run(installed, tmp_path, code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "s2" / "catalog.db").is_file()
