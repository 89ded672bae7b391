"""Workers table, tracebacks of failed attempts, schema_version 2.

Workers announce what they can run (tiers_workers); failed attempts keep their
traceback; tiers_meta says version 2, so a release before migrations refuses the
database instead of misreading it.

Revision ID: engine_0002
Revises: engine_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0002"
down_revision = "engine_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database the code of the same day (before migrations) opened has these already.
    inspector = sa.inspect(op.get_bind())
    if "traceback" not in {c["name"] for c in inspector.get_columns("tiers_attempts")}:
        op.add_column("tiers_attempts", sa.Column("traceback", sa.String(), nullable=True))
    if not inspector.has_table("tiers_workers"):
        op.create_table(
            "tiers_workers",
            sa.Column("id", sa.String(length=120), nullable=False),
            sa.Column("host", sa.String(length=200), nullable=False),
            sa.Column("pid", sa.Integer(), nullable=False),
            sa.Column("concurrency", sa.Integer(), nullable=False),
            sa.Column("lease_ms", sa.BigInteger(), nullable=False),
            sa.Column("functions", sa.JSON(), nullable=False),
            sa.Column("handlers", sa.JSON(), nullable=False),
            sa.Column("started_ms", sa.BigInteger(), nullable=False),
            sa.Column("heartbeat_ms", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    op.execute("UPDATE tiers_meta SET value = 2 WHERE key = 'schema_version'")


def downgrade() -> None:
    op.execute("UPDATE tiers_meta SET value = 1 WHERE key = 'schema_version'")
    op.drop_table("tiers_workers")
    op.drop_column("tiers_attempts", "traceback")
