"""A catalog change counter for search caches (issue 31)

One row, ``catalog_version.version``, bumped by triggers in the same transaction
as every write to the tables a search depends on (images, datasets and their
members, feature sets, shards, vector indexes). A process caching a set's
shards, index record or a compiled ``--where`` filter compares its copy's
counter with this one. ``feature_rows`` has no trigger: its rows are only
written together with a shard (registered, compacted, unregistered or dropped
with its set) in the same transaction, and a per-row trigger would cost SQLite
about 14 us per extracted vector.

SQLite triggers are per row; PostgreSQL's run once per statement.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

TABLES = ('images', 'datasets', 'dataset_members', 'feature_sets', 'feature_shards', 'vector_indexes')
BUMP = "UPDATE catalog_version SET version = version + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table('catalog_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_catalog_version'))
    )
    op.execute("INSERT INTO catalog_version (id, version) VALUES (1, 0)")
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE FUNCTION fs_bump_catalog_version() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {BUMP}; RETURN NULL; END $$")
        for table in TABLES:
            op.execute(f"CREATE TRIGGER fs_version_{table} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                       f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION fs_bump_catalog_version()")
    else:
        for table in TABLES:
            for event in ('insert', 'update', 'delete'):
                op.execute(f"CREATE TRIGGER fs_version_{table}_{event} AFTER {event.upper()} ON {table} "
                           f"BEGIN {BUMP}; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS fs_version_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS fs_bump_catalog_version()")
    else:
        for table in TABLES:
            for event in ('insert', 'update', 'delete'):
                op.execute(f"DROP TRIGGER IF EXISTS fs_version_{table}_{event}")
    op.drop_table('catalog_version')
