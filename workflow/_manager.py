"""`WorkflowManager`: tier 3's public API."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar, overload

import anyio.to_thread
from sqlalchemy import event
from sqlmodel import Session

from retrier import (
    Canceled,
    Completed,
    Debounce,
    Failed,
    InProgress,
    InvalidArguments,
    InvalidSchedule,
    InvalidSettings,
    RunStatus,
    Schedule,
    Success,
)
from retrier.engine import (
    MAX_AHEAD,
    MAX_NAME,
    Changes,
    Why,
    check_debounce,
    check_flag,
    check_idempotency_key,
    check_json,
    check_name,
    check_once,
    check_timeout,
    ms_to_datetime,
    new_id,
    renamed_key,
    schedule_spec,
)
from workpool import RetryBehavior, Workpool

from ._admin import cancel as cancel_workflow
from ._admin import restart as restart_workflow
from ._check import CheckReport, check_one, unfinished_ids
from ._context import _check_event
from ._definitions import Definitions, WorkflowDef, define
from ._driver import Driver, result_action_name
from ._errors import UnregisteredWorkflow
from ._explain import explain_workflow
from ._listeners import Listener, Listeners
from ._models import CANCELED, COMPLETED, FAILED, RUNNING, WorkflowRow
from ._progress import LogLine
from ._retention import purge_events, purge_workflows
from ._waits import Waits
from ._watch import WatchEvent, watch_workflow
from .migrations import BRANCH as MIGRATIONS

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """A stored workflow, as `list` returns it."""

    id: str
    name: str
    state: str  # running | completed | failed | canceled
    args: dict[str, Any]
    result: Any
    error: str | None
    idempotency_key: str | None
    parent_id: str | None
    created: datetime
    finished: datetime | None
    deadline: datetime | None = None  # when it fails if still running (`timeout=`)
    progress: Any = None  # what `ctx.set_progress` last stored

    @property
    def key(self) -> str | None:
        """Deprecated: `idempotency_key` (in every tier, `key` is the concurrency key)."""
        warnings.warn(
            "WorkflowInfo.key is deprecated: read idempotency_key", DeprecationWarning, 2
        )
        return self.idempotency_key


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One journal entry of a workflow, as `steps` returns it."""

    name: str
    kind: str  # step | sleep | event | invoke | send
    state: str  # running | waiting | completed | failed | canceled
    fn: str | None
    result: Any
    error: str | None
    attempts: int
    started: datetime
    finished: datetime | None
    wake_at: datetime | None
    run_id: str | None
    child_id: str | None
    logs: tuple[LogLine, ...] = ()  # `ctx.log` lines logged after this call was made


class WorkflowManager:
    """Durable multi-step workflows whose steps run in `pool`.

    >>> workflows = WorkflowManager(pool)
    >>> @workflows.define
    ... async def process_order(ctx: WorkflowContext, order_id: str) -> dict: ...
    >>> wf_id = workflows.start(process_order, {"order_id": "o1"}, idempotency_key="order-o1")
    >>> workflows.wait(wf_id, timeout=60)

    Steps are registered actions (`@retrier.action`). Whether a step is retried
    follows the pool's `retry_actions_by_default` and `default_retry_behavior`, unless
    given here or per step.
    """

    def __init__(
        self,
        pool: Workpool,
        *,
        retry_steps_by_default: bool | None = None,
        default_retry_behavior: RetryBehavior | None = None,
    ) -> None:
        # The engine names the pool's step handler after it (see Driver), within 200.
        check_name(pool.name, "the name of a pool that runs workflows", max_length=175)
        self.pool = pool
        self.retrier = pool.retrier
        if retry_steps_by_default is None:
            retry_steps_by_default = pool.retry_actions_by_default
        check_flag(retry_steps_by_default, "retry_steps_by_default")
        if default_retry_behavior is None:
            default_retry_behavior = pool.default_retry_behavior
        if default_retry_behavior is not None and not isinstance(
            default_retry_behavior, RetryBehavior
        ):
            raise InvalidSettings(
                f"default_retry_behavior must be a RetryBehavior, got {default_retry_behavior!r}"
            )
        self._defs = Definitions()
        self._listeners = Listeners()
        self._driver = Driver(
            self.retrier,
            pool.name,
            self._defs,
            self._listeners,
            default_retry_behavior or RetryBehavior(),
            retry_steps_by_default,
            pool.default_timeout_ms,
        )
        self._journal = self._driver.journal
        self.retrier.use_migrations(MIGRATIONS)
        # The daily retention job deletes finished workflows and old events too.
        store = self.retrier.store
        store.add_retention("workflows", partial(purge_workflows, self._journal))
        store.add_retention("workflow events", partial(purge_events, self._journal))
        # Workflows that ended in this process wake `wait` at once (others are polled).
        self._ended = Changes()
        self._waits = Waits(self._journal, self.retrier, self._ended)
        self._listeners.add("run:complete", self._workflow_ended)
        self._listeners.add("run:fail", self._workflow_ended)
        # What a schedule's tick runs: an engine action that starts the workflow.
        self.retrier.registry.add_action(self._start_scheduled, name=_START_PREFIX + pool.name)

    # -- definitions -----------------------------------------------------------------------

    @overload
    def define(self, fn: F, /) -> F: ...
    @overload
    def define(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...
    def define(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Define a workflow: an `async def f(ctx, **args)`, stored under a stable name
        (its qualified name unless `name=` is given)."""

        def register(f: F) -> F:
            d = define(f, name)
            # Its on_complete run is named after it, with a prefix, in 200 characters.
            check_name(d.name, "a workflow name", max_length=MAX_NAME - len(_RESULT_PREFIX))
            self._defs.add(d)
            self.retrier.registry.add_action(_result_stub(d), name=result_action_name(d.name))
            return f

        return register(fn) if fn is not None else register

    # -- starting ------------------------------------------------------------------------

    def start(
        self,
        workflow: Callable[..., Any] | str,
        args: dict[str, Any] | None = None,
        *,
        on_complete: Callable[..., Any] | str | None = None,
        context: Any = None,
        idempotency_key: str | None = None,
        debounce: Debounce | None = None,
        session: Session | None = None,
        key: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> str:
        """Start a workflow; returns its id. `on_complete` (a registered
        `@retrier.on_complete` handler) runs exactly once with the workflow's id, its
        result and `context`. With `session=`, it starts only if the caller commits.

        `idempotency_key`: while a workflow started with that key is stored (any
        workflow of this database's namespace, running or finished), the call returns
        its id and starts nothing; once it is deleted (`cleanup`), the key is free.
        `debounce=Debounce(key, period, max_wait)`: starts of this workflow with the
        same debounce key within `period` collapse into one workflow, which runs with
        the latest args and context, `period` after the last call (no later than
        `max_wait` after the first); once it has begun, the next call starts another.
        `key=` is the deprecated name of `idempotency_key` (`DeprecationWarning`):
        in every tier, `key` means the concurrency key.
        `timeout` (a timedelta or seconds, above 0 and at most 100 years) sets a
        deadline: a workflow still running then fails ("DeadlineExceeded: ..."), even
        while it sleeps or waits; its on_complete gets `Failed`, its unfinished steps
        and child workflows are canceled.
        """
        row = self._checked_row(
            workflow, args, on_complete, context, idempotency_key, debounce, key, timeout
        )
        return self._insert(row, session, debounce)

    def _checked_row(
        self,
        workflow: Callable[..., Any] | str,
        args: dict[str, Any] | None,
        on_complete: Callable[..., Any] | str | None = None,
        context: Any = None,
        idempotency_key: str | None = None,
        debounce: Debounce | None = None,
        key: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> dict[str, Any]:
        """The row `start` stores for these arguments, every one of them checked."""
        idempotency_key = renamed_key(key, idempotency_key, "WorkflowManager.start")
        check_idempotency_key(idempotency_key)
        check_debounce(debounce)
        check_once(idempotency_key, debounce)
        d = self._defs.get(workflow)
        stored = d.validate_args(args)
        if context is not None:
            check_json(context, "the context", InvalidArguments)
        timeout_ms = None if timeout is None else check_timeout(timeout, "timeout", MAX_AHEAD)
        return self._row(d, stored, on_complete, context, idempotency_key, timeout_ms=timeout_ms)

    def _row(
        self,
        d: WorkflowDef,
        stored: dict[str, Any],
        on_complete: Callable[..., Any] | str | None,
        context: Any,
        idempotency_key: str | None,
        retrigger_of: str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        handler = None
        if on_complete is not None:
            handler = self.retrier.registry.handler(on_complete).name
        return self._driver.workflow_row(
            new_id(),
            d.name,
            stored,
            on_complete=handler,
            context=context,
            key=idempotency_key,
            retrigger_of=retrigger_of,
            timeout_ms=timeout_ms,
        )

    def _insert(
        self, row: dict[str, Any], session: Session | None, debounce: Debounce | None
    ) -> str:
        """Store a new workflow's row and its first driver run; wake the workers once
        they are committed."""
        if session is None:
            workflow_id = self._journal.create(row, debounce=debounce)
            self.retrier.wake_workers()
            return workflow_id
        workflow_id = self._journal.create(row, session.connection(), debounce)
        event.listen(session, "after_commit", lambda _s: self.retrier.wake_workers(), once=True)
        return workflow_id

    def schedule(
        self,
        name: str,
        workflow: Callable[..., Any] | str,
        args: dict[str, Any] | None = None,
        *,
        cron: str,
        timezone: str = "UTC",
        missed: str = "latest",
        on_complete: Callable[..., Any] | str | None = None,
        context: Any = None,
        timeout: timedelta | float | None = None,
    ) -> Schedule:
        """Start `workflow` with `args` at every tick of `cron` in `timezone`, once per
        tick across every worker; returns the stored schedule. `timeout` gives each
        workflow it starts a deadline, as `start(..., timeout=)` does.

        The schedule works as `Retrier.schedule` says (declared again: updated; a
        missed tick: as `missed` says; `retrier.unschedule(name)` deletes it). Each
        tick starts one workflow with the key `schedule:<name>:<tick epoch ms>`, so
        even a tick whose start is retried starts it once.

        >>> workflows.schedule("nightly-billing", bill_accounts, {}, cron="0 2 * * *",
        ...                    timezone="Europe/Paris")
        """
        check_name(name, "a schedule name", max_length=150, error=InvalidSchedule)
        d = self._defs.get(workflow)
        stored = d.validate_args(args)
        handler = None
        if on_complete is not None:
            handler = self.retrier.registry.handler(on_complete).name
        if context is not None:
            check_json(context, "the context", InvalidArguments)
        start_args = {
            "workflow": d.name,
            "args": stored,
            "schedule": name,
            "on_complete": handler,
            "context": context,
        }
        if timeout is not None:  # only then: a schedule without one suits older workers
            start_args["timeout_ms"] = check_timeout(timeout, "timeout", MAX_AHEAD)
        run = self.retrier.prepare(_START_PREFIX + self.pool.name, start_args)
        spec = schedule_spec(
            name, "workflow", run, cron=cron, timezone=timezone, missed=missed,
            tick_arg="tick_ms",
        )
        return self.retrier.declare_schedule(spec)

    def _start_scheduled(
        self,
        workflow: str,
        args: dict[str, Any],
        schedule: str,
        on_complete: str | None = None,
        context: Any = None,
        tick_ms: int = 0,
        timeout_ms: int | None = None,
    ) -> str:
        """A schedule's tick: start the workflow once for this tick (its idempotency key)."""
        return self.start(
            workflow, args, on_complete=on_complete, context=context,
            idempotency_key=f"schedule:{schedule}:{tick_ms}",
            timeout=None if timeout_ms is None else timedelta(milliseconds=timeout_ms),
        )

    def retrigger(self, workflow_id: str) -> str:
        """Start a fresh run of a workflow with the same input, on_complete, context and
        `timeout` (counted from the new start); returns the new id. The original stays
        as it is."""
        row = self._journal.get(workflow_id)
        d = self._defs.get(row.name)
        timeout_ms = None if row.deadline_ms is None else row.deadline_ms - row.created_ms
        new = self._row(
            d, row.args, row.on_complete, row.context, None, workflow_id, timeout_ms
        )
        return self._insert(new, None, None)

    # -- status ------------------------------------------------------------------------

    def status(self, workflow_id: str) -> RunStatus:
        """`InProgress()` or `Completed(Success(value) | Failed(error) | Canceled())`;
        raises `WorkflowNotFound` (a `LookupError`) for unknown ids."""
        return self._status_of(self._journal.get(workflow_id))

    def _status_of(self, row: WorkflowRow) -> RunStatus:
        if row.state == COMPLETED:
            value = row.result
            try:
                value = self._defs.get(row.name).decode_result(row.result)
            except UnregisteredWorkflow:
                pass
            return Completed(Success(value))
        if row.state == FAILED:
            return Completed(Failed(row.error or "failed"))
        if row.state == CANCELED:
            return Completed(Canceled())
        return InProgress(progress=row.progress)

    def wait(self, workflow_id: str, timeout: float | None = None) -> Completed:
        """Block until the workflow has finished and its on_complete has run.

        Raises `WaitTimeout` (a `TimeoutError`) after `timeout` seconds.
        """
        return self.wait_all([workflow_id], timeout)[0]

    def wait_all(
        self, workflow_ids: Sequence[str], timeout: float | None = None
    ) -> builtins.list[Completed]:
        """Block until every workflow has finished and its on_complete has run; their
        outcomes, in the order of `workflow_ids`. One short read per look, however
        many are waited for. Raises `WaitTimeout` after `timeout` seconds."""
        rows = self._waits.wait_all(workflow_ids, timeout)
        return [self._completed(row) for row in rows]

    async def wait_async(
        self,
        workflow_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors wait(id, timeout=...)
    ) -> Completed:
        """`wait` without holding a thread while waiting."""
        return (await self.wait_all_async([workflow_id], timeout))[0]

    async def wait_all_async(
        self,
        workflow_ids: Sequence[str],
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors wait_all(ids, timeout=...)
    ) -> builtins.list[Completed]:
        """`wait_all` without holding a thread while waiting."""
        rows = await self._waits.wait_all_async(workflow_ids, timeout)
        return [self._completed(row) for row in rows]

    def _completed(self, row: WorkflowRow) -> Completed:
        status = self._status_of(row)
        assert isinstance(status, Completed)
        return status

    def explain(self, workflow_id: str) -> Why:
        """Why the workflow is not done: finished or canceled, sleeping until a time,
        waiting for an event or a child workflow, or what holds the run of its current
        step or of its driver (see `Retrier.explain`). Raises `WorkflowNotFound`."""
        return explain_workflow(self._journal, workflow_id)

    async def explain_async(self, workflow_id: str) -> Why:
        return await anyio.to_thread.run_sync(self.explain, workflow_id)

    def list(
        self, *, state: str | None = None, name: str | None = None, limit: int = 100
    ) -> list[WorkflowInfo]:
        """This manager's workflows, newest first; optionally by state and name."""
        rows = self._journal.list(state=state, name=name, pool=self.pool.name, limit=limit)
        return [workflow_info(r) for r in rows]

    def steps(self, workflow_id: str) -> builtins.list[StepInfo]:
        """The journal of a workflow, in call order, each entry with the `ctx.log`
        lines logged after it was called (lines before the first call: `logs()`)."""
        self._journal.get(workflow_id)
        lines: dict[str | None, builtins.list[LogLine]] = {}
        for line in self._journal.progress.logs(workflow_id, limit=_STEP_LOGS):
            lines.setdefault(line.step, []).append(line)
        return [
            step_info(r, tuple(lines.get(r["name"], ())))
            for r in self._journal.steps(workflow_id)
        ]

    # -- progress, log lines, watching ---------------------------------------------------

    def get(self, workflow_id: str) -> WorkflowInfo:
        """One workflow, with its progress; `WorkflowNotFound` if there is none."""
        return workflow_info(self._journal.get(workflow_id))

    def progress(self, workflow_id: str) -> Any:
        """What the workflow last stored with `ctx.set_progress` (None until then)."""
        return self._journal.get(workflow_id).progress

    def logs(
        self, workflow_id: str, *, after: int = 0, limit: int = 1000
    ) -> builtins.list[LogLine]:
        """The workflow's `ctx.log` lines after ordinal `after`, oldest first."""
        self._journal.get(workflow_id)
        return self._journal.progress.logs(workflow_id, after, limit)

    def watch(self, workflow_id: str, *, poll_interval: float = 0.15) -> AsyncIterator[WatchEvent]:
        """Its changes as they happen, until it ends: an async iterator of
        `StatusChanged` (first the current state; a finished one is the last event),
        `StepChanged`, `LogAdded` and `ProgressChanged`, each with `to_json()`.

        Starts with the current picture (status, journal, log lines, progress), so
        a late watcher misses nothing. On PostgreSQL changes arrive by notification
        (one LISTEN connection per watch); on SQLite it polls every `poll_interval`
        seconds. Raises `WorkflowNotFound` (at the first iteration) for an unknown id.

        >>> async for event in workflows.watch(wf_id):
        ...     print(event.to_json())
        """
        return watch_workflow(self._journal, workflow_id, poll_interval=poll_interval)

    # -- cancel, cleanup ---------------------------------------------------------------

    def cancel(self, workflow_id: str) -> None:
        """Cancel a running workflow (and its running children): no further step starts,
        pending steps are canceled, running ones best effort. Its status reads canceled
        at once and its on_complete gets `Canceled()`. Finished workflows are left."""
        if not cancel_workflow(self._journal, workflow_id, self.retrier.cancel):
            return
        self.retrier.wake_workers()
        self._workflow_ended()

    def restart(self, workflow_id: str, from_step: str) -> None:
        """Run a finished (completed, failed or canceled) workflow again from a
        journaled step: the entries before it keep their results and are not run
        again; it and everything after it run again, with this process's code.

        `from_step` is a step's name (`"save-order"`, its first call) or name and
        occurrence (`"save-order[1]"`). Its on_complete is delivered again for the
        new outcome. Running children invoked from the dropped entries are canceled
        and unfinished runs of dropped steps canceled; a wait for an event matches
        again (the first event after the workflow's start that no kept wait took);
        a dropped `send_event` sends again. Raises `WorkflowNotFound`, `StepNotFound`
        (naming the journaled steps), or `CannotRestart` for a running workflow or
        one whose previous on_complete is still being delivered, writing nothing.
        """
        restart_workflow(self._journal, workflow_id, from_step, self.retrier.cancel)
        self.retrier.wake_workers()

    async def restart_async(self, workflow_id: str, from_step: str) -> None:
        await anyio.to_thread.run_sync(self.restart, workflow_id, from_step)

    def check(self, *, limit: int | None = None) -> CheckReport:
        """Replay the journal of every unfinished workflow of this manager against
        this process's code, executing no step and writing nothing; report which
        would diverge (with the step, what the journal has and what the code does),
        fail, or are not defined. Run it with the code about to be deployed: a
        report that is not `ok` means the deploy would break running workflows."""
        return anyio.run(partial(self.check_async, limit=limit))

    async def check_async(self, *, limit: int | None = None) -> CheckReport:
        ids = await anyio.to_thread.run_sync(unfinished_ids, self._driver, limit)
        problems = []
        checked = 0
        for workflow_id in ids:
            loaded = await anyio.to_thread.run_sync(self._journal.load, workflow_id)
            if loaded is None or loaded.workflow.state != RUNNING:
                continue
            checked += 1
            problem = await check_one(self._driver, loaded)
            if problem is not None:
                problems.append(problem)
        return CheckReport(checked, problems)

    def _workflow_ended(self, _event: Any = None) -> None:
        self._ended.notify()

    def cleanup(self, workflow_id: str) -> None:
        """Delete a finished workflow's journal and runs. Raises `WorkflowNotFinished`."""
        self._journal.delete(workflow_id)

    # -- events and listeners ------------------------------------------------------------

    def send_event(self, name: str, data: dict[str, Any]) -> int:
        """Store an event and wake the workflows waiting for it; returns its id.

        `data` must be a JSON object. Workflows that start waiting later still see it
        if they started before it was sent.
        """
        _check_event(name, data)
        event_id = self._journal.events.send_event_alone(name, data)
        self.retrier.wake_workers()
        return event_id

    def on(self, kind: str, handler: Listener) -> None:
        """Call `handler(WorkflowEvent)` in this process on `run:complete`, `run:fail`
        or `step:fail`."""
        self._listeners.add(kind, handler)

    # -- async twins ---------------------------------------------------------------------

    async def start_async(
        self, workflow: Callable[..., Any] | str, args: dict[str, Any] | None = None, **kw: Any
    ) -> str:
        """`start` from async code. Without `session=`, its insert joins this event
        loop's group commit (`Dialect.call`), as a workflow's steps do: no thread is
        taken for it on SQLite, where it runs on the loop."""
        session = kw.pop("session", None)
        if session is not None:
            return await anyio.to_thread.run_sync(
                partial(self.start, workflow, args, session=session, **kw)
            )
        row = self._checked_row(workflow, args, **kw)
        workflow_id: str = await self.retrier.store.dialect.call(
            self._journal.create, row, None, kw.get("debounce")
        )
        self.retrier.wake_workers()
        return workflow_id

    async def schedule_async(
        self,
        name: str,
        workflow: Callable[..., Any] | str,
        args: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Schedule:
        return await anyio.to_thread.run_sync(partial(self.schedule, name, workflow, args, **kw))

    async def status_async(self, workflow_id: str) -> RunStatus:
        return await anyio.to_thread.run_sync(self.status, workflow_id)

    async def list_async(self, **kw: Any) -> builtins.list[WorkflowInfo]:
        return await anyio.to_thread.run_sync(partial(self.list, **kw))

    async def steps_async(self, workflow_id: str) -> builtins.list[StepInfo]:
        return await anyio.to_thread.run_sync(self.steps, workflow_id)

    async def get_async(self, workflow_id: str) -> WorkflowInfo:
        return await anyio.to_thread.run_sync(self.get, workflow_id)

    async def progress_async(self, workflow_id: str) -> Any:
        return await anyio.to_thread.run_sync(self.progress, workflow_id)

    async def logs_async(
        self, workflow_id: str, *, after: int = 0, limit: int = 1000
    ) -> builtins.list[LogLine]:
        return await anyio.to_thread.run_sync(
            partial(self.logs, workflow_id, after=after, limit=limit)
        )

    async def cancel_async(self, workflow_id: str) -> None:
        await anyio.to_thread.run_sync(self.cancel, workflow_id)

    async def cleanup_async(self, workflow_id: str) -> None:
        await anyio.to_thread.run_sync(self.cleanup, workflow_id)

    async def retrigger_async(self, workflow_id: str) -> str:
        return await anyio.to_thread.run_sync(self.retrigger, workflow_id)

    async def send_event_async(self, name: str, data: dict[str, Any]) -> int:
        return await anyio.to_thread.run_sync(self.send_event, name, data)


def workflow_info(r: WorkflowRow) -> WorkflowInfo:
    return WorkflowInfo(
        id=r.id,
        name=r.name,
        state=r.state,
        args=r.args,
        result=r.result,
        error=r.error,
        idempotency_key=r.key,
        parent_id=r.parent_id,
        created=ms_to_datetime(r.created_ms),
        finished=None if r.finished_ms is None else ms_to_datetime(r.finished_ms),
        deadline=None if r.deadline_ms is None else ms_to_datetime(r.deadline_ms),
        progress=r.progress,
    )


def step_info(r: Any, logs: tuple[LogLine, ...] = ()) -> StepInfo:
    return StepInfo(
        name=r["name"],
        kind=r["kind"],
        state=r["state"],
        fn=r["fn"],
        result=r["result"],
        error=r["error"],
        attempts=r["attempts"],
        started=ms_to_datetime(r["started_ms"]),
        finished=None if r["finished_ms"] is None else ms_to_datetime(r["finished_ms"]),
        wake_at=None if r["wake_ms"] is None else ms_to_datetime(r["wake_ms"]),
        run_id=r["run_id"],
        child_id=r["child_id"],
        logs=logs,
    )


_RESULT_PREFIX = result_action_name("")
_STEP_LOGS = 10_000  # at most this many log lines are attached to `steps()`
_START_PREFIX = "tiers.workflow.start:"  # + the pool's name: the action a tick runs


def _result_stub(d: WorkflowDef) -> Callable[[], Any]:
    """An action never executed: it stands for the workflow's result in the run that
    delivers its on_complete, so the handler's `Success(value)` is typed."""

    def result() -> Any:
        from retrier import NonRetryableError

        raise NonRetryableError(f"the result of workflow {d.name!r} is not an action")

    result.__annotations__ = {"return": d.return_hint}
    result.__qualname__ = result_action_name(d.name)
    return result
