"""The engine's tables as SQLAlchemy Core handles, with the columns, predicates,
statements and row builders that more than one part of the store uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Row,
    Table,
    and_,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    update,
)

from ._models import (
    PENDING,
    AttemptRow,
    KeyLimitRow,
    KeyStartRow,
    MetaRow,
    QueueGroupRow,
    QueueRow,
    RunRow,
    WorkerRow,
)
from ._run_types import NewRun, QueueLimits

runs: Table = RunRow.__table__  # type: ignore[attr-defined]
attempts_t: Table = AttemptRow.__table__  # type: ignore[attr-defined]
queues_t: Table = QueueRow.__table__  # type: ignore[attr-defined]
meta_t: Table = MetaRow.__table__  # type: ignore[attr-defined]
workers_t: Table = WorkerRow.__table__  # type: ignore[attr-defined]
key_limits_t: Table = KeyLimitRow.__table__  # type: ignore[attr-defined]
key_starts_t: Table = KeyStartRow.__table__  # type: ignore[attr-defined]
groups_t: Table = QueueGroupRow.__table__  # type: ignore[attr-defined]


CLAIM_COLUMNS = (
    runs.c.priority,
    runs.c.due_ms,
    runs.c.id,
    runs.c.fn,
    runs.c.args,
    runs.c.state,
    runs.c.fence,
    runs.c.attempts,
    runs.c.failures,
    runs.c.queue,
    runs.c.key,
    runs.c.owner,
    runs.c.on_complete,
    runs.c.context,
    runs.c.outcome,
    runs.c.result,
    runs.c.error,
    runs.c.trace,
    runs.c.timeout_ms,
)


# Columns a decision about a run's next state needs.
DECIDE_COLUMNS = (
    runs.c.id,
    runs.c.trace,
    runs.c.fn,
    runs.c.fence,
    runs.c.state,
    runs.c.attempts,
    runs.c.failures,
    runs.c.max_failures,
    runs.c.initial_backoff_ms,
    runs.c.base,
    runs.c.jitter,
    runs.c.max_backoff_ms,
    runs.c.cancel_requested,
    runs.c.on_complete,
    runs.c.context,
    runs.c.queue,
    runs.c.owner,
    runs.c.started_ms,
    runs.c.lease_owner,
    runs.c.handler_failures,
    runs.c.outcome,
    runs.c.result,
    runs.c.error,
)


# One statement shape for every state change of a leased run, so a batch of them
# goes to the database as a single executemany. `b_trace` stores the trace context of
# a run that had none (its first attempt's span, when it was enqueued outside any
# trace); a stored context is kept, and None (`settle_values`' default) changes
# nothing.
SETTLE = (
    update(runs)
    .where(runs.c.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        outcome=bindparam("b_outcome"),
        result=bindparam("b_result", type_=runs.c.result.type),
        error=bindparam("b_error"),
        failures=bindparam("b_failures"),
        attempts=bindparam("b_attempts"),
        due_ms=bindparam("b_due_ms"),
        fence=bindparam("b_fence"),
        lease_owner=bindparam("b_lease_owner"),
        lease_until_ms=bindparam("b_lease_until_ms"),
        finished_ms=bindparam("b_finished_ms"),
        handler_failures=bindparam("b_handler_failures"),
        handler_error=bindparam("b_handler_error"),
        trace=func.coalesce(runs.c.trace, bindparam("b_trace", type_=runs.c.trace.type)),
    )
)


def in_state(*states: str) -> ColumnElement[bool]:
    """`state IN ('a', 'b')` with the states as SQL literals, not bound parameters.

    Partial indexes are defined on literal state predicates; a query can use one only
    if the database can see that its own predicate implies the index's. With bound
    parameters neither SQLite nor a generic PostgreSQL plan can, and claims would
    scan every stored run.
    """
    literals: list[ColumnElement[Any]] = [literal_column(f"'{state}'") for state in states]
    # SQLite matches `state = 'x'` to an index on `state = 'x'`, but not `state IN ('x')`.
    return runs.c.state == literals[0] if len(literals) == 1 else runs.c.state.in_(literals)


# Hot statements, built once: SQLAlchemy then skips construction and cache-key work.
IDS: BindParameter[Any] = bindparam("ids", expanding=True)
ROWS_BY_ID = select(*DECIDE_COLUMNS).where(runs.c.id.in_(IDS))
# The same for one id: an expanding IN is re-rendered on every execution.
ROW_BY_ID = select(*DECIDE_COLUMNS).where(runs.c.id == bindparam("id"))
INSERT_RUNS = insert(runs)
INSERT_ATTEMPTS = insert(attempts_t)


def runs_in_queue(queue: str) -> ColumnElement[bool]:
    """The runs of one queue (a pool), as a condition for `Store.cancel_many`."""
    return runs.c.queue == queue


def held_in(state: str) -> ColumnElement[bool]:
    """The run `b_id`, still in `state` under the fence `b_fence` its holder knows."""
    return and_(
        runs.c.id == bindparam("b_id"), runs.c.fence == bindparam("b_fence"), runs.c.state == state
    )


def new_row(r: NewRun, now: int) -> dict[str, Any]:
    """The column values of a new pending run (its keys only if it has any, so a
    plain run's INSERT stays as it was)."""
    row = {
        "id": r.id,
        "fn": r.fn,
        "args": r.args,
        "state": PENDING,
        "due_ms": r.due_ms,
        "priority": r.priority,
        "queue": r.queue,
        "key": r.key,
        "owner": r.owner,
        "initial_backoff_ms": r.initial_backoff_ms,
        "base": r.base,
        "max_failures": r.max_failures,
        "jitter": r.jitter,
        "max_backoff_ms": r.max_backoff_ms,
        "on_complete": r.on_complete,
        "context": r.context,
        "trace": r.trace,
        "timeout_ms": r.timeout_ms,
        "created_ms": now,
        "attempts": 0,
        "failures": 0,
        "fence": 0,
        "cancel_requested": False,
        "handler_failures": 0,
    }
    if not r.plain:
        row.update(idempotency_key=r.idempotency_key, debounce_key=r.debounce_key)
    return row


def settle_values(row: Row[Any], **changes: Any) -> dict[str, Any]:
    """Parameters for `SETTLE`: the row's current values with `changes` applied."""
    values = {
        "state": row.state,
        "outcome": row.outcome,
        "result": row.result,
        "error": row.error,
        "failures": row.failures,
        "attempts": row.attempts,
        "due_ms": 0,
        "fence": row.fence,
        "lease_owner": None,
        "lease_until_ms": None,
        "finished_ms": None,
        "handler_failures": row.handler_failures,
        "handler_error": None,
        "trace": None,  # a context to store if the run has none (`SETTLE`)
    }
    values.update(changes)
    return {"b_id": row.id, **{f"b_{k}": v for k, v in values.items()}}


def attempt_row(
    run_id: str,
    number: int | None,
    queue: str,
    worker: str | None,
    started_ms: int,
    finished_ms: int,
    outcome: str,
    error: str | None = None,
    traceback: str | None = None,
) -> dict[str, Any]:
    """Parameters for `INSERT_ATTEMPTS`: one attempt of a run, as it ended."""
    return {
        "run_id": run_id,
        "number": number,
        "queue": queue,
        "worker": worker,
        "started_ms": started_ms,
        "finished_ms": finished_ms,
        "outcome": outcome,
        "error": error,
        "traceback": traceback,
    }


def limits_of(row: Any) -> QueueLimits:
    """The limits a `tiers_queues` row holds (a SQLAlchemy row or a named tuple)."""
    return QueueLimits(**{f.name: getattr(row, f.name) for f in dataclasses.fields(QueueLimits)})


# Workers whose heartbeat is recent enough (three leases): who can run what.
LIVE_WORKERS = select(
    workers_t.c.id, workers_t.c.functions, workers_t.c.handlers, workers_t.c.heartbeat_ms
).where(workers_t.c.heartbeat_ms + 3 * workers_t.c.lease_ms >= bindparam("now"))


def names_in(stored: Any) -> set[str]:
    """The names in a stored JSON list (nothing, if it cannot be read)."""
    return {n for n in stored if isinstance(n, str)} if isinstance(stored, list) else set()


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
