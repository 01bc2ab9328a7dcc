"""Models, training runs with per-split scores, predictions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('symbol_path', sa.Text(), nullable=False),
    sa.Column('params_path', sa.Text(), nullable=False),
    sa.Column('symbol_sha256', sa.String(length=64), nullable=False),
    sa.Column('params_sha256', sa.String(length=64), nullable=False),
    sa.Column('preprocess', sa.JSON(), nullable=False),
    sa.Column('taps', sa.JSON(), nullable=False),
    sa.Column('default_tap', sa.String(length=200), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('features', sa.JSON(), nullable=False),
    sa.Column('feature_params', sa.JSON(), nullable=False),
    sa.Column('target', sa.String(length=20), nullable=False),
    sa.Column('selection', sa.JSON(), nullable=False),
    sa.Column('classifier', sa.String(length=20), nullable=False),
    sa.Column('classifier_params', sa.JSON(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('n_splits', sa.Integer(), nullable=False),
    sa.Column('test_size', sa.Float(), nullable=False),
    sa.Column('split_scheme', sa.String(length=20), nullable=False),
    sa.Column('splits_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('dataset', sa.String(length=200), nullable=True),
    sa.Column('accuracy_mean', sa.Float(), nullable=True),
    sa.Column('accuracy_std', sa.Float(), nullable=True),
    sa.Column('macro_f1_mean', sa.Float(), nullable=True),
    sa.Column('superclass_accuracy_mean', sa.Float(), nullable=True),
    sa.Column('versions', sa.JSON(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('artifact_path', sa.Text(), nullable=True),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=True),
    sa.Column('comparison_group', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    op.create_table('run_splits',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('split', sa.Integer(), nullable=False),
    sa.Column('test_accuracy', sa.Float(), nullable=False),
    sa.Column('train_accuracy', sa.Float(), nullable=False),
    sa.Column('macro_f1', sa.Float(), nullable=False),
    sa.Column('superclass_accuracy', sa.Float(), nullable=True),
    sa.Column('fit_seconds', sa.Float(), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_splits_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'split', name=op.f('pk_run_splits'))
    )
    op.create_table('predictions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('top5', sa.JSON(), nullable=False),
    sa.Column('predicted_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_predictions_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_predictions_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('run_id', 'image_id', name='uq_predictions_run_id_image_id')
    )


def downgrade() -> None:
    op.drop_table('predictions')
    op.drop_table('run_splits')
    op.drop_table('runs')
    op.drop_table('models')
