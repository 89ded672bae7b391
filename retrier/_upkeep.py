"""Upkeep of the engine's state: leases renewed and reaped, completed runs purged
after their retention, workers' presence, and runs no live worker can run failed
after their grace.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, insert, select, update

from ._clock import Clock
from ._dialects import WAKE, Dialect
from ._errors import UnregisteredFunction, describe
from ._models import COMPLETED, DELIVERING, FINISHING, LEASED, PENDING
from ._records import Records
from ._run_types import Heartbeat, Outcome, WorkerInfo
from ._tables import (
    DECIDE_COLUMNS,
    INSERT_ATTEMPTS,
    LIVE_WORKERS,
    SETTLE,
    attempt_row,
    attempts_t,
    in_state,
    names_in,
    runs,
    settle_values,
    workers_t,
)

# Rows of workers silent for this long are deleted.
_FORGET_MS = 86_400_000


def sweep_interval(grace: timedelta) -> timedelta:
    """How often to look for runs no worker can run: often enough for the grace to
    hold within a quarter of it, at most every 5 minutes (it reads the backlog)."""
    return min(max(grace / 4, timedelta(seconds=1)), timedelta(minutes=5))


class Upkeep:
    """Upkeep: leases kept and reaped, old runs purged, workers announced, and runs
    that no live worker can run failed after their grace."""

    def __init__(self, dialect: Dialect, clock: Clock, records: Records) -> None:
        self.dialect = dialect
        self.clock = clock
        self._records = records

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
                select(*DECIDE_COLUMNS)
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
                    delivery = settle_values(row, state=FINISHING, due_ms=now, fence=row.fence + 1)
                    settles.append(delivery)
                    continue
                lost = Outcome(
                    run_id=row.id,
                    fence=row.fence,
                    kind="failure",
                    started_ms=row.started_ms or now,
                    error=f"worker {row.lease_owner} stopped renewing its lease (lost)",
                )
                settle, _ = self._records.decide(row, lost, now, 0, "")
                if settle["b_state"] == DELIVERING:  # nobody holds it: any worker delivers
                    settle.update(b_state=FINISHING, b_lease_owner=None, b_lease_until_ms=None)
                settle["b_fence"] = row.fence + 1
                settle["b_due_ms"] = max(settle["b_due_ms"], now)
                settles.append(settle)
                attempt_rows.append(
                    attempt_row(
                        row.id, row.attempts, row.queue, row.lease_owner,
                        row.started_ms or now, now, "lost", lost.error,
                    )
                )
            conn.execute(SETTLE, settles)
            if attempt_rows:
                conn.execute(INSERT_ATTEMPTS, attempt_rows)
            self.dialect.notify(conn, WAKE)
        return len(rows)

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
            live = conn.execute(LIVE_WORKERS, {"now": now}).all()
            if not live:
                return 0
            actions = set().union(*(names_in(r.functions) for r in live))
            handlers = set().union(*(names_in(r.handlers) for r in live))
            cutoff = now - grace_ms
            rows = conn.execute(
                self.dialect.lock_for_claim(
                    select(*DECIDE_COLUMNS)
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
                settle, _ = self._records.decide(row, lost, now, 0, "")
                if settle["b_state"] == DELIVERING:  # nobody holds it: any worker delivers
                    settle.update(b_state=FINISHING, b_lease_owner=None, b_lease_until_ms=None)
                settle["b_fence"] = row.fence + 1
                settles.append(settle)
            if settles:
                conn.execute(SETTLE, settles)
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
