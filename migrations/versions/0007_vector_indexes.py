"""Approximate nearest-neighbour indexes over feature sets (issue 14)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('vector_indexes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('feature_set_id', sa.Integer(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('vectors', sa.BigInteger(), nullable=False),
    sa.Column('shard_ids', sa.JSON(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['feature_set_id'], ['feature_sets.id'], name=op.f('fk_vector_indexes_feature_set_id_feature_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vector_indexes')),
    sa.UniqueConstraint('feature_set_id', name=op.f('uq_vector_indexes_feature_set_id')),
    sa.UniqueConstraint('path', name=op.f('uq_vector_indexes_path'))
    )


def downgrade() -> None:
    op.drop_table('vector_indexes')
