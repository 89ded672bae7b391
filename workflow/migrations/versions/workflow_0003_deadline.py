"""Workflows: deadline_ms.

A workflow started with `timeout=` fails when its deadline passes, even while it
sleeps or waits; runs of workflows started before have none.

Revision ID: workflow_0003
Revises: workflow_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "workflow_0003"
down_revision = "workflow_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tiers_workflows", sa.Column("deadline_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("tiers_workflows", "deadline_ms")
