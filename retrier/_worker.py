"""The worker: claims due runs, executes them, records outcomes, delivers on_complete.

One async loop per worker. Database calls run in threads (the store is synchronous),
sync actions run in threads, async actions run as tasks. Every outcome is recorded
under a shielded cancel scope, so shutdown or cancellation never loses one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from sqlalchemy import Connection

from ._attempt_threads import AttemptThreads, Finished
from ._attempts import EarlyEnds, attempt, attempt_blocking, runs_blocking
from ._clock import to_ms
from ._deliveries import Deliveries, finished_from
from ._dialect import AlwaysWanting, AnnouncementWants
from ._dialects import CANCEL, WAKE, WouldBlock, is_transient, sent_at
from ._errors import first_line
from ._hints import NONE, UNKNOWN, Hints, wants_announcements
from ._log import run_extra
from ._models import DELIVERING
from ._registry import Registry
from ._run_types import Claimed, Delivery, Outcome, Recorded, Runnable, SessionHandler
from ._store import Store
from ._telemetry import Telemetry, outcomes_recorded
from ._timers import WAKE_LEAD_MS, Timers
from ._upkeep import sweep_interval
from ._waiting import loop_caller
from ._worker_jobs import WorkerJobs

log = logging.getLogger("tiers.worker")

T = TypeVar("T")

_BATCH = 256
# How far ahead a claim may be made as of (a timer's lead, and some scheduling slack).
_CLAIM_AHEAD_MS = 4 * WAKE_LEAD_MS

current_worker: ContextVar[Worker | None] = ContextVar("tiers_current_worker", default=None)
"""The worker executing the current action, seen from inside the action (or None)."""


class Worker:
    """Executes the runs of one database, alongside any number of other workers.

    Make one with `Retrier.worker()`, or let `with retrier:` / `tiers worker` do it.
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        concurrency: int = 16,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: timedelta = timedelta(seconds=1),
        retention: timedelta = timedelta(days=7),
        shutdown_grace: timedelta = timedelta(seconds=30),
        record_patience: timedelta = timedelta(minutes=5),
        unregistered_grace: timedelta = timedelta(hours=1),
        on_completed: Callable[[list[str]], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.store = store
        self.registry = registry
        self.concurrency = concurrency
        self.lease_ms = to_ms(lease)
        self.poll_interval = poll_interval
        self.retention = retention
        self.shutdown_grace = shutdown_grace
        self.record_patience = record_patience
        self.unregistered_grace = unregistered_grace
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._on_completed = on_completed or (lambda ids: None)
        self._held: dict[str, int] = {}  # run id -> fence, for every lease we hold
        self._found_work_at = 0.0  # time.monotonic() of the last claim that found runs
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._cancel_reason: dict[str, str] = {}
        self._async_runs: set[str] = set()
        self._stopping = False
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._call_soon: Callable[[Callable[[], None]], None] | None = None
        self._loop_thread: int | None = None
        self._tg: TaskGroup | None = None
        self._outcomes: MemoryObjectSendStream[Outcome] | None = None
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._timers: Timers | None = None
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._deliveries = Deliveries(store, registry, self._persist, self.telemetry)
        self._hints = Hints()  # how to answer announcements of new runs
        self._announced = False  # an announcement is on its way to the loop
        self._announced_at = NONE  # when the latest one was sent (see Hints)
        self._claims_left: int | None = None  # run_until_idle's budget of claims
        self.next_look_ms: int | None = None  # when the last claim said to look again
        self._claim_at: int | None = None  # a timer's due time, for the next claim
        self._early_ends = EarlyEnds()  # so that this worker's retries start on time
        # Whether to hear of new runs (`Dialect.announcement_wants`), and when a record
        # last claimed; a timer asks again once records have paused.
        self._wants: AnnouncementWants = AlwaysWanting()
        self._recorded_at = 0.0
        self._wants_check: asyncio.TimerHandle | None = None
        self.jobs = WorkerJobs(self)
        # `def` actions without a time limit run wholly on these threads (see
        # `_attempt_threads`); every other attempt is a task on the loop.
        self._threads = AttemptThreads(
            self._attempt_blocking,
            self._threads_finished,
            self._from_thread,
            on_thread_start=partial(current_worker.set, self),
        )

    # -- lifecycle -----------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()`; then finish (or release) running work and return."""
        self._bind_loop()
        self._wants = self.store.dialect.announcement_wants(self._began_wanting)
        timers = Timers()
        self._timers = timers
        send, receive = anyio.create_memory_object_stream[Outcome](math.inf)
        self._outcomes = send
        timers.start()
        lease_s = self.lease_ms / 1000
        timers.every("heartbeat", timedelta(seconds=lease_s / 3), self.jobs.heartbeat, now=True)
        timers.every("reap", timedelta(seconds=lease_s / 2), self.jobs.reap, now=True)
        timers.every("unrunnable", sweep_interval(self.unregistered_grace), self.jobs.sweep)
        timers.every("retention", timedelta(days=1), self.jobs.purge, now=True)
        timers.every("poll", self.poll_interval, self.jobs.poll)
        timers.every("schedules", self.jobs.schedule_look, self.jobs.fire_schedules, now=True)
        log.info("worker %s started (concurrency %d)", self.id, self.concurrency)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                listening = anyio.CancelScope()
                tg.start_soon(self._listen, listening)
                tg.start_soon(self._record_loop, receive)
                task_status.started()
                await self._claim_loop()
                await self._drain()
                send.close()
                listening.cancel()
        finally:
            await self._record_leftovers(receive)
            timers.shutdown()
            self._threads.close()
            if self._wants_check is not None:
                self._wants_check.cancel()
            wants, self._wants = self._wants, AlwaysWanting()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(wants.close)
                await anyio.to_thread.run_sync(self.jobs.retire_quietly)
            self._tg = None
            self._call_soon = None
            log.info("worker %s stopped", self.id)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ask the worker to stop claiming and shut down gracefully; thread-safe."""
        self._stopping = True
        self.wake()

    async def run_until_idle(self, *, max_rounds: int = 10_000) -> bool:
        """Claim and finish due work until none is left; for tests with a fake clock.

        No timers or listeners: time moves only when the test moves it. Returns False
        if it stopped after `max_rounds` claims that found work (refills included).
        """
        self._bind_loop()
        send, receive = anyio.create_memory_object_stream[Outcome](math.inf)
        self._outcomes, self._claims_left = send, max_rounds
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._record_loop, receive)
            while not (idle := not await self._claim_batch() and not self._held):
                await self._wait_idle()
                if self._stopping:  # the rounds are spent
                    break
            send.close()
        receive.close()
        self._threads.close()
        self._tg = None
        return idle

    def _bind_loop(self) -> None:
        self._loop_thread = threading.get_ident()
        self._call_soon = loop_caller()

    def wake(self) -> None:
        """Make the worker look for due work now; thread-safe, never blocks."""
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
            return
        call_soon = self._call_soon
        if call_soon is not None:
            try:
                call_soon(self._set_wake)
            except RuntimeError:  # the loop has closed
                pass

    def _set_wake(self) -> None:
        self._wake.set()

    def cancel_local(self, run_id: str) -> None:
        """Cancel our running attempt of `run_id`, if we hold one; thread-safe."""
        if threading.get_ident() == self._loop_thread:
            self._cancel_scope(run_id, "canceled")
        elif self._call_soon is not None:
            try:
                self._call_soon(partial(self._cancel_scope, run_id, "canceled"))
            except RuntimeError:
                pass

    # -- claiming --------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        pause = 0.1
        while not self._stopping:
            self._wake = anyio.Event()
            free = self.concurrency - len(self._held)
            wanted = min(free, _BATCH)
            if wanted > 0 and (delay := self._hints.delay()):
                await anyio.sleep(delay)  # announcements meanwhile fold into this claim
            try:
                claimed = await self._claim_batch() if wanted > 0 else []
                self._hints.claimed(len(claimed))
            except Exception:
                # The database may be restarting: keep running work, retry claims later.
                log.exception("claiming failed; retrying in %.1f s", pause)
                with anyio.move_on_after(pause):
                    await self._wake.wait()  # stop() wakes us early
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            if wanted > 0 and len(claimed) == wanted:
                continue  # there may be more
            await self._wake.wait()

    async def _claim_batch(self) -> list[Claimed]:
        wanted = min(self.concurrency - len(self._held), _BATCH)
        if wanted <= 0:
            return []
        began = time.monotonic()
        claimed, wake_at_ms = await self.store.dialect.call(
            partial(self.store.claim, at_ms=self._take_claim_at()),
            self.id, wanted, self.lease_ms, self.runnable(),
        )
        self._hints.looked(began)
        self._start(claimed, wake_at_ms)
        return claimed

    def _start(self, claimed: list[Claimed], wake_at_ms: int | None) -> None:
        """Start executing (or delivering) claimed runs; look again at `wake_at_ms`.

        The runs start first: nothing after a claim has committed may strand them.
        """
        if claimed:
            self._found_work_at = time.monotonic()
        assert self._tg is not None
        on_loop = []
        for c in claimed:
            self._hold(c.id, c.fence)
            if c.state == DELIVERING:
                self._tg.start_soon(self._deliver, finished_from(c))
            elif not self.telemetry.active and runs_blocking(self.registry, c):
                self._threads.submit(c)
            else:
                on_loop.append(c)
        if len(on_loop) == 1:
            self._tg.start_soon(self._execute, on_loop[0])
        elif on_loop:
            self._tg.start_soon(self._execute_all, on_loop)
        self.next_look_ms = wake_at_ms  # a due time, or when a rate limit lets more start
        if claimed and self._claims_left is not None:  # run_until_idle: no refills past it
            self._claims_left -= 1
            self._stopping = self._stopping or self._claims_left <= 0
        if wake_at_ms is not None and self._timers is not None:
            self._timers.wake_at(wake_at_ms, self._wake_for)  # never raises

    def _wake_for(self, due_ms: int) -> None:
        """A timer fired just before `due_ms`: claim as at `due_ms` (the runs then
        start on time, each waiting for its `started_ms`); thread-safe."""
        if threading.get_ident() == self._loop_thread:
            self._set_claim_at(due_ms)
        else:
            self._from_thread(partial(self._set_claim_at, due_ms))

    def _set_claim_at(self, due_ms: int) -> None:
        self._claim_at = max(self._claim_at or due_ms, due_ms)
        self._wake.set()

    def _take_claim_at(self) -> int | None:
        """The due time a timer asked the next claim to be made as of, if still
        ahead (by at most `_CLAIM_AHEAD_MS`)."""
        at, self._claim_at = self._claim_at, None
        if at is None:
            return None
        now = self.store.clock.now_ms()
        return at if now < at <= now + _CLAIM_AHEAD_MS else None

    # -- executing --------------------------------------------------------------------

    async def _execute_all(self, claimed: list[Claimed]) -> None:
        """Execute claimed runs at once, each in an asyncio task of its own, under one
        task of the worker's group: anyio's bookkeeping per task costs more than a
        no-op's whole attempt. Cancelled (a forced shutdown), it cancels them and
        waits until each has recorded its interruption, as `_execute` does alone."""
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._execute(c)) for c in claimed]
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks)
            raise
        for task in tasks:  # as a task group would: an error here is the worker's
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    async def _execute(self, c: Claimed) -> None:
        token = current_worker.set(self)
        outcome = self._interrupted(c)  # if shutdown cancels us from outside
        try:
            outcome = await self._run_attempt(c)
        finally:
            current_worker.reset(token)
            self._record(outcome)

    def _attempt_blocking(self, c: Claimed) -> Outcome | None:
        """An attempt on one of `_threads` (called there)."""
        return attempt_blocking(
            self.registry, c, clock=self.store.clock,
            cancelled=partial(self._cancel_reason.__contains__, c.id),
            early_s=self._early_ends.take(c.id),
        )

    def _threads_finished(self, finished: Finished) -> None:
        """Attempts that ended on `_threads`, to be recorded (called on the loop).
        One whose run was cancelled or whose lease was lost meanwhile ends as
        interrupted, as an attempt on the loop whose scope was cancelled does."""
        for c, outcome in finished:
            if outcome is None or c.id in self._cancel_reason:
                outcome = self._interrupted(c)
            self._record(outcome)

    async def attempt_claimed(self, c: Claimed, session_handler: SessionHandler) -> Outcome:
        """Execute a run this worker holds (from `Store.insert_running`) here and now,
        and keep holding it: the caller records the outcome, in a transaction of its
        own (`settle_claimed`) or inside another write (`record_claimed`, then
        `release_claimed`). `session_handler` stands in for the run's on_complete in
        that transaction.

        The attempt is leased, heartbeated and cancellable like a claimed one.
        Cancelled from outside, it records the interruption itself.
        """
        self._hold(c.id, c.fence)
        try:
            return await self._run_attempt(c)
        except BaseException:
            # Cancelled from outside (shutdown), perhaps natively by asyncio, where no
            # await is safe any more: release the attempt right here, synchronously.
            self.settle_claimed([self._interrupted(c)], session_handler)
            raise

    def record_claimed(
        self,
        conn: Connection,
        outcomes: list[Outcome],
        session_handler: SessionHandler,
        *,
        wake_waiting: bool = True,
    ) -> Recorded:
        """Record outcomes of runs held after `attempt_claimed` inside the caller's
        transaction; `session_handler` stands in for their on_complete there.
        `wake_waiting`: see `Store.record_in`."""
        recorded = self.store.record_in(
            conn,
            [replace(o, handler_in_txn=True) for o in outcomes],
            self.id,
            self.lease_ms,
            session_handler,
            handler_savepoint=False,
            wake_waiting=wake_waiting,
        )
        outcomes_recorded(self.telemetry, outcomes, recorded)
        return recorded

    def recorded_elsewhere(self, outcomes: list[Outcome]) -> None:
        """Successes of runs held after `attempt_claimed` that a higher tier completed
        in its own statement (a workflow's server-side step start): logged and counted
        as `record_claimed` does; then `release_claimed` them."""
        completed = Recorded(completed=[o.run_id for o in outcomes])
        outcomes_recorded(self.telemetry, outcomes, completed)

    def release_claimed(self, run_ids: list[str], completed: list[str]) -> None:
        """After the transaction of `record_claimed` has committed (or if it did not,
        for runs whose outcome is left to their lease expiring)."""
        for run_id in run_ids:
            self._release(run_id, wake=False)
        if completed:
            self._on_completed(completed)

    def settle_claimed(
        self, outcomes: list[Outcome], session_handler: SessionHandler
    ) -> Recorded:
        """Record outcomes of runs held after `attempt_claimed` in a transaction of
        their own, then release them (blocking: call it through `Dialect.call`)."""
        try:
            with self.store.dialect.write_internal() as conn:
                recorded = self.record_claimed(conn, outcomes, session_handler)
        except WouldBlock:
            raise  # nothing was done: Dialect.call runs it again on a thread
        except Exception:
            # Nothing was recorded: the runs stay leased until their lease expires,
            # then they are retried like any lost attempt (their on_complete journals
            # them).
            log.exception(
                "recording inline runs %s failed; they will be retried",
                [o.run_id for o in outcomes],
            )
            recorded = Recorded()
        # No wake-up: the caller goes on with its own work, and a claim round per
        # inline run would cost a transaction each.
        self.release_claimed([o.run_id for o in outcomes], recorded.completed)
        return recorded

    async def _run_attempt(self, c: Claimed) -> Outcome:
        """One attempt under a cancel scope of its own, which cancel requests and lost
        leases cancel; such an interruption becomes an outcome too."""
        scope = anyio.CancelScope()
        self._scopes[c.id] = scope
        try:
            with scope:
                going_async = partial(self._async_runs.add, c.id)
                call = partial(
                    attempt,
                    self.registry,
                    c,
                    limiter=self._limiter,
                    going_async=going_async,
                    clock=self.store.clock,
                    early_s=self._early_ends.take(c.id),
                )
                if self.telemetry.active:
                    return await self.telemetry.attempt(c, call)
                return await call()
            return self._interrupted(c)  # our scope was cancelled
        finally:
            self._scopes.pop(c.id, None)
            self._async_runs.discard(c.id)

    def _interrupted(self, c: Claimed) -> Outcome:
        """The outcome of an attempt cut short: canceled (a cancel request), released
        (shutdown, or any cancellation from outside: it runs again elsewhere and is not
        a failure) or, for a lost lease, a failure."""
        reason = self._cancel_reason.pop(c.id, "released")
        return Outcome(
            run_id=c.id,
            fence=c.fence,
            kind=reason if reason in ("canceled", "released") else "failure",
            started_ms=c.started_ms,
            error=f"attempt interrupted ({reason})",
            attempt=c.attempts,
            queue=c.queue,
            fn=c.fn,
        )

    def _record(self, outcome: Outcome) -> None:
        """Hand `outcome` to the record loop: its stream has no bound, so this never
        waits, and needs no shield from a cancellation (nor a checkpoint per run)."""
        if self._outcomes is None:  # never served
            return
        try:
            self._outcomes.send_nowait(outcome)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # The worker has stopped (an attempt on a thread that ended after a
            # cancellation from outside): the run's lease expires, as for any worker
            # that stopped short.
            log.warning("run %s ended after its worker stopped; it will run again", outcome.run_id)

    async def _record_loop(self, receive: MemoryObjectReceiveStream[Outcome]) -> None:
        """Record outcomes in batches until `receive`'s sender closes. Cancelled, it
        leaves `receive` open: the attempts cancelled with it still hand their
        interruptions on, for `_record_leftovers`."""
        async for first in receive:
            batch = [first]
            _take_ready(receive, batch)
            self._hints.recording = True  # announcements now wait for its refill
            wait = self.store.dialect.straggler_wait_s
            try:
                with anyio.CancelScope(shield=True):
                    # A few of the batch's attempts still running on threads (ending a
                    # moment later, they would take a record of their own, and their
                    # refills would stay apart from the batch's ever after): wait for
                    # them.
                    if wait and 0 < len(self._threads.running) * 4 <= len(batch):
                        await anyio.sleep(wait)
                        _take_ready(receive, batch)
                    await self._record_batch(batch)
            finally:
                self._hints.recording = False
            if self._hints.record_done(bool(receive.statistics().current_buffer_used)):
                self.wake()

    async def _record_leftovers(self, receive: MemoryObjectReceiveStream[Outcome]) -> None:
        """Record what the record loop left when the worker was cancelled from
        outside (its interrupted attempts, released), then close `receive`: their runs
        are free to run elsewhere at once, not leased until their lease expires.
        Shielded, for at most `shutdown_grace`; nothing is claimed or delivered."""
        batch: list[Outcome] = []
        _take_ready(receive, batch, limit=math.inf)
        receive.close()  # an attempt ending later (on a thread) logs that it was left
        if not batch:
            return
        record = partial(
            self.store.record, batch, self.id, self.lease_ms, self._deliveries.in_session,
            claim_limit=0, runnable=self.runnable(),
        )
        recorded: Recorded | None = None
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.shutdown_grace.total_seconds()
            try:
                recorded = await self._persist(
                    partial(anyio.to_thread.run_sync, record),
                    f"recording {len(batch)} outcome(s) on the way out",
                )
            except Exception:
                log.exception("could not record %d outcome(s) as the worker stopped; "
                              "their leases will expire, then they run again", len(batch))
        if recorded is None:
            return
        outcomes_recorded(self.telemetry, batch, recorded)
        if recorded.completed:
            self._on_completed(recorded.completed)

    async def _record_batch(self, batch: list[Outcome], *, refill: bool = True) -> None:
        """Store a batch of outcomes, retrying through a database blip; one outcome
        that cannot be stored must not sink the others, so a batch that fails for
        another reason is stored one outcome at a time."""
        self._early_ends.note(batch)  # before the refill may claim their retries
        # The slots these outcomes free are refilled in the same transaction.
        room = 0 if self._stopping or not refill else (
            self.concurrency - len(self._held) + len(batch)
        )
        record = partial(
            self.store.record,
            batch,
            self.id,
            self.lease_ms,
            self._deliveries.in_session,
            claim_limit=min(room, _BATCH),
            runnable=self.runnable(),
        )
        if any(o.handler_in_txn for o in batch):
            # An app's on_complete runs in this transaction: keep it off the loop.
            call: Callable[[], Awaitable[Recorded]] = partial(anyio.to_thread.run_sync, record)
        else:
            call = partial(self.store.dialect.call, record)
        began = time.monotonic()
        try:
            recorded = await self._persist(call, f"recording {len(batch)} outcome(s)")
            if room > 0:
                self._hints.looked(began)  # its refill claimed what was due then
        except Exception:
            if len(batch) > 1:
                log.exception("recording %d outcomes failed; recording each alone", len(batch))
                for o in batch:
                    await self._record_batch([o], refill=False)
                self.wake()
                return
            log.exception("could not record the outcome of run %s; its lease will expire, "
                          "then it runs again", batch[0].run_id)
            self._release(batch[0].run_id)
            return
        outcomes_recorded(self.telemetry, batch, recorded)
        delivering = {f.id for f in recorded.to_deliver}
        for o in batch:
            if o.run_id not in delivering:
                # No wake-up: this transaction already claimed what was due.
                self._release(o.run_id, wake=not refill)
        assert self._tg is not None
        for f in recorded.to_deliver:
            self._hold(f.id, f.fence)
            self._tg.start_soon(self._deliver, f)
        self._start(recorded.claimed, recorded.wake_at_ms)
        if room > 0:
            self._recorded_at = time.monotonic()  # its refill claimed what was due
        self._update_wants()
        if recorded.completed:
            self._on_completed(recorded.completed)

    async def _persist(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """`call()`, retried with backoff while the database is unreachable or busy
        (a restart, a terminated connection, a locked file), for up to
        `record_patience`: an outcome already reached must not be thrown away and
        run again for a blip. Other errors are raised at once."""
        deadline = time.monotonic() + self.record_patience.total_seconds()
        pause = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + pause > deadline:
                    raise
                log.warning("%s failed (%s); retrying in %.2f s", what, first_line(exc), pause)
            await anyio.sleep(pause)
            pause = min(pause * 2, 2.0)

    # -- on_complete ---------------------------------------------------------------------

    async def _deliver(self, f: Delivery) -> None:
        with anyio.CancelScope(shield=True):
            try:
                completed = await self._deliveries.deliver(f)
            except Exception:
                log.exception("delivering on_complete of run %s failed", f.id)
                completed = []
            finally:
                self._release(f.id)
            if completed:
                self._on_completed(completed)

    # -- leases, cancellation, maintenance -------------------------------------------------

    def _hold(self, run_id: str, fence: int) -> None:
        if not self._held:
            self._idle = anyio.Event()  # the previous one was set when we went idle
        self._held[run_id] = fence

    def _release(self, run_id: str, *, wake: bool = True) -> None:
        self._held.pop(run_id, None)
        if not self._held:
            self._idle.set()
            if not self._hints.recording:  # (a record updates them once it ends)
                self._update_wants()
        if wake:
            self.wake()

    def _update_wants(self) -> None:
        """Wish to hear of new runs, or not (`wants_announcements`); on the loop."""
        if isinstance(self._wants, AlwaysWanting):
            return
        since = time.monotonic() - self._recorded_at
        wanted, ask_again = wants_announcements(
            len(self._held), self.concurrency, self._stopping, since
        )
        self._wants.want(wanted)
        if ask_again is not None and self._wants_check is None:
            self._wants_check = asyncio.get_running_loop().call_later(ask_again, self._wants_due)

    def _wants_due(self) -> None:
        self._wants_check = None
        self._update_wants()

    def _began_wanting(self) -> None:
        """This worker hears of new runs again (from the dialect's thread): runs
        inserted while it did not were not announced, so claim as if they were."""
        self._on_notify(WAKE, "")

    def _cancel_scope(self, run_id: str, reason: str) -> None:
        scope = self._scopes.get(run_id)
        if scope is not None:
            self._cancel_reason.setdefault(run_id, reason)
            scope.cancel()
        elif run_id in self._threads.running:
            # A thread cannot be stopped: its outcome is replaced when it ends.
            self._cancel_reason.setdefault(run_id, reason)

    def _lease_lost(self, run_id: str, fence: int) -> None:
        # The heartbeat read a snapshot; the attempt may have finished since.
        attempting = run_id in self._scopes or run_id in self._threads.running
        if self._held.get(run_id) == fence and attempting:
            log.warning(
                "lost the lease of run %s; abandoning its attempt", run_id,
                extra=run_extra(run_id),
            )
            self._cancel_scope(run_id, "lost")

    async def _listen(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self.store.dialect.listen(self._on_notify)

    def hint(self, channel: str, payload: str = "") -> None:
        """A hint that there is work (WAKE) or a cancel to look at (CANCEL), as
        other processes send them; thread-safe, never blocks."""
        self._on_notify(channel, payload)

    def _on_notify(self, channel: str, payload: str) -> None:
        """A hint from another process; called on the loop or a listener's thread."""
        # A notification is only a hint to look at the database (any role that can
        # connect can send one): a cancel is acted on only if the run says so.
        if channel == CANCEL:
            if self._held and (not payload or payload in self._held):
                if threading.get_ident() != self._loop_thread:
                    self.jobs.heartbeat()  # reads each held run's cancel request
                elif self._tg is not None:
                    self._tg.start_soon(anyio.to_thread.run_sync, self.jobs.heartbeat)
            return
        stamp = sent_at(payload)
        stamp = UNKNOWN if stamp is None else stamp
        if self._hints.covers(stamp):
            return  # our latest claim began after it was sent: it saw those runs
        self._announced_at = max(self._announced_at, stamp)
        if not self._announced:  # one hop to the loop for a burst of announcements
            self._announced = True
            self._from_thread(self._new_work)

    def _new_work(self) -> None:
        """Another process announced new runs (see `Hints`)."""
        stamp, self._announced_at = self._announced_at, NONE
        self._announced = False
        waiting = self._outcomes is not None and self._outcomes.statistics().current_buffer_used
        if self._hints.announced(bool(waiting), stamp):
            self.wake()

    def runnable(self) -> Runnable:
        """The functions and handlers this worker can run, as claims filter them."""
        return self.registry.runnable()

    def announce(self) -> None:
        """Tell the database this worker is alive, and what it can run (blocking)."""
        self.jobs.announce()

    def retire(self) -> None:
        """Tell the database this worker has stopped (blocking)."""
        self.jobs.retire()

    def sweep_unrunnable(self) -> int:
        """Fail the runs no live worker could run for `unregistered_grace` (blocking);
        returns how many."""
        return self.jobs.sweep_unrunnable()

    def _from_thread(self, fn: Callable[[], None]) -> None:
        if self._call_soon is not None:
            try:
                self._call_soon(fn)
            except RuntimeError:
                pass

    async def _wait_idle(self) -> None:
        while self._held:
            await self._idle.wait()

    async def _drain(self) -> None:
        """Let running work finish; after the grace period, release async attempts."""
        with anyio.move_on_after(self.shutdown_grace.total_seconds()):
            await self._wait_idle()
        for run_id in list(self._async_runs):
            self._cancel_scope(run_id, "released")
        await self._wait_idle()


def _take_ready(
    receive: MemoryObjectReceiveStream[Outcome], batch: list[Outcome], limit: float = 512
) -> None:
    """Add the outcomes already waiting in `receive` to `batch` (`limit` at most);
    none left, or the sender gone, ends it."""
    while len(batch) < limit:
        try:
            batch.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
