"""Label history (label_changes, label_reviews), out-of-fold probabilities of K-fold runs (run_oof), runs.label_version

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs') as batch:
        batch.add_column(sa.Column('label_version', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('oof_classes', sa.JSON(), nullable=True))
    op.create_table('run_oof',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('fold', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('probabilities', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_run_oof_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_oof_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'image_id', name=op.f('pk_run_oof'))
    )
    op.create_table('label_changes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('old_label', sa.String(length=200), nullable=True),
    sa.Column('old_superclass', sa.String(length=200), nullable=True),
    sa.Column('new_label', sa.String(length=200), nullable=False),
    sa.Column('new_superclass', sa.String(length=200), nullable=True),
    sa.Column('changed_at', sa.DateTime(), nullable=False),
    sa.Column('changed_by', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('undoes', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_label_changes_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['undoes'], ['label_changes.id'], name=op.f('fk_label_changes_undoes_label_changes')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_label_changes'))
    )
    op.create_index('ix_label_changes_image_id', 'label_changes', ['image_id'], unique=False)
    op.create_table('label_reviews',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('reviewed_by', sa.String(length=200), nullable=False),
    sa.Column('reviewed_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_label_reviews_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_label_reviews_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'image_id', name=op.f('pk_label_reviews'))
    )


def downgrade() -> None:
    op.drop_table('label_reviews')
    op.drop_index('ix_label_changes_image_id', table_name='label_changes')
    op.drop_table('label_changes')
    op.drop_table('run_oof')
    with op.batch_alter_table('runs') as batch:
        batch.drop_column('oof_classes')
        batch.drop_column('label_version')
