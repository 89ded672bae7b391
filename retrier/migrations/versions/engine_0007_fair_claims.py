"""Fair claims: pools start due runs by priority, with aging, or keys take turns.

`tiers_queues.priority_aging_ms`: a pool that sets it starts its due runs by priority
(higher first), except that a run due for longer than that starts before every run
due after it. An index of each queue's pending runs by priority, then due time, lets
a claim read them in that order with a few seeks per distinct priority.
`round_robin` and `rr_cursor`: a pool whose keys take turns, and where the turn is;
an index of each queue's pending runs by key, then due time, finds the next key and
its first due run in a seek or two. `tiers_key_limits`: a key's own cap in a
queue (a tenant's limit), overriding the queue's `max_per_key`. `key_rate_limit`,
`key_rate_period_ms` and `tiers_key_starts`: a rate limit per key, counted over the
starts the claims log per key. The claim
on PostgreSQL is `tiers_claim_v3` (created with the other server-side objects,
`Dialect.create_extras`); an older release, still running beside this one in a
rolling deploy, keeps calling its `tiers_claim_v2`, which ignores the new settings.

Revision ID: engine_0007
Revises: engine_0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0007"
down_revision = "engine_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "tiers_queues", sa.Column("priority_aging_ms", sa.BigInteger(), nullable=True)
    )
    op.create_table(
        "tiers_key_limits",
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("max_parallelism", sa.Integer(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("queue", "key"),
    )
    op.create_table(
        "tiers_key_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tiers_key_starts", "tiers_key_starts", ["queue", "key", "started_ms"])
    op.add_column("tiers_queues", sa.Column("key_rate_limit", sa.Integer(), nullable=True))
    op.add_column(
        "tiers_queues", sa.Column("key_rate_period_ms", sa.BigInteger(), nullable=True)
    )
    op.add_column("tiers_queues", sa.Column("round_robin", sa.Boolean(), nullable=True))
    op.add_column("tiers_queues", sa.Column("rr_cursor", sa.String(length=200), nullable=True))
    pending = sa.text("state = 'pending'")
    op.create_index(
        "ix_tiers_runs_queue_priority",
        "tiers_runs",
        ["queue", sa.text("priority DESC"), "due_ms"],
        sqlite_where=pending,
        postgresql_where=pending,
    )
    op.create_index(
        "ix_tiers_runs_queue_key_due",
        "tiers_runs",
        ["queue", "key", "due_ms", sa.text("priority DESC")],
        sqlite_where=pending,
        postgresql_where=pending,
    )


def downgrade() -> None:
    op.drop_index("ix_tiers_runs_queue_key_due", table_name="tiers_runs")
    op.drop_index("ix_tiers_runs_queue_priority", table_name="tiers_runs")
    op.drop_column("tiers_queues", "rr_cursor")
    op.drop_column("tiers_queues", "round_robin")
    op.drop_table("tiers_key_limits")
    op.drop_column("tiers_queues", "key_rate_period_ms")
    op.drop_column("tiers_queues", "key_rate_limit")
    op.drop_index("ix_tiers_key_starts", table_name="tiers_key_starts")
    op.drop_table("tiers_key_starts")
    op.drop_column("tiers_queues", "priority_aging_ms")
