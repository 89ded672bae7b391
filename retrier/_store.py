"""The store: every read and write of run state, as short transactions.

One class for both databases; what differs lives in `_dialects`. Hot paths use
SQLAlchemy Core statements on the SQLModel tables and work in batches: one claim
transaction takes many runs, one record transaction finishes many.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    Connection,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    inspect,
    literal_column,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateColumn
from sqlmodel import SQLModel

from ._clock import Clock
from ._dialects import CANCEL, WAKE, Dialect, is_transient, open_dialect, reconnecting
from ._errors import RunNotFinished, RunNotFound, SchemaTooNew, UnregisteredFunction, describe
from ._models import (
    CANCELED,
    CLAIMABLE,
    COMPLETED,
    DELIVERING,
    ENGINE_TABLES,
    FAILED,
    FINISHING,
    LEASED,
    PENDING,
    RUNNING,
    SCHEMA_VERSION,
    SUCCESS,
    AttemptRow,
    MetaRow,
    QueueRow,
    RunRow,
    WorkerRow,
)
from ._policy import backoff_ms

runs: Table = RunRow.__table__  # type: ignore[attr-defined]
attempts_t: Table = AttemptRow.__table__  # type: ignore[attr-defined]
queues_t: Table = QueueRow.__table__  # type: ignore[attr-defined]
meta_t: Table = MetaRow.__table__  # type: ignore[attr-defined]
workers_t: Table = WorkerRow.__table__  # type: ignore[attr-defined]

# Fetch rounds of one claim; each round after the first follows a queue running out.
_CLAIM_ROUNDS = 4

# A handler that fails this many times is given up on; the run stays completed.
MAX_HANDLER_FAILURES = 5

# An on_complete run inside the transaction that records the completion: it gets the
# transaction's connection (the worker wraps user handlers in a SQLModel Session).
SessionHandler = Callable[["Finished", Connection], None]


@dataclass(frozen=True, slots=True)
class Runnable:
    """What a worker can run: it claims only pending runs of these `actions` and
    on_complete deliveries of these `handlers`, and leaves the rest to a worker that
    has them (a rolling deploy). None: anything (for tools and tests)."""

    actions: frozenset[str] | None = None
    handlers: frozenset[str] | None = None

    def params(self) -> dict[str, Any]:
        if self.actions is None or self.handlers is None:
            return {"any_fn": True, "fns": [], "handlers": []}
        return {"any_fn": False, "fns": sorted(self.actions), "handlers": sorted(self.handlers)}


ANYTHING = Runnable()


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as the `tiers_workers` table keeps it."""

    id: str
    host: str
    pid: int
    concurrency: int
    lease_ms: int
    runnable: Runnable


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to insert."""

    id: str
    fn: str
    args: dict[str, Any]
    due_ms: int
    initial_backoff_ms: int
    base: float
    max_failures: int
    jitter: bool
    max_backoff_ms: int
    queue: str = ""
    key: str | None = None
    owner: str | None = None
    priority: int = 0
    on_complete: str | None = None
    context: Any = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run this worker now holds a lease on, to execute or to deliver."""

    id: str
    fn: str
    args: dict[str, Any]
    state: str  # RUNNING: execute the action; DELIVERING: run its on_complete
    fence: int
    attempts: int
    failures: int
    queue: str
    owner: str | None
    on_complete: str | None
    context: Any
    outcome: str | None
    result: Any
    error: str | None
    started_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as the worker saw it."""

    run_id: str
    fence: int
    kind: str  # success | failure | fatal | canceled | released
    started_ms: int
    result: Any = None
    error: str | None = None
    retry_after_ms: int | None = None
    traceback: str | None = None  # of a failed attempt (its last lines if long)
    handler_in_txn: bool = False
    # What the worker knew of the run when it claimed it, for recording a plain
    # success (no on_complete) without reading the row back; the fence guards it.
    attempt: int | None = None
    queue: str = ""
    plain: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """A run whose outcome is final and whose on_complete must now run."""

    id: str
    fn: str
    fence: int
    outcome: str
    result: Any
    error: str | None
    on_complete: str
    context: Any
    queue: str
    owner: str | None


@dataclass(slots=True)
class Recorded:
    """What a record transaction did: what to deliver next, and what is done."""

    to_deliver: list[Finished] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    # Runs claimed in the same transaction, into the slots the outcomes freed.
    claimed: list[Claimed] = field(default_factory=list)
    wake_at_ms: int | None = None


@dataclass(slots=True)
class Canceling:
    """What `cancel_many` did: how many runs it canceled, and which of them were
    running (their cancel is best effort, by the worker that holds them)."""

    count: int = 0
    running: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    lost: set[str]
    cancel_requested: set[str]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    name: str
    max_parallelism: int | None = None
    rate_limit: int | None = None
    rate_period_ms: int | None = None
    max_per_key: int | None = None
    max_per_worker: int | None = None


_CLAIM_COLUMNS = (
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
)

# Columns a decision about a run's next state needs.
_DECIDE_COLUMNS = (
    runs.c.id,
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
# goes to the database as a single executemany.
_SETTLE = (
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
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
# The claimable runs a worker can run: pending runs of its functions, deliveries of
# its handlers (parameters from `Runnable.params`; `any_fn` lifts the filter).
_RUNNABLE = or_(
    bindparam("any_fn", type_=Boolean),
    and_(runs.c.state == PENDING, runs.c.fn.in_(bindparam("fns", expanding=True))),
    and_(
        runs.c.state == FINISHING,
        runs.c.on_complete.in_(bindparam("handlers", expanding=True)),
    ),
)
_RUNNABLE_SQL = (
    "(:any_fn OR (state = 'pending' AND fn IN :fns)"
    " OR (state = 'finishing' AND on_complete IN :handlers))"
)
_DUE_ORDERED = (
    select(*_CLAIM_COLUMNS)
    .where(in_state(*CLAIMABLE), runs.c.due_ms <= bindparam("now"), _RUNNABLE)
    .order_by(runs.c.due_ms, runs.c.priority.desc())
)
_DUE_CANDIDATES = _DUE_ORDERED.limit(bindparam("limit"))
# One queue's due runs in claim order (index ix_tiers_runs_queue_due).
_DUE_IN_QUEUE = _DUE_ORDERED.where(runs.c.queue == bindparam("queue"))
# Due deliveries of every queue (index ix_tiers_runs_finishing).
_DUE_DELIVERIES = (
    select(*_CLAIM_COLUMNS)
    .where(in_state(FINISHING), runs.c.due_ms <= bindparam("now"), _RUNNABLE)
    .order_by(runs.c.due_ms)
    .limit(bindparam("limit"))
)
# What a claim of limited queues reads once it holds their rows' locks, in one round
# trip: the queues that have claimable runs (a loose index scan: one seek per queue),
# each limited queue's running count (and how many of those the claiming worker
# holds), whether any delivery is due, and the earliest claimable run due after now.
_CLAIM_SURVEY = text(
    "WITH RECURSIVE q(name) AS ("
    " SELECT (SELECT min(queue) FROM tiers_runs WHERE state IN ('pending', 'finishing'))"
    " UNION ALL"
    " SELECT (SELECT min(r.queue) FROM tiers_runs r"
    "         WHERE r.state IN ('pending', 'finishing') AND r.queue > q.name)"
    " FROM q WHERE q.name IS NOT NULL"
    ") SELECT 'queue' AS kind, name, 0 AS n, 0 AS mine FROM q WHERE name IS NOT NULL"
    " UNION ALL"
    " SELECT 'running', queue, count(*),"
    "  sum(CASE WHEN lease_owner = :worker THEN 1 ELSE 0 END) FROM tiers_runs"
    "  WHERE state = 'running' AND queue IN :names GROUP BY queue"
    " UNION ALL"
    " SELECT 'deliveries', '', count(*), 0 FROM (SELECT 1 AS one FROM tiers_runs"
    f"  WHERE state = 'finishing' AND due_ms <= :now AND {_RUNNABLE_SQL} LIMIT 1) AS due"
    " UNION ALL"
    " SELECT 'next', '', min(due_ms), 0 FROM tiers_runs"
    f"  WHERE state IN ('pending', 'finishing') AND due_ms > :now AND {_RUNNABLE_SQL}"
).bindparams(
    # Typed: an empty list renders as an empty set of that type.
    bindparam("names", expanding=True, type_=String),
    bindparam("fns", expanding=True, type_=String),
    bindparam("handlers", expanding=True, type_=String),
    bindparam("any_fn", type_=Boolean),
)
_NEXT_DUE_AFTER = select(func.min(runs.c.due_ms)).where(
    in_state(*CLAIMABLE), runs.c.due_ms > bindparam("now"), _RUNNABLE
)
_NEXT_DUE = select(func.min(runs.c.due_ms)).where(in_state(*CLAIMABLE), _RUNNABLE)
_START_RUNS = (
    update(runs)
    .where(runs.c.id.in_(_IDS))
    .values(
        state=RUNNING,
        fence=runs.c.fence + 1,
        attempts=runs.c.attempts + 1,
        lease_owner=bindparam("worker"),
        lease_until_ms=bindparam("until"),
        started_ms=bindparam("now"),
    )
)
_START_DELIVERIES = (
    update(runs)
    .where(runs.c.id.in_(_IDS))
    .values(
        state=DELIVERING,
        fence=runs.c.fence + 1,
        lease_owner=bindparam("worker"),
        lease_until_ms=bindparam("until"),
    )
)
_ROWS_BY_ID = select(*_DECIDE_COLUMNS).where(runs.c.id.in_(_IDS))
# The same for one id: an expanding IN is re-rendered on every execution.
_ROW_BY_ID = select(*_DECIDE_COLUMNS).where(runs.c.id == bindparam("id"))
INSERT_RUNS = insert(runs)
INSERT_ATTEMPTS = insert(attempts_t)
# Whether any run of these queues is due now (a freed slot is worth a wake-up).
_WAITING_IN = (
    select(runs.c.id)
    .where(
        in_state(*CLAIMABLE),
        runs.c.due_ms <= bindparam("now"),
        runs.c.queue.in_(bindparam("queues", expanding=True)),
    )
    .limit(1)
)


def runs_in_queue(queue: str) -> ColumnElement[bool]:
    """The runs of one queue (a pool), as a condition for `Store.cancel_many`."""
    return runs.c.queue == queue


def _held_in(state: str) -> ColumnElement[bool]:
    """The run `b_id`, still in `state` under the fence `b_fence` its holder knows."""
    return and_(
        runs.c.id == bindparam("b_id"), runs.c.fence == bindparam("b_fence"), runs.c.state == state
    )


# The columns of a run that completes with a success (result in `b_result`).
_SUCCESS_VALUES: dict[str, Any] = {
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
_COMPLETE_SUCCESS = (
    update(runs)
    .where(_held_in(RUNNING), runs.c.cancel_requested == false())
    .values(
        **_SUCCESS_VALUES,
        fence=case((runs.c.on_complete.is_(None), runs.c.fence), else_=runs.c.fence + 1),
    )
    .returning(
        runs.c.fn, runs.c.fence, runs.c.attempts, runs.c.on_complete, runs.c.context,
        runs.c.queue, runs.c.owner,
    )
)
# Many successes of runs without an on_complete, executed as one batch.
_COMPLETE_PLAIN_SUCCESS = (
    update(runs)
    .where(_held_in(RUNNING), runs.c.cancel_requested == false(), runs.c.on_complete.is_(None))
    .values(**_SUCCESS_VALUES)
)
_COMPLETE_DELIVERY = (
    update(runs)
    .where(_held_in(DELIVERING))
    .values(state=COMPLETED, lease_owner=None, lease_until_ms=None)
)
# The pending runs of one function for one owner (a workflow's drivers).
_PENDING_OF_OWNER = select(runs.c.id, runs.c.due_ms).where(
    runs.c.owner == bindparam("owner"), runs.c.fn == bindparam("fn"), in_state(PENDING)
)
# Runs about to be canceled, locked in id order.
_LOCK_TO_CANCEL = (
    select(runs.c.id, runs.c.state, runs.c.cancel_requested)
    .where(runs.c.id.in_(_IDS))
    .order_by(runs.c.id)
)
_CANCEL_PENDING = (
    update(runs)
    .where(runs.c.id.in_(_IDS), in_state(PENDING))
    .values(
        state=case((runs.c.on_complete.is_(None), COMPLETED), else_=FINISHING),
        outcome=CANCELED,
        finished_ms=bindparam("now"),
        due_ms=bindparam("now"),
        fence=runs.c.fence + 1,
    )
)
_REQUEST_CANCEL = (
    update(runs).where(runs.c.id.in_(_IDS), in_state(RUNNING)).values(cancel_requested=True)
)
# Workers whose heartbeat is recent enough: three leases.
_LIVE_WORKERS = select(workers_t.c.functions, workers_t.c.handlers).where(
    workers_t.c.heartbeat_ms + 3 * workers_t.c.lease_ms >= bindparam("now")
)
# Rows of workers silent for this long are deleted.
_FORGET_MS = 86_400_000
# One queue's limits, to lock its row (its budget is then counted in statements of
# their own, see _QueueBudget.lock).
_QUEUE = select(queues_t).where(queues_t.c.name == bindparam("queue"))


class Store:
    """All durable state of one database, for every tier."""

    def __init__(self, url: str, clock: Clock, namespace: str | None = None) -> None:
        self.url = url
        self.clock = clock
        self.dialect: Dialect = open_dialect(url, namespace)
        self.engine = self.dialect.engine
        self._rng = random.Random()
        self._due_candidates = self.dialect.lock_for_claim(_DUE_CANDIDATES)
        self._due_in_queue = self.dialect.lock_for_claim(_DUE_IN_QUEUE.limit(bindparam("limit")))
        self._due_deliveries = self.dialect.lock_for_claim(_DUE_DELIVERIES)
        self._rows_by_id = self.dialect.lock_rows(_ROWS_BY_ID)
        self._row_by_id = self.dialect.lock_rows(_ROW_BY_ID)
        self._update_returning = bool(self.engine.dialect.update_returning)
        self._batch_rowcount = bool(self.engine.dialect.supports_sane_multi_rowcount)
        self._locked_queue = self.dialect.lock_rows(_QUEUE)
        self._lock_to_cancel = self.dialect.lock_rows(_LOCK_TO_CANCEL)
        self._pending_of_owner = self.dialect.lock_rows(_PENDING_OF_OWNER)
        self._limited_queues = self.dialect.lock_rows(_LIMITED_QUEUES)

    # -- schema -----------------------------------------------------------------

    def create_schema(self, extra_tables: Sequence[Table] = ()) -> None:
        """Create missing tables; refuse a database written by a newer version."""
        with self.dialect.write() as conn:
            self.dialect.lock_schema(conn)
            tables = [*ENGINE_TABLES, *extra_tables]
            SQLModel.metadata.create_all(conn, tables=tables)
            _add_missing_columns(conn, tables)
            for table in tables:
                for index in table.indexes:  # added since the table was created
                    index.create(conn, checkfirst=True)
            self.dialect.create_extras(conn)
            found = conn.execute(
                select(meta_t.c.value).where(meta_t.c.key == "schema_version")
            ).scalar()
            if found is None:
                conn.execute(insert(meta_t).values(key="schema_version", value=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise SchemaTooNew(found, SCHEMA_VERSION)

    def dispose(self) -> None:
        self.dialect.dispose()

    def checked_out(self) -> int:
        """Connections in use right now; zero once every transaction has ended."""
        return self.dialect.checked_out()

    # -- enqueue ------------------------------------------------------------------

    def insert_runs(self, new: Sequence[NewRun], conn: Connection | None = None) -> None:
        """Insert runs, in `conn`'s transaction if given, else in a transaction of our own."""
        now = self.clock.now_ms()
        rows = [_new_row(r, now) for r in new]
        if not rows:
            return
        if conn is not None:
            conn.execute(INSERT_RUNS, rows)
            return
        self._insert_own(rows)

    @reconnecting
    def _insert_own(self, rows: list[dict[str, Any]]) -> None:
        # Workers learn of new runs from the Retrier (same process), from a trigger's
        # NOTIFY (PostgreSQL) or by polling (SQLite in other processes).
        try:
            with self.dialect.write_one() if len(rows) == 1 else self.dialect.write() as own:
                own.execute(insert(runs), rows)
        except IntegrityError:
            # Tried again after a dropped connection: the first try may have committed.
            if self.states(r["id"] for r in rows).keys() != {r["id"] for r in rows}:
                raise

    def ensure_pending(self, conn: Connection, new: NewRun) -> None:
        """Make sure one pending run of `new.fn` for `new.owner` is due by `new.due_ms`:
        bring an existing one forward, or insert `new` if there is none. The caller
        serializes calls for one owner (by locking the owner's row first), so they
        never leave two such runs (a workflow's driver)."""
        pending = conn.execute(
            self._pending_of_owner, {"owner": new.owner, "fn": new.fn}
        ).all()
        if any(p.due_ms <= new.due_ms for p in pending):
            return
        if pending:
            conn.execute(
                update(runs).where(runs.c.id == pending[0].id).values(due_ms=new.due_ms)
            )
            return
        self.insert_runs([new], conn)

    def insert_running(
        self, new: NewRun, worker: str, lease_ms: int, conn: Connection
    ) -> Claimed | None:
        """Insert `new` already claimed by `worker`, if its queue has room now.

        For a caller that will execute the run itself at once (a workflow's fast
        path): the run counts against its queue's limits like any claimed run, and
        `None` means the queue is full, so nothing was written. The caller runs it
        with `Worker.attempt_claimed`.
        """
        now = self.clock.now_ms()
        if new.queue and not self._queue_has_room(conn, new.queue, new.key, worker):
            return None
        row = _new_row(new, now)
        row.update(
            state=RUNNING,
            attempts=1,
            fence=1,
            lease_owner=worker,
            lease_until_ms=now + lease_ms,
            started_ms=now,
            due_ms=now,
        )
        conn.execute(INSERT_RUNS, [row])
        return Claimed(
            id=new.id,
            fn=new.fn,
            args=new.args,
            state=RUNNING,
            fence=1,
            attempts=1,
            failures=0,
            queue=new.queue,
            owner=new.owner,
            on_complete=new.on_complete,
            context=new.context,
            outcome=None,
            result=None,
            error=None,
            started_ms=now,
        )

    def _queue_has_room(
        self, conn: Connection, queue: str, key: str | None, worker: str
    ) -> bool:
        # Locks the queue's row as a claim does, so the two cannot both take its last slot
        # (a claim locks every limited queue's row, this one included).
        locked = (self._locked_queue, {"queue": queue})
        return _QueueBudget.load(conn, locked, self.clock, worker).take(queue, key)

    def insert_finished(
        self,
        new: NewRun,
        outcome: str,
        conn: Connection,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        """Insert a run whose outcome is already known; only its on_complete is left.

        Any worker delivers the on_complete (exactly once, as for any run). A higher
        tier uses this to report an outcome it reached by itself, such as a workflow's.
        """
        now = self.clock.now_ms()
        row = _new_row(new, now)
        row.update(
            state=FINISHING if new.on_complete else COMPLETED,
            outcome=outcome,
            result=result,
            error=error,
            finished_ms=now,
            due_ms=now,
        )
        conn.execute(INSERT_RUNS, [row])  # the PostgreSQL trigger wakes the workers


    # -- claim ----------------------------------------------------------------------

    def claim(
        self, worker: str, limit: int, lease_ms: int, runnable: Runnable = ANYTHING
    ) -> tuple[list[Claimed], int | None]:
        """Lease up to `limit` due runs that `runnable` covers, honouring every
        queue's limits.

        Returns the claimed runs and, if fewer than `limit` could start now, when
        the worker should look again: the next due time, or the moment a rate
        limit lets more start (None: only new work or freed slots can help).
        """
        if limit <= 0:
            return [], None
        with self.dialect.write_internal() as conn:
            return self._claim(conn, worker, limit, lease_ms, runnable)

    def _claim(
        self, conn: Connection, worker: str, limit: int, lease_ms: int, runnable: Runnable
    ) -> tuple[list[Claimed], int | None]:
        limits, now = _QueueBudget.lock(conn, self._limited_queues, clock=self.clock)
        survey: _Survey | None = None
        rate_retry_ms: int | None = None
        can_run = runnable.params()
        if limits:
            survey = _Survey.read(conn, list(limits), worker, now, can_run)
            budget = _QueueBudget.build(conn, limits, survey.running, survey.mine, now)
            chosen = self._choose_limited(conn, budget, survey, limit, can_run)
            rate_retry_ms = budget.rate_retry_ms
        else:
            chosen = list(
                conn.execute(self._due_candidates, {"now": now, "limit": limit, **can_run})
            )
        until = now + lease_ms
        to_run = [r.id for r in chosen if r.state == PENDING]
        to_deliver = [r.id for r in chosen if r.state == FINISHING]
        lease = {"worker": worker, "until": until, "now": now}
        if to_run:
            conn.execute(_START_RUNS, {"ids": to_run, **lease})
        if to_deliver:
            conn.execute(_START_DELIVERIES, {"ids": to_deliver, **lease})
        wake_at = rate_retry_ms
        if len(chosen) < limit:
            later = (
                survey.next_due_ms
                if survey is not None
                else conn.execute(_NEXT_DUE_AFTER, {"now": now, **can_run}).scalar()
            )
            if later is not None:
                wake_at = min(int(later), wake_at or int(later))
        claimed = [
            Claimed(
                id=r.id,
                fn=r.fn,
                args=r.args,
                state=RUNNING if r.state == PENDING else DELIVERING,
                fence=r.fence + 1,
                attempts=r.attempts + (1 if r.state == PENDING else 0),
                failures=r.failures,
                queue=r.queue,
                owner=r.owner,
                on_complete=r.on_complete,
                context=r.context,
                outcome=r.outcome,
                result=r.result,
                error=r.error,
                started_ms=now,
            )
            for r in chosen
        ]
        return claimed, wake_at

    def _choose_limited(
        self,
        conn: Connection,
        budget: _QueueBudget,
        survey: _Survey,
        limit: int,
        can_run: dict[str, Any],
    ) -> list[Row[Any]]:
        """Due runs to claim when some queues have limits; uses `budget`'s slots.

        A busy queue can fill a whole fetch with rows it has no slot left for. When a
        queue (or key) runs out during a round, fetch again without it, so the work
        of other queues behind it is not starved.
        """
        chosen: list[Row[Any]] = []
        for _ in range(_CLAIM_ROUNDS):
            want = limit - len(chosen)
            over = want * 2 + 8
            taken = {r.id for r in chosen}
            rows = self._due_outside(conn, budget, survey, taken, over, can_run)
            exhausted = budget.exhausted
            for r in rows:
                if len(chosen) == limit:
                    break
                if r.state == FINISHING or budget.take(r.queue, r.key):
                    chosen.append(r)
            if len(chosen) == limit or len(rows) < over or budget.exhausted == exhausted:
                break
        return chosen

    def _due_outside(
        self,
        conn: Connection,
        budget: _QueueBudget,
        survey: _Survey,
        taken: set[str],
        limit: int,
        can_run: dict[str, Any],
    ) -> list[Row[Any]]:
        """Up to `limit` due runs in claim order, leaving out the queues at their limit
        (but not their deliveries) and runs in `taken`, and no more of a limited queue
        than its free slots.

        `queue NOT IN (blocked)` on the claim index would read past every waiting run
        of the blocked queues, which in a backlog is all of them, on every claim.
        Instead: the survey's queues that have claimable runs, then each open queue's
        first due runs, merged.
        """
        wanted = limit + len(taken)
        params = {"now": budget.now, "limit": wanted, **can_run}
        rows: dict[str, Row[Any]] = {}
        for queue in survey.queues:
            if queue in budget.blocked:
                continue
            # No more than its free slots (its deliveries come from their own fetch).
            params["limit"] = min(wanted, budget.slots.get(queue, wanted) + len(taken))
            stmt = self._due_in_queue
            keys = budget.full_keys.get(queue)
            if keys:
                full = and_(runs.c.state == PENDING, runs.c.key.is_not(None), runs.c.key.in_(keys))
                stmt = self.dialect.lock_for_claim(
                    _DUE_IN_QUEUE.where(not_(full)).limit(bindparam("limit"))
                )
            rows.update((r.id, r) for r in conn.execute(stmt, {"queue": queue, **params}))
        if survey.deliveries:
            params["limit"] = wanted
            rows.update((r.id, r) for r in conn.execute(self._due_deliveries, params))
        fresh = (r for r in rows.values() if r.id not in taken)
        ordered = sorted(fresh, key=lambda r: (r.due_ms, -r.priority))
        return ordered[:limit]

    @reconnecting
    def next_due_ms(self, runnable: Runnable = ANYTHING) -> int | None:
        """The earliest due time of any claimable run that `runnable` covers."""
        with self.dialect.read() as conn:
            value = conn.execute(_NEXT_DUE, runnable.params()).scalar()
        return int(value) if value is not None else None

    # -- outcomes ---------------------------------------------------------------------

    def record(
        self,
        outcomes: Sequence[Outcome],
        worker: str,
        lease_ms: int,
        session_handler: SessionHandler | None = None,
        claim_limit: int = 0,
        handler_savepoint: bool = True,
        runnable: Runnable = ANYTHING,
    ) -> Recorded:
        """Store the outcomes of attempts, fenced: a stale worker's outcome is dropped.

        Runs whose on_complete takes a session have it called here, inside this
        transaction (each in a savepoint), so its writes commit with the completion.
        With `claim_limit`, the same transaction then claims up to that many due runs
        (less the on_complete deliveries this worker keeps): one transaction where a
        busy worker would otherwise need two. `handler_savepoint=False` is for the
        engine's own handlers: one that raises then rolls back the whole record.
        """
        if not outcomes:
            return Recorded()
        with self.dialect.write_internal() as conn:
            return self.record_in(
                conn,
                outcomes,
                worker,
                lease_ms,
                session_handler,
                claim_limit,
                handler_savepoint,
                runnable=runnable,
            )

    def record_in(
        self,
        conn: Connection,
        outcomes: Sequence[Outcome],
        worker: str,
        lease_ms: int,
        session_handler: SessionHandler | None = None,
        claim_limit: int = 0,
        handler_savepoint: bool = True,
        wake_waiting: bool = True,
        runnable: Runnable = ANYTHING,
    ) -> Recorded:
        """`record`, inside the caller's write transaction. `wake_waiting=False`: the
        caller takes the freed slot again in this transaction (a workflow's next
        inline step), so no other worker needs waking for it."""
        done = Recorded()
        if not outcomes:
            return done
        now = self.clock.now_ms()
        freed: set[str] = set()  # limited queues this record frees a slot of
        if (
            len(outcomes) == 1
            and outcomes[0].kind == "success"
            and outcomes[0].handler_in_txn
            and session_handler is not None
            and not handler_savepoint
            and self._update_returning
        ):
            queue = self._complete_success(conn, outcomes[0], worker, now, session_handler)
            if queue is not None:
                done.completed.append(outcomes[0].run_id)
                freed.update([queue] if queue else [])
                outcomes = []
            # Else stale, or cancel requested: the general path below decides.
        outcomes = self._complete_plain(conn, outcomes, worker, now, done, freed)
        if outcomes:
            self._record_read(
                conn, outcomes, worker, lease_ms, session_handler, handler_savepoint, now, done,
                freed,
            )
        room = claim_limit - len(done.to_deliver)
        if room > 0:
            done.claimed, done.wake_at_ms = self._claim(conn, worker, room, lease_ms, runnable)
            # Fewer than asked: nothing due is left that any worker could start
            # (queue limits are global). Exactly as many: more may be waiting.
            notify = len(done.claimed) == room
        else:
            # Slots freed and not refilled here: worth a wake-up only if work is
            # waiting for them.
            notify = (
                wake_waiting
                and self.dialect.can_notify
                and bool(freed)
                and self._waiting_in(conn, freed, now)
            )
        if notify:
            self.dialect.notify(conn, WAKE)
        return done

    def _record_read(
        self,
        conn: Connection,
        outcomes: Sequence[Outcome],
        worker: str,
        lease_ms: int,
        session_handler: SessionHandler | None,
        handler_savepoint: bool,
        now: int,
        done: Recorded,
        freed: set[str],
    ) -> None:
        """The general record: read each run, decide its next state, write it."""
        current = self._rows_for_update(conn, [o.run_id for o in outcomes])
        settles: list[dict[str, Any]] = []
        attempt_rows: list[dict[str, Any]] = []
        in_txn: list[Finished] = []
        for o in outcomes:
            row = current.get(o.run_id)
            if row is None or row.fence != o.fence or row.state != RUNNING:
                done.stale.append(o.run_id)
                continue
            if o.kind == "released":  # as if never started (shutdown, HandBack)
                due = now + (o.retry_after_ms or 0)
                settles.append(
                    _settle(row, state=PENDING, attempts=row.attempts - 1, due_ms=due)
                )
                continue
            settle, finished = self._decide(row, o, now, lease_ms, worker)
            settles.append(settle)
            attempt_rows.append(
                _attempt_row(
                    row.id, row.attempts, row.queue, worker, o.started_ms, now,
                    _attempt_outcome(o, row), o.error, o.traceback,
                )
            )
            if row.queue:
                freed.add(row.queue)
            if finished is None:
                if settle["b_state"] == COMPLETED:
                    done.completed.append(row.id)
            elif o.handler_in_txn and session_handler is not None:
                # Settled as completed at once; a handler that fails (the rare case)
                # moves it back to finishing below, and its writes roll back.
                settle.update(b_state=COMPLETED, b_lease_owner=None, b_lease_until_ms=None)
                in_txn.append(finished)
            else:
                done.to_deliver.append(finished)
        if settles:
            conn.execute(_SETTLE, settles)
        if attempt_rows:
            conn.execute(INSERT_ATTEMPTS, attempt_rows)
        for finished in in_txn:
            assert session_handler is not None
            if not handler_savepoint:
                session_handler(finished, conn)
                done.completed.append(finished.id)
                continue
            error = _call_in_savepoint(conn, finished, session_handler)
            if error is None:
                done.completed.append(finished.id)
            else:
                self._handler_failed(conn, finished, error, now)

    def _complete_plain(
        self,
        conn: Connection,
        outcomes: Sequence[Outcome],
        worker: str,
        now: int,
        done: Recorded,
        freed: set[str],
    ) -> Sequence[Outcome]:
        """Complete, in one batch and without reading them, the successes of runs that
        have no on_complete; return the outcomes left for the general record.

        Those that could not (a lost lease, a cancel request: rare) are found by
        reading the batch back, and go the general way."""
        plain = [o for o in outcomes if o.kind == "success" and o.plain and o.attempt]
        if len(plain) < 2 or not self._batch_rowcount:
            return outcomes
        changed = conn.execute(
            _COMPLETE_PLAIN_SUCCESS,
            [
                {"b_id": o.run_id, "b_fence": o.fence, "b_result": o.result, "b_now": now}
                for o in plain
            ],
        ).rowcount
        if changed != len(plain):
            rows = self._rows_for_update(conn, [o.run_id for o in plain])
            plain = [
                o
                for o in plain
                if (row := rows.get(o.run_id)) is not None
                # Only this worker, holding this fence, records a success for it (the
                # reaper completes a lost attempt as failed).
                and (row.fence, row.state, row.outcome) == (o.fence, COMPLETED, SUCCESS)
            ]
        if plain:  # all of them may have been canceled meanwhile
            conn.execute(
                INSERT_ATTEMPTS,
                [
                    _attempt_row(o.run_id, o.attempt, o.queue, worker, o.started_ms, now, SUCCESS)
                    for o in plain
                ],
            )
        done.completed.extend(o.run_id for o in plain)
        freed.update(o.queue for o in plain if o.queue)
        completed = {o.run_id for o in plain}
        return [o for o in outcomes if o.run_id not in completed]

    def _complete_success(
        self,
        conn: Connection,
        o: Outcome,
        worker: str,
        now: int,
        session_handler: SessionHandler,
    ) -> str | None:
        """Complete a held run whose attempt succeeded, calling `session_handler` for
        its on_complete in this transaction; its queue, or None if the run could not
        simply complete (then nothing was written)."""
        row = conn.execute(
            _COMPLETE_SUCCESS,
            {"b_id": o.run_id, "b_fence": o.fence, "b_result": o.result, "b_now": now},
        ).first()
        if row is None:
            return None
        conn.execute(
            INSERT_ATTEMPTS,
            _attempt_row(o.run_id, row.attempts, row.queue, worker, o.started_ms, now, SUCCESS),
        )
        if row.on_complete is not None:
            session_handler(
                Finished(
                    id=o.run_id,
                    fn=row.fn,
                    fence=row.fence,
                    outcome=SUCCESS,
                    result=o.result,
                    error=None,
                    on_complete=row.on_complete,
                    context=row.context,
                    queue=row.queue,
                    owner=row.owner,
                ),
                conn,
            )
        return str(row.queue or "")

    def _waiting_in(self, conn: Connection, queues: set[str], now: int) -> bool:
        found = conn.execute(_WAITING_IN, {"now": now, "queues": sorted(queues)}).first()
        return found is not None

    def _decide(
        self, row: Row[Any], o: Outcome, now: int, lease_ms: int, worker: str
    ) -> tuple[dict[str, Any], Finished | None]:
        """The next state of a run after an attempt ended as `o`."""
        if row.cancel_requested or o.kind == "canceled":
            return self._finish(row, CANCELED, None, None, now, lease_ms, worker)
        if o.kind == "success":
            return self._finish(row, SUCCESS, o.result, None, now, lease_ms, worker)
        failures = row.failures + 1
        if o.kind == "fatal" or failures >= row.max_failures:
            settle, finished = self._finish(row, FAILED, None, o.error, now, lease_ms, worker)
            settle["b_failures"] = failures
            return settle, finished
        delay = o.retry_after_ms
        if delay is None:
            delay = backoff_ms(
                failures,
                row.initial_backoff_ms,
                row.base,
                row.max_backoff_ms,
                row.jitter,
                self._rng,
            )
        return (
            _settle(row, state=PENDING, failures=failures, due_ms=now + delay, error=o.error),
            None,
        )

    def _finish(
        self,
        row: Row[Any],
        outcome: str,
        result: Any,
        error: str | None,
        now: int,
        lease_ms: int,
        worker: str,
    ) -> tuple[dict[str, Any], Finished | None]:
        if row.on_complete is None:
            return (
                _settle(
                    row,
                    state=COMPLETED,
                    outcome=outcome,
                    result=result,
                    error=error,
                    finished_ms=now,
                ),
                None,
            )
        # Keep the lease: this worker delivers the on_complete next.
        fence = row.fence + 1
        settle = _settle(
            row,
            state=DELIVERING,
            outcome=outcome,
            result=result,
            error=error,
            finished_ms=now,
            fence=fence,
            lease_owner=worker,
            lease_until_ms=now + lease_ms,
        )
        return settle, Finished(
            id=row.id,
            fn=row.fn,
            fence=fence,
            outcome=outcome,
            result=result,
            error=error,
            on_complete=row.on_complete,
            context=row.context,
            queue=row.queue,
            owner=row.owner,
        )

    def delivered(self, finished: Sequence[Finished], failures: dict[str, str]) -> list[str]:
        """Mark on_complete deliveries done (or failed, to be retried); fenced."""
        if not finished:
            return []
        completed: list[str] = []
        with self.dialect.write_internal() as conn:
            now = self.clock.now_ms()
            for f in finished:
                if f.id in failures:
                    self._handler_failed(conn, f, failures[f.id], now)
                    continue
                result = conn.execute(_COMPLETE_DELIVERY, {"b_id": f.id, "b_fence": f.fence})
                if result.rowcount:
                    completed.append(f.id)
        return completed

    def run_session_delivery(
        self, finished: Finished, session_handler: SessionHandler
    ) -> bool:
        """Deliver one on_complete that takes a session, in its own transaction."""
        with self.dialect.write_internal() as conn:
            row = conn.execute(
                self.dialect.lock_rows(
                    select(runs.c.fence, runs.c.state).where(runs.c.id == finished.id)
                )
            ).first()
            if row is None or row.fence != finished.fence or row.state != DELIVERING:
                return False
            error = _call_in_savepoint(conn, finished, session_handler)
            if error is not None:
                self._handler_failed(conn, finished, error, self.clock.now_ms())
                return False
            conn.execute(
                update(runs)
                .where(runs.c.id == finished.id, runs.c.fence == finished.fence)
                .values(state=COMPLETED, lease_owner=None, lease_until_ms=None)
            )
        return True

    def _handler_failed(self, conn: Connection, f: Finished, error: str, now: int) -> None:
        row = conn.execute(
            select(runs.c.handler_failures, runs.c.fence).where(runs.c.id == f.id)
        ).first()
        if row is None or row.fence != f.fence:
            return
        failures = row.handler_failures + 1
        give_up = failures >= MAX_HANDLER_FAILURES
        conn.execute(
            update(runs)
            .where(runs.c.id == f.id, runs.c.fence == f.fence)
            .values(
                state=COMPLETED if give_up else FINISHING,
                handler_failures=failures,
                handler_error=error,
                due_ms=now + backoff_ms(failures, 250, 2.0, 60_000, False),
                lease_owner=None,
                lease_until_ms=None,
            )
        )

    # -- leases ---------------------------------------------------------------------------

    def heartbeat(self, worker: str, held: dict[str, int], lease_ms: int) -> Heartbeat:
        """Extend this worker's leases; report the ones it lost and those to cancel."""
        if not held:
            return Heartbeat(set(), set())
        ids = list(held)
        with self.dialect.write_internal() as conn:
            now = self.clock.now_ms()
            # Rows locked right now are skipped, not waited for: their lock is this
            # worker's own record settling them (waiting could deadlock with it).
            renewable = self.dialect.lock_for_claim(
                select(runs.c.id).where(
                    runs.c.id.in_(ids), runs.c.lease_owner == worker, in_state(*LEASED)
                )
            )
            conn.execute(
                update(runs)
                .where(runs.c.id.in_(renewable.scalar_subquery()))
                .values(lease_until_ms=now + lease_ms)
            )
            rows = conn.execute(
                select(runs.c.id, runs.c.fence, runs.c.lease_owner, runs.c.cancel_requested)
                .where(runs.c.id.in_(ids))
            ).all()
        seen = {r.id: r for r in rows}
        lost = {
            i
            for i, fence in held.items()
            if i not in seen or seen[i].fence != fence or seen[i].lease_owner != worker
        }
        cancel = {r.id for r in rows if r.cancel_requested and r.id not in lost}
        return Heartbeat(lost, cancel)

    def reap(self, limit: int = 500) -> int:
        """Recover runs whose worker stopped renewing its lease (it died or hung).

        A lost attempt counts as a failure; a lost on_complete is delivered again.
        """
        with self.dialect.write_internal() as conn:
            now = self.clock.now_ms()
            stmt = (
                select(*_DECIDE_COLUMNS)
                .where(in_state(*LEASED), runs.c.lease_until_ms < now)
                .limit(limit)
            )
            rows = conn.execute(self.dialect.lock_for_claim(stmt)).all()
            if not rows:
                return 0
            settles = []
            attempt_rows = []
            for row in rows:
                if row.state == DELIVERING:
                    settles.append(_settle(row, state=FINISHING, due_ms=now, fence=row.fence + 1))
                    continue
                lost = Outcome(
                    run_id=row.id,
                    fence=row.fence,
                    kind="failure",
                    started_ms=row.started_ms or now,
                    error=f"worker {row.lease_owner} stopped renewing its lease (lost)",
                )
                settle, _ = self._decide(row, lost, now, 0, "")
                if settle["b_state"] == DELIVERING:  # nobody holds it: any worker delivers
                    settle.update(b_state=FINISHING, b_lease_owner=None, b_lease_until_ms=None)
                settle["b_fence"] = row.fence + 1
                settle["b_due_ms"] = max(settle["b_due_ms"], now)
                settles.append(settle)
                attempt_rows.append(
                    _attempt_row(
                        row.id, row.attempts, row.queue, row.lease_owner,
                        row.started_ms or now, now, "lost", lost.error,
                    )
                )
            conn.execute(_SETTLE, settles)
            if attempt_rows:
                conn.execute(INSERT_ATTEMPTS, attempt_rows)
            self.dialect.notify(conn, WAKE)
        return len(rows)

    # -- workers ------------------------------------------------------------------------

    def announce_worker(self, info: WorkerInfo) -> None:
        """Record that a worker is alive and what it can run (its heartbeat)."""
        now = self.clock.now_ms()
        values = {
            "host": info.host,
            "pid": info.pid,
            "concurrency": info.concurrency,
            "lease_ms": info.lease_ms,
            "functions": sorted(info.runnable.actions or ()),
            "handlers": sorted(info.runnable.handlers or ()),
            "heartbeat_ms": now,
        }
        with self.dialect.write_internal() as conn:
            changed = conn.execute(
                update(workers_t).where(workers_t.c.id == info.id).values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(workers_t).values(id=info.id, started_ms=now, **values))

    def retire_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""
        with self.dialect.write_internal() as conn:
            conn.execute(delete(workers_t).where(workers_t.c.id == worker_id))

    def fail_unrunnable(self, grace_ms: int, limit: int = 500) -> int:
        """Fail the runs that no live worker has been able to run for `grace_ms`: due
        that long ago, their function registered by no worker alive now. Their
        on_complete is then delivered as for any failure; a delivery whose handler no
        live worker has is given up the same way. Returns how many runs failed.

        Nothing happens while no worker is alive (nobody could tell what it lacks).
        """
        with self.dialect.write_internal() as conn:
            now = self.clock.now_ms()
            conn.execute(delete(workers_t).where(workers_t.c.heartbeat_ms < now - _FORGET_MS))
            live = conn.execute(_LIVE_WORKERS, {"now": now}).all()
            if not live:
                return 0
            actions = set().union(*(_names(r.functions) for r in live))
            handlers = set().union(*(_names(r.handlers) for r in live))
            cutoff = now - grace_ms
            rows = conn.execute(
                self.dialect.lock_for_claim(
                    select(*_DECIDE_COLUMNS)
                    .where(
                        in_state(PENDING),
                        runs.c.due_ms <= cutoff,
                        runs.c.created_ms <= cutoff,
                        runs.c.fn.not_in(sorted(actions)),
                    )
                    .limit(limit)
                )
            ).all()
            settles = []
            for row in rows:
                error = (
                    f"{describe(UnregisteredFunction(row.fn))} (no live worker has "
                    f"registered it for {grace_ms / 1000:g} s)"
                )
                lost = Outcome(row.id, row.fence, "fatal", now, error=error)
                settle, _ = self._decide(row, lost, now, 0, "")
                if settle["b_state"] == DELIVERING:  # nobody holds it: any worker delivers
                    settle.update(b_state=FINISHING, b_lease_owner=None, b_lease_until_ms=None)
                settle["b_fence"] = row.fence + 1
                settles.append(settle)
            if settles:
                conn.execute(_SETTLE, settles)
            given_up = conn.execute(
                update(runs)
                .where(
                    in_state(FINISHING),
                    runs.c.due_ms <= cutoff,
                    runs.c.finished_ms <= cutoff,
                    runs.c.on_complete.not_in(sorted(handlers)),
                )
                .values(
                    state=COMPLETED,
                    handler_error=f"no live worker has registered this on_complete for "
                    f"{grace_ms / 1000:g} s",
                )
            ).rowcount
            if settles or given_up:
                self.dialect.notify(conn, WAKE)
        return len(settles)

    def release_delivery(self, f: Finished) -> bool:
        """Hand back an on_complete delivery this worker cannot make (it lacks the
        handler) to any worker that can, without counting a failure."""
        with self.dialect.write_internal() as conn:
            changed = conn.execute(
                update(runs)
                .where(runs.c.id == f.id, runs.c.fence == f.fence, in_state(DELIVERING))
                .values(
                    state=FINISHING,
                    due_ms=self.clock.now_ms(),
                    fence=runs.c.fence + 1,
                    lease_owner=None,
                    lease_until_ms=None,
                )
            ).rowcount
            if changed:
                self.dialect.notify(conn, WAKE)
        return bool(changed)

    # -- cancel, read, delete ------------------------------------------------------------

    @reconnecting
    def cancel(self, run_id: str) -> bool:
        """Cancel a run: pending at once; running best effort. False if already over."""
        with self.dialect.write() as conn:
            row = self._rows_for_update(conn, [run_id]).get(run_id)
            if row is None:
                raise RunNotFound(run_id)
            if row.state == PENDING:
                now = self.clock.now_ms()
                settle = _settle(
                    row,
                    state=FINISHING if row.on_complete else COMPLETED,
                    outcome=CANCELED,
                    finished_ms=now,
                    fence=row.fence + 1,
                    due_ms=now,
                )
                conn.execute(_SETTLE, [settle])
                self.dialect.notify(conn, WAKE)
                return True
            if row.state == RUNNING and not row.cancel_requested:
                conn.execute(
                    update(runs).where(runs.c.id == run_id).values(cancel_requested=True)
                )
                self.dialect.notify(conn, CANCEL, run_id)
                return True
            return False

    def cancel_many(self, *conditions: Any, limit: int | None = None) -> Canceling:
        """Cancel the unfinished runs matching `conditions` (at most `limit`, running
        ones first), in one transaction: pending ones are canceled, running ones get a
        cancel request. Runs that finish meanwhile are left alone and not counted."""
        pick = (
            select(runs.c.id)
            .where(in_state(PENDING, RUNNING), runs.c.cancel_requested == false(), *conditions)
            .order_by(runs.c.state.desc(), runs.c.id)  # 'running' sorts before 'pending'
        )
        if limit is not None:
            pick = pick.limit(limit)
        done = Canceling()
        with self.dialect.write() as conn:
            now = self.clock.now_ms()
            ids = list(conn.execute(pick).scalars())
            for chunk in _chunks(sorted(ids), 500):  # locked in id order, as records lock
                rows = conn.execute(self._lock_to_cancel, {"ids": chunk}).all()
                pending = [r.id for r in rows if r.state == PENDING and not r.cancel_requested]
                running = [r.id for r in rows if r.state == RUNNING and not r.cancel_requested]
                if pending:
                    conn.execute(_CANCEL_PENDING, {"ids": pending, "now": now})
                if running:
                    conn.execute(_REQUEST_CANCEL, {"ids": running})
                done.count += len(pending) + len(running)
                done.running.extend(running)
            if done.count:
                self.dialect.notify(conn, WAKE)
                if done.running:
                    self.dialect.notify(conn, CANCEL)
        return done

    def unfinished(self, *conditions: Any, limit: int | None = None) -> list[str]:
        """Ids of pending and running runs matching `conditions`, running ones first
        (they hold slots), at most `limit`."""
        stmt = (
            select(runs.c.id)
            .where(in_state(PENDING, RUNNING), *conditions)
            .order_by(runs.c.state.desc())
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.dialect.read() as conn:
            return list(conn.execute(stmt).scalars())

    def get(self, run_id: str) -> RunRow:
        rows = self.get_many([run_id])
        if run_id not in rows:
            raise RunNotFound(run_id)
        return rows[run_id]

    @reconnecting
    def get_many(self, run_ids: Iterable[str]) -> dict[str, RunRow]:
        ids = list(run_ids)
        found: dict[str, RunRow] = {}
        with self.dialect.read() as conn:
            for chunk in _chunks(ids, 500):
                for row in conn.execute(select(runs).where(runs.c.id.in_(chunk))).mappings():
                    found[row["id"]] = RunRow.model_validate(dict(row))
        return found

    @reconnecting
    def states(self, run_ids: Iterable[str]) -> dict[str, str]:
        """Just the state of each run; cheap enough to poll."""
        ids = list(run_ids)
        out: dict[str, str] = {}
        with self.dialect.read() as conn:
            for chunk in _chunks(ids, 500):
                stmt = select(runs.c.id, runs.c.state).where(runs.c.id.in_(chunk))
                out.update({r.id: r.state for r in conn.execute(stmt)})
        return out

    @reconnecting
    def attempts(self, run_id: str) -> list[AttemptRow]:
        with self.dialect.read() as conn:
            rows = conn.execute(
                select(attempts_t)
                .where(attempts_t.c.run_id == run_id)
                .order_by(attempts_t.c.number, attempts_t.c.id)
            ).mappings()
            return [AttemptRow.model_validate(dict(r)) for r in rows]

    @reconnecting
    def list_runs(
        self,
        *,
        state: str | None = None,
        fn: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        limit: int = 50,
    ) -> list[RunRow]:
        stmt = select(runs).order_by(runs.c.created_ms.desc()).limit(limit)
        if state is not None:
            stmt = stmt.where(runs.c.state == state)
        if fn is not None:
            stmt = stmt.where(runs.c.fn == fn)
        if queue is not None:
            stmt = stmt.where(runs.c.queue == queue)
        if owner is not None:
            stmt = stmt.where(runs.c.owner == owner)
        with self.dialect.read() as conn:
            return [RunRow.model_validate(dict(r)) for r in conn.execute(stmt).mappings()]

    def delete(self, run_id: str) -> None:
        """Delete a finished run and its attempts."""
        with self.dialect.write() as conn:
            state = conn.execute(select(runs.c.state).where(runs.c.id == run_id)).scalar()
            if state is None:
                raise RunNotFound(run_id)
            if state != COMPLETED:
                raise RunNotFinished(run_id)
            conn.execute(delete(attempts_t).where(attempts_t.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.id == run_id))

    def purge_completed(self, older_than_ms: int, batch: int = 1000) -> int:
        """Delete runs completed more than `older_than_ms` ago; in batches."""
        cutoff = self.clock.now_ms() - older_than_ms
        total = 0
        while True:
            with self.dialect.write_internal() as conn:
                ids = list(
                    conn.execute(
                        select(runs.c.id)
                        .where(in_state(COMPLETED), runs.c.finished_ms < cutoff)
                        .limit(batch)
                    ).scalars()
                )
                if not ids:
                    return total
                conn.execute(delete(attempts_t).where(attempts_t.c.run_id.in_(ids)))
                conn.execute(delete(runs).where(runs.c.id.in_(ids)))
                total += len(ids)

    # -- queues -------------------------------------------------------------------------

    @reconnecting
    def set_queue(self, limits: QueueLimits) -> None:
        values = {
            "max_parallelism": limits.max_parallelism,
            "rate_limit": limits.rate_limit,
            "rate_period_ms": limits.rate_period_ms,
            "max_per_key": limits.max_per_key,
            "max_per_worker": limits.max_per_worker,
            "updated_ms": self.clock.now_ms(),
        }
        with self.dialect.write() as conn:
            changed = conn.execute(
                update(queues_t).where(queues_t.c.name == limits.name).values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(queues_t).values(name=limits.name, **values))
            self.dialect.notify(conn, WAKE)

    @reconnecting
    def get_queue(self, name: str) -> QueueLimits | None:
        with self.dialect.read() as conn:
            row = conn.execute(select(queues_t).where(queues_t.c.name == name)).first()
        return _limits(row) if row is not None else None

    @reconnecting
    def list_queues(self) -> list[QueueLimits]:
        with self.dialect.read() as conn:
            rows = conn.execute(select(queues_t).order_by(queues_t.c.name)).all()
        return [_limits(r) for r in rows]

    @reconnecting
    def queue_counts(self, name: str, since_ms: int) -> dict[str, int]:
        """Running, pending and recently failed counts of one queue."""
        with self.dialect.read() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(
                    select(runs.c.state, func.count())
                    .where(runs.c.queue == name, in_state(PENDING, RUNNING))
                    .group_by(runs.c.state)
                ).all()
            )
            failed = conn.execute(
                select(func.count()).where(
                    attempts_t.c.queue == name,
                    attempts_t.c.outcome.in_(("failed", "lost")),
                    attempts_t.c.finished_ms >= since_ms,
                )
            ).scalar()
        return {
            "running": int(by_state.get(RUNNING, 0)),
            "pending": int(by_state.get(PENDING, 0)),
            "failed": int(failed or 0),
        }

    # -- helpers --------------------------------------------------------------------------

    def _rows_for_update(self, conn: Connection, ids: list[str]) -> dict[str, Row[Any]]:
        found: dict[str, Row[Any]] = {}
        if len(ids) == 1:
            row = conn.execute(self._row_by_id, {"id": ids[0]}).first()
            return {} if row is None else {row.id: row}
        for chunk in _chunks(ids, 500):
            found.update({r.id: r for r in conn.execute(self._rows_by_id, {"ids": chunk})})
        return found


_LIMITED_QUEUES = (
    select(queues_t)
    .where(
        or_(
            queues_t.c.max_parallelism.is_not(None),
            queues_t.c.rate_limit.is_not(None),
            queues_t.c.max_per_key.is_not(None),
            queues_t.c.max_per_worker.is_not(None),
        )
    )
    .order_by(queues_t.c.name)
)
# Each queue's running runs, and how many of them the worker `worker` holds.
_RUNNING_PER_QUEUE = (
    select(
        runs.c.queue,
        func.count(),
        func.sum(case((runs.c.lease_owner == bindparam("worker"), 1), else_=0)),
    )
    .where(in_state(RUNNING), runs.c.queue.in_(bindparam("names", expanding=True)))
    .group_by(runs.c.queue)
)


@dataclass(frozen=True, slots=True)
class _Survey:
    """What a claim of limited queues reads in one statement (`_CLAIM_SURVEY`) once it
    holds their locks."""

    queues: list[str]  # the queues that have claimable runs, due now or later
    running: dict[str, int]  # running runs of each limited queue that has any
    mine: dict[str, int]  # how many of those the claiming worker holds
    deliveries: bool  # whether an on_complete delivery is due now
    next_due_ms: int | None  # the earliest claimable run due after now

    @classmethod
    def read(
        cls, conn: Connection, limited: list[str], worker: str, now: int, can_run: dict[str, Any]
    ) -> _Survey:
        queues: list[str] = []
        running: dict[str, int] = {}
        mine: dict[str, int] = {}
        deliveries, next_due = False, None
        params = {"names": limited, "worker": worker, "now": now, **can_run}
        for kind, name, n, held in conn.execute(_CLAIM_SURVEY, params):
            if kind == "queue":
                queues.append(name)
            elif kind == "running":
                running[name], mine[name] = int(n), int(held)
            elif kind == "deliveries":
                deliveries = bool(n)
            elif n is not None:
                next_due = int(n)
        return cls(queues, running, mine, deliveries, next_due)


@dataclass
class _QueueBudget:
    """How many more runs each limited queue may start now, within one claim."""

    limits: dict[str, QueueLimits]
    slots: dict[str, int]
    key_running: dict[tuple[str, str], int]
    blocked: set[str]
    full_keys: dict[str, list[str]]
    rate_retry_ms: int | None
    now: int

    @classmethod
    def load(
        cls,
        conn: Connection,
        queues: tuple[Select[Any], dict[str, Any]],
        clock: Clock,
        worker: str,
    ) -> _QueueBudget:
        """Lock the rows of `queues` (a locking statement and its parameters) and
        count their slots for `worker` (see `lock`)."""
        limits, now = cls.lock(conn, *queues, clock=clock)
        if not limits:
            return cls.build(conn, limits, {}, {}, now)
        rows = conn.execute(_RUNNING_PER_QUEUE, {"names": list(limits), "worker": worker}).all()
        running = {q: int(n) for q, n, _ in rows}
        mine = {q: int(held) for q, _, held in rows}
        return cls.build(conn, limits, running, mine, now)

    @staticmethod
    def lock(
        conn: Connection,
        queues: Select[Any],
        params: dict[str, Any] | None = None,
        *,
        clock: Clock,
    ) -> tuple[dict[str, QueueLimits], int]:
        """Lock the rows `queues` selects (`_LIMITED_QUEUES` or one queue, as the
        dialect locks rows); return their limits and the time, read after the lock.

        The clock is read after the lock: a claim that waited for another claim's
        locks must not stamp its runs as started before that claim committed. What
        the queues' slots are counted from must be read after it too, in statements
        of their own: on PostgreSQL a statement that waits for a lock reads from the
        snapshot it took before the wait.
        """
        rows = conn.execute(queues, params or {}).all()
        return {r.name: _limits(r) for r in rows}, clock.now_ms()

    @classmethod
    def build(
        cls,
        conn: Connection,
        limits: dict[str, QueueLimits],
        running: dict[str, int],
        mine: dict[str, int],
        now: int,
    ) -> _QueueBudget:
        """The budget of the locked `limits`, given each one's `running` count and how
        many of those the claiming worker holds (`mine`); rate and per-key limits are
        read here."""
        budget = cls(limits, {}, {}, set(), {}, None, now)
        for name, lim in limits.items():
            slots = 1 << 30
            if lim.max_parallelism is not None:
                slots = lim.max_parallelism - running.get(name, 0)
            if lim.max_per_worker is not None:
                slots = min(slots, lim.max_per_worker - mine.get(name, 0))
            if lim.rate_limit is not None and lim.rate_period_ms:
                slots = min(slots, budget._rate_slots(conn, lim, now))
            budget.slots[name] = slots
            if slots <= 0:
                budget.blocked.add(name)
        keyed = [n for n, lim in limits.items() if lim.max_per_key is not None]
        if keyed:
            for queue, key, count in conn.execute(
                select(runs.c.queue, runs.c.key, func.count())
                .where(in_state(RUNNING), runs.c.queue.in_(keyed), runs.c.key.is_not(None))
                .group_by(runs.c.queue, runs.c.key)
            ).all():
                budget.key_running[(queue, key)] = int(count)
                max_per_key = limits[queue].max_per_key
                if max_per_key is not None and count >= max_per_key:
                    budget.full_keys.setdefault(queue, []).append(key)
        return budget

    def _rate_slots(self, conn: Connection, lim: QueueLimits, now: int) -> int:
        assert lim.rate_limit is not None and lim.rate_period_ms is not None
        since = now - lim.rate_period_ms
        # One statement, so one snapshot: with two, on PostgreSQL (READ COMMITTED) an
        # attempt recorded between them was in neither, and let one more start through.
        finished = select(attempts_t.c.started_ms).where(
            attempts_t.c.queue == lim.name,
            attempts_t.c.started_ms > since,
            attempts_t.c.outcome != "released",
        )
        current = select(runs.c.started_ms).where(
            runs.c.queue == lim.name, in_state(RUNNING), runs.c.started_ms > since
        )
        starts = sorted(conn.execute(finished.union_all(current)).scalars())
        free = lim.rate_limit - len(starts)
        if free <= 0:
            # The window (now - period, now] lets one more start once the limit-th
            # newest start falls out of it, at exactly that start + period.
            retry = starts[-lim.rate_limit] + lim.rate_period_ms
            self.rate_retry_ms = min(self.rate_retry_ms or retry, retry)
        return free

    @property
    def exhausted(self) -> int:
        """How many queues and keys have no slot left; grows as `take` uses them."""
        return len(self.blocked) + sum(len(keys) for keys in self.full_keys.values())

    def take(self, queue: str, key: str | None) -> bool:
        """Use one slot of `queue` (and of its `key`) if one is free."""
        lim = self.limits.get(queue)
        if lim is None:
            return True
        if self.slots.get(queue, 0) <= 0:
            return False
        if lim.max_per_key is not None and key is not None:
            used = self.key_running.get((queue, key), 0)
            if used >= lim.max_per_key:
                return False
            self.key_running[(queue, key)] = used + 1
            if used + 1 >= lim.max_per_key:
                self.full_keys.setdefault(queue, []).append(key)
        self.slots[queue] -= 1
        if self.slots[queue] <= 0:
            self.blocked.add(queue)
        return True


def _add_missing_columns(conn: Connection, tables: Sequence[Table]) -> None:
    """Add the columns a later release added to tables created before it. Such columns
    must be nullable, so that the rows already there stay valid."""
    inspector = inspect(conn)
    preparer = conn.dialect.identifier_preparer
    for table in tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{column.name}")
            definition = CreateColumn(column).compile(dialect=conn.dialect)
            name = preparer.format_table(table)
            conn.execute(text(f"ALTER TABLE {name} ADD COLUMN {definition}"))


def _new_row(r: NewRun, now: int) -> dict[str, Any]:
    """The column values of a new pending run."""
    return {
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
        "created_ms": now,
        "attempts": 0,
        "failures": 0,
        "fence": 0,
        "cancel_requested": False,
        "handler_failures": 0,
    }


def _call_in_savepoint(
    conn: Connection, finished: Finished, session_handler: SessionHandler
) -> str | None:
    """Run an in-transaction on_complete on `conn`, inside a savepoint of its own.

    If it raises, its writes roll back and the error is returned; the enclosing
    transaction goes on and commits the rest.
    """
    savepoint = conn.begin_nested()
    try:
        session_handler(finished, conn)
    except Exception as exc:
        if is_transient(exc):
            raise  # the database failed, not the handler: the whole record is retried
        savepoint.rollback()
        return describe(exc)
    savepoint.commit()
    return None


def _limits(row: Any) -> QueueLimits:
    return QueueLimits(
        name=row.name,
        max_parallelism=row.max_parallelism,
        rate_limit=row.rate_limit,
        rate_period_ms=row.rate_period_ms,
        max_per_key=row.max_per_key,
        max_per_worker=row.max_per_worker,
    )


def _settle(row: Row[Any], **changes: Any) -> dict[str, Any]:
    """Parameters for `_SETTLE`: the row's current values with `changes` applied."""
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
    }
    values.update(changes)
    return {"b_id": row.id, **{f"b_{k}": v for k, v in values.items()}}


def _attempt_row(
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


def _attempt_outcome(o: Outcome, row: Row[Any]) -> str:
    if row.cancel_requested or o.kind == "canceled":
        return "canceled"
    return "success" if o.kind == "success" else "failed"



def _names(stored: Any) -> set[str]:
    """The names in a stored JSON list (nothing, if it cannot be read)."""
    return {n for n in stored if isinstance(n, str)} if isinstance(stored, list) else set()


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


__all__ = [
    "ANYTHING",
    "Canceling",
    "Claimed",
    "Finished",
    "Heartbeat",
    "NewRun",
    "Outcome",
    "QueueLimits",
    "Recorded",
    "Runnable",
    "Store",
    "WorkerInfo",
]
