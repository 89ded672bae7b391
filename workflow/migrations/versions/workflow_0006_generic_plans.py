"""The workflow functions of PostgreSQL plan their statements once per session.

`tiers_step_v1` and `tiers_finish_v1` (workflow_0005) run with
`plan_cache_mode = force_generic_plan`, as the engine's claim does: under the
default (`auto`), PL/pgSQL planned their parameterised statements again at every
call, because each custom plan looked cheaper than the generic one. Planning then
cost more than running them (a step's start: 1.04 -> 0.90 ms of CPU per step in
`bench.workflow`; the generic plans are the same index lookups). The functions
themselves are unchanged, so a release still running beside this one in a rolling
deploy calls them as before; the functions they call inherit the setting.

Revision ID: workflow_0006
Revises: workflow_0005
"""

from __future__ import annotations

from alembic import op

revision = "workflow_0006"
down_revision = "workflow_0005"
branch_labels = None
depends_on = None

_ENTRY_POINTS = (
    "tiers_finish_v1(text, bigint, text, text, text, integer, json, bigint, text, text, "
    "json, text)",
    "tiers_step_v1(text, bigint, text, text, bigint, text, integer, json, bigint, text, "
    "text, integer, text, bigint, json)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in _ENTRY_POINTS:
            op.get_bind().exec_driver_sql(
                f"ALTER FUNCTION {signature} SET plan_cache_mode = force_generic_plan"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in _ENTRY_POINTS:
            op.get_bind().exec_driver_sql(f"ALTER FUNCTION {signature} RESET plan_cache_mode")
