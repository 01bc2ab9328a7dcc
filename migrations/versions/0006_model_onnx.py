"""ONNX export of each model (path + sha256); runtime that computed each feature shard

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('onnx_path', sa.Text(), nullable=True))
        batch.add_column(sa.Column('onnx_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('feature_shards') as batch:
        batch.add_column(sa.Column('runtime', sa.String(length=50), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('feature_shards') as batch:
        batch.drop_column('runtime')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('onnx_sha256')
        batch.drop_column('onnx_path')
