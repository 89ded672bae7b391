"""`Retrier`: tier 1's public API, and the engine the higher tiers build on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio
import anyio.from_thread
from sqlalchemy import Engine, event
from sqlmodel import Session

from ._checks import check_worker_settings
from ._clock import Clock, SystemClock, delay_ms, due_ms
from ._dialects import WAKE, Durability, stamped
from ._errors import InvalidArguments, InvalidSettings, WaitTimeout
from ._explain import Why
from ._ids import new_id
from ._json import check_json
from ._keys import Debounce, check_debounce, check_idempotency_key, check_once
from ._log import configure_logging
from ._migrations import Branch, Migrations
from ._models import CANCELED, FAILED, PENDING, RUNNING, SUCCESS, RunRow
from ._policy import RetryPolicy
from ._registry import Fn, Registry, attempt_timeout_ms
from ._results import Canceled, Completed, Failed, InProgress, RunResult, RunStatus, Success
from ._run_types import NewRun
from ._run_waits import all_completed, warn_if_no_worker, warn_when_unserved
from ._scheduling import Scheduling
from ._serving import AsTask, OnThread
from ._store import Store
from ._stored_json import unreadable
from ._tables import runs_in_queue
from ._telemetry import Telemetry
from ._waiting import Changes, poll_until, poll_until_async
from ._worker import Worker

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from .metrics import Metrics
    from .tracing import Tracing

log = logging.getLogger("tiers")

P = ParamSpec("P")

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class Retrier(Scheduling):
    """Durable retries of actions, stored in SQLite or PostgreSQL.

    >>> retrier = Retrier("sqlite:///tiers.db")
    >>> @retrier.action
    ... def send_email(to: str) -> dict: ...
    >>> with retrier:                                   # an in-process worker
    ...     run_id = retrier.run(send_email, {"to": "a@b.c"})
    ...     retrier.wait(run_id, timeout=10)

    Defaults follow Convex's action-retrier: first backoff 250 ms, base 2, and the
    run fails after 4 failed attempts. Cron schedules: `schedule` (see `Scheduling`).
    """

    def __init__(
        self,
        url: str = "sqlite:///tiers.db",
        *,
        initial_backoff_ms: int = 250,
        base: float = 2,
        max_failures: int = 4,
        jitter: bool = False,
        max_backoff: timedelta = timedelta(hours=1),
        retention: timedelta = timedelta(days=7),
        concurrency: int = 16,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: timedelta | None = None,
        unregistered_grace: timedelta = timedelta(hours=1),
        namespace: str | None = None,
        durability: Durability = "normal",
        clock: Clock | None = None,
        metrics: bool = False,
        tracing: bool = False,
    ) -> None:
        configure_logging()
        self.policy = RetryPolicy(
            initial_backoff_ms=initial_backoff_ms,
            base=base,
            max_failures=max_failures,
            jitter=jitter,
            max_backoff=max_backoff,
        )
        check_worker_settings(
            concurrency=concurrency,
            lease=lease,
            poll_interval=timedelta(seconds=1) if poll_interval is None else poll_interval,
            retention=retention,
            unregistered_grace=unregistered_grace,
        )
        self.retention = retention
        self.concurrency = concurrency
        self.lease = lease
        self.clock: Clock = clock or SystemClock()
        self.store = Store(url, self.clock, namespace, durability)
        self.unregistered_grace = unregistered_grace
        self.poll_interval = poll_interval or self.store.dialect.default_poll_interval
        self.registry = Registry()
        self.migrations = Migrations()
        self._branches = ["engine"]  # the migration branches in use
        self._workers: list[Worker] = []
        self._completions = Changes()  # runs completed in this process
        self._on_thread: OnThread | None = None  # the worker of `with retrier:`
        # Metrics and tracing, off until enabled (see docs/observability.md).
        self.telemetry = Telemetry()
        # A wait this long with no live worker logs a warning (once per wait).
        self.no_worker_warning_after = 10.0
        self.store.migrate(self.migrations, self._branches)
        if metrics:
            self.enable_metrics()
        if tracing:
            self.enable_tracing()

    # -- observability ------------------------------------------------------------------

    def enable_metrics(self, registry: CollectorRegistry | None = None) -> Metrics:
        """Collect Prometheus metrics (needs the `metrics` extra) in `registry`, or a
        registry of this Retrier's own; returns them (`.registry`). Serve them with
        `retrier.metrics.make_asgi_app(retrier)` or `tiers worker --metrics-port`."""
        if self.telemetry.metrics is not None:
            return self.telemetry.metrics
        from .metrics import Metrics

        metrics = Metrics(self.store, registry)
        self.telemetry.set(metrics=metrics)
        self.store.on_insert = self.telemetry.inserted
        return metrics

    def enable_tracing(self, tracer_provider: TracerProvider | None = None) -> Tracing:
        """Trace enqueues, attempts, on_complete handlers and workflows with
        OpenTelemetry (needs the `tracing` extra), through `tracer_provider` or the
        global one; runs then store their enqueuing trace context."""
        from .tracing import Tracing

        tracing = Tracing(tracer_provider)
        self.telemetry.set(tracing=tracing)
        self.store.on_insert = self.telemetry.inserted
        return tracing

    # -- schema and engine ------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine; use it for sessions whose writes enqueue runs."""
        return self.store.engine

    def session(self) -> Session:
        """A new SQLModel session on this database (for `run(..., session=...)`)."""
        return Session(self.store.engine)

    def use_migrations(self, branch: Branch) -> None:
        """Bring a higher tier's tables up to date (its branch of migrations) and keep
        them so; for a tier built on this engine (a WorkflowManager calls it)."""
        self.migrations = Migrations([*self.migrations.branches.values(), branch])
        if branch.label not in self._branches:
            self._branches.append(branch.label)
        self.store.migrate(self.migrations, [branch.label])

    def add_tables(self, tables: Sequence[Any]) -> None:
        """Create an app's own tables beside the engine's if they do not exist (for
        tests and examples; an app's real schema belongs to its own migrations)."""
        self.store.create_tables(tables)

    def close(self) -> None:
        """Release database connections."""
        self.store.dispose()

    # -- registration --------------------------------------------------------------------

    @overload
    def action(self, fn: F, /) -> F: ...
    @overload
    def action(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> Callable[[F], F]: ...
    def action(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> F | Callable[[F], F]:
        """Register an action (a `def` or `async def`) under a stable name.

        The name defaults to the function's qualified name; pass `name=` to keep it
        stable across renames. Stored runs refer to actions by this name only.

        `timeout` (a timedelta or seconds, above 0 and at most 7 days) limits each
        attempt of the runs enqueued from now on that give no `timeout=` of their own:
        an attempt past it fails ("attempt exceeded 30 s") and is retried by the
        run's policy. See "Timeouts" in docs/retrier.md.
        """

        def register(f: F) -> F:
            self.registry.add_action(f, name, timeout)
            return f

        return register(fn) if fn is not None else register

    @overload
    def on_complete(self, fn: F, /) -> F: ...
    @overload
    def on_complete(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...
    def on_complete(
        self, fn: F | None = None, /, *, name: str | None = None
    ) -> F | Callable[[F], F]:
        """Register a completion handler `(run_id, result, context[, session])`.

        It runs exactly once per run. If it declares `session`, its writes through that
        session commit in the transaction that marks the completion delivered.
        """

        def register(f: F) -> F:
            self.registry.add_handler(f, name)
            return f

        return register(fn) if fn is not None else register

    # -- enqueue --------------------------------------------------------------------------

    def run(
        self,
        fn: Fn | str,
        args: dict[str, Any] | None = None,
        *,
        on_complete: Fn | str | None = None,
        context: Any = None,
        session: Session | None = None,
        initial_backoff_ms: int | None = None,
        base: float | None = None,
        max_failures: int | None = None,
        jitter: bool | None = None,
        max_backoff: timedelta | None = None,
        idempotency_key: str | None = None,
        debounce: Debounce | None = None,
        timeout: timedelta | float | None = None,
    ) -> str:
        """Start a durable run of a registered action now; returns its run id.

        With `session=`, the run is written in that session's transaction and exists
        only if the caller commits it.

        With `idempotency_key=`, a call while a run with that key is stored (in the
        retrier's own runs: each pool has its keys) returns that run's id and stores
        nothing: the key is free again once the run is deleted (`cleanup`, retention).
        With `debounce=Debounce(key, period, max_wait)`, calls within `period` of each
        other collapse into one run with the latest args, which starts `period` after
        the last call (no later than `max_wait` after the first); all get its id.
        `timeout` limits each attempt (a timedelta or seconds; default: the action's
        registered `timeout`, else none).
        """
        policy = self.policy.with_overrides(
            initial_backoff_ms=initial_backoff_ms,
            base=base,
            max_failures=max_failures,
            jitter=jitter,
            max_backoff=max_backoff,
        )
        new = self.prepare(
            fn,
            args,
            on_complete=on_complete,
            context=context,
            policy=policy,
            idempotency_key=idempotency_key,
            debounce=debounce,
            timeout=timeout,
        )
        return self.submit([new], session=session)[0]

    def run_at(
        self, when: datetime, fn: Fn | str, args: dict[str, Any] | None = None, **options: Any
    ) -> str:
        """Like `run`, but the first attempt starts at `when`: a timezone-aware datetime
        within 100 years of now (else `InvalidSettings`)."""
        return self._run_due(due_ms(when, "run_at", self.clock.now_ms()), fn, args, options)

    def run_after(
        self,
        delay: timedelta | float,
        fn: Fn | str,
        args: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Like `run`, but the first attempt starts after `delay`: a timedelta or seconds,
        from 0 to 100 years (else `InvalidSettings`)."""
        ms = delay_ms(delay, "run_after")
        return self._run_due(self.clock.now_ms() + ms, fn, args, options)

    def _run_due(
        self, due_ms: int, fn: Fn | str, args: dict[str, Any] | None, options: dict[str, Any]
    ) -> str:
        session = options.pop("session", None)
        new = self._from_options(fn, args, options, due_ms)
        return self.submit([new], session=session)[0]

    def _from_options(
        self,
        fn: Fn | str,
        args: dict[str, Any] | None,
        options: dict[str, Any],
        due_ms: int | None = None,
        *,
        debounce: bool = False,
    ) -> NewRun:
        """The run `run`'s keyword `options` (less `session`, taken before) make, each
        checked; with `debounce`, that option too."""
        on_complete = options.pop("on_complete", None)
        context = options.pop("context", None)
        idempotency_key = options.pop("idempotency_key", None)
        timeout = options.pop("timeout", None)
        debounced = options.pop("debounce", None) if debounce else None
        unknown = options.keys() - _POLICY_OPTIONS
        if unknown:
            raise InvalidSettings(
                f"unknown option(s) {sorted(unknown)}; expected session, on_complete, "
                f"context, idempotency_key, {'debounce, ' if debounce else ''}timeout or "
                f"some of {sorted(_POLICY_OPTIONS)}"
            )
        return self.prepare(
            fn,
            args,
            on_complete=on_complete,
            context=context,
            policy=self.policy.with_overrides(**options),
            due_ms=due_ms,
            idempotency_key=idempotency_key,
            debounce=debounced,
            timeout=timeout,
        )

    def prepare(
        self,
        fn: Fn | str,
        args: dict[str, Any] | None,
        *,
        on_complete: Fn | str | None = None,
        context: Any = None,
        policy: RetryPolicy | None = None,
        due_ms: int | None = None,
        queue: str = "",
        key: str | None = None,
        owner: str | None = None,
        priority: int = 0,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        debounce: Debounce | None = None,
        debounce_scope: str | None = None,
        timeout: timedelta | float | None = None,
        default_timeout_ms: int | None = None,
    ) -> NewRun:
        """Validate a run and build its row, writing nothing. For higher tiers.

        Raises `UnregisteredFunction` or `InvalidArguments` (arguments or a context that
        are not strict JSON included), or `InvalidSettings` (a bad idempotency key or
        debounce, a bad `timeout`) before anything is stored. Each attempt's limit is
        `timeout` if given, else the action's registered one, else `default_timeout_ms`
        (a tier's default, already checked), else none.
        """
        if idempotency_key is not None or debounce is not None:
            check_idempotency_key(idempotency_key)
            check_debounce(debounce)
            check_once(idempotency_key, debounce)
        reg = self.registry.action(fn)
        if timeout is not None:
            timeout_ms: int | None = attempt_timeout_ms(timeout)
        else:
            timeout_ms = reg.timeout_ms if reg.timeout_ms is not None else default_timeout_ms
        stored_args = reg.validate_args(args)
        if context is not None:
            check_json(context, "the context", InvalidArguments)
        handler = self.registry.handler(on_complete).name if on_complete is not None else None
        policy = policy or self.policy
        return NewRun(
            id=run_id or new_id(),
            fn=reg.name,
            args=stored_args,
            due_ms=self.clock.now_ms() if due_ms is None else due_ms,
            initial_backoff_ms=policy.initial_backoff_ms,
            base=policy.base,
            max_failures=policy.max_failures,
            jitter=policy.jitter,
            max_backoff_ms=policy.max_backoff_ms,
            queue=queue,
            key=key,
            owner=owner,
            priority=priority,
            on_complete=handler,
            context=context,
            idempotency_key=idempotency_key,
            debounce=debounce,
            debounce_scope=debounce_scope,
            timeout_ms=timeout_ms,
        )

    def submit(self, new: Sequence[NewRun], *, session: Session | None = None) -> list[str]:
        """Store prepared runs in one transaction (the caller's, if `session` is given);
        the id each got, in order: its own, or, for one with an idempotency key or a
        debounce, that of the run stored before it collapses into."""
        with self._enqueue_span(new):
            ids = self._submit(new, session)
        _log_enqueued(new, ids)
        return ids

    async def submit_async(self, new: Sequence[NewRun]) -> list[str]:
        """`submit` from async code, without a session: the insert joins this event
        loop's group commit (`Dialect.call`), so enqueues made at once (concurrent
        requests) commit together; on SQLite it runs on the loop when the database is
        free, with no thread hop."""
        with self._enqueue_span(new):
            ids = await self.store.dialect.call(self.store.insert_runs, new)
        self.wake_workers()
        _log_enqueued(new, ids)
        return ids

    def _enqueue_span(self, new: Sequence[NewRun]) -> AbstractContextManager[Any]:
        """The enqueue's span (`Telemetry.enqueue_span`); without tracing, nothing, and
        no list of names built for it."""
        if self.telemetry.tracing is None:
            return nullcontext()
        span: AbstractContextManager[Any] = self.telemetry.enqueue_span([r.fn for r in new])
        return span

    def _submit(self, new: Sequence[NewRun], session: Session | None) -> list[str]:
        if session is None:
            ids = self.store.insert_runs(new)
            self.wake_workers()
            return ids
        ids = self.store.insert_runs(new, conn=session.connection())
        event.listen(session, "after_commit", lambda _s: self.wake_workers(), once=True)
        return ids

    # -- status, cancel, cleanup, wait --------------------------------------------------

    def status(self, run_id: str) -> RunStatus:
        """`InProgress()` or `Completed(result)`; raises `RunNotFound` for unknown ids."""
        return self.status_of(self.store.get(run_id))

    def explain(self, run_id: str) -> Why:
        """Why the run is where it is: finished, canceled, running on a worker until its
        lease ends, or, for a run that waits, what holds it: no live worker (or none
        that registers its function), its due time (backoff or `run_at`), its pool
        paused or full, its rate window or its key. Computed by the claim's own rules;
        raises `RunNotFound` for unknown ids."""
        return self.store.explain(run_id)

    def status_of(self, row: RunRow) -> RunStatus:
        """The status a stored run row stands for."""
        if row.state in (PENDING, RUNNING):
            return Completed(Canceled()) if row.cancel_requested else InProgress()
        return Completed(self.result_of(row))

    def result_of(self, row: RunRow) -> RunResult:
        corrupt = unreadable("result", row.result) if row.outcome == SUCCESS else None
        if corrupt is not None:
            return Failed(f"CorruptRun: {corrupt}")
        if row.outcome == SUCCESS:
            value = row.result
            if self.registry.has_action(row.fn):
                value = self.registry.action(row.fn).decode_result(row.result)
            return Success(value)
        if row.outcome == FAILED:
            return Failed(row.error or "failed")
        if row.outcome == CANCELED or row.cancel_requested:
            return Canceled()
        raise AssertionError(f"run {row.id} in state {row.state} has no outcome")

    def cancel(self, run_id: str) -> None:
        """Cancel a run. Pending: canceled now. Running: best effort (an async action's
        task is cancelled; a sync one finishes but its result is discarded). Either way
        its status reads canceled at once. Finished runs are left as they are."""
        if self.store.cancel(run_id):
            for worker in list(self._workers):
                worker.cancel_local(run_id)
            self.wake_workers()
            log.info("run %s canceled", run_id, extra={"run_id": run_id})
            if self.telemetry.metrics is not None:
                row = self.store.get_many([run_id]).get(run_id)
                if row is not None:
                    self.telemetry.metrics.canceled(row.fn, row.queue)

    def retry(self, run_id: str) -> None:
        """Run a failed run again now: pending, due at once, with its retry budget
        renewed (see `Store.retry`). Raises `RunNotRetryable` if it has not failed."""
        self.store.retry(run_id)
        self.wake_workers()

    def cancel_queue(self, queue: str, limit: int | None = None) -> int:
        """Cancel every unfinished run of `queue` (at most `limit`, running ones
        first), in one transaction; returns how many were canceled. For higher tiers
        (`Workpool.cancel_all`)."""
        done = self.store.cancel_many(runs_in_queue(queue), limit=limit)
        for run_id in done.running:
            for worker in list(self._workers):
                worker.cancel_local(run_id)
        if done.count:
            self.wake_workers()
            log.info("%d run(s) of queue %s canceled", done.count, queue, extra={"queue": queue})
            if self.telemetry.metrics is not None:
                self.telemetry.metrics.canceled("", queue, done.count)
        return done.count

    def cleanup(self, run_id: str) -> None:
        """Delete a finished run's stored state. Raises `RunNotFinished` if it has not."""
        self.store.delete(run_id)

    def wait(self, run_id: str, timeout: float | None = None) -> Completed:
        """Block until the run has completed and its on_complete has run.

        Raises `WaitTimeout` (a `TimeoutError`) after `timeout` seconds.
        """
        self.wait_all([run_id], timeout=timeout)
        status = self.status(run_id)
        assert isinstance(status, Completed)
        return status

    def wait_all(self, run_ids: Sequence[str], timeout: float | None = None) -> None:
        """Block until every run has completed (see `wait`)."""
        remaining = set(run_ids)
        poll_until(
            self.watched(partial(self._all_completed, remaining)),
            self._completions,
            timeout,
            lambda: WaitTimeout(next(iter(remaining)), timeout or 0),
        )

    def _all_completed(self, remaining: set[str]) -> bool | None:
        return all_completed(self.store, remaining)

    def watched(self, check: Callable[[], R | None]) -> Callable[[], R | None]:
        """`check` for a wait (`poll_until`), which logs a warning, once, when the
        wait has lasted `no_worker_warning_after` seconds with no live worker
        registered in the database (a wait that nothing will ever end)."""
        return warn_when_unserved(check, self.no_worker_warning_after, self._warn_if_no_worker)

    def _warn_if_no_worker(self, waited_s: float) -> None:
        if not self._workers:  # else this process runs one
            warn_if_no_worker(self.store, waited_s)

    def _runs_completed(self, _ids: list[str]) -> None:
        self._completions.notify()

    # -- async twins ------------------------------------------------------------------

    async def run_async(self, fn: Fn | str, args: dict[str, Any] | None = None, **kw: Any) -> str:
        """`run` from async code; without `session=`, through `submit_async`."""
        sync = partial(self.run, fn, args, **kw)
        return await self._run_async(sync, fn, args, kw, due=None, debounce=True)

    async def run_at_async(
        self, when: datetime, fn: Fn | str, args: dict[str, Any] | None = None, **kw: Any
    ) -> str:
        """`run_at` from async code; without `session=`, through `submit_async`."""
        sync = partial(self.run_at, when, fn, args, **kw)
        return await self._run_async(
            sync, fn, args, kw, due=lambda: due_ms(when, "run_at", self.clock.now_ms())
        )

    async def run_after_async(
        self, delay: timedelta | float, fn: Fn | str, args: dict[str, Any] | None = None,
        **kw: Any,
    ) -> str:
        """`run_after` from async code; without `session=`, through `submit_async`."""
        sync = partial(self.run_after, delay, fn, args, **kw)
        return await self._run_async(
            sync, fn, args, kw, due=lambda: self.clock.now_ms() + delay_ms(delay, "run_after")
        )

    async def _run_async(
        self,
        sync: Callable[[], str],
        fn: Fn | str,
        args: dict[str, Any] | None,
        options: dict[str, Any],
        *,
        due: Callable[[], int] | None,
        debounce: bool = False,
    ) -> str:
        """An enqueue twin's one path: with `session=`, its sync twin (`sync`) on a
        thread, in the session's transaction; else the run `options` make, due at
        `due()` (now if None), through `submit_async`."""
        if options.get("session") is not None:
            return await anyio.to_thread.run_sync(sync)
        options.pop("session", None)
        due_at = None if due is None else due()
        new = self._from_options(fn, args, options, due_at, debounce=debounce)
        return (await self.submit_async([new]))[0]

    async def status_async(self, run_id: str) -> RunStatus:
        return await anyio.to_thread.run_sync(self.status, run_id)

    async def explain_async(self, run_id: str) -> Why:
        return await anyio.to_thread.run_sync(self.explain, run_id)

    async def cancel_async(self, run_id: str) -> None:
        await anyio.to_thread.run_sync(self.cancel, run_id)

    async def cleanup_async(self, run_id: str) -> None:
        await anyio.to_thread.run_sync(self.cleanup, run_id)

    async def wait_async(
        self,
        run_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors wait(run_id, timeout=...)
    ) -> Completed:
        await self.wait_all_async([run_id], timeout)
        status = await self.status_async(run_id)
        assert isinstance(status, Completed)
        return status

    async def wait_all_async(
        self,
        run_ids: Sequence[str],
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors wait_all(ids, timeout=...)
    ) -> None:
        """`wait_all` without holding a thread while waiting (only during each short
        read), so any number of waiters leaves the worker's threads to the worker."""
        remaining = set(run_ids)
        await poll_until_async(
            self.watched(partial(self._all_completed, remaining)),
            self._completions,
            timeout,
            lambda: WaitTimeout(next(iter(remaining)), timeout or 0),
        )

    # -- workers ------------------------------------------------------------------------

    def worker(self, **options: Any) -> Worker:
        """A new worker for this retrier's database and registry (not yet started)."""
        settings: dict[str, Any] = {
            "concurrency": self.concurrency,
            "lease": self.lease,
            "poll_interval": self.poll_interval,
            "retention": self.retention,
            "unregistered_grace": self.unregistered_grace,
        }
        settings.update(options)
        check_worker_settings(**{k: settings[k] for k in _WORKER_SETTINGS})
        worker = Worker(
            self.store,
            self.registry,
            on_completed=self._runs_completed,
            telemetry=self.telemetry,
            **settings,
        )
        self._workers.append(worker)
        return worker

    def forget_worker(self, worker: Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)

    def wake_workers(self) -> None:
        """Make this process's workers look for due work now (after a higher tier has
        committed runs through its own connection)."""
        # As a hint stamped after the commit, like another process's: a worker whose
        # latest claim began later has seen these runs, and a burst of enqueues
        # costs one hop to its loop.
        hint = stamped(WAKE, "")
        for worker in list(self._workers):
            worker.hint(WAKE, hint)
        # And other processes' (on SQLite; PostgreSQL's trigger announces new runs).
        self.store.dialect.announce(WAKE, hint)


    def __enter__(self) -> Retrier:
        """Run an in-process worker on a background thread until the block exits."""
        self._on_thread = OnThread(self.worker())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._on_thread is not None
        serving, self._on_thread = self._on_thread, None
        try:
            serving.stop()
        finally:
            self.forget_worker(serving.worker)

    async def __aenter__(self) -> Retrier:
        """Run a worker as a task of the current event loop until the block exits."""
        worker = self.worker()
        self._as_task = await AsTask.start(worker)
        self._as_task_worker = worker
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._as_task.stop(exc_type, exc, tb)
        finally:
            self.forget_worker(self._as_task_worker)


def _log_enqueued(new: Sequence[NewRun], ids: list[str]) -> None:
    if log.isEnabledFor(logging.DEBUG):
        for r, run_id in zip(new, ids, strict=True):
            log.debug(
                "run %s (%s) enqueued", run_id, r.fn,
                extra={"run_id": run_id, "fn": r.fn, "queue": r.queue},
            )


_POLICY_OPTIONS = frozenset({"initial_backoff_ms", "base", "max_failures", "jitter", "max_backoff"})
_WORKER_SETTINGS = ("concurrency", "lease", "poll_interval", "retention", "unregistered_grace")


def retrier_of(target: object) -> Retrier:
    """The `Retrier` behind `target`: a Retrier, or a tier built on one (a Workpool,
    a WorkflowManager: anything whose `.retrier` leads to one). `TypeError` else."""
    found = target
    for _ in range(3):
        if isinstance(found, Retrier):
            return found
        found = getattr(found, "retrier", None)
    raise TypeError(
        f"expected a Retrier, a Workpool or a WorkflowManager, got {type(target).__name__}"
    )
