"""A step that follows an inline step of the same pool takes over its slot without locking
the pool (`tiers_step_v2`).

`tiers_step_v1` (workflow_0005) locked the pool's row for every new step, to count its
running runs, and held that lock until its commit: with `synchronous_commit=on` every
step start of the pool then queued behind one WAL flush after another (300 concurrent
5-step workflows: 3.3 ms of waiting per start, up to eight at once). Yet a step started
by the call that completes the workflow's previous inline step, of the same pool and
held by the same worker, changes no count: one running run of the pool and of the worker
ends and one begins, in one transaction, which any other transaction counting them sees
whole or not at all. Such a start reads the pool's row without locking it and counts its
running runs as before, so a pool whose cap was lowered meanwhile still leaves the new
run pending; only a start that adds a running run (a workflow's first step, or a step of
another pool) takes the lock.

`tiers_inline_done_v2` is `tiers_inline_done_v1` returning the completed run's pool
(and refusing, as TS001, a run the worker does not hold). Version 1 of both stays for
a release still running beside this one in a rolling deploy; `tiers_finish_v1` is
unchanged.

Revision ID: workflow_0007
Revises: workflow_0006
"""

from __future__ import annotations

from alembic import op

revision = "workflow_0007"
down_revision = "workflow_0006"
branch_labels = None
depends_on = None

INLINE_DONE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_inline_done_v2(
    p_wf text, p_now bigint, p_worker text, p_run text, p_fence integer, p_result json,
    p_started bigint, p_step text
) RETURNS text LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_attempts integer;
    v_queue text;
    v_on_complete text;
BEGIN
    -- An inline step's run completes with its attempt, and its journal entry takes the
    -- result (`Records._complete_success`, `Journal.settle_step`), or TS001 (held by
    -- another worker too: the general path sorts that out). Returns the run's pool,
    -- whose slot the worker now holds no more.
    UPDATE tiers_runs t SET
        state = 'completed', outcome = 'success', result = p_result,
        error = NULL, due_ms = 0, lease_owner = NULL, lease_until_ms = NULL,
        finished_ms = p_now, handler_error = NULL,
        fence = CASE WHEN t.on_complete IS NULL THEN t.fence ELSE t.fence + 1 END
     WHERE t.id = p_run AND t.fence = p_fence AND t.state = 'running'
       AND t.cancel_requested = false
       AND t.lease_owner = p_worker
    RETURNING t.attempts, t.queue, t.on_complete INTO v_attempts, v_queue, v_on_complete;
    IF NOT FOUND OR v_on_complete IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'TS001',
            MESSAGE = 'run ' || p_run || ' cannot simply complete';
    END IF;
    INSERT INTO tiers_attempts (run_id, number, queue, worker, started_ms, finished_ms,
                                outcome)
    VALUES (p_run, v_attempts, v_queue, p_worker, p_started, p_now, 'success');
    UPDATE tiers_workflow_steps s SET
        state = 'completed', result = p_result, result_size = NULL, error = NULL,
        attempts = 1, finished_ms = p_now
     WHERE s.workflow_id = p_wf AND s.name = p_step AND s.state = 'running'
       AND s.run_id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'TS001',
            MESSAGE = 'step ' || p_step || ' is not running';
    END IF;
    RETURN v_queue;
END
$fn$
"""

STEP_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_step_v2(
    p_wf text, p_now bigint, p_channel text, p_worker text, p_lease_ms bigint,
    p_prev_run text, p_prev_fence integer, p_prev_result json, p_prev_started bigint,
    p_prev_step text,
    p_step_name text, p_step_position integer, p_step_fn text, p_step_started bigint,
    p_run json
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_wf tiers_workflows;
    v_freed text;  -- the pool whose slot the previous step's run left this worker
    v_q record;
    v_running integer;
    v_mine integer;
    v_room boolean := true;
    v_run tiers_runs;
BEGIN
    -- 1. The workflow's row (`Journal.lock_running`).
    v_wf := tiers_lock_workflow_v1(p_wf, p_now, p_channel);
    IF v_wf.id IS NULL OR v_wf.state <> 'running' THEN
        RAISE EXCEPTION USING ERRCODE = 'TS002', MESSAGE = 'workflow ' || p_wf || ' is not running';
    END IF;

    -- 2. The previous inline step's success.
    IF p_prev_run IS NOT NULL THEN
        v_freed := tiers_inline_done_v2(p_wf, p_now, p_worker, p_prev_run, p_prev_fence,
                                        p_prev_result, p_prev_started, p_prev_step);
    END IF;

    -- 3. The new step's journal entry.
    INSERT INTO tiers_workflow_steps (workflow_id, name, position, kind, state, fn, run_id,
                                      attempts, started_ms)
    VALUES (p_wf, p_step_name, p_step_position, 'step', 'running', p_step_fn,
            p_run ->> 'id', 0, p_step_started);

    -- 4. A slot of the pool, if one is free, counted after its row is locked; or the
    -- slot the previous step freed in this transaction, which changes no count: the
    -- row is then only read.
    v_run := json_populate_record(NULL::tiers_runs, p_run);
    IF v_run.queue IS NOT NULL AND v_run.queue <> '' THEN
        IF v_run.queue = v_freed THEN
            SELECT q.* INTO v_q FROM tiers_queues q WHERE q.name = v_run.queue;
        ELSE
            SELECT q.* INTO v_q FROM tiers_queues q WHERE q.name = v_run.queue FOR UPDATE;
        END IF;
        IF FOUND THEN
            IF v_q.rate_limit IS NOT NULL OR v_q.group_name IS NOT NULL
               OR v_run.key IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'TS003',
                    MESSAGE = 'pool ' || v_run.queue || ' needs the general start';
            END IF;
            SELECT count(*)::integer,
                   count(*) FILTER (WHERE t.lease_owner = p_worker)::integer
              INTO v_running, v_mine
              FROM tiers_runs t WHERE t.state = 'running' AND t.queue = v_run.queue;
            v_room := (v_q.max_parallelism IS NULL OR v_running < v_q.max_parallelism)
                  AND (v_q.max_per_worker IS NULL OR v_mine < v_q.max_per_worker);
        END IF;
    END IF;

    -- 5. The new run: running, held by the worker, if it took a slot; else pending.
    IF v_room THEN
        v_run.state := 'running';
        v_run.attempts := 1;
        v_run.fence := 1;
        v_run.lease_owner := p_worker;
        v_run.lease_until_ms := p_now + p_lease_ms;
        v_run.started_ms := p_now;
        v_run.due_ms := p_now;
    END IF;
    INSERT INTO tiers_runs (
        id, fn, args, state, due_ms, priority, queue, key, owner, initial_backoff_ms,
        base, max_failures, jitter, max_backoff_ms, on_complete, context, trace,
        timeout_ms, created_ms, attempts, failures, fence, cancel_requested,
        handler_failures, lease_owner, lease_until_ms, started_ms)
    VALUES (
        v_run.id, v_run.fn, v_run.args, v_run.state, v_run.due_ms, v_run.priority,
        v_run.queue, v_run.key, v_run.owner, v_run.initial_backoff_ms, v_run.base,
        v_run.max_failures, v_run.jitter, v_run.max_backoff_ms, v_run.on_complete,
        v_run.context, v_run.trace, v_run.timeout_ms, v_run.created_ms, v_run.attempts,
        v_run.failures, v_run.fence, v_run.cancel_requested, v_run.handler_failures,
        v_run.lease_owner, v_run.lease_until_ms, v_run.started_ms);
    RETURN v_room;
END
$fn$
"""

STEP_SIGNATURE = (
    "tiers_step_v2(text, bigint, text, text, bigint, text, integer, json, bigint, text, "
    "text, integer, text, bigint, json)"
)
_INLINE_DONE_SIGNATURE = (
    "tiers_inline_done_v2(text, bigint, text, text, integer, json, bigint, text)"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(INLINE_DONE_FUNCTION)
        op.get_bind().exec_driver_sql(STEP_FUNCTION)
        # Generic plans, as for version 1 (workflow_0006).
        op.get_bind().exec_driver_sql(
            f"ALTER FUNCTION {STEP_SIGNATURE} SET plan_cache_mode = force_generic_plan"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(f"DROP FUNCTION IF EXISTS {STEP_SIGNATURE}")
        op.get_bind().exec_driver_sql(f"DROP FUNCTION IF EXISTS {_INLINE_DONE_SIGNATURE}")
