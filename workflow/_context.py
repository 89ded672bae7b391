"""`WorkflowContext`: what a workflow function calls to run steps, sleep, wait and fan out.

Every call is identified by its name and occurrence (`fetch[0]`, `fetch[1]`) and
assigned when it is *made*, not when it is awaited, so `asyncio.gather` of several
calls journals them in a deterministic order. Each call returns an awaitable that is
already under way (like a JavaScript promise): journaled results come back at once;
new work is journaled and started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from retrier import InvalidArguments, InvalidSettings
from retrier.engine import (
    MAX_AHEAD,
    Fn,
    NewRun,
    Worker,
    check_json,
    check_name,
    check_timeout,
    delay_ms,
    due_ms,
    is_transient,
    new_id,
    unreadable,
)

from ._errors import InvalidEvent, StepFailed, WorkflowDiverged
from ._inline import InlineOutcomes
from ._journal_reads import Entry, Loaded
from ._journal_signals import Conflict, NotRunning, Unsettled
from ._limits import check_args, check_event, check_progress
from ._listeners import WorkflowEvent
from ._models import (
    CANCELED,
    COMPLETED,
    EVENT,
    FAILED,
    INVOKE,
    PATCH,
    RUNNING,
    SEND,
    SLEEP,
    STEP,
    WAITING,
)
from ._progress import Reporter, WorkflowLog
from ._replay import Divergence, Replay

T = TypeVar("T")

if TYPE_CHECKING:
    from workpool import RetryBehavior

    from ._driver import Driver


class Interrupted(BaseException):
    """The database failed under a workflow's call (a restart, a dropped connection):
    the driver run fails and the engine retries it; the workflow itself does not
    fail. A BaseException, so that workflow code cannot catch it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Frontier(BaseException):
    """A dry replay (`workflows.check`) reached a call that would run or wait: the
    journal agreed with the code up to there."""


class Suspend(BaseException):
    """Unwinds a workflow function that must wait for something outside this run.

    A BaseException, so that `except Exception` in workflow code never swallows it.
    """


class WorkflowContext:
    """The first argument of every workflow function.

    >>> @workflows.define
    ... async def onboard(ctx: WorkflowContext, user_id: str) -> None:
    ...     await ctx.step("welcome", send_email, {"to": user_id})
    ...     await ctx.sleep("wait-a-day", timedelta(days=1))
    ...     await ctx.step("follow-up", send_email, {"to": user_id})

    Code outside steps must be deterministic: it runs again on every replay.
    """

    def __init__(
        self, driver: Driver, loaded: Loaded, worker: Worker | None, *, dry: bool = False
    ) -> None:
        self._driver = driver
        self._workflow = loaded.workflow
        self._entries = loaded.entries
        self._worker = worker
        self._counts: dict[str, int] = {}
        self._calls = 0
        self._last_position = -1
        self._futures: list[asyncio.Future[Any]] = []
        self.inline = InlineOutcomes(self._workflow.id, driver.journal, worker, driver.store_call)
        self._replay = Replay(loaded.entries)
        self._patches: dict[str, bool] = {}  # patch name -> what patched() answered
        self._marker_writes: list[asyncio.Future[Any]] = []
        self._dry = dry  # replay only: stop at the first call that would run or wait
        self.diverged: WorkflowDiverged | None = None
        self.replayed = 0  # calls answered from the journal (for metrics)
        self.executed = 0  # steps started by this pass
        self._at: str | None = None  # the last call made, which log lines are kept with
        self._reporter = Reporter(driver.journal, self._workflow.id, driver.store_call)
        self.log = WorkflowLog(self._log)
        """Log lines kept with the workflow: `ctx.log.info("charged %s", amount)`
        (also `debug`, `warning`, `error`); see `WorkflowLog`."""

    @property
    def workflow_id(self) -> str:
        """The id of the running workflow."""
        return self._workflow.id

    @property
    def workflow_name(self) -> str:
        """The defined name of the running workflow."""
        return self._workflow.name

    # -- progress and log lines -------------------------------------------------------

    def set_progress(self, value: Any) -> None:
        """Store `value` (strict JSON, at most 64 KiB) as the workflow's progress, for
        `progress()`, `watch()`, `tiers workflows show` and the dashboard. Not awaited;
        written in the background (in call order) and never moved back by a replay.
        Bad values raise `InvalidArguments` (`ValueTooLarge`) here."""
        check_json(value, "the progress", InvalidArguments)
        check_progress(value)
        if self._dry:  # a check replays the code: it writes nothing
            return
        if self._reporter.progress(value):
            self._spawn(self._reporter.write())

    def _log(self, level: str, message: str) -> None:
        if self._dry:
            return
        if self._reporter.log(level, message, self._at, self._now()):
            self._spawn(self._reporter.write())

    # -- steps -------------------------------------------------------------------------

    def step(
        self,
        name: str,
        fn: Fn | str,
        args: dict[str, Any] | None = None,
        *,
        retry: bool | RetryBehavior | None = None,
        timeout: timedelta | float | None = None,
    ) -> Awaitable[Any]:
        """Run a registered action as a checkpointed step in the manager's pool.

        Returns its result (typed by the action's return annotation). On a replay a
        finished step returns its journaled result without running. `retry`: True
        uses the pool's default `RetryBehavior`, False makes one attempt, a
        `RetryBehavior` sets its own; None follows the pool's
        `retry_actions_by_default`. A step that exhausts its attempts raises
        `StepFailed` here. `timeout` limits each attempt (a timedelta or seconds;
        default: the action's registered `timeout`, else the pool's
        `default_timeout`); an attempt past it fails and is retried like any failure.
        """
        full, position, entry = self._call(name, STEP)
        _check_retry(retry)
        reg = self._driver.retrier.registry.action(fn)
        if entry is not None:
            if entry.fn != reg.name:
                self._diverge(
                    full,
                    f"the journal ran {entry.fn!r} there, the code runs {reg.name!r}",
                    f"step {full!r} ({entry.fn})",
                    f"step {full!r} ({reg.name})",
                )
            self.replayed += 1
            return self._replayed(full, entry, reg.decode_result)
        self.executed += 1
        new = self._driver.retrier.prepare(
            reg.name,
            args,
            on_complete=self._driver.step_handler,
            context={"wf": self.workflow_id, "step": full},
            policy=self._driver.policy_for(retry),
            queue=self._driver.pool_name,
            owner=self.workflow_id,
            timeout=timeout,
            default_timeout_ms=self._driver.default_timeout_ms,
        )
        check_args(new.args, f"the arguments of step {name!r}")
        row = self._entry_row(full, position, STEP, RUNNING, fn=reg.name, run_id=new.id)
        return self._spawn(self._run_step(full, position, row, new, reg.decode_result))

    async def _run_step(
        self, full: str, position: int, row: dict[str, Any], new: NewRun, decode: Any
    ) -> Any:
        telemetry = self._driver.retrier.telemetry
        if not telemetry.active:
            return await self._step(full, position, row, new, decode)
        began = time.perf_counter()
        with telemetry.span(
            f"tiers step {full}",
            {"tiers.workflow_id": self.workflow_id, "tiers.step": full, "tiers.fn": new.fn},
        ) as span:
            inline = False
            try:
                value = await self._step(full, position, row, new, decode)
                inline = True
                return value
            except StepFailed as exc:
                inline = True
                if span is not None and telemetry.tracing is not None:
                    telemetry.tracing.failed(span, str(exc))
                raise
            except Suspend:
                if span is not None:
                    span.set_attribute("tiers.suspended", True)
                raise
            finally:
                if inline and telemetry.metrics is not None:
                    telemetry.metrics.step_duration.labels(self.workflow_name, new.fn).observe(
                        time.perf_counter() - began
                    )

    async def _step(
        self, full: str, position: int, row: dict[str, Any], new: NewRun, decode: Any
    ) -> Any:
        await self._markers_stored()
        worker = self._worker
        taken = self.inline.take()
        try:
            claimed = await self._driver.start_step(
                self.workflow_id,
                row,
                new,
                worker,
                self.inline.settler(taken, starts_step=True),
                self.inline.simple(taken),
            )
        except BaseException as exc:
            await self.inline.settle_alone(taken)
            if isinstance(exc, (Conflict, NotRunning, Unsettled)):
                raise Suspend from None
            if isinstance(exc, Exception) and is_transient(exc):
                raise Interrupted(exc) from exc
            raise
        self.inline.settled(taken)
        if claimed is None or worker is None:
            self._driver.retrier.wake_workers()
            raise Suspend
        self.inline.steps[claimed.id] = full
        outcome = await worker.attempt_claimed(claimed, self.inline.journal_inline)
        if outcome.kind == "success":
            # Not stored yet: the transaction of this workflow's next write stores it
            # first, and commits only if it completes (see `settler`).
            self.inline.pending.append(outcome)
            self._entries[full] = Entry(
                full, position, STEP, COMPLETED, fn=new.fn, result=outcome.result
            )
            return decode(outcome.result)
        stored = await self.inline.settle_alone([outcome])
        entry = self.inline.journaled.pop(claimed.id, None)
        if not stored or entry is None:
            # Retried later: the step's on_complete wakes this workflow when it is over.
            self._driver.retrier.wake_workers()
            raise Suspend
        entry.position, entry.fn = position, new.fn
        self._entries[full] = entry
        if entry.state != COMPLETED:
            self._driver.step_failed(self._workflow, full, entry.error)
            raise StepFailed(full, entry.error or entry.state)
        return decode(entry.result)

    async def _flush(self) -> None:
        """Store patch markers, and unsettled outcomes, before a write that cannot
        include them."""
        await self._markers_stored()
        taken = self.inline.take()
        if taken and not await self.inline.settle_alone(taken):
            raise Suspend

    # -- sleeping ------------------------------------------------------------------------

    def sleep(self, name: str, duration: timedelta | float) -> Awaitable[None]:
        """Sleep for a timedelta or a number of seconds (0 to 100 years, else
        `InvalidSettings`), holding no worker or slot."""
        ms = delay_ms(duration, f"sleep {name!r}")
        return self._sleep(name, lambda: self._now() + ms)

    def sleep_until(self, name: str, when: datetime) -> Awaitable[None]:
        """Sleep until a timezone-aware datetime within 100 years of now (else
        `InvalidSettings`), holding no worker or slot."""
        due = due_ms(when, f"sleep_until {name!r}", self._now())
        return self._sleep(name, lambda: due)

    def _sleep(self, name: str, due: Any) -> Awaitable[None]:
        full, position, entry = self._call(name, SLEEP)
        if entry is not None:
            if entry.state == COMPLETED:
                return self._resolved(None)
            return self._spawn(self._sleep_more(full, entry.wake_ms or 0))
        wake_ms: int = due()
        if wake_ms <= self._now():
            row = self._entry_row(full, position, SLEEP, COMPLETED, wake_ms=wake_ms)
            row["finished_ms"] = self._now()
            return self._spawn(self._journal_done(full, row))
        row = self._entry_row(full, position, SLEEP, WAITING, wake_ms=wake_ms)
        return self._spawn(self._wait_new(row, wake_ms))

    async def _sleep_more(self, full: str, wake_ms: int) -> None:
        if self._now() < wake_ms:
            # This driver came early (a retry, another step's end): the driver due at
            # the sleep's end may be the one that just ran, so make sure of one.
            await self._flush()
            await self._journal_call(self._driver.journal.wake_alone, self.workflow_id, wake_ms)
            raise Suspend
        await self._flush()
        await self._journal_call(self._driver.journal.complete_waiting, self.workflow_id, full)
        self._entries[full].state = COMPLETED

    async def _wait_new(self, row: dict[str, Any], wake_ms: int | None) -> None:
        await self._flush()
        try:
            await self._journal_call(
                self._driver.journal.add_waiting, self.workflow_id, row, wake_ms
            )
        except (Conflict, NotRunning):
            raise Suspend from None
        self._driver.retrier.wake_workers()  # so they set a timer for the wake-up
        raise Suspend

    async def _journal_done(self, full: str, row: dict[str, Any]) -> Any:
        await self._flush()
        try:
            await self._journal_call(self._driver.journal.add_entry, self.workflow_id, row)
        except (Conflict, NotRunning):
            raise Suspend from None
        return row.get("result")

    # -- events ------------------------------------------------------------------------

    def wait_for_event(
        self,
        name: str,
        event: str,
        *,
        match: str | dict[str, Any] | None = None,
        timeout: timedelta | float | None = None,
    ) -> Awaitable[dict[str, Any] | None]:
        """Wait for the first event named `event` sent after this workflow started.

        `match="order_id"` takes only events whose `data["order_id"]` equals this
        workflow's own `order_id` argument; `match={"k": v}` takes exact values; None
        takes any. Returns the event's data, or None once `timeout` has elapsed.
        An event sent before the wait began (but after the start) still matches.
        """
        full, position, entry = self._call(name, EVENT)
        if entry is not None and entry.state == COMPLETED:
            return self._resolved(entry.result)
        check_name(event, "an event name", error=InvalidEvent)
        wanted = self._match(name, match)
        timeout_ms = None if timeout is None else delay_ms(timeout, f"the timeout of wait {name!r}")
        row = self._entry_row(full, position, EVENT, WAITING, event_name=event, match=wanted)
        return self._spawn(self._event(full, position, row, timeout_ms))

    async def _event(
        self, full: str, position: int, row: dict[str, Any], timeout_ms: int | None
    ) -> Any:
        await self._flush()
        try:
            done, data = await self._journal_call(
                self._driver.journal.events.try_event, self._workflow, row, timeout_ms
            )
        except (Conflict, NotRunning):
            raise Suspend from None
        if not done:
            self._driver.retrier.wake_workers()
            raise Suspend
        self._entries[full] = Entry(full, position, EVENT, COMPLETED, result=data)
        return data

    def _match(self, name: str, match: str | dict[str, Any] | None) -> dict[str, Any]:
        if match is None:
            return {}
        if isinstance(match, str):
            if match not in self._workflow.args:
                raise InvalidArguments(
                    f"wait {name!r} matches on {match!r}, which is not an argument of "
                    f"workflow {self.workflow_name!r}"
                )
            return {match: self._workflow.args[match]}
        if isinstance(match, dict):
            check_json(match, f"the match of wait {name!r}", InvalidArguments)
            return dict(match)
        raise InvalidArguments(f"match must be a field name or a dict, got {type(match).__name__}")

    def send_event(self, name: str, event: str, data: dict[str, Any]) -> Awaitable[int]:
        """Send an event once (journaled as a step); returns the stored event's id."""
        full, position, entry = self._call(name, SEND)
        if entry is not None:
            return self._resolved(entry.result)
        _check_event(event, data)
        row = self._entry_row(full, position, SEND, COMPLETED, event_name=event)
        row["finished_ms"] = self._now()
        journal = self._driver.journal
        return self._spawn(
            self._send(full, row, lambda conn: journal.events.send_event(conn, event, data))
        )

    async def _send(self, full: str, row: dict[str, Any], send: Any) -> int:
        await self._flush()
        try:
            event_id = await self._journal_call(
                self._driver.journal.add_entry, self.workflow_id, row, send
            )
        except (Conflict, NotRunning):
            raise Suspend from None
        self._driver.retrier.wake_workers()
        return int(event_id)

    # -- child workflows -------------------------------------------------------------------

    def invoke(
        self,
        name: str,
        workflow: Any,
        args: dict[str, Any] | None = None,
        *,
        timeout: timedelta | float | None = None,
    ) -> Awaitable[Any]:
        """Start a child workflow and wait (holding nothing) for its result.

        A child that fails or is canceled raises `StepFailed` here. `timeout` gives
        the child a deadline, as `WorkflowManager.start(..., timeout=)` does.
        """
        full, position, entry = self._call(name, INVOKE)
        child = self._driver.defs.get(workflow)
        if entry is not None:
            return self._replayed(full, entry, child.decode_result)
        stored = child.validate_args(args)
        timeout_ms = None if timeout is None else check_timeout(timeout, "timeout", MAX_AHEAD)
        child_id = new_id()
        child_row = self._driver.workflow_row(
            child_id,
            child.name,
            stored,
            parent_id=self.workflow_id,
            parent_step=full,
            timeout_ms=timeout_ms,
        )
        row = self._entry_row(full, position, INVOKE, WAITING, fn=child.name, child_id=child_id)
        return self._spawn(self._invoke(row, child_row))

    async def _invoke(self, row: dict[str, Any], child_row: dict[str, Any]) -> Any:
        await self._flush()
        try:
            await self._journal_call(
                self._driver.journal.start_child, self.workflow_id, row, child_row
            )
        except (Conflict, NotRunning):
            raise Suspend from None
        self._driver.retrier.wake_workers()
        raise Suspend

    # -- identity, replay, divergence ------------------------------------------------------

    def _call(self, name: str, kind: str) -> tuple[str, int, Entry | None]:
        # Room for the occurrence suffix ("[12]") within the stored name's 200 characters.
        check_name(name, f"the name of a {kind}", max_length=190, error=InvalidArguments)
        occurrence = self._counts.get(name, 0)
        self._counts[name] = occurrence + 1
        full = f"{name}[{occurrence}]"
        self._at = full
        entry = self._entries.get(full)
        if entry is None:
            position = self._new_position()
            self._check(self._replay.new_call(kind, full, position))  # before it runs
            if self._dry:
                raise Frontier
            return full, position, None
        if entry.kind != kind:
            self._diverge(
                full,
                f"the journal has a {entry.kind} there, the code asks for a {kind}",
                f"{entry.kind} {full!r}",
                f"{kind} {full!r}",
            )
        self._take(full, entry)
        if self._dry and entry.state not in (COMPLETED, FAILED, CANCELED):
            raise Frontier
        return full, entry.position, entry

    def _new_position(self) -> int:
        position = max(self._calls, self._last_position + 1)
        self._calls += 1
        return position

    def _take(self, full: str, entry: Entry) -> None:
        """Consume a journaled call, checking that it comes in its journaled order."""
        self._calls += 1
        if entry.position < self._last_position:
            self._diverge(
                full,
                "it was journaled before a step that this replay has already passed",
                f"{entry.kind} {full!r} earlier",
                f"{entry.kind} {full!r} here",
            )
        self._check(self._replay.consume(entry))
        self._last_position = entry.position

    def ended(self) -> None:
        """The workflow function returned: a journal holding entries it never reached
        proves the code changed (see `_replay`). Code that raises ends the workflow
        with its own error instead."""
        if self.diverged is None:
            d = self._replay.ended()
            if d is not None:
                self.diverged = self._diverged(d.step, d.detail, d.expected, d.found)

    def _check(self, d: Divergence | None) -> None:
        if d is not None:
            self._diverge(d.step, d.detail, d.expected, d.found)

    def _diverged(self, step: str, detail: str, expected: str, found: str) -> WorkflowDiverged:
        return WorkflowDiverged(
            self.workflow_id, self.workflow_name, step, detail, expected=expected, found=found
        )

    def _diverge(self, step: str, detail: str, expected: str = "", found: str = "") -> None:
        exc = self._diverged(step, detail, expected, found)
        self.diverged = self.diverged or exc  # fails the workflow even if caught
        raise exc

    # -- patching --------------------------------------------------------------------------

    def patched(self, name: str) -> bool:
        """Whether this run takes the patched path of a code change named `name`.

        >>> if ctx.patched("fix-42"):
        ...     await ctx.step("save-v2", save_v2, {...})
        ... else:
        ...     await ctx.step("save", save, {...})

        True for a run that reaches this point with the new code (a marker is
        journaled, so its replays answer True too); False for a run whose journal
        went past this point without the marker (it started on the old code, whose
        path it replays). The same name answers the same within one run.
        """
        known = self._patches.get(name)
        if known is not None:
            return known
        check_name(name, "a patch name", max_length=190, error=InvalidArguments)
        full = patch_entry_name(name)
        entry = self._entries.get(full)
        if entry is not None:
            self._take(full, entry)
            value = True
        elif self._replay.unconsumed:
            value = False  # the old code journaled further without the patch
        else:
            if self._dry:
                raise Frontier
            row = self._entry_row(full, self._new_position(), PATCH, COMPLETED)
            row["finished_ms"] = row["started_ms"]
            self._marker_writes.append(self._spawn(self._store_marker(row)))
            value = True
        self._patches[name] = value
        return value

    def deprecate_patch(self, name: str) -> None:
        """The patched path of `name` is now the only one: call this instead of
        `patched` once no run that started before the patch is unfinished. Runs that
        journaled the marker replay as before; new runs journal nothing. The call
        may be removed later, too (a marker no call reaches is ignored)."""
        if name in self._patches:
            return
        check_name(name, "a patch name", max_length=190, error=InvalidArguments)
        entry = self._entries.get(patch_entry_name(name))
        if entry is not None:
            self._take(entry.name, entry)
        self._patches[name] = True

    async def _store_marker(self, row: dict[str, Any]) -> None:
        try:
            await self._journal_call(self._driver.journal.add_entry, self.workflow_id, row)
        except (Conflict, NotRunning):
            raise Suspend from None

    async def _markers_stored(self) -> None:
        """Patch markers are stored before any entry journaled after them."""
        for write in self._marker_writes:
            await write

    def _replayed(self, full: str, entry: Entry, decode: Any) -> Awaitable[Any]:
        corrupt = unreadable("result", entry.result)
        if entry.state == COMPLETED and corrupt is not None:
            return self._rejected(StepFailed(full, corrupt))
        if entry.state == COMPLETED and entry.result_size is not None:
            return self._spawn(self._load_result(full, entry, decode))
        if entry.state == COMPLETED:
            return self._resolved(decode(entry.result))
        if entry.state in (FAILED, "canceled"):
            return self._rejected(StepFailed(full, entry.error or entry.state))
        return self._spawn(_suspend())  # running or waiting: its end wakes us

    async def _load_result(self, full: str, entry: Entry, decode: Any) -> Any:
        """A large result, kept apart from the journal: read once a replay needs it."""
        entry.result = await self._journal_call(
            self._driver.journal.load_result, self.workflow_id, full
        )
        entry.result_size = None
        corrupt = unreadable("result", entry.result)
        if corrupt is not None:
            raise StepFailed(full, corrupt)
        return decode(entry.result)

    def _entry_row(
        self, full: str, position: int, kind: str, state: str, **more: Any
    ) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "name": full,
            "position": position,
            "kind": kind,
            "state": state,
            "started_ms": self._now(),
            "attempts": 0,
            **more,
        }

    async def _journal_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A journal write on a thread; a database that fails under it interrupts the
        driver (see `Interrupted`) instead of raising into the workflow's code."""
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args))
        except Exception as exc:
            if is_transient(exc):
                raise Interrupted(exc) from exc
            raise

    def _now(self) -> int:
        return self._driver.retrier.clock.now_ms()

    # -- futures ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._futures.append(task)
        return task

    def _resolved(self, value: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(value)
        return future

    def _rejected(self, exc: BaseException) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(exc)
        self._futures.append(future)
        return future

    async def drain(self) -> None:
        """Wait for every call still under way (so none is orphaned when the driver
        returns), and retrieve their exceptions."""
        pending = [f for f in self._futures if not f.done()]
        if pending:
            await asyncio.wait(pending)
        for f in self._futures:
            if not f.cancelled():
                f.exception()
        self._futures.clear()


async def _suspend() -> Any:
    raise Suspend


def patch_entry_name(name: str) -> str:
    """A patch marker's journal name; a step's always ends with "[n]", so none collide."""
    return f"{name}@patch"


def _check_retry(retry: Any) -> None:
    from workpool import RetryBehavior

    if retry is not None and not isinstance(retry, bool | RetryBehavior):
        raise InvalidSettings(f"retry must be True, False or a RetryBehavior, got {retry!r}")


def _check_event(event: str, data: Any) -> None:
    check_name(event, "an event name", error=InvalidEvent)
    if not isinstance(data, dict):
        raise InvalidEvent(f"the data of event {event!r} must be a JSON object (a dict)")
    check_json(data, f"the data of event {event!r}", InvalidEvent)
    check_event(data, event)


def step_failed_event(workflow: Any, step: str, error: str | None) -> WorkflowEvent:
    return WorkflowEvent("step:fail", workflow.id, workflow.name, step=step, error=error)
