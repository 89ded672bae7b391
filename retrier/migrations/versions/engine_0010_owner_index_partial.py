"""The index of runs by owner holds only runs that have one.

`ix_tiers_runs_owner` finds a workflow's runs (its steps, drivers and deadline). Runs
that no workflow owns (every `retrier.run` and pool item) entered it too, under
NULL, where no query looks: a page more written at every enqueue's commit. It is
now partial (`owner IS NOT NULL`); every query by owner compares it with `=`, which
implies the predicate, so SQLite and PostgreSQL use it as before. Releases before
this one read and write the table alike (the schema version stays 2).

Revision ID: engine_0010
Revises: engine_0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0010"
down_revision = "engine_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tiers_runs_owner", table_name="tiers_runs")
    owned = sa.text("owner IS NOT NULL")
    op.create_index(
        "ix_tiers_runs_owner",
        "tiers_runs",
        ["owner"],
        sqlite_where=owned,
        postgresql_where=owned,
    )


def downgrade() -> None:
    op.drop_index("ix_tiers_runs_owner", table_name="tiers_runs")
    op.create_index("ix_tiers_runs_owner", "tiers_runs", ["owner"])
