"""Steps that many workflows start at the same moment start in one call (`tiers_steps_v1`).

Under load a worker's drivers take their next steps together: 300 concurrent 5-step
workflows made 1,500 `tiers_step_v2` calls, each a round trip, a statement and a
commit of its own. `tiers_steps_v1` takes such starts as one JSON array and makes each
through `tiers_step_v2`, in one transaction that commits once. Each start runs in a
block of its own (a subtransaction), so one that the general path must take, or whose
workflow is no longer running, or whose journal entry exists already, undoes only its
own writes and is answered by a letter: `r` (started, held by the worker), `p` (left
pending in its pool), `1`, `2` and `3` (SQLSTATEs TS001-TS003, as `tiers_step_v2`
raises them), `c` (a unique violation: a conflict) or `e` (any other error: the caller
makes that start again alone, where the error is its own, so that one bad start never
fails the others). The caller sends at most 32
starts per call, so a call's subtransactions stay within the 64 that a backend keeps
in shared memory (beyond them, every snapshot in the cluster looks them up on disk).

The workflows' rows are locked first, in id order, before any pool's row: every other
writer locks one workflow's row before its pool's, so two such calls, or a call and a
step started alone, cannot wait for each other in a cycle.

It runs without sequential scans or JIT, as the claim does (`retrier._pg_claim`): its
plans are made once per session, perhaps while the tables are small.

Revision ID: workflow_0008
Revises: workflow_0007
"""

from __future__ import annotations

from alembic import op

revision = "workflow_0008"
down_revision = "workflow_0007"
branch_labels = None
depends_on = None

STEPS_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_steps_v1(p_channel text, p_items json)
RETURNS text LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    v_item json;
    v_room boolean;
    v_answers text := '';
BEGIN
    PERFORM 1 FROM tiers_workflows w
     WHERE w.id = ANY (ARRAY(SELECT e ->> 'wf' FROM json_array_elements(p_items) e))
     ORDER BY w.id
       FOR UPDATE;
    FOR v_item IN SELECT * FROM json_array_elements(p_items) LOOP
        BEGIN
            v_room := tiers_step_v2(
                v_item ->> 'wf', (v_item ->> 'now')::bigint, p_channel,
                v_item ->> 'worker', (v_item ->> 'lease_ms')::bigint,
                v_item ->> 'prev_run', (v_item ->> 'prev_fence')::integer,
                v_item -> 'prev_result', (v_item ->> 'prev_started')::bigint,
                v_item ->> 'prev_step', v_item ->> 'name', (v_item ->> 'position')::integer,
                v_item ->> 'fn', (v_item ->> 'started')::bigint, v_item -> 'run');
            v_answers := v_answers || CASE WHEN v_room THEN 'r' ELSE 'p' END;
        EXCEPTION
            WHEN SQLSTATE 'TS001' THEN v_answers := v_answers || '1';
            WHEN SQLSTATE 'TS002' THEN v_answers := v_answers || '2';
            WHEN SQLSTATE 'TS003' THEN v_answers := v_answers || '3';
            WHEN unique_violation THEN v_answers := v_answers || 'c';
            WHEN OTHERS THEN v_answers := v_answers || 'e';
        END;
    END LOOP;
    RETURN v_answers;
END
$fn$
"""

STEPS_SIGNATURE = "tiers_steps_v1(text, json)"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(STEPS_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(f"DROP FUNCTION IF EXISTS {STEPS_SIGNATURE}")
