"""Alembic environment: runs migrations against the featurestore catalog.

The URL comes from the Alembic config (set by ``fs db upgrade``) or, when
run as plain ``alembic upgrade head``, from featurestore's settings
(FS_DATABASE_URL, else the SQLite catalog of FS_STORE).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from featurestore.catalog.database import configure_sqlite
from featurestore.catalog.schema import Base
from featurestore.config import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    settings = Settings.from_env()
    if not settings.database_url:
        settings.store.mkdir(parents=True, exist_ok=True)
    return settings.catalog_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config({"sqlalchemy.url": _url()}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    configure_sqlite(engine)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
