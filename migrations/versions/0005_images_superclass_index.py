"""Index images.superclass (the web app's superclass filter, keyset-paged)

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02
"""
from alembic import op


revision = '0005'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_superclass', ['superclass'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_superclass')
