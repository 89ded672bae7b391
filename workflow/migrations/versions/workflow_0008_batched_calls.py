"""What many workflows write at the same moment goes in one call (`tiers_batch_v1`).

Under load a worker's drivers move in step: 300 concurrent 5-step workflows made 1,500
`tiers_step_v2` and 300 `tiers_finish_v1` calls, each a round trip, a statement and a
commit of its own. `tiers_batch_v1` takes such steps' starts and workflows' ends as one
JSON array (an item with `"end": true` is an end) and makes each through
`tiers_step_v2` or `tiers_finish_v1`, in one transaction that commits once. Each item
runs in a block of its own (a subtransaction), so one that the general path must
take, or whose workflow is no longer running, or whose journal entry exists already,
undoes only its own writes; it is answered by a letter: `r` (a step started, held by
the worker), `p` (a step left pending in its pool), `t` and `f` (an end written, or
not: the workflow had ended), `1`, `2` and `3` (SQLSTATEs TS001-TS003, as the
functions raise them), `c` (a unique violation: a conflict) or `e` (any other error:
the caller makes that item again alone, where the error is its own, so that one bad
item never fails the others). The caller sends at most 32 items per call, so a
call's subtransactions stay within the 64 that a backend keeps in shared memory
(beyond them, every snapshot in the cluster looks them up on disk).

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

BATCH_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_batch_v1(p_channel text, p_items json)
RETURNS text LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS $fn$
DECLARE
    v_item json;
    v_yes boolean;
    v_answers text := '';
BEGIN
    PERFORM 1 FROM tiers_workflows w
     WHERE w.id = ANY (ARRAY(SELECT e ->> 'wf' FROM json_array_elements(p_items) e))
     ORDER BY w.id
       FOR UPDATE;
    FOR v_item IN SELECT * FROM json_array_elements(p_items) LOOP
        BEGIN
            IF (v_item ->> 'end') IS NOT NULL THEN
                v_yes := tiers_finish_v1(
                    v_item ->> 'wf', (v_item ->> 'now')::bigint, p_channel,
                    v_item ->> 'worker',
                    v_item ->> 'prev_run', (v_item ->> 'prev_fence')::integer,
                    v_item -> 'prev_result', (v_item ->> 'prev_started')::bigint,
                    v_item ->> 'prev_step',
                    v_item ->> 'state', v_item -> 'result', v_item ->> 'error');
                v_answers := v_answers || CASE WHEN v_yes THEN 't' ELSE 'f' END;
            ELSE
                v_yes := tiers_step_v2(
                    v_item ->> 'wf', (v_item ->> 'now')::bigint, p_channel,
                    v_item ->> 'worker', (v_item ->> 'lease_ms')::bigint,
                    v_item ->> 'prev_run', (v_item ->> 'prev_fence')::integer,
                    v_item -> 'prev_result', (v_item ->> 'prev_started')::bigint,
                    v_item ->> 'prev_step', v_item ->> 'name',
                    (v_item ->> 'position')::integer, v_item ->> 'fn',
                    (v_item ->> 'started')::bigint, v_item -> 'run');
                v_answers := v_answers || CASE WHEN v_yes THEN 'r' ELSE 'p' END;
            END IF;
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

BATCH_SIGNATURE = "tiers_batch_v1(text, json)"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(BATCH_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(f"DROP FUNCTION IF EXISTS {BATCH_SIGNATURE}")
