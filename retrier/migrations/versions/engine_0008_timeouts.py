"""How long one attempt of a run may take (`timeout=`), in milliseconds.

A nullable column: runs written by a release without it have no limit. The schema
version stays 2 (a release that does not know the column still reads and writes the
table correctly; it just does not enforce the limit).

Revision ID: engine_0008
Revises: engine_0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0008"
down_revision = "engine_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tiers_runs", sa.Column("timeout_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("tiers_runs", "timeout_ms")
