"""The store: every read and write of run state, as short transactions.

One class for both databases; what differs lives in `_dialects`. Its jobs live in
modules of their own: claiming (`_claims`, with queue limits in `_limits`),
recording outcomes and deliveries (`_records`), upkeep of leases, retention and
workers (`_upkeep`) and reads (`_reads`); the values they exchange are in
`_run_types`, the tables and shared statements in `_tables`. This module keeps the
schema and the writes that start, cancel and delete runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    case,
    delete,
    false,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from ._claims import Claims
from ._clock import Clock
from ._compiled import CompiledWrite
from ._dialects import CANCEL, WAKE, Dialect, Durability, open_dialect, reconnecting
from ._errors import RunNotFinished, RunNotFound, RunNotRetryable, SchemaTooNew
from ._explain import Explainer
from ._keyed import Debounced, KeyedInserts
from ._migrations import Migrations
from ._models import (
    CANCELED,
    COMPLETED,
    FAILED,
    FINISHING,
    PENDING,
    RUNNING,
    SCHEMA_VERSION,
)
from ._queue_settings import QueueSettings
from ._reads import Gauges, Reads, WorkersSeen
from ._records import Records
from ._run_types import Canceling, Claimed, NewRun, OwnedRun, StoredOutcome
from ._schedules import Schedules
from ._tables import (
    IDS,
    INSERT_RUNS,
    SETTLE,
    attempts_t,
    chunks,
    in_state,
    meta_t,
    new_row,
    runs,
    settle_values,
)
from ._upkeep import Upkeep

# The pending runs of one function for one owner (a workflow's drivers).
_PENDING_OF_OWNER = select(runs.c.id, runs.c.due_ms).where(
    runs.c.owner == bindparam("owner"), runs.c.fn == bindparam("fn"), in_state(PENDING)
)


_OUTCOME_OF = select(runs.c.outcome, runs.c.result, runs.c.error, runs.c.attempts).where(
    runs.c.id == bindparam("id")
)
_UNFINISHED_OF = select(runs.c.id, runs.c.fn, runs.c.state).where(
    runs.c.owner == bindparam("owner"), in_state(PENDING, RUNNING)
)
# Runs about to be canceled, locked in id order.
_LOCK_TO_CANCEL = (
    select(runs.c.id, runs.c.state, runs.c.cancel_requested)
    .where(runs.c.id.in_(IDS))
    .order_by(runs.c.id)
)


_CANCEL_PENDING = (
    update(runs)
    .where(runs.c.id.in_(IDS), in_state(PENDING))
    .values(
        state=case((runs.c.on_complete.is_(None), COMPLETED), else_=FINISHING),
        outcome=CANCELED,
        finished_ms=bindparam("now"),
        due_ms=bindparam("now"),
        fence=runs.c.fence + 1,
    )
)


_REQUEST_CANCEL = (
    update(runs).where(runs.c.id.in_(IDS), in_state(RUNNING)).values(cancel_requested=True)
)


class Store:
    """All durable state of one database, for every tier: the one store, on SQLite or
    PostgreSQL (what differs lives in the Dialect).

    Its operations come from the parts that do each job (claims, records, upkeep,
    reads); the writes that start, cancel and delete runs are its own.
    """

    def __init__(
        self,
        url: str,
        clock: Clock,
        namespace: str | None = None,
        durability: Durability = "normal",
    ) -> None:
        self.url = url
        self.clock = clock
        self.dialect: Dialect = open_dialect(url, namespace, durability=durability)
        self.engine = self.dialect.engine
        self._insert_run = CompiledWrite(INSERT_RUNS, self.engine.dialect)
        claims = Claims(self.dialect, clock)
        records = Records(self.dialect, clock, claims)
        upkeep = Upkeep(self.dialect, clock, records)
        reads = Reads(self.dialect)
        self._claims = claims
        self._records = records
        self._keyed = KeyedInserts(self.dialect)
        self._lock_to_cancel = self.dialect.lock_rows(_LOCK_TO_CANCEL)
        self._pending_of_owner = self.dialect.lock_rows(_PENDING_OF_OWNER)
        # Claiming (_claims.py)
        self.claim = claims.claim
        self.next_due_ms = claims.next_due_ms
        # Recording outcomes and deliveries (_records.py)
        self.record = records.record
        self.record_in = records.record_in
        self.delivered = records.delivered
        self.run_session_delivery = records.run_session_delivery
        self.release_delivery = records.release_delivery
        # Leases, retention, workers (_upkeep.py)
        self.heartbeat = upkeep.heartbeat
        self.reap = upkeep.reap
        self.purge_completed = upkeep.purge_completed
        # Retention of higher tiers' tables, run by the same daily job (see add_retention)
        self.retention_purges: dict[str, Callable[[int], int]] = {}
        self.announce_worker = upkeep.announce_worker
        self.retire_worker = upkeep.retire_worker
        self.fail_unrunnable = upkeep.fail_unrunnable
        # Reads (_reads.py)
        self.get = reads.get
        self.get_many = reads.get_many
        self.states = reads.states
        self.attempts = reads.attempts
        self.list_runs = reads.list_runs
        self.unfinished = reads.unfinished
        self.get_queue = reads.get_queue
        self.list_queues = reads.list_queues
        self.queue_counts = reads.queue_counts
        # Queues' settings: limits, keys' own caps, pool groups (_queue_settings.py)
        settings = QueueSettings(self.dialect, clock)
        self.set_queue = settings.set_queue
        self.set_key_limit = settings.set_key_limit
        self.key_limits = settings.key_limits
        self.set_group = settings.set_group
        self.get_group = settings.get_group
        self.list_groups = settings.list_groups
        # Why a run is not running (_explain.py)
        self.explain = Explainer(self.dialect, clock, claims).explain
        self._reads = reads
        # Cron schedules (_schedules.py): declared, fired once per tick, managed
        schedules = Schedules(self.dialect, clock, self._insert_in)
        self.declare_schedule = schedules.declare
        self.fire_schedules = schedules.fire_due
        self.next_schedule_ms = schedules.next_fire_ms
        self.trigger_schedule = schedules.trigger
        self.pause_schedule = schedules.set_paused
        self.delete_schedule = schedules.delete
        self.get_schedule = schedules.get
        self.list_schedules = schedules.list
        # Called with the rows of new runs before they are inserted (telemetry: the
        # trace context stamped, runs counted); None while telemetry is off.
        self.on_insert: Callable[[list[dict[str, Any]]], None] | None = None

    def gauges(self) -> Gauges:
        """What the metrics' gauges show (read at scrape time)."""
        return self._reads.gauges(self.clock.now_ms())

    def workers_seen(self) -> WorkersSeen:
        """Workers alive now, and the last heartbeat on record."""
        return self._reads.workers_seen(self.clock.now_ms())

    def migrate(self, migrations: Migrations, labels: Sequence[str]) -> list[str]:
        """Bring the schema of the branches `labels` up to date (Alembic migrations),
        safely when several processes start at once; returns the revisions applied.
        Raises `SchemaTooNew` for a database a newer release has migrated."""
        with self.dialect.write() as conn:
            self.dialect.lock_schema(conn)
            applied = migrations.upgrade(conn, labels)
            found = conn.execute(
                select(meta_t.c.value).where(meta_t.c.key == "schema_version")
            ).scalar()
            if found is not None and found > SCHEMA_VERSION:  # what releases before
                raise SchemaTooNew(found, SCHEMA_VERSION)  # migrations also checked
            self.dialect.create_extras(conn)
        return applied

    def create_tables(self, tables: Sequence[Table]) -> None:
        """Create an app's own tables if they do not exist (no migrations: for tests
        and examples that keep a table beside the engine's)."""
        with self.dialect.write() as conn:
            self.dialect.lock_schema(conn)
            SQLModel.metadata.create_all(conn, tables=list(tables))

    def add_retention(self, name: str, purge: Callable[[int], int]) -> None:
        """Have the daily retention job also call `purge(older_than_ms)`: a higher
        tier deleting its own finished rows (in batches) as the engine deletes
        completed runs; it returns how many it deleted. One per `name` (a second
        registration under a name replaces the first)."""
        self.retention_purges[name] = purge

    def purge(self, older_than_ms: int) -> dict[str, int]:
        """Retention: completed runs, then every tier's `add_retention`, each
        deleting what finished more than `older_than_ms` ago. How many each deleted
        (`runs` for the engine's own)."""
        removed = {"runs": self.purge_completed(older_than_ms)}
        for name, purge in list(self.retention_purges.items()):
            removed[name] = purge(older_than_ms)
        return removed

    def dispose(self) -> None:
        self.dialect.dispose()

    def checked_out(self) -> int:
        """Connections in use right now; zero once every transaction has ended."""
        return self.dialect.checked_out()

    def insert_runs(self, new: Sequence[NewRun], conn: Connection | None = None) -> list[str]:
        """Insert runs, in `conn`'s transaction if given, else in a transaction of our
        own; the id each gets, in order. A run with an idempotency key gets the id of
        the queue's run stored with that key, if any; a debounced run, the id of the
        pending run it collapses into (see `_keyed`)."""
        now = self.clock.now_ms()
        rows = [new_row(r, now) for r in new]
        if not rows:
            return []
        if self.on_insert is not None:
            self.on_insert(rows)
        if not all(r.plain for r in new):
            if conn is not None:
                return self._keyed.insert_in(conn, new, rows, now)
            return self._insert_keyed_own(new, rows, now)
        if conn is not None:
            conn.execute(INSERT_RUNS, rows)
        else:
            self._insert_own(rows)
        return [r.id for r in new]

    @reconnecting
    def _insert_keyed_own(
        self, new: Sequence[NewRun], rows: list[dict[str, Any]], now: int
    ) -> list[str]:
        # Safe to try twice: a first try that committed left the keys, which the
        # second finds.
        with self.dialect.write() as own:
            return self._keyed.insert_in(own, new, rows, now)

    def _insert_in(self, new: Sequence[NewRun], conn: Connection) -> None:
        self.insert_runs(new, conn)

    @reconnecting
    def _insert_own(self, rows: list[dict[str, Any]]) -> None:
        # Workers learn of new runs from the Retrier (same process), from a trigger's
        # NOTIFY (PostgreSQL) or by polling (SQLite in other processes).
        try:
            if len(rows) == 1:
                self.dialect.insert_alone(self._insert_run, rows[0])
            else:
                with self.dialect.write() as own:
                    own.execute(INSERT_RUNS, rows)
        except IntegrityError:
            # Tried again after a dropped connection: the first try may have committed.
            if self.states(r["id"] for r in rows).keys() != {r["id"] for r in rows}:
                raise

    def debounce_in(self, conn: Connection, new: NewRun, *, replace_args: bool = True) -> Debounced:
        """Store the debounced run `new` in the caller's transaction: collapsed into the
        pending, never-started run of its queue, function and debounce key (its args
        and context replaced unless `replace_args` is False; due one period from now,
        and no later than `max_wait` after the first call), else inserted. For a tier
        whose own rows depend on which it was (a workflow's start)."""
        now = self.clock.now_ms()
        row = self.pending_row(new, now)
        return self._keyed.debounce_in(conn, new, row, now, replace_args=replace_args)

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
            self.dialect.notify(conn, WAKE)  # an update, which no insert trigger announces
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
        if new.queue and not self._claims.queue_has_room(conn, new.queue, new.key, worker):
            return None
        row = self.pending_row(new, now)
        row.update(running_values(worker, lease_ms, now))
        self._insert_run.run_in(conn, [row])
        return claimed_inline(new, row)

    def pending_row(self, new: NewRun, now: int) -> dict[str, Any]:
        """The column values of `new`, pending (seen by `on_insert` first)."""
        row = new_row(new, now)
        if self.on_insert is not None:
            self.on_insert([row])
        return row

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
        row = new_row(new, now)
        row.update(
            state=FINISHING if new.on_complete else COMPLETED,
            outcome=outcome,
            result=result,
            error=error,
            finished_ms=now,
            due_ms=now,
        )
        self._insert_run.run_in(conn, [row])  # the PostgreSQL trigger wakes the workers

    @reconnecting
    def cancel(self, run_id: str) -> bool:
        """Cancel a run: pending at once; running best effort. False if already over."""
        with self.dialect.write() as conn:
            row = self._records.rows_for_update(conn, [run_id]).get(run_id)
            if row is None:
                raise RunNotFound(run_id)
            if row.state == PENDING:
                now = self.clock.now_ms()
                settle = settle_values(
                    row,
                    state=FINISHING if row.on_complete else COMPLETED,
                    outcome=CANCELED,
                    finished_ms=now,
                    fence=row.fence + 1,
                    due_ms=now,
                )
                conn.execute(SETTLE, [settle])
                self.dialect.notify(conn, WAKE)
                return True
            if row.state == RUNNING and not row.cancel_requested:
                conn.execute(
                    update(runs).where(runs.c.id == run_id).values(cancel_requested=True)
                )
                self.dialect.notify(conn, CANCEL, run_id)
                return True
            return False

    @reconnecting
    def retry(self, run_id: str) -> None:
        """Make a failed run pending again, due now, with its retry budget renewed.

        Its attempts so far are kept (the next one is numbered after them), and its
        on_complete, already told of the failure, is called again when it ends. Raises
        `RunNotRetryable` for a run that has not failed, whose on_complete has not run
        yet, or that a workflow owns (retrigger the workflow instead)."""
        with self.dialect.write() as conn:
            row = self._records.rows_for_update(conn, [run_id]).get(run_id)
            if row is None:
                raise RunNotFound(run_id)
            if row.owner is not None:
                raise RunNotRetryable(run_id, f"it belongs to {row.owner!r}; retrigger that")
            if row.state != COMPLETED or row.outcome != FAILED:
                why = "it has not failed" if row.state == COMPLETED else f"it is {row.state}"
                raise RunNotRetryable(run_id, why)
            now = self.clock.now_ms()
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    state=PENDING,
                    outcome=None,
                    result=None,
                    failures=0,
                    handler_failures=0,
                    handler_error=None,
                    due_ms=now,
                    finished_ms=None,
                    lease_owner=None,
                    lease_until_ms=None,
                    cancel_requested=False,
                    fence=row.fence + 1,
                )
            )
            self.dialect.notify(conn, WAKE)

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
            for chunk in chunks(sorted(ids), 500):  # locked in id order, as records lock
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

    # -- runs of one owner (a higher tier's unit: a workflow and its steps) -----------

    def outcome_in(self, conn: Connection, run_id: str) -> StoredOutcome | None:
        """A run's outcome and attempt count, read in the caller's transaction."""
        row = conn.execute(_OUTCOME_OF, {"id": run_id}).first()
        if row is None:
            return None
        return StoredOutcome(row.outcome, row.result, row.error, row.attempts)

    def unfinished_of(self, conn: Connection, owner: str) -> list[OwnedRun]:
        """The pending and running runs `owner` owns, in the caller's transaction."""
        rows = conn.execute(_UNFINISHED_OF, {"owner": owner}).all()
        return [OwnedRun(r.id, r.fn, r.state) for r in rows]

    def delete_pending_of(self, conn: Connection, owner: str, fn: str) -> int:
        """Delete the pending runs of `fn` that `owner` owns, in the caller's
        transaction (a run made moot, such as a finished workflow's deadline); runs
        already running are left to finish. Returns how many."""
        return int(
            conn.execute(
                delete(runs).where(
                    runs.c.owner == owner, runs.c.fn == fn, in_state(PENDING)
                )
            ).rowcount
        )

    def delete_completed(self, conn: Connection, run_id: str) -> str | None:
        """Delete a run and its attempts, in the caller's transaction, if it is
        completed (its on_complete delivered). Returns its state before; None if
        there is no such run."""
        state = conn.execute(select(runs.c.state).where(runs.c.id == run_id)).scalar()
        if state == COMPLETED:
            conn.execute(delete(attempts_t).where(attempts_t.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.id == run_id))
        return None if state is None else str(state)

    def delete_finished_of(self, conn: Connection, owner: str, *also: str) -> int:
        """Delete the completed runs `owner` owns (and the runs `also` names, if
        completed) with their attempts, in the caller's transaction."""
        ids = list(
            conn.execute(
                select(runs.c.id).where(
                    (runs.c.owner == owner) | runs.c.id.in_(also), in_state(COMPLETED)
                )
            ).scalars()
        )
        for chunk in chunks(ids, 500):
            conn.execute(delete(attempts_t).where(attempts_t.c.run_id.in_(chunk)))
            conn.execute(delete(runs).where(runs.c.id.in_(chunk)))
        return len(ids)


def running_values(worker: str, lease_ms: int, now: int) -> dict[str, Any]:
    """The columns that make a new run's row one `worker` holds, started at `now`."""
    return {
        "state": RUNNING,
        "attempts": 1,
        "fence": 1,
        "lease_owner": worker,
        "lease_until_ms": now + lease_ms,
        "started_ms": now,
        "due_ms": now,
    }


def claimed_inline(new: NewRun, row: dict[str, Any]) -> Claimed:
    """`new`, stored as `row` with `running_values`: held by its caller, to execute
    at once (`Worker.attempt_claimed`)."""
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
        started_ms=row["started_ms"],
        trace=row["trace"],
        due_ms=row["started_ms"],
        timeout_ms=new.timeout_ms,
    )
