"""The workflow tier's tables, as release 94c3053 created them.

Revision ID: workflow_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "workflow_0001"
down_revision = None
branch_labels = ("workflow",)
depends_on = "engine_0001"


def upgrade() -> None:
    op.create_table(
        "tiers_workflows",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("pool", sa.String(length=200), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("key", sa.String(length=200), nullable=True),
        sa.Column("parent_id", sa.String(length=40), nullable=True),
        sa.Column("parent_step", sa.String(length=200), nullable=True),
        sa.Column("retrigger_of", sa.String(length=40), nullable=True),
        sa.Column("on_complete", sa.String(length=200), nullable=True),
        sa.Column("context", sa.JSON(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_tiers_workflows_state_created", "tiers_workflows", ["state", "created_ms"])
    op.create_index("ix_tiers_workflows_name", "tiers_workflows", ["name", "created_ms"])
    op.create_index("ix_tiers_workflows_parent", "tiers_workflows", ["parent_id"])
    op.create_table(
        "tiers_workflow_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=240), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("fn", sa.String(length=200), nullable=True),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_ms", sa.BigInteger(), nullable=True),
        sa.Column("wake_ms", sa.BigInteger(), nullable=True),
        sa.Column("event_name", sa.String(length=200), nullable=True),
        sa.Column("match", sa.JSON(), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("child_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workflow_id", "name", name="uq_tiers_workflow_steps_name"),
    )
    waiting = "state = 'waiting' AND kind = 'event'"
    op.create_index(
        "ix_tiers_workflow_steps_waiting",
        "tiers_workflow_steps",
        ["event_name"],
        sqlite_where=sa.text(waiting),
        postgresql_where=sa.text(waiting),
    )
    op.create_table(
        "tiers_workflow_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tiers_workflow_events_name", "tiers_workflow_events", ["name", "id"])


def downgrade() -> None:
    for table in ("tiers_workflow_events", "tiers_workflow_steps", "tiers_workflows"):
        op.drop_table(table)
