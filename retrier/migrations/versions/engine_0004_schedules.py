"""Cron schedules (tiers_schedules): one row per declared schedule.

A new table only: a release that does not know it reads and writes the other tables
as before, so the schema version stays 2.

Revision ID: engine_0004
Revises: engine_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0004"
down_revision = "engine_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tiers_schedules",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("fn", sa.String(length=200), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("cron", sa.String(length=120), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("missed", sa.String(length=8), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_fire_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_fire_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_run_id", sa.String(length=40), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    due = sa.text("paused = false")
    op.create_index(
        "ix_tiers_schedules_due",
        "tiers_schedules",
        ["next_fire_ms"],
        sqlite_where=due,
        postgresql_where=due,
    )


def downgrade() -> None:
    op.drop_index("ix_tiers_schedules_due", table_name="tiers_schedules")
    op.drop_table("tiers_schedules")
