"""Recording: how attempts ended, stored fenced (a stale worker's outcome is
dropped); each run's next state decided (retry with backoff, finish, deliver); and
on_complete deliveries marked done, in the transaction of the handler's own writes
when it takes a session.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    select,
    update,
)

from ._claims import Claims
from ._clock import Clock
from ._compiled import CompiledQuery, CompiledWrite
from ._dialects import WAKE, Dialect, is_transient
from ._errors import describe
from ._models import (
    CANCELED,
    COMPLETED,
    DELIVERING,
    FAILED,
    FINISHING,
    PENDING,
    RUNNING,
    SUCCESS,
)
from ._policy import backoff_ms
from ._record_statements import (
    COMPLETE_DELIVERY,
    COMPLETE_PLAIN_SUCCESS,
    COMPLETE_SUCCESS,
    SHARING,
    WAITING_IN,
    completing_plain_batch,
    completing_with_attempt,
)
from ._run_types import ANYTHING, Delivery, Outcome, Recorded, Runnable, SessionHandler
from ._tables import (
    INSERT_ATTEMPTS,
    ROW_BY_ID,
    ROWS_BY_ID,
    SETTLE,
    attempt_row,
    chunks,
    in_state,
    runs,
    settle_values,
)

# A handler that fails this many times is given up on; the run stays completed.
MAX_HANDLER_FAILURES = 5


class Records:
    """Recording: storing how attempts ended (fenced), deciding each run's next
    state, and marking on_complete deliveries done."""

    def __init__(self, dialect: Dialect, clock: Clock, claims: Claims) -> None:
        self.dialect = dialect
        self.clock = clock
        self._claims = claims
        self._rng = random.Random()
        self._rows_by_id = dialect.lock_rows(ROWS_BY_ID)
        self._row_by_id = dialect.lock_rows(ROW_BY_ID)
        self._update_returning = dialect.update_returning
        self._batch_rowcount = dialect.batch_rowcount
        # The writes of every recorded outcome, on the driver directly (`_compiled`).
        sa_dialect = dialect.engine.dialect
        self._insert_attempts = CompiledWrite(INSERT_ATTEMPTS, sa_dialect)
        self._settle = CompiledWrite(SETTLE, sa_dialect)
        self._complete_plain_success = CompiledWrite(COMPLETE_PLAIN_SUCCESS, sa_dialect)
        # A success and its attempt's row: one statement where writes nest in a WITH
        # (PostgreSQL), else an UPDATE ... RETURNING on the driver, then the INSERT.
        self.completing_with_attempt = (
            completing_with_attempt() if dialect.writes_in_cte else None
        )
        self._completing_success = CompiledQuery(COMPLETE_SUCCESS, sa_dialect)
        # Whether freed slots are worth a wake-up: asked by many records under load.
        self._sharing = CompiledQuery(SHARING, sa_dialect)
        self._waiting = CompiledQuery(WAITING_IN, sa_dialect)
        # And a batch of plain successes with their attempts' rows, in one statement.
        self._completing_plain_batch = (
            CompiledQuery(completing_plain_batch(), sa_dialect) if dialect.writes_in_cte
            else None
        )

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
            claimed = self._claims.claim_in(conn, worker, room, lease_ms, runnable)
            done.claimed, done.wake_at_ms = claimed
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
        current = self.rows_for_update(conn, [o.run_id for o in outcomes])
        settles: list[dict[str, Any]] = []
        attempt_rows: list[dict[str, Any]] = []
        in_txn: list[Delivery] = []
        for o in outcomes:
            row = current.get(o.run_id)
            if row is None or row.fence != o.fence or row.state != RUNNING:
                done.stale.append(o.run_id)
                continue
            if o.kind == "released":  # as if never started (shutdown, HandBack)
                due = now + (o.retry_after_ms or 0)
                settles.append(
                    settle_values(
                        row, state=PENDING, attempts=row.attempts - 1, due_ms=due, trace=o.trace
                    )
                )
                continue
            settle, finished = self.decide(row, o, now, lease_ms, worker)
            settles.append(settle)
            attempt_rows.append(
                attempt_row(
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
        self._settle.run_in(conn, settles)
        self._insert_attempts.run_in(conn, attempt_rows)
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
        if not plain or not self._batch_rowcount:
            return outcomes
        if self._completing_plain_batch is not None:
            return self._complete_plain_batch(conn, outcomes, plain, worker, now, done, freed)
        changed = self._complete_plain_success.run_in(
            conn,
            [
                {"b_id": o.run_id, "b_fence": o.fence, "b_result": o.result, "b_now": now}
                for o in plain
            ],
        )
        if changed != len(plain):
            rows = self.rows_for_update(conn, [o.run_id for o in plain])
            plain = [
                o
                for o in plain
                if (row := rows.get(o.run_id)) is not None
                # Only this worker, holding this fence, records a success for it (the
                # reaper completes a lost attempt as failed).
                and (row.fence, row.state, row.outcome) == (o.fence, COMPLETED, SUCCESS)
            ]
        # (All of them may have been canceled meanwhile.)
        self._insert_attempts.run_in(
            conn,
            [
                attempt_row(o.run_id, o.attempt, o.queue, worker, o.started_ms, now, SUCCESS)
                for o in plain
            ],
        )
        done.completed.extend(o.run_id for o in plain)
        freed.update(o.queue for o in plain if o.queue)
        completed = {o.run_id for o in plain}
        return [o for o in outcomes if o.run_id not in completed]

    def _complete_plain_batch(
        self,
        conn: Connection,
        outcomes: Sequence[Outcome],
        plain: list[Outcome],
        worker: str,
        now: int,
        done: Recorded,
        freed: set[str],
    ) -> Sequence[Outcome]:
        """`_complete_plain` where writes nest in a WITH (PostgreSQL): the batch and
        its attempts' rows in one statement, which says which runs it completed."""
        assert self._completing_plain_batch is not None
        params = {
            "b_ids": [o.run_id for o in plain],
            "b_fences": [o.fence for o in plain],
            "b_results": [json.dumps(o.result) for o in plain],
            "b_started": [o.started_ms for o in plain],
            "b_now": now,
            "b_worker": worker,
        }
        rows = self._completing_plain_batch.rows(conn, params)
        completed = {run_id for (run_id,) in rows}
        for o in plain:
            if o.run_id in completed:
                done.completed.append(o.run_id)
                if o.queue:
                    freed.add(o.queue)
        # The others (a lost lease, a cancel request: rare) go the general way.
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
        params = {"b_id": o.run_id, "b_fence": o.fence, "b_result": o.result, "b_now": now}
        if self.completing_with_attempt is not None:
            row = conn.execute(
                self.completing_with_attempt,
                {**params, "b_worker": worker, "b_started": o.started_ms},
            ).first()
            if row is None:
                return None
        else:
            found = self._completing_success.rows(conn, params)
            if not found:
                return None
            row = found[0]
            attempt = attempt_row(
                o.run_id, row.attempts, row.queue, worker, o.started_ms, now, SUCCESS
            )
            self._insert_attempts.run_in(conn, [attempt])
        if row.on_complete is not None:
            session_handler(
                Delivery(
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
                    # The run completes here: its attempt's context, if it had none,
                    # is needed by this on_complete's span only.
                    trace=row.trace if row.trace is not None else o.trace,
                ),
                conn,
            )
        return str(row.queue or "")

    def _waiting_in(self, conn: Connection, queues: set[str], now: int) -> bool:
        sharing = {r.name for r in self._sharing.rows(conn, {"queues": sorted(queues)})}
        return bool(self._waiting.rows(conn, {"now": now, "queues": sorted(queues | sharing)}))

    def decide(
        self, row: Row[Any], o: Outcome, now: int, lease_ms: int, worker: str
    ) -> tuple[dict[str, Any], Delivery | None]:
        """The next state of a run after an attempt ended as `o`.

        A run with no trace context stored takes the one its attempt's outcome
        carries (`Outcome.trace`), for its retries and its on_complete."""
        if row.cancel_requested or o.kind == "canceled":
            return self._finish(row, o, CANCELED, None, None, now, lease_ms, worker)
        if o.kind == "success":
            return self._finish(row, o, SUCCESS, o.result, None, now, lease_ms, worker)
        failures = row.failures + 1
        if o.kind == "fatal" or failures >= row.max_failures:
            settle, finished = self._finish(row, o, FAILED, None, o.error, now, lease_ms, worker)
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
        # From when the attempt ended (recording may come a little later). Its end is
        # stamped rounded up, `now` rounded down: within the same millisecond, the end
        # is the later of the two, and a backoff counted from `now` would end early.
        since = now if o.ended_ms is None else min(o.ended_ms, now + 1)
        return (
            settle_values(
                row,
                state=PENDING,
                failures=failures,
                due_ms=since + delay,
                error=o.error,
                trace=o.trace,
            ),
            None,
        )

    def _finish(
        self,
        row: Row[Any],
        o: Outcome,
        outcome: str,
        result: Any,
        error: str | None,
        now: int,
        lease_ms: int,
        worker: str,
    ) -> tuple[dict[str, Any], Delivery | None]:
        if row.on_complete is None:
            return (
                settle_values(
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
        settle = settle_values(
            row,
            state=DELIVERING,
            outcome=outcome,
            result=result,
            error=error,
            finished_ms=now,
            fence=fence,
            lease_owner=worker,
            lease_until_ms=now + lease_ms,
            trace=o.trace,  # kept for a delivery made again (handed back, failed, lost)
        )
        return settle, Delivery(
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
            trace=row.trace if row.trace is not None else o.trace,
        )

    def delivered(self, finished: Sequence[Delivery], failures: dict[str, str]) -> list[str]:
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
                result = conn.execute(COMPLETE_DELIVERY, {"b_id": f.id, "b_fence": f.fence})
                if result.rowcount:
                    completed.append(f.id)
        return completed

    def run_session_delivery(
        self, finished: Delivery, session_handler: SessionHandler
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

    def _handler_failed(self, conn: Connection, f: Delivery, error: str, now: int) -> None:
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

    def release_delivery(self, f: Delivery) -> bool:
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

    def rows_for_update(self, conn: Connection, ids: list[str]) -> dict[str, Row[Any]]:
        found: dict[str, Row[Any]] = {}
        if len(ids) == 1:
            row = conn.execute(self._row_by_id, {"id": ids[0]}).first()
            return {} if row is None else {row.id: row}
        for chunk in chunks(ids, 500):
            found.update({r.id: r for r in conn.execute(self._rows_by_id, {"ids": chunk})})
        return found


def _call_in_savepoint(
    conn: Connection, finished: Delivery, session_handler: SessionHandler
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


def _attempt_outcome(o: Outcome, row: Row[Any]) -> str:
    if row.cancel_requested or o.kind == "canceled":
        return "canceled"
    return "success" if o.kind == "success" else "failed"
