"""Workflows on PostgreSQL: a step's start, and a workflow's end, as one server-side
call each (`tiers_step_v1`, `tiers_finish_v1`).

An inline step's transaction (lock the workflow, complete the previous inline
step's run with its attempt and journal it, journal the new step, take a slot of the
pool and store the new run) took nine round trips from Python; this function does
the same writes, in the same order and under the same locks, in one statement that
commits alone. It does only the plain case, all or nothing: where the previous
outcome cannot simply complete (a stale lease, a cancel request), it raises
`TS001`; where the pool has limits beyond `max_parallelism` and `max_per_worker`
(a group, a rate, caps per key) or the run has a key, `TS003`; a workflow that is
not running, `TS002`. Nothing is then written, and the caller takes the general
path in Python (`workflow._server_calls`). The rules it applies are those of
`Claims.queue_has_room` for such a pool: the pool's row locked, its running runs
(and the worker's) counted after the lock, in statements of their own.

`tiers_finish_v1` ends a workflow the same way (`Journal.finish`): its row locked,
the last inline step's success stored, the row's end written; a workflow with a
deadline, an on_complete or a parent takes the general path (`TS003`), one that is
no longer running returns false. Both share `tiers_lock_workflow_v1` and
`tiers_inline_done_v1`.

A new version of a function is a new name, created by a new migration: a release
running beside another in a rolling deploy keeps calling its own. SQLite has no
such function (its statements cost no round trips): nothing to do there.

Revision ID: workflow_0005
Revises: workflow_0004
"""

from __future__ import annotations

from alembic import op

revision = "workflow_0005"
down_revision = "workflow_0004"
branch_labels = None
depends_on = None

LOCK_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_lock_workflow_v1(p_wf text, p_now bigint, p_channel text)
RETURNS tiers_workflows LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_row tiers_workflows;
BEGIN
    -- The workflow's row, as `Journal._lock` locks it (and tells its watchers, if it
    -- has any, at commit); NULL if there is none.
    SELECT w.* INTO v_row FROM tiers_workflows w WHERE w.id = p_wf FOR UPDATE;
    IF FOUND AND v_row.watched_until_ms > p_now THEN
        PERFORM pg_notify(p_channel, p_wf);
    END IF;
    RETURN v_row;
END
$fn$
"""

INLINE_DONE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_inline_done_v1(
    p_wf text, p_now bigint, p_worker text, p_run text, p_fence integer, p_result json,
    p_started bigint, p_step text
) RETURNS void LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_attempts integer;
    v_queue text;
    v_on_complete text;
BEGIN
    -- An inline step's run completes with its attempt, and its journal entry takes the
    -- result (`Records._complete_success`, `Journal.settle_step`), or TS001.
    UPDATE tiers_runs t SET
        state = 'completed', outcome = 'success', result = p_result,
        error = NULL, due_ms = 0, lease_owner = NULL, lease_until_ms = NULL,
        finished_ms = p_now, handler_error = NULL,
        fence = CASE WHEN t.on_complete IS NULL THEN t.fence ELSE t.fence + 1 END
     WHERE t.id = p_run AND t.fence = p_fence AND t.state = 'running'
       AND t.cancel_requested = false
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
END
$fn$
"""

STEP_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_step_v1(
    p_wf text, p_now bigint, p_channel text, p_worker text, p_lease_ms bigint,
    p_prev_run text, p_prev_fence integer, p_prev_result json, p_prev_started bigint,
    p_prev_step text,
    p_step_name text, p_step_position integer, p_step_fn text, p_step_started bigint,
    p_run json
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_wf tiers_workflows;
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
        PERFORM tiers_inline_done_v1(p_wf, p_now, p_worker, p_prev_run, p_prev_fence,
                                     p_prev_result, p_prev_started, p_prev_step);
    END IF;

    -- 3. The new step's journal entry.
    INSERT INTO tiers_workflow_steps (workflow_id, name, position, kind, state, fn, run_id,
                                      attempts, started_ms)
    VALUES (p_wf, p_step_name, p_step_position, 'step', 'running', p_step_fn,
            p_run ->> 'id', 0, p_step_started);

    -- 4. A slot of the pool, if one is free: its row locked, then counted.
    v_run := json_populate_record(NULL::tiers_runs, p_run);
    IF v_run.queue IS NOT NULL AND v_run.queue <> '' THEN
        SELECT q.* INTO v_q FROM tiers_queues q WHERE q.name = v_run.queue FOR UPDATE;
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

FINISH_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tiers_finish_v1(
    p_wf text, p_now bigint, p_channel text, p_worker text,
    p_prev_run text, p_prev_fence integer, p_prev_result json, p_prev_started bigint,
    p_prev_step text, p_state text, p_result json, p_error text
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_wf tiers_workflows;
BEGIN
    -- `Journal.finish`: false, writing nothing, if the workflow has ended already.
    v_wf := tiers_lock_workflow_v1(p_wf, p_now, p_channel);
    IF v_wf.id IS NULL OR v_wf.state <> 'running' THEN
        RETURN false;
    END IF;
    IF v_wf.deadline_ms IS NOT NULL OR v_wf.on_complete IS NOT NULL
       OR v_wf.parent_id IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'TS003',
            MESSAGE = 'workflow ' || p_wf || ' needs the general end';
    END IF;
    IF p_prev_run IS NOT NULL THEN
        PERFORM tiers_inline_done_v1(p_wf, p_now, p_worker, p_prev_run, p_prev_fence,
                                     p_prev_result, p_prev_started, p_prev_step);
    END IF;
    UPDATE tiers_workflows w SET state = p_state, result = p_result, error = p_error,
           finished_ms = p_now
     WHERE w.id = p_wf;
    RETURN true;
END
$fn$
"""

FUNCTIONS = (LOCK_FUNCTION, INLINE_DONE_FUNCTION, STEP_FUNCTION, FINISH_FUNCTION)
_SIGNATURES = (
    "tiers_finish_v1(text, bigint, text, text, text, integer, json, bigint, text, text, "
    "json, text)",
    "tiers_step_v1(text, bigint, text, text, bigint, text, integer, json, bigint, text, "
    "text, integer, text, bigint, json)",
    "tiers_inline_done_v1(text, bigint, text, text, integer, json, bigint, text)",
    "tiers_lock_workflow_v1(text, bigint, text)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in FUNCTIONS:
            op.get_bind().exec_driver_sql(function)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in _SIGNATURES:
            op.get_bind().exec_driver_sql(f"DROP FUNCTION IF EXISTS {signature}")
