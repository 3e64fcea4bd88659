"""An index in the device list's order (enrolment time, then id), so that a page is one range read

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_devices_enrolled", "devices", ["enrolled_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_devices_enrolled", table_name="devices")
