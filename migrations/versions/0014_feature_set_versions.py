"""Feature-set versions: `fs extract --replace` keeps the old vectors (issue 26 item 5)

Every existing feature set becomes version 1 of itself, and every existing run
is recorded as having read version 1 of each of its sets that still exists (the
only version there was). No trigger: a version's vectors are reached through its
``feature_sets`` row, whose changes already move the catalog counter (0012).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""
import json

from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('feature_set_versions',
    sa.Column('feature_set_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['feature_set_id'], ['feature_sets.id'],
                            name=op.f('fk_feature_set_versions_feature_set_id_feature_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('feature_set_id', name=op.f('pk_feature_set_versions')),
    sa.UniqueConstraint('name', 'version', name='uq_feature_set_versions_name_version')
    )
    op.create_table('run_feature_versions',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feature_set', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_feature_versions_run_id_runs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'feature_set', name=op.f('pk_run_feature_versions'))
    )
    op.execute("INSERT INTO feature_set_versions (feature_set_id, name, version, created_at) "
               "SELECT id, name, 1, created_at FROM feature_sets")
    bind = op.get_bind()
    sets = {str(n) for (n,) in bind.execute(sa.text("SELECT name FROM feature_sets"))}
    pins = []
    for run_id, features in bind.execute(sa.text("SELECT id, features FROM runs")):
        names = json.loads(features) if isinstance(features, str) else (features or [])
        pins += [{"r": int(run_id), "f": str(n), "v": 1} for n in dict.fromkeys(names) if str(n) in sets]
    if pins:
        bind.execute(sa.text("INSERT INTO run_feature_versions (run_id, feature_set, version) VALUES (:r, :f, :v)"),
                     pins)


def downgrade() -> None:
    op.drop_table('run_feature_versions')
    op.drop_table('feature_set_versions')
