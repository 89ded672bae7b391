"""The statements of recording (`_records.py`): completing runs, their attempts' rows,
and the reads that decide whether a freed slot is worth a wake-up."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Select,
    String,
    bindparam,
    case,
    false,
    insert,
    literal,
    select,
    update,
)

from ._models import CLAIMABLE, COMPLETED, DELIVERING, RUNNING, SUCCESS
from ._tables import attempts_t, held_in, in_state, queues_t, runs

# These queues and the other members of their pool groups (a freed slot of a group
# member may start a run of another member).
SHARING = select(queues_t.c.name).where(
    queues_t.c.group_name.in_(
        select(queues_t.c.group_name).where(
            queues_t.c.name.in_(bindparam("queues", expanding=True)),
            queues_t.c.group_name.is_not(None),
        )
    )
)
# Whether any run of these queues is due now (a freed slot is worth a wake-up).
WAITING_IN = (
    select(runs.c.id)
    .where(
        in_state(*CLAIMABLE),
        runs.c.due_ms <= bindparam("now"),
        runs.c.queue.in_(bindparam("queues", expanding=True)),
    )
    .limit(1)
)


# The columns of a run that completes with a success (result in `b_result`).
SUCCESS_VALUES: dict[str, Any] = {
    "state": COMPLETED,
    "outcome": SUCCESS,
    "result": bindparam("b_result", type_=runs.c.result.type),
    "error": None,
    "due_ms": 0,
    "lease_owner": None,
    "lease_until_ms": None,
    "finished_ms": bindparam("b_now"),
    "handler_error": None,
}
# A held run's successful attempt, when it can simply complete (fenced, not canceled):
# one statement where the general record reads the row first.
COMPLETE_SUCCESS = (
    update(runs)
    .where(held_in(RUNNING), runs.c.cancel_requested == false())
    .values(
        **SUCCESS_VALUES,
        fence=case((runs.c.on_complete.is_(None), runs.c.fence), else_=runs.c.fence + 1),
    )
    .returning(
        runs.c.id, runs.c.fn, runs.c.fence, runs.c.attempts, runs.c.on_complete,
        runs.c.context, runs.c.queue, runs.c.owner, runs.c.trace,
    )
)


def completing_with_attempt() -> Select[Any]:
    """`COMPLETE_SUCCESS` and the attempt's row in one statement (a write in a WITH
    clause: one round trip where the database allows it)."""
    done = COMPLETE_SUCCESS.cte("done")
    attempt = insert(attempts_t).from_select(
        ["run_id", "number", "queue", "worker", "started_ms", "finished_ms", "outcome"],
        select(
            done.c.id,
            done.c.attempts,
            done.c.queue,
            bindparam("b_worker", type_=String),
            bindparam("b_started", type_=BigInteger),
            bindparam("b_now"),
            literal(SUCCESS, type_=String),
        ),
    )
    return select(done).add_cte(attempt.cte("attempt"))


# Many successes of runs without an on_complete, executed as one batch.
COMPLETE_PLAIN_SUCCESS = (
    update(runs)
    .where(held_in(RUNNING), runs.c.cancel_requested == false(), runs.c.on_complete.is_(None))
    .values(**SUCCESS_VALUES)
)


COMPLETE_DELIVERY = (
    update(runs)
    .where(held_in(DELIVERING))
    .values(state=COMPLETED, lease_owner=None, lease_until_ms=None)
)


# `COMPLETE_PLAIN_SUCCESS` for a whole batch, with each completed run's attempt row,
# as one PostgreSQL statement (parameters: the batch's ids, fences, results as JSON
# text and attempts' start times, in four arrays; `now`, `worker`): what it returns
# is the runs it completed. One round trip, and one statement for the server to run,
# where an executemany of each took one per row.
COMPLETE_PLAIN_BATCH = f"""
WITH done AS (
    UPDATE tiers_runs t
       SET state = '{COMPLETED}', outcome = '{SUCCESS}', result = b.result::json,
           error = NULL, due_ms = 0, lease_owner = NULL, lease_until_ms = NULL,
           finished_ms = %(now)s, handler_error = NULL
      FROM unnest(%(ids)s::text[], %(fences)s::integer[], %(results)s::text[],
                  %(started)s::bigint[]) AS b(id, fence, result, started_ms)
     WHERE t.id = b.id AND t.fence = b.fence AND t.state = '{RUNNING}'
       AND NOT t.cancel_requested AND t.on_complete IS NULL
    RETURNING t.id, t.attempts, t.queue, b.started_ms
)
INSERT INTO tiers_attempts (run_id, number, queue, worker, started_ms, finished_ms, outcome)
SELECT d.id, d.attempts, d.queue, %(worker)s, d.started_ms, %(now)s, '{SUCCESS}' FROM done d
RETURNING run_id
"""
