from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect

from featurestore.catalog import database
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, SchemaOutdatedError
from featurestore.store import Store
from helpers import raises_cli


def _url(tmp_path: Path, backend_url: str | None) -> str:
    return backend_url or Settings.from_env(store=tmp_path / ".fs").catalog_url


def test_upgrade_empty_to_head_matches_models(tmp_path: Path, backend_url: str | None) -> None:
    (tmp_path / ".fs").mkdir()
    url = _url(tmp_path, backend_url)
    engine = database.make_engine(url)
    before, after = database.upgrade(engine, url)
    assert before is None and after == database.head_revision(url)
    tables = set(inspect(engine).get_table_names())
    assert {"datasets", "images", "ingest_errors", "feature_sets", "feature_shards", "feature_rows",
            "models", "runs", "run_splits", "predictions"} <= tables
    cfg = database.alembic_config(url)
    command.check(cfg)  # raises if the models and the migrations disagree
    engine.dispose()


def test_older_revision_asks_for_upgrade(tmp_path: Path, backend_url: str | None) -> None:
    (tmp_path / ".fs").mkdir()
    url = _url(tmp_path, backend_url)
    engine = database.make_engine(url)
    database.upgrade(engine, url, "0001")
    engine.dispose()
    settings = Settings.from_env(store=tmp_path / ".fs", database_url=backend_url)
    with raises_cli(SchemaOutdatedError, match="at revision 0001, older .* run `fs db upgrade`"):
        Store.open(settings)
    engine = database.make_engine(url)
    database.upgrade(engine, url)
    engine.dispose()
    Store.open(settings).close()


def test_foreign_database_refused(tmp_path: Path) -> None:
    (tmp_path / ".fs").mkdir()
    url = _url(tmp_path, None)
    engine = database.make_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE something (x int)")
    engine.dispose()
    with pytest.raises(FeatureStoreError, match="has tables but no featurestore schema"):
        Store.open(Settings.from_env(store=tmp_path / ".fs"), create=True)


def test_sqlite_catalog_uses_wal(tmp_path: Path) -> None:
    store = Store.open(Settings.from_env(store=tmp_path / ".fs"), create=True)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.close()
