"""The SHA-256 of each device message as accepted, so that a resend of it is recognised

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a message accepted before this revision has no digest, and a resend of it is refused as
    # before.
    with op.batch_alter_table("round_messages") as batch:
        batch.add_column(sa.Column("digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("round_messages") as batch:
        batch.drop_column("digest")
