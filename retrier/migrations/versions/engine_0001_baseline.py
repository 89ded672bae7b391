"""The engine's tables, as release 94c3053 created them.

Revision ID: engine_0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "engine_0001"
down_revision = None
branch_labels = ("engine",)
depends_on = None

CLAIMABLE = "state IN ('pending', 'finishing')"


def _where(predicate: str) -> dict[str, Any]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.create_table(
        "tiers_meta",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "tiers_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("fn", sa.String(length=200), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("due_ms", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("lease_owner", sa.String(length=120), nullable=True),
        sa.Column("lease_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("fence", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("initial_backoff_ms", sa.Integer(), nullable=False),
        sa.Column("base", sa.Float(), nullable=False),
        sa.Column("max_failures", sa.Integer(), nullable=False),
        sa.Column("jitter", sa.Boolean(), nullable=False),
        sa.Column("max_backoff_ms", sa.BigInteger(), nullable=False),
        sa.Column("on_complete", sa.String(length=200), nullable=True),
        sa.Column("context", sa.JSON(), nullable=True),
        sa.Column("handler_failures", sa.Integer(), nullable=False),
        sa.Column("handler_error", sa.String(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=True),
        sa.Column("finished_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    desc = sa.text("priority DESC")
    op.create_index("ix_tiers_runs_claim", "tiers_runs", ["due_ms", desc], **_where(CLAIMABLE))
    op.create_index(
        "ix_tiers_runs_queue_due", "tiers_runs", ["queue", "due_ms", desc], **_where(CLAIMABLE)
    )
    op.create_index(
        "ix_tiers_runs_finishing", "tiers_runs", ["due_ms"], **_where("state = 'finishing'")
    )
    op.create_index(
        "ix_tiers_runs_running", "tiers_runs", ["queue", "key"], **_where("state = 'running'")
    )
    op.create_index(
        "ix_tiers_runs_leased",
        "tiers_runs",
        ["lease_until_ms"],
        **_where("state IN ('running', 'delivering')"),
    )
    op.create_index(
        "ix_tiers_runs_finished", "tiers_runs", ["finished_ms"], **_where("state = 'completed'")
    )
    op.create_index("ix_tiers_runs_created", "tiers_runs", ["created_ms"])
    op.create_index("ix_tiers_runs_owner", "tiers_runs", ["owner"])
    op.create_table(
        "tiers_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("worker", sa.String(length=120), nullable=True),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_ms", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tiers_attempts_run", "tiers_attempts", ["run_id", "number"])
    op.create_index("ix_tiers_attempts_queue_started", "tiers_attempts", ["queue", "started_ms"])
    op.create_table(
        "tiers_queues",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("max_parallelism", sa.Integer(), nullable=True),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column("rate_period_ms", sa.BigInteger(), nullable=True),
        sa.Column("max_per_key", sa.Integer(), nullable=True),
        sa.Column("max_per_worker", sa.Integer(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute("INSERT INTO tiers_meta (key, value) VALUES ('schema_version', 1)")


def downgrade() -> None:
    for table in ("tiers_queues", "tiers_attempts", "tiers_runs", "tiers_meta"):
        op.drop_table(table)
