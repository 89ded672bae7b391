"""The driver: the engine action that runs a workflow function until it ends or waits.

A workflow is moved forward by driver runs (`tiers.workflow.drive:<pool>`), ordinary
engine runs in the unlimited queue `tiers.workflow`. A driver loads the journal once
and calls the workflow function: journaled calls return at once; a new step whose pool
has room is run inline by the same worker (one transaction per step, no replay per
step); anything that must wait journals itself, makes sure a driver will come back
(the step's on_complete, or a driver run due at a wake-up time) and unwinds the
function with `Suspend`. A waiting workflow is only rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection

from retrier import HandBack, Retrier, RetryPolicy, ValueTooLarge
from retrier.engine import (
    Claimed,
    NewRun,
    ResultNotSerializable,
    Worker,
    check_size,
    current_worker,
    to_ms,
)
from retrier.engine import describe_error as describe

from ._batched_calls import BatchedCalls
from ._context import Interrupted, Suspend, WorkflowContext, step_failed_event
from ._definitions import Definitions
from ._errors import UnregisteredWorkflow
from ._journal import DRIVER_QUEUE, TOPIC, Journal, deadline_name, driver_name
from ._journal_signals import Unsettled
from ._limits import MAX_RESULT
from ._listeners import Listeners, WorkflowEvent
from ._models import COMPLETED, FAILED, RUNNING, WorkflowRow
from ._server_calls import NotSimple, ServerCalls, SimpleSettle
from ._stopping import expire

log = logging.getLogger("tiers.workflow")

# How long a driver handed back by a worker that lacks the workflow's code waits
# before any worker takes it again.
_HAND_BACK_S = 5.0

class Driver:
    """Runs the workflows of one manager: its driver action and step handler."""

    def __init__(
        self,
        retrier: Retrier,
        pool_name: str,
        defs: Definitions,
        listeners: Listeners,
        default_retry: Any,
        retry_by_default: bool,
        default_timeout_ms: int | None = None,
    ) -> None:
        self.retrier = retrier
        self.default_timeout_ms = default_timeout_ms  # of a step's attempts
        self.pool_name = pool_name
        self.defs = defs
        self.listeners = listeners
        self.default_retry = default_retry
        self.retry_by_default = retry_by_default
        self.drive_name = driver_name(pool_name)
        self.step_handler = f"tiers.workflow.step_done:{pool_name}"
        self._policies: dict[Any, RetryPolicy] = {}
        retrier.registry.add_action(self.drive, name=self.drive_name)
        retrier.registry.add_action(self.deadline, name=deadline_name(pool_name))
        retrier.registry.add_handler(self.step_done, name=self.step_handler)
        self.journal = Journal(retrier.store)
        # Runs a journal call (one transaction) from the driver's async code.
        self.store_call = retrier.store.dialect.call
        # PostgreSQL makes plain steps' starts and workflows' ends server-side, many in
        # one call (`_server_calls`, `_batched_calls`); the workflows' watchers hear of
        # them on the journal's channel.
        channel = retrier.store.dialect.topic_channel(TOPIC)
        self._batches = (
            BatchedCalls(ServerCalls(retrier.store, channel), self.store_call)
            if retrier.store.dialect.name == "postgresql" and channel is not None
            else None
        )

    # -- rows ------------------------------------------------------------------------

    def workflow_row(
        self,
        workflow_id: str,
        name: str,
        args: dict[str, Any],
        *,
        on_complete: str | None = None,
        context: Any = None,
        key: str | None = None,
        parent_id: str | None = None,
        parent_step: str | None = None,
        retrigger_of: str | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        now = self.retrier.clock.now_ms()
        return {
            "id": workflow_id,
            "name": name,
            "pool": self.pool_name,
            "args": args,
            "state": RUNNING,
            "key": key,
            "parent_id": parent_id,
            "parent_step": parent_step,
            "retrigger_of": retrigger_of,
            "on_complete": on_complete,
            "context": context,
            "created_ms": now,
            "deadline_ms": None if timeout_ms is None else now + timeout_ms,
        }

    def completion(self, row: Any) -> NewRun | None:
        """The run that delivers a finished workflow's on_complete (see `completion_run`)."""
        return completion_run(row, self.retrier.clock.now_ms())

    def policy_for(self, retry: Any) -> RetryPolicy:
        if retry is None:
            retry = self.retry_by_default
        if retry is False:
            retry = ("once",)
        elif retry is True:
            retry = self.default_retry
        policy = self._policies.get(retry)
        if policy is None:
            if retry == ("once",):
                policy = RetryPolicy(max_failures=1)
            else:
                policy = RetryPolicy(
                    initial_backoff_ms=retry.initial_backoff_ms,
                    base=retry.base,
                    max_failures=retry.max_attempts,
                )
            self._policies[retry] = policy
        return policy

    # -- a step's start, a workflow's end ---------------------------------------------

    async def start_step(
        self,
        workflow_id: str,
        entry: dict[str, Any],
        new: NewRun,
        worker: Worker | None,
        before: Callable[[Connection], None] | None,
        simple: SimpleSettle | None,
    ) -> Claimed | None:
        """`Journal.start_step`, from async code: with the other drivers' starts of this
        pass in one server-side call where the start is plain enough (`_batched_calls`),
        else alone."""
        batches = self._batches
        if batches is not None and simple is not None and worker is not None:
            try:
                start = batches.server.prepare(
                    workflow_id, entry, new, worker.id, worker.lease_ms, simple.previous
                )
                claimed: Claimed | None = await batches.make(start)
            except NotSimple:
                pass  # the general path stores the previous outcome, by `before`
            else:
                simple.stored()
                return claimed
        return await self.store_call(
            self.journal.start_step,
            workflow_id,
            entry,
            new,
            None if worker is None else worker.id,
            0 if worker is None else worker.lease_ms,
            before,
        )

    async def _finish(
        self,
        workflow_id: str,
        state: str,
        result: Any,
        error: str | None,
        before: Callable[[Connection], None] | None,
        simple: SimpleSettle | None,
    ) -> bool:
        """`Journal.finish`, from async code: with the other drivers' writes of this
        pass in one server-side call where the end is plain enough (`_batched_calls`),
        else alone."""
        batches = self._batches
        if batches is not None and simple is not None:
            try:
                end = batches.server.prepare_end(
                    workflow_id, state, result, error, simple.worker, simple.previous
                )
                ended: bool = await batches.make(end)
            except NotSimple:
                pass  # the general path stores the previous outcome, by `before`
            else:
                if ended:
                    simple.stored()
                return ended
        return await self.store_call(
            self.journal.finish, workflow_id, state, result, error, self.completion, before
        )

    # -- the driver action -----------------------------------------------------------

    async def drive(self, workflow_id: str) -> str:
        """Run the workflow until it finishes or must wait."""
        loaded = await self.store_call(self.journal.load, workflow_id)
        if loaded is None or loaded.workflow.state != RUNNING:
            return "idle"
        deadline = loaded.workflow.deadline_ms
        if deadline is not None and self.retrier.clock.now_ms() >= deadline:
            return await self.deadline(workflow_id)  # it runs no further
        if not self.defs.has(loaded.workflow.name):
            await self._hand_back(loaded.workflow)  # or, past the grace, go on to fail it
        elif loaded.workflow.unrunnable_since_ms is not None:
            await self.store_call(self.journal.clear_unrunnable, workflow_id)
        ctx = WorkflowContext(self, loaded, current_worker.get())
        telemetry = self.retrier.telemetry
        try:
            if not telemetry.active:
                return await self._drive(ctx, loaded.workflow)
            with telemetry.span(
                f"tiers workflow {loaded.workflow.name}",
                {"tiers.workflow_id": workflow_id, "tiers.workflow": loaded.workflow.name},
            ) as span:
                state = await self._drive(ctx, loaded.workflow)
                if span is not None:
                    span.set_attribute("tiers.workflow.state", state)
                    span.set_attribute("tiers.steps.replayed", ctx.replayed)
                    span.set_attribute("tiers.steps.executed", ctx.executed)
                return state
        finally:
            ctx.inline.settle_now()  # only if cancelled from outside with outcomes unstored
            metrics = telemetry.metrics
            if metrics is not None:
                name = loaded.workflow.name
                if ctx.replayed:
                    metrics.steps_replayed.labels(name).inc(ctx.replayed)
                if ctx.executed:
                    metrics.steps_executed.labels(name).inc(ctx.executed)

    async def _hand_back(self, wf: WorkflowRow) -> None:
        """This worker lacks the workflow's code (a rolling deploy, or a rollback):
        hand its driver back for a worker that has it, until none has had it for the
        retrier's `unregistered_grace`."""
        now = self.retrier.clock.now_ms()
        since = await self.store_call(self.journal.mark_unrunnable, wf.id, now)
        if now - since < to_ms(self.retrier.unregistered_grace):
            raise HandBack(_HAND_BACK_S, f"this worker does not define workflow {wf.name!r}")

    async def _drive(self, ctx: WorkflowContext, wf: WorkflowRow) -> str:
        state, result, error = COMPLETED, None, None
        try:
            definition = self.defs.get(wf.name)
            value = await definition.fn(ctx, **definition.decode_args(wf.args))
        except Interrupted as exc:
            # The database failed: this driver run fails and is retried; the workflow
            # goes on from its journal then.
            await ctx.drain()
            await ctx.inline.settle_alone(ctx.inline.take())
            raise exc.cause from None
        except Suspend:
            await ctx.drain()
            if ctx.diverged is None:
                await ctx.inline.settle_alone(ctx.inline.take())
                return "waiting"
            state, error = FAILED, describe(ctx.diverged)
        except UnregisteredWorkflow as exc:
            state, error = FAILED, describe(exc)
        except Exception as exc:
            await ctx.drain()
            state, error = FAILED, describe(ctx.diverged or exc)
        else:
            await ctx.drain()
            ctx.ended()
            if ctx.diverged is not None:
                state, error = FAILED, describe(ctx.diverged)
            else:
                try:
                    result = definition.encode_result(value)
                    check_size(result, f"the result of workflow {wf.name!r}", MAX_RESULT)
                except ResultNotSerializable as exc:
                    state, error = FAILED, str(exc)
                except ValueTooLarge as exc:
                    state, result, error = FAILED, None, describe(exc)
        # The last inline steps' outcomes are stored with the end, or not at all.
        taken = ctx.inline.take()
        try:
            ended = await self._finish(
                wf.id, state, result, error, ctx.inline.settler(taken), ctx.inline.simple(taken)
            )
        except Unsettled:
            await ctx.inline.settle_alone(taken)
            return "waiting"  # a step is not over after all: its end wakes us again
        except BaseException:
            await ctx.inline.settle_alone(taken)
            raise
        if not ended:
            await ctx.inline.settle_alone(taken)
            return state
        ctx.inline.settled(taken)
        self.retrier.wake_workers()
        metrics = self.retrier.telemetry.metrics
        if metrics is not None:
            took_ms = self.retrier.clock.now_ms() - wf.created_ms
            metrics.workflow_duration.labels(wf.name, state).observe(max(0, took_ms) / 1000)
        log.log(
            logging.INFO if state == FAILED else logging.DEBUG,
            "workflow %s (%s) %s%s", wf.name, wf.id, state, f": {error}" if error else "",
            extra={"workflow_id": wf.id, "workflow": wf.name, "state": state, "error": error},
        )
        kind = "run:complete" if state == COMPLETED else "run:fail"
        self.listeners.emit(WorkflowEvent(kind, wf.id, wf.name, error=error, result=result))
        return state

    async def deadline(self, workflow_id: str) -> str:
        """The action due at a workflow's deadline: fail it if it is still running
        (its on_complete gets `Failed`), cancel its unfinished steps and children."""
        stopped = await anyio.to_thread.run_sync(
            expire, self.journal, workflow_id, self.retrier.cancel, self.completion
        )
        if stopped.early_ms > 0:  # this clock is behind the one that set it
            raise HandBack(stopped.early_ms / 1000, "the workflow's deadline is still ahead")
        if not stopped.ended:
            return "over"
        self.retrier.wake_workers()
        row = stopped.row
        log.info(
            "workflow %s (%s) failed: %s", row.name, row.id, stopped.error,
            extra={"workflow_id": row.id, "workflow": row.name, "state": FAILED},
        )
        self.listeners.emit(WorkflowEvent("run:fail", row.id, row.name, error=stopped.error))
        return "expired"

    # -- a step's run is over -----------------------------------------------------------

    def step_done(self, run_id: str, result: Any, context: Any, session: Any) -> None:
        """on_complete of every step run: journal its outcome and wake the workflow,
        in the transaction that completes the run (so exactly once)."""
        conn = session.connection()
        row = self.retrier.store.outcome_in(conn, run_id)
        if row is None or row.outcome is None:
            return
        workflow_id, step = context["wf"], context["step"]
        entry = self.journal.settle_step(
            conn, workflow_id, step, row.outcome, row.result, row.error, run_id, row.attempts
        )
        if entry is None:
            return
        self.journal.wake(conn, workflow_id)
        if entry.state != COMPLETED:
            self.listeners.emit(
                WorkflowEvent("step:fail", workflow_id, "", step=step, error=entry.error)
            )

    def step_failed(self, workflow: WorkflowRow, step: str, error: str | None) -> None:
        self.listeners.emit(step_failed_event(workflow, step, error))


def completion_run(row: Any, now_ms: int) -> NewRun | None:
    """The run that delivers a finished workflow's on_complete (its id is the
    workflow's, so the handler gets the workflow id); None without one."""
    if row.on_complete is None:
        return None
    return NewRun(
        id=row.id,
        fn=result_action_name(row.name),
        args={},
        due_ms=now_ms,
        initial_backoff_ms=250,
        base=2,
        max_failures=1,
        jitter=False,
        max_backoff_ms=60_000,
        queue=DRIVER_QUEUE,
        on_complete=row.on_complete,
        context=row.context,
    )


def result_action_name(workflow: str) -> str:
    """The engine action standing for a workflow's result (it types its on_complete)."""
    return f"tiers.workflow.result:{workflow}"
