"""Every read and write of workflow state, as short transactions on the engine's database.

Each write that moves a workflow forward also makes sure a driver run will look at it
again (`wake`), in the same transaction: a committed step result can never be left
without a driver to consume it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from retrier import Debounce, RetryPolicy, ValueTooLarge
from retrier.engine import CANCELED as RUN_CANCELED
from retrier.engine import FAILED as RUN_FAILED
from retrier.engine import RUNNING as RUN_RUNNING
from retrier.engine import SUCCESS as RUN_SUCCESS
from retrier.engine import (
    Claimed,
    CompiledQuery,
    CompiledWrite,
    NewRun,
    Store,
    describe_error,
    format_limit,
    ms_to_datetime,
    new_id,
)

from ._errors import WorkflowNotFinished, WorkflowNotFound
from ._events import Events
from ._journal_reads import Entry, JournalReads
from ._journal_signals import Conflict, NotRunning
from ._limits import result_columns, store_apart
from ._models import (
    CANCELED,
    COMPLETED,
    FAILED,
    RUNNING,
    WAITING,
    logs_t,
    results_t,
    steps_t,
    workflows_t,
)
from ._progress import Progress
from ._start_alone import StartAlone

DRIVER_QUEUE = "tiers.workflow"
# The Dialect topic a change to a watched workflow is announced on (its id the
# payload), in the transaction that makes it: what `watch` listens to on PostgreSQL.
TOPIC = "workflow"
# Driver runs fail only on infrastructure errors (workflow code errors fail the
# workflow instead), so they retry long and patiently.
DRIVER_POLICY = RetryPolicy(
    initial_backoff_ms=250, base=2, max_failures=100, max_backoff=timedelta(seconds=30)
)


def driver_name(pool: str) -> str:
    """The engine action that drives the workflows whose steps run in `pool`."""
    return f"tiers.workflow.drive:{pool}"


def deadline_name(pool: str) -> str:
    """The engine action that fails a workflow (of `pool`) at its deadline."""
    return f"tiers.workflow.deadline:{pool}"


def driver_run(workflow_id: str, pool: str, due_ms: int, fn: str | None = None) -> NewRun:
    """A run of the workflow's driver (or of another action of the workflow tier,
    `fn`), due at `due_ms`, in the unlimited driver queue."""
    p = DRIVER_POLICY
    return NewRun(
        id=new_id(),
        fn=driver_name(pool) if fn is None else fn,
        args={"workflow_id": workflow_id},
        due_ms=due_ms,
        initial_backoff_ms=p.initial_backoff_ms,
        base=p.base,
        max_failures=p.max_failures,
        jitter=False,
        max_backoff_ms=p.max_backoff_ms,
        queue=DRIVER_QUEUE,
        owner=workflow_id,
    )


_STEP_STATE = {RUN_SUCCESS: COMPLETED, RUN_FAILED: FAILED, RUN_CANCELED: CANCELED}


@dataclass(slots=True)
class Stopped:
    """What ending a workflow early did (`Journal.cancel`, `Journal.expire`)."""

    ended: bool
    children: list[str] = field(default_factory=list)  # running: to be canceled too
    run_ids: list[str] = field(default_factory=list)  # its unfinished runs to cancel
    early_ms: int = 0  # expire: how far ahead its deadline still is
    row: Any = None  # the workflow's locked row (id, name, pool, ...), once ended
    error: str | None = None  # why it failed, if it did


def deadline_error(deadline_ms: int, created_ms: int) -> str:
    """The error of a workflow failed by its deadline: the limit and the time."""
    when = ms_to_datetime(deadline_ms).isoformat(timespec="milliseconds")
    limit = format_limit(max(1, deadline_ms - created_ms))
    return f"DeadlineExceeded: the workflow ran past its deadline ({limit} after its start, {when})"


# Hot statements, built once (SQLAlchemy then skips construction and cache keys).
_SETTLE_STEP = (
    update(steps_t)
    .where(
        steps_t.c.workflow_id == bindparam("b_wf"),
        steps_t.c.name == bindparam("b_name"),
        steps_t.c.state == RUNNING,
        # A restarted workflow may journal the step again: only its own run settles it.
        steps_t.c.run_id == bindparam("b_run"),
    )
    .values(  # bind names differ from column names, which UPDATE reserves
        state=bindparam("b_state"),
        result=bindparam("b_result", type_=steps_t.c.result.type),
        result_size=bindparam("b_result_size"),
        error=bindparam("b_error"),
        attempts=bindparam("b_attempts"),
        finished_ms=bindparam("b_finished_ms"),
    )
)
_INSERT_STEP = insert(steps_t)
_INSERT_WORKFLOW = insert(workflows_t)
_POOL_OF = select(workflows_t.c.pool).where(workflows_t.c.id == bindparam("wf"))
_LOCK_WORKFLOW = select(
    workflows_t.c.id,
    workflows_t.c.state,
    workflows_t.c.parent_id,
    workflows_t.c.parent_step,
    workflows_t.c.on_complete,
    workflows_t.c.context,
    workflows_t.c.name,
    workflows_t.c.pool,
    workflows_t.c.deadline_ms,
    workflows_t.c.created_ms,
).where(workflows_t.c.id == bindparam("wf"))

# A workflow's end (its row's state, result or error, and when).
_END_WORKFLOW = (
    update(workflows_t)
    .where(workflows_t.c.id == bindparam("b_wf"))
    .values(  # bind names differ from column names, which UPDATE reserves
        state=bindparam("b_state"),
        result=bindparam("b_result", type_=workflows_t.c.result.type),
        error=bindparam("b_error"),
        finished_ms=bindparam("b_finished_ms"),
    )
)


class Journal(JournalReads):
    """Workflow rows, journal entries and events of one database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dialect = store.dialect
        self.clock = store.clock
        self.compile_reads()
        # Where the database can notify, locking a workflow's row also announces its
        # change to its watchers, if it has any: no extra round trip, and no
        # notification (which serializes commits on PostgreSQL) when nobody watches.
        notice = self.dialect.topic_notice(TOPIC, workflows_t.c.id)
        self._notice = notice
        extra = []
        if notice is not None:
            watched = workflows_t.c.watched_until_ms > bindparam("now")
            extra = [case((watched, notice), else_=None).label("notice")]
            self._notify_watched = select(notice).where(
                workflows_t.c.id == bindparam("wf"), watched
            )
        # Locked by every workflow's end (and cancel, expiry, restart): on the driver.
        self._lock_workflow = CompiledQuery(
            self.dialect.lock_rows(_LOCK_WORKFLOW.add_columns(*extra)),
            self.dialect.engine.dialect,
        )
        # The same lock where only the state matters (no JSON to decode), taken by
        # every step's start: on the driver (see retrier's `_compiled`).
        self._lock_state = CompiledQuery(
            self.dialect.lock_rows(
                select(workflows_t.c.state)
                .where(workflows_t.c.id == bindparam("wf"))
                .add_columns(*extra)
            ),
            self.dialect.engine.dialect,
        )
        # RETURNING says whether it inserted (a rowcount may read -1 here).
        self._insert_workflow_once = self.dialect.insert_ignoring(workflows_t).returning(
            workflows_t.c.id
        )
        self._lock_pool = self.dialect.lock_rows(_POOL_OF.add_columns(*extra))
        # A step's journal writes, on the driver directly (see retrier's `_compiled`).
        self._insert_step = CompiledWrite(_INSERT_STEP, store.engine.dialect)
        self._settle_step = CompiledWrite(_SETTLE_STEP, store.engine.dialect)
        self._end_workflow = CompiledWrite(_END_WORKFLOW, store.engine.dialect)
        # A plain start outside a session, in one statement where writes nest.
        self._start_alone = StartAlone(store) if self.dialect.writes_in_cte else None
        self.events = Events(self)
        self.progress = Progress(self)

    # -- watching ------------------------------------------------------------------

    def notify(self, conn: Connection, workflow_id: str) -> None:
        """Announce a change to the workflow to its watchers (at commit), if it has
        any, in a transaction that has not locked its row (`_lock` and `wake` do it
        with the lock)."""
        if self._notice is not None:
            conn.execute(self._notify_watched, {"wf": workflow_id, "now": self.clock.now_ms()})

    def watching(self, workflow_id: str, until_ms: int) -> None:
        """A watcher wants notifications of the workflow's changes until `until_ms`."""
        with self.dialect.write_internal() as conn:
            conn.execute(
                update(workflows_t)
                .where(workflows_t.c.id == workflow_id)
                .values(watched_until_ms=until_ms)
            )

    def mark_unrunnable(self, workflow_id: str, now_ms: int) -> int:
        """Note that a worker lacking the workflow's code took its driver; returns
        since when that has been so."""
        with self.dialect.write_internal() as conn:
            conn.execute(
                update(workflows_t)
                .where(workflows_t.c.id == workflow_id, workflows_t.c.unrunnable_since_ms.is_(None))
                .values(unrunnable_since_ms=now_ms)
            )
            since = conn.execute(
                select(workflows_t.c.unrunnable_since_ms).where(workflows_t.c.id == workflow_id)
            ).scalar()
        return now_ms if since is None else int(since)

    def clear_unrunnable(self, workflow_id: str) -> None:
        with self.dialect.write_internal() as conn:
            conn.execute(
                update(workflows_t)
                .where(workflows_t.c.id == workflow_id)
                .values(unrunnable_since_ms=None)
            )

    # -- starting workflows --------------------------------------------------------

    def create(
        self,
        row: dict[str, Any],
        conn: Connection | None = None,
        debounce: Debounce | None = None,
    ) -> str:
        """Insert a workflow and its first driver run; the id of the workflow the call
        got. With an idempotency key (`row["key"]`), a stored workflow with that key
        is the answer (concurrent starters wait for each other's transaction, and one
        inserts). With `debounce`, a workflow of the same name and debounce key whose
        driver has not started takes `row`'s args and context instead, and starts one
        period after this call (no later than `max_wait` after the first)."""
        if conn is not None:
            return self._create(conn, row, debounce)
        plain = debounce is None and row.get("key") is None and row.get("deadline_ms") is None
        if plain and self._start_alone is not None:
            driver = driver_run(row["id"], row["pool"], row["created_ms"])
            self._start_alone.insert(row, self.store.pending_row(driver, self.clock.now_ms()))
            return str(row["id"])
        with self.dialect.write() as own:
            return self._create(own, row, debounce)

    def _create(
        self, conn: Connection, row: dict[str, Any], debounce: Debounce | None = None
    ) -> str:
        driver = driver_run(row["id"], row["pool"], row["created_ms"])
        if debounce is not None:
            driver = dataclasses.replace(
                driver, debounce=debounce, debounce_scope=f"{row['name']}\x1f{debounce.key}"
            )
            got = self.store.debounce_in(conn, driver, replace_args=False)
            if got.collapsed and got.owner is not None:
                conn.execute(
                    update(workflows_t)
                    .where(workflows_t.c.id == got.owner, workflows_t.c.state == RUNNING)
                    .values(args=row["args"], context=row["context"])
                )
                return got.owner
            conn.execute(_INSERT_WORKFLOW, [row])
            self._arm_new(conn, row)
            return str(row["id"])
        if row.get("key") is None:
            conn.execute(_INSERT_WORKFLOW, [row])
        else:
            found = self._insert_once(conn, row)
            if found is not None:
                return found
        self.store.insert_runs([driver], conn)
        self._arm_new(conn, row)
        return str(row["id"])

    def _arm_new(self, conn: Connection, row: dict[str, Any]) -> None:
        """A new workflow with a deadline: the run that fails it then (`arm_deadline`)."""
        if row.get("deadline_ms") is not None:
            self.arm_deadline(conn, row["id"], row["pool"], row["deadline_ms"])

    def _insert_once(self, conn: Connection, row: dict[str, Any]) -> str | None:
        """Insert a workflow with an idempotency key, unless one is stored with it:
        then its id. (Tried again if that one was deleted between the two statements.)"""
        for _ in range(3):
            if conn.execute(self._insert_workflow_once, row).first() is not None:
                return None
            found = conn.execute(
                select(workflows_t.c.id).where(workflows_t.c.key == row["key"])
            ).scalar()
            if found is not None:
                return str(found)
        raise Conflict(f"idempotency key {row['key']!r} kept changing hands")

    def arm_deadline(self, conn: Connection, workflow_id: str, pool: str, at_ms: int) -> None:
        """Store the run that fails the workflow at `at_ms` if it still runs then,
        whatever it is doing (it holds nothing until then)."""
        self.store.insert_runs([driver_run(workflow_id, pool, at_ms, deadline_name(pool))], conn)

    # -- steps -----------------------------------------------------------------------

    def start_step(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        new: NewRun,
        worker: str | None,
        lease_ms: int,
        before: Callable[[Connection], None] | None = None,
    ) -> Claimed | None:
        """Journal a new step and store its run: claimed by `worker` if its pool has
        room now (the caller runs it inline), else pending in the pool. `before`
        writes first in the same transaction (the outcomes of earlier inline steps).
        (On PostgreSQL the driver makes a plain start server-side first:
        `Driver.start_step`.)"""
        # Internal: lost in a database crash, the step simply runs again.
        with self.write(internal=True) as conn:
            self.lock_running(conn, workflow_id)
            if before is not None:
                before(conn)
            self._insert_step.run_in(conn, [entry])
            claimed = None
            if worker is not None:
                claimed = self.store.insert_running(new, worker, lease_ms, conn)
            if claimed is None:
                self.store.insert_runs([new], conn)
            return claimed

    def settle_step(
        self,
        conn: Connection,
        workflow_id: str,
        name: str,
        outcome: str,
        result: Any,
        error: str | None,
        run_id: str,
        attempts: int | None = None,
    ) -> Entry | None:
        """Journal the final outcome of a step's run; None if it was journaled already."""
        if attempts is None:
            stored = self.store.outcome_in(conn, run_id)
            attempts = 0 if stored is None else stored.attempts
        state = _STEP_STATE[outcome]
        columns: dict[str, Any] = {"result": None, "result_size": None}
        if state == COMPLETED and result is not None:
            try:
                columns = result_columns(result, f"the result of step {name!r}")
            except ValueTooLarge as exc:
                # The workflow may have gone on with it (an inline step): a replay
                # meets the failure instead.
                state, result, error = FAILED, None, describe_error(exc)
                self.wake(conn, workflow_id)
        settle = {
            "b_wf": workflow_id,
            "b_name": name,
            "b_run": run_id,
            "b_state": state,
            "b_result": columns["result"],
            "b_result_size": columns["result_size"],
            "b_error": error,
            "b_attempts": attempts or 0,
            "b_finished_ms": self.clock.now_ms(),
        }
        changed = self._settle_step.run_in(conn, [settle])
        if not changed:
            return None
        if columns["result_size"] is not None:
            store_apart(conn, workflow_id, name, result)
        return Entry(name, 0, "step", state, result=result, error=error)

    def wake(self, conn: Connection, workflow_id: str, due_ms: int | None = None) -> None:
        """Make sure one driver run of the workflow is pending, due by `due_ms` (now).

        The workflow's row is locked first: two transactions waking it at once are
        serialized, and the second sees the driver the first left pending (a check
        alone cannot see a row another transaction is inserting).
        """
        due = self.clock.now_ms() if due_ms is None else due_ms
        pool = conn.execute(self._lock_pool, self._lock_params(workflow_id)).scalar()
        if pool is None:
            return
        self.store.ensure_pending(conn, driver_run(workflow_id, pool, due))

    def wake_alone(self, workflow_id: str, due_ms: int) -> None:
        """`wake`, in a transaction of its own."""
        with self.dialect.write_internal() as conn:
            self.wake(conn, workflow_id, due_ms)

    # -- sleeps, events, children, sends -------------------------------------------

    def add_waiting(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        wake_ms: int | None,
        extra: Callable[[Connection], None] | None = None,
    ) -> None:
        """Journal a waiting entry (with a driver due at `wake_ms`, if given)."""
        with self.write() as conn:
            self.lock_running(conn, workflow_id)
            conn.execute(_INSERT_STEP, [entry])
            if wake_ms is not None:
                self.wake(conn, workflow_id, wake_ms)
            if extra is not None:
                extra(conn)

    def add_entry(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        extra: Callable[[Connection], Any] | None = None,
    ) -> Any:
        """Journal a finished entry (with `extra` writes in the same transaction)."""
        with self.write() as conn:
            self.lock_running(conn, workflow_id)
            out = extra(conn) if extra is not None else None
            if out is not None:
                entry = {**entry, "result": out}
            conn.execute(_INSERT_STEP, [entry])
            return out

    def complete_waiting(self, workflow_id: str, name: str, result: Any = None) -> bool:
        with self.write() as conn:
            changed = conn.execute(
                update(steps_t)
                .where(
                    steps_t.c.workflow_id == workflow_id,
                    steps_t.c.name == name,
                    steps_t.c.state == WAITING,
                )
                .values(state=COMPLETED, result=result, finished_ms=self.clock.now_ms())
            ).rowcount
            if changed:
                self.notify(conn, workflow_id)
            return bool(changed)

    def start_child(self, parent_id: str, entry: dict[str, Any], child: dict[str, Any]) -> None:
        """Journal an `invoke` and start the child workflow, in one transaction."""
        with self.write() as conn:
            self.lock_running(conn, parent_id)
            conn.execute(_INSERT_STEP, [entry])
            self._create(conn, child)

    # -- finishing -------------------------------------------------------------------

    def finish(
        self,
        workflow_id: str,
        state: str,
        result: Any,
        error: str | None,
        completion: Callable[[Any], NewRun | None],
        before: Callable[[Connection], None] | None = None,
    ) -> bool:
        """Record a workflow's end: its row, its on_complete run, and its parent's
        journal entry. False if it had already ended (canceled, or another driver).
        `before` writes first in the same transaction. (On PostgreSQL the driver makes
        a plain end server-side first: `Driver._finish`.)"""
        with self.dialect.write() as conn:
            row = self._lock(conn, workflow_id)
            if row is None or row.state != RUNNING:
                return False
            if before is not None:
                before(conn)
            self._end(conn, row, state, result, error, completion)
            return True

    def cancel(self, workflow_id: str, completion: Callable[[Any], NewRun | None]) -> Stopped:
        """Mark a running workflow canceled. Returns whether it was, its running
        children, and its unfinished runs (steps, and drivers not running) to cancel."""
        with self.dialect.write() as conn:
            row = self._lock(conn, workflow_id)
            if row is None:
                raise WorkflowNotFound(workflow_id)
            if row.state != RUNNING:
                return Stopped(False)
            return self._stop(conn, row, CANCELED, None, completion)

    def expire(self, workflow_id: str, completion: Callable[[Any], NewRun | None]) -> Stopped:
        """Fail a running workflow whose deadline has passed, naming the deadline.
        Returns as `cancel` does (its children and runs are to be canceled); when its
        deadline is still ahead (a clock behind the one that set it), `Stopped.early_ms`
        is how many milliseconds."""
        with self.dialect.write() as conn:
            row = self._lock(conn, workflow_id)
            if row is None or row.state != RUNNING or row.deadline_ms is None:
                return Stopped(False)
            early = row.deadline_ms - self.clock.now_ms()
            if early > 0:
                return Stopped(False, early_ms=early)
            error = deadline_error(row.deadline_ms, row.created_ms)
            return self._stop(conn, row, FAILED, error, completion)

    def _stop(
        self,
        conn: Connection,
        row: Any,
        state: str,
        error: str | None,
        completion: Callable[[Any], NewRun | None],
    ) -> Stopped:
        self._end(conn, row, state, None, error, completion)
        children = list(
            conn.execute(
                select(workflows_t.c.id).where(
                    workflows_t.c.parent_id == row.id, workflows_t.c.state == RUNNING
                )
            ).scalars()
        )
        owned = self.store.unfinished_of(conn, row.id)
        # Not the running driver (it ends when it next writes) nor the deadline's run
        # (which may be the caller).
        spared = (driver_name(row.pool), deadline_name(row.pool))
        run_ids = [r.id for r in owned if not (r.fn in spared and r.state == RUN_RUNNING)]
        return Stopped(True, children, run_ids, row=row, error=error)

    def _end(
        self,
        conn: Connection,
        row: Any,
        state: str,
        result: Any,
        error: str | None,
        completion: Callable[[Any], NewRun | None],
    ) -> None:
        now = self.clock.now_ms()
        self._end_workflow.run_in(
            conn, [{"b_wf": row.id, "b_state": state, "b_result": result, "b_error": error,
                    "b_finished_ms": now}]
        )
        if row.deadline_ms is not None:  # its deadline's run is moot now
            self.store.delete_pending_of(conn, row.id, deadline_name(row.pool))
        new = completion(row)
        if new is not None:
            outcome = {COMPLETED: RUN_SUCCESS, FAILED: RUN_FAILED, CANCELED: RUN_CANCELED}[state]
            self.store.insert_finished(new, outcome, conn, result=result, error=error)
        if row.parent_id is not None and row.parent_step is not None:
            if state == COMPLETED:
                what = f"the result of child workflow {row.id}"
                values: dict[str, Any] = {"state": COMPLETED, **result_columns(result, what)}
            else:
                why = error if state == FAILED else "child workflow was canceled"
                values = {"state": FAILED, "error": why}
            changed = conn.execute(
                update(steps_t)
                .where(
                    steps_t.c.workflow_id == row.parent_id,
                    steps_t.c.name == row.parent_step,
                    steps_t.c.state == WAITING,
                )
                .values(finished_ms=now, **values)
            ).rowcount
            if changed and values.get("result_size") is not None:
                store_apart(conn, row.parent_id, row.parent_step, result)
            self.wake(conn, row.parent_id, now)

    def delete(self, workflow_id: str) -> None:
        """Delete a finished workflow, its journal and its finished runs."""
        with self.dialect.write() as conn:
            row = self._lock(conn, workflow_id)
            if row is None:
                raise WorkflowNotFound(workflow_id)
            if row.state == RUNNING:
                raise WorkflowNotFinished(workflow_id)
            # Its steps and drivers, and the run that delivered its on_complete.
            self.store.delete_finished_of(conn, workflow_id, workflow_id)
            delete_workflows(conn, [workflow_id])

    # -- helpers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self, *, internal: bool = False) -> Iterator[Connection]:
        """A write transaction whose unique-key violation surfaces as `Conflict`.

        `internal`: the engine's own bookkeeping, which may commit without waiting
        for the disk (see `Dialect.write_internal`).
        """
        try:
            with self.dialect.write_internal() if internal else self.dialect.write() as conn:
                yield conn
        except IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def lock(self, conn: Connection, workflow_id: str) -> Any:
        """Lock a workflow's row for this transaction; the row (a few columns) or None."""
        return self._lock(conn, workflow_id)

    def _lock(self, conn: Connection, workflow_id: str) -> Any:
        rows = self._lock_workflow.rows(conn, self._lock_params(workflow_id))
        return rows[0] if rows else None

    def _lock_params(self, workflow_id: str) -> dict[str, Any]:
        if self._notice is None:
            return {"wf": workflow_id}
        return {"wf": workflow_id, "now": self.clock.now_ms()}

    def lock_running(self, conn: Connection, workflow_id: str) -> None:
        rows = self._lock_state.rows(conn, self._lock_params(workflow_id))
        if not rows or rows[0].state != RUNNING:
            raise NotRunning(workflow_id)


def delete_workflows(conn: Connection, ids: builtins.list[str]) -> None:
    """Delete these workflows' rows, journals, log lines and large results."""
    for table, column in (
        (logs_t, logs_t.c.workflow_id),
        (results_t, results_t.c.workflow_id),
        (steps_t, steps_t.c.workflow_id),
        (workflows_t, workflows_t.c.id),
    ):
        conn.execute(delete(table).where(column.in_(ids)))
