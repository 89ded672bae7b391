"""Idempotency keys and debounce keys on runs.

Two nullable columns and their partial indexes: a unique one on (queue,
idempotency_key), so a second enqueue with a key gets the first run's id; and one
that finds the pending run a debounced call collapses into. The schema version stays
2 (a release that does not know the columns still reads and writes the table).

Revision ID: engine_0006
Revises: engine_0004
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "engine_0006"
down_revision = "engine_0004"
branch_labels = None
depends_on = None


def _where(predicate: str) -> dict[str, Any]:
    return {f"{backend}_where": sa.text(predicate) for backend in ("sqlite", "postgresql")}


def upgrade() -> None:
    op.add_column(
        "tiers_runs", sa.Column("idempotency_key", sa.String(length=200), nullable=True)
    )
    op.add_column("tiers_runs", sa.Column("debounce_key", sa.String(length=400), nullable=True))
    op.create_index(
        "ux_tiers_runs_idempotency",
        "tiers_runs",
        ["queue", "idempotency_key"],
        unique=True,
        **_where("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_tiers_runs_debounce",
        "tiers_runs",
        ["queue", "debounce_key"],
        **_where("debounce_key IS NOT NULL AND state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_tiers_runs_debounce", table_name="tiers_runs")
    op.drop_index("ux_tiers_runs_idempotency", table_name="tiers_runs")
    op.drop_column("tiers_runs", "debounce_key")
    op.drop_column("tiers_runs", "idempotency_key")
