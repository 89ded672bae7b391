"""Workflows: progress, log lines, large step results, retention indexes.

`ctx.set_progress` stores its value (and the ordinal of the call) on the workflow,
with until when a watcher wants notifications of its changes;
`ctx.log` lines go to tiers_workflow_logs; step results too large for the journal
go to tiers_workflow_results; indexes let retention find finished workflows and old
events without a scan.

Revision ID: workflow_0004
Revises: workflow_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "workflow_0004"
down_revision = "workflow_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tiers_workflows", sa.Column("progress", sa.JSON(), nullable=True))
    op.add_column(
        "tiers_workflows",
        sa.Column("progress_seq", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "tiers_workflows", sa.Column("watched_until_ms", sa.BigInteger(), nullable=True)
    )
    op.add_column("tiers_workflow_steps", sa.Column("result_size", sa.Integer(), nullable=True))
    op.create_index("ix_tiers_workflows_finished", "tiers_workflows", ["finished_ms"])
    op.create_index(
        "ix_tiers_workflow_events_created", "tiers_workflow_events", ["created_ms"]
    )
    op.create_table(
        "tiers_workflow_logs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(length=240), nullable=True),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("message", sa.String(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workflow_id", "seq", name="uq_tiers_workflow_logs_seq"),
    )
    op.create_table(
        "tiers_workflow_results",
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=240), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("workflow_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("tiers_workflow_results")
    op.drop_table("tiers_workflow_logs")
    op.drop_index("ix_tiers_workflow_events_created", "tiers_workflow_events")
    op.drop_index("ix_tiers_workflows_finished", "tiers_workflows")
    with op.batch_alter_table("tiers_workflow_steps") as batch:
        batch.drop_column("result_size")
    with op.batch_alter_table("tiers_workflows") as batch:
        batch.drop_column("watched_until_ms")
        batch.drop_column("progress_seq")
        batch.drop_column("progress")
