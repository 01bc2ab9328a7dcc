"""Honest splits and audits: near-duplicate grouping of runs, per-split test images, audit findings

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('group_threshold', sa.Float(), nullable=True))
        batch.add_column(sa.Column('group_features', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('n_groups', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('n_near_overlap', sa.Integer(), nullable=True))
    op.create_table('run_images',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_run_images_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_images_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'image_id', name=op.f('pk_run_images'))
    )
    op.create_table('run_split_images',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('split', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_run_split_images_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_split_images_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'split', 'image_id', name=op.f('pk_run_split_images'))
    )
    op.create_table('audit_findings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('audit', sa.String(length=20), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('other_image_id', sa.Integer(), nullable=True),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('feature_set', sa.String(length=200), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_audit_findings_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['other_image_id'], ['images.id'], name=op.f('fk_audit_findings_other_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_findings'))
    )
    op.create_index('ix_audit_findings_kind_image_id', 'audit_findings', ['kind', 'image_id'], unique=False)
    op.create_index('ix_audit_findings_image_id', 'audit_findings', ['image_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_audit_findings_image_id', table_name='audit_findings')
    op.drop_index('ix_audit_findings_kind_image_id', table_name='audit_findings')
    op.drop_table('audit_findings')
    op.drop_table('run_split_images')
    op.drop_table('run_images')
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('n_near_overlap')
        batch.drop_column('n_groups')
        batch.drop_column('group_features')
        batch.drop_column('group_threshold')
