"""A worker's periodic jobs besides running work: its heartbeat (its row in
`tiers_workers`, what it can run, and its held runs' leases and cancel requests), the
poll for due work, firing cron schedules' ticks, the sweep that fails runs no live
worker can run, reaping expired leases, and retention. Each job logs its failure and
never raises: a timer calls it again at its next tick.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

from ._clock import to_ms
from ._errors import first_line
from ._run_types import WorkerInfo

if TYPE_CHECKING:
    from ._worker import Worker

log = logging.getLogger("tiers.worker")

SCHEDULE_LOOK = timedelta(milliseconds=500)
"""How often a worker looks for due cron ticks: a tick fires within this of its time."""


class WorkerJobs:
    """The periodic jobs of one worker (blocking calls, run from its timers)."""

    schedule_look = SCHEDULE_LOOK

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._store = worker.store

    def announce(self) -> None:
        """Tell the database this worker is alive, and what it can run."""
        w = self._worker
        self._store.announce_worker(
            WorkerInfo(
                id=w.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                concurrency=w.concurrency,
                lease_ms=w.lease_ms,
                runnable=w.runnable(),
            )
        )

    def heartbeat(self) -> None:
        """Renew the leases of the runs the worker holds; act on lost leases and on
        cancel requests (its `_held`, `_lease_lost` and `_cancel_scope`)."""
        w = self._worker
        self.announce_quietly()
        held = dict(w._held)
        if not held:
            return
        try:
            beat = self._store.heartbeat(w.id, held, w.lease_ms)
        except Exception:
            log.exception("heartbeat failed")
            return
        for run_id in beat.lost:
            w._from_thread(partial(w._lease_lost, run_id, held[run_id]))
        for run_id in beat.cancel_requested:
            w._from_thread(partial(w._cancel_scope, run_id, "canceled"))

    def poll(self) -> None:
        """Look for due work by itself, in case no hint arrived."""
        w = self._worker
        # A worker whose claims keep finding runs claims again after every batch:
        # nothing for a poll to add. (Not any claim: under a trickle every record
        # claims, finding nothing, and the poll would never run.)
        if time.monotonic() - w._found_work_at < w.poll_interval.total_seconds():
            return
        # A read first: an idle worker must not take SQLite's write lock forty times a
        # second just to find nothing due.
        try:
            due = self._store.next_due_ms(w.runnable())
        except Exception:
            log.exception("polling for due work failed")
            return
        if due is not None and due <= self._store.clock.now_ms():
            w.wake()

    def announce_quietly(self) -> None:
        try:
            self.announce()
        except Exception as exc:
            log.warning("worker heartbeat failed: %s", first_line(exc))

    def retire(self) -> None:
        """Tell the database this worker has stopped."""
        self._store.retire_worker(self._worker.id)

    def retire_quietly(self) -> None:
        try:
            self.retire()
        except Exception as exc:
            log.warning("could not unregister worker %s: %s", self._worker.id, first_line(exc))

    def sweep_unrunnable(self) -> int:
        """Fail the runs no live worker could run for `unregistered_grace`; how many."""
        return self._store.fail_unrunnable(to_ms(self._worker.unregistered_grace))

    def sweep(self) -> None:
        try:
            failed = self.sweep_unrunnable()
        except Exception:
            log.exception("failing runs that no worker can run failed")
            return
        if failed:
            log.warning("%d run(s) failed: no live worker registered their function", failed)
            self._worker.wake()

    def reap(self) -> None:
        try:
            if self._store.reap():
                self._worker.wake()
        except Exception:
            log.exception("reaping expired leases failed")

    def fire_schedules(self) -> None:
        """Fire the cron schedules' due ticks (each once, whichever worker is first)."""
        store = self._store
        try:
            due = store.next_schedule_ms()  # a read: most looks find nothing due
            if due is None or due > store.clock.now_ms():
                return
            fired = store.fire_schedules()
        except Exception:
            log.exception("firing cron schedules failed")
            return
        for tick in fired:
            log.info(
                "schedule %s fired run %s", tick.name, tick.run_id,
                extra={"schedule": tick.name, "run_id": tick.run_id},
            )
        if fired:
            self._worker.wake()

    def purge(self) -> None:
        """Retention: completed runs, then the higher tiers' rows (`Store.add_retention`);
        each part on its own, so one failing does not keep the others from running."""
        older_than_ms = to_ms(self._worker.retention)
        parts = {"runs": self._store.purge_completed, **self._store.retention_purges}
        for name, purge in parts.items():
            try:
                removed = purge(older_than_ms)
            except Exception:
                log.exception("retention cleanup of %s failed", name)
                continue
            if removed:
                log.info("retention: deleted %d %s", removed, name)
