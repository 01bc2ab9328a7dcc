"""Datasets are collections: dataset_members (one image in several datasets); fixed-test runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dataset_members',
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('source_path', sa.Text(), nullable=False),
    sa.Column('added_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_dataset_members_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_dataset_members_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset_id', 'image_id', name=op.f('pk_dataset_members'))
    )
    op.create_index('ix_dataset_members_image_id', 'dataset_members', ['image_id'], unique=False)
    # Every existing image is a member of the dataset it was ingested into.
    op.execute("INSERT INTO dataset_members (dataset_id, image_id, source_path, added_at) "
               "SELECT dataset_id, id, source_path, ingested_at FROM images")
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('test_dataset', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('n_test_overlap', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('n_test_overlap')
        batch.drop_column('test_dataset')
    op.drop_index('ix_dataset_members_image_id', table_name='dataset_members')
    op.drop_table('dataset_members')
