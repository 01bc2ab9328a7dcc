"""Out-of-fold neighbour votes of K-fold runs (run_oof.neighbours, runs.oof_neighbours, issue 24)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('run_oof') as batch:
        batch.add_column(sa.Column('neighbours', sa.JSON(), nullable=True))
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('oof_neighbours', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('oof_neighbours')
    with op.batch_alter_table('run_oof') as batch:
        batch.drop_column('neighbours')
