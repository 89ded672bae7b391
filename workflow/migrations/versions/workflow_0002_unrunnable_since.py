"""Workflows: unrunnable_since_ms.

Workflows remember since when the workers that took their driver lacked their
code (a rolling deploy), to fail them only after the grace.

Revision ID: workflow_0002
Revises: workflow_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "workflow_0002"
down_revision = "workflow_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("tiers_workflows")}
    if "unrunnable_since_ms" not in columns:  # added by the code of the same day
        op.add_column(
            "tiers_workflows", sa.Column("unrunnable_since_ms", sa.BigInteger(), nullable=True)
        )


def downgrade() -> None:
    op.drop_column("tiers_workflows", "unrunnable_since_ms")
