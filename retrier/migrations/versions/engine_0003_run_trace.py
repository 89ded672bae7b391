"""The trace context a run was enqueued in (W3C traceparent), for tracing.

A nullable column: runs written by a release without it simply have none. The
schema version stays 2 (a release that does not know the column still reads and
writes the table correctly).

Revision ID: engine_0003
Revises: engine_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0003"
down_revision = "engine_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tiers_runs", sa.Column("trace", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.drop_column("tiers_runs", "trace")
