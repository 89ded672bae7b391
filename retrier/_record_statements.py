"""The statements of recording (`_records.py`): completing runs, their attempts' rows,
and the reads that decide whether a freed slot is worth a wake-up."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    column,
    false,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

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


def _successful_attempt(done: CTE, started: ColumnElement[Any]) -> CTE:
    """The attempts' rows of the runs `done` completed with a success (`started`: when
    each attempt started), as a write in a WITH clause."""
    return insert(attempts_t).from_select(
        ["run_id", "number", "queue", "worker", "started_ms", "finished_ms", "outcome"],
        select(
            done.c.id,
            done.c.attempts,
            done.c.queue,
            bindparam("b_worker", type_=String),
            started,
            bindparam("b_now"),
            literal(SUCCESS, type_=String),
        ),
    ).cte("attempt")


def completing_with_attempt() -> Select[Any]:
    """`COMPLETE_SUCCESS` and the attempt's row in one statement (a write in a WITH
    clause: one round trip where the database allows it)."""
    done = COMPLETE_SUCCESS.cte("done")
    return select(done).add_cte(
        _successful_attempt(done, bindparam("b_started", type_=BigInteger))
    )


def _plain_success(run_id: Any, fence: Any) -> ColumnElement[bool]:
    """The run `run_id`, held under `fence`, that can simply complete with a success:
    not canceled meanwhile, and without an on_complete to deliver."""
    return and_(
        runs.c.id == run_id,
        runs.c.fence == fence,
        runs.c.state == RUNNING,
        runs.c.cancel_requested == false(),
        runs.c.on_complete.is_(None),
    )


# Many successes of runs without an on_complete, executed as one batch.
COMPLETE_PLAIN_SUCCESS = (
    update(runs)
    .where(_plain_success(bindparam("b_id"), bindparam("b_fence")))
    .values(**SUCCESS_VALUES)
)


COMPLETE_DELIVERY = (
    update(runs)
    .where(held_in(DELIVERING))
    .values(state=COMPLETED, lease_owner=None, lease_until_ms=None)
)


def completing_plain_batch() -> Select[Any]:
    """`COMPLETE_PLAIN_SUCCESS` for a whole batch, with each completed run's attempt
    row, as one statement (PostgreSQL: arrays, `unnest`, writes in a WITH clause);
    returns the runs it completed. Parameters: the batch's `b_ids`, `b_fences`,
    `b_results` (JSON text) and `b_started` as four arrays, `b_now` and `b_worker`.
    One round trip, and one statement for the server to run, where an executemany
    of each took one per row."""
    batch = (
        func.unnest(
            bindparam("b_ids", type_=ARRAY(String)),
            bindparam("b_fences", type_=ARRAY(Integer)),
            bindparam("b_results", type_=ARRAY(Text)),
            bindparam("b_started", type_=ARRAY(BigInteger)),
        )
        .table_valued(
            column("id", String),
            column("fence", Integer),
            column("result", Text),
            column("started_ms", BigInteger),
        )
        .render_derived(name="b")
    )
    done = (
        update(runs)
        .where(_plain_success(batch.c.id, batch.c.fence))
        .values(**{**SUCCESS_VALUES, "result": cast(batch.c.result, runs.c.result.type)})
        .returning(runs.c.id, runs.c.attempts, runs.c.queue, batch.c.started_ms)
        .cte("done")
    )
    return select(done.c.id).add_cte(_successful_attempt(done, done.c.started_ms))
