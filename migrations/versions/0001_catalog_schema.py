"""Catalog: datasets, images, ingest errors, feature sets, shards and row index

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('feature_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=50), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('dtype', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feature_sets')),
    sa.UniqueConstraint('name', name=op.f('uq_feature_sets_name'))
    )
    op.create_table('feature_shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('feature_set_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['feature_set_id'], ['feature_sets.id'], name=op.f('fk_feature_shards_feature_set_id_feature_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feature_shards')),
    sa.UniqueConstraint('path', name=op.f('uq_feature_shards_path'))
    )
    with op.batch_alter_table('feature_shards', schema=None) as batch_op:
        batch_op.create_index('ix_feature_shards_feature_set_id', ['feature_set_id'], unique=False)
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('source_path', sa.Text(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=20), nullable=False),
    sa.Column('mode', sa.String(length=20), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('superclass', sa.String(length=200), nullable=True),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('ingested_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_images_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('sha256', name=op.f('uq_images_sha256'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_dataset_id', ['dataset_id'], unique=False)
        batch_op.create_index('ix_images_label', ['label'], unique=False)
    op.create_table('ingest_errors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('occurred_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_ingest_errors_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ingest_errors'))
    )
    op.create_table('feature_rows',
    sa.Column('feature_set_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('shard_id', sa.Integer(), nullable=False),
    sa.Column('row', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['feature_set_id'], ['feature_sets.id'], name=op.f('fk_feature_rows_feature_set_id_feature_sets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_feature_rows_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['shard_id'], ['feature_shards.id'], name=op.f('fk_feature_rows_shard_id_feature_shards'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('feature_set_id', 'image_id', name=op.f('pk_feature_rows'))
    )
    with op.batch_alter_table('feature_rows', schema=None) as batch_op:
        batch_op.create_index('ix_feature_rows_shard_id', ['shard_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('feature_rows', schema=None) as batch_op:
        batch_op.drop_index('ix_feature_rows_shard_id')
    op.drop_table('feature_rows')
    op.drop_table('ingest_errors')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_dataset_id')
        batch_op.drop_index('ix_images_label')
    op.drop_table('images')
    with op.batch_alter_table('feature_shards', schema=None) as batch_op:
        batch_op.drop_index('ix_feature_shards_feature_set_id')
    op.drop_table('feature_shards')
    op.drop_table('feature_sets')
    op.drop_table('datasets')
