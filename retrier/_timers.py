"""Each worker's timers, on APScheduler 3.x. The only module that imports APScheduler.

Timers only wake the worker or start maintenance; the database stays the single
source of truth, so a scheduler lost with its process loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

_WAKE_JOB = "wake"
# A wake-up further ahead than this is set for this far ahead: the worker looks at the
# database then and sets the next one. Due times near the end of what datetime can
# hold (a bad row, seconds taken for milliseconds) then never reach APScheduler.
_LONGEST_WAKE_MS = 3_600_000
# A wake-up fires this much before its due time: the scheduler's own lateness and the
# claim then fit before it, and the worker starts the run at its due time exactly
# (`Claims.claim`'s `at_ms`).
WAKE_LEAD_MS = 12


class _SchedulerNotices(logging.Filter):
    """Keep APScheduler's warnings and errors, under the `tiers` logger (so that
    TIERS_LOG_LEVEL governs them), but drop its INFO chatter (every job added or
    removed: one per wake-up) and its notice that a periodic job (a poll, a heartbeat)
    was skipped because its previous run had not ended, which under load is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return "maximum number of running instances reached" not in record.getMessage()


_scheduler_log = logging.getLogger("tiers.timers")
_scheduler_log.addFilter(_SchedulerNotices())


class Timers:
    """One-off wake-ups at due times, and periodic jobs.

    Made inside an asyncio event loop (the worker's), the scheduler runs on that loop
    (APScheduler's AsyncIOScheduler): a wake-up then fires on the loop itself, with
    no hop from a thread of its own (a 250 ms backoff starts on time). Periodic jobs,
    which block on the database, run in a small thread pool either way. Elsewhere
    (anyio's trio backend), a background thread does it all.
    """

    def __init__(self, name: str = "tiers") -> None:
        options: dict[str, Any] = {
            "timezone": UTC,
            "job_defaults": {"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            "logger": _scheduler_log,
        }
        threads = ThreadPoolExecutor(max_workers=4)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._on_loop = loop is not None
        if loop is not None:
            self._scheduler: BaseScheduler = AsyncIOScheduler(
                event_loop=loop,
                executors={"default": threads, "loop": AsyncIOExecutor()},
                **options,
            )
        else:
            self._scheduler = BackgroundScheduler(executors={"default": threads}, **options)
        self._lock = threading.Lock()
        self._wake_due_ms: int | None = None
        self._name = name

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def wake_at(self, due_ms: int, wake: Callable[[int], None]) -> None:
        """Call `wake(due_ms)` `WAKE_LEAD_MS` before `due_ms` (epoch ms), unless an
        earlier wake-up is pending.

        Never raises: a wake-up that cannot be set is logged, and the worker's poll
        finds the work instead.
        """
        try:
            self._wake_at(due_ms, wake)
        except Exception:
            _scheduler_log.exception("could not set a wake-up at %r; polling instead", due_ms)

    def _wake_at(self, due_ms: int, wake: Callable[[int], None]) -> None:
        with self._lock:
            now_ms = datetime.now(UTC).timestamp() * 1000
            due_ms = int(min(due_ms, now_ms + _LONGEST_WAKE_MS))
            pending = self._wake_due_ms
            if pending is not None and pending <= due_ms and pending > now_ms:
                return
            self._wake_due_ms = due_ms
        self._scheduler.add_job(
            self._fire_on_loop if self._on_loop else self._fire,
            "date",
            executor="loop" if self._on_loop else "default",
            args=(wake, due_ms),
            run_date=datetime.fromtimestamp((due_ms - WAKE_LEAD_MS) / 1000, tz=UTC),
            id=_WAKE_JOB,
            replace_existing=True,
            # A wake-up replaced while the previous one is still firing must not be
            # skipped as "already running": that would lose it.
            max_instances=100,
        )

    def _fire(self, wake: Callable[[int], None], due_ms: int) -> None:
        with self._lock:
            self._wake_due_ms = None
        wake(due_ms)

    async def _fire_on_loop(self, wake: Callable[[int], None], due_ms: int) -> None:
        self._fire(wake, due_ms)

    def every(
        self, name: str, interval: timedelta, job: Callable[[], Any], *, now: bool = False
    ) -> None:
        """Run `job` every `interval` (and once right away if `now`)."""
        # APScheduler reads an explicit next_run_time=None as "paused", so pass it only
        # to run at once.
        extra: dict[str, Any] = {"next_run_time": datetime.now(UTC)} if now else {}
        self._scheduler.add_job(
            job, "interval", seconds=interval.total_seconds(), id=name, replace_existing=True,
            **extra,
        )

    def cron(self, name: str, job: Callable[[], Any], **fields: Any) -> None:
        """Run `job` on a cron schedule (APScheduler's cron fields: minute=, hour=, ...)."""
        self._scheduler.add_job(job, "cron", id=name, replace_existing=True, **fields)

    def job_names(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())
