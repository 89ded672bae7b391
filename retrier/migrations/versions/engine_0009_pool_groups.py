"""Pool groups: a cap shared by several queues, each guaranteed some of its slots.

`tiers_queue_groups` holds each group's cap; `tiers_queues.group_name` and
`guaranteed` make a queue a member. The claim on PostgreSQL is `tiers_claim_v5`
(created with the other server-side objects, `Dialect.create_extras`); an older
release, still running beside this one in a rolling deploy, keeps calling its
`tiers_claim_v4`, which ignores groups (so a group's cap holds once every worker
runs this release). The schema version stays 2: a release that does not know the
columns still reads and writes the tables correctly.

Revision ID: engine_0009
Revises: engine_0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "engine_0009"
down_revision = "engine_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tiers_queue_groups",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("max_parallelism", sa.Integer(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.add_column("tiers_queues", sa.Column("group_name", sa.String(length=200), nullable=True))
    op.add_column("tiers_queues", sa.Column("guaranteed", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("tiers_queues", "guaranteed")
    op.drop_column("tiers_queues", "group_name")
    op.drop_table("tiers_queue_groups")
