"""Testing mode: run durable work inside a test, with no worker process and no real sleeps.

Give the `Retrier` a `FakeClock`, enqueue as the app does, then:

- `drain(target)` runs everything due now, to completion, in this process (retries
  due now, on_complete handlers and workflow steps included);
- `advance(target, delta)` moves the fake clock forward and drains;
- `run_for(target, delta)` walks the clock through `delta`, stopping at every due time
  on the way, so backoffs, durable sleeps and timeouts pass in order;
- `enqueued`, `assert_enqueued`, `refute_enqueued` look at the runs waiting to start;
- `perform(target, fn, args)` calls one action as a worker would, and returns its
  result (or raises its error).

`target` is a `Retrier`, a `Workpool` or a `WorkflowManager`: anything whose
`.retrier` leads to the Retrier. The pytest plugin (`retrier.pytest_plugin`, loaded
automatically) adds fixtures: `tiers_clock`, `tiers_database_url`,
`tiers_make_retrier`, `tiers_retrier` and `tiers_drain`. See docs/testing.md.

>>> from retrier import Completed, Retrier, Success
>>> from retrier.testing import FakeClock, assert_enqueued, drain
>>> retrier = Retrier("sqlite:///test.db", clock=FakeClock())
>>> @retrier.action
... def send_email(to: str) -> str:
...     return f"sent to {to}"
>>> run_id = retrier.run(send_email, {"to": "a@b.c"})
>>> [run.fn for run in assert_enqueued(retrier, send_email, {"to": "a@b.c"})]
['send_email']
>>> drain(retrier)
>>> retrier.status(run_id) == Completed(Success("sent to a@b.c"))
True
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
from pydantic_core import to_jsonable_python

from ._clock import FakeClock, delay_ms, ms_to_datetime
from ._models import LEASED, PENDING, RunRow
from ._registry import Fn
from ._retrier import Retrier, retrier_of

__all__ = [
    "DrainLimitReached",
    "EnqueuedRun",
    "FakeClock",
    "advance",
    "advance_async",
    "assert_enqueued",
    "drain",
    "drain_async",
    "enqueued",
    "fake_clock",
    "perform",
    "perform_async",
    "refute_enqueued",
    "run_for",
    "run_for_async",
]

T = TypeVar("T")

MAX_ROUNDS = 10_000
"""Claims a drain makes at most before it gives up (`DrainLimitReached`)."""

# How many pending runs `enqueued` reads at most, and how many a failure message lists.
_READ_LIMIT = 10_000
_SHOWN = 10


class HasRetrier(Protocol):
    """A `Workpool`, a `WorkflowManager`, or anything else whose `.retrier` leads to one."""

    @property
    def retrier(self) -> Retrier | HasRetrier: ...


Target = Retrier | HasRetrier
"""What the helpers take: a `Retrier`, or an object whose `.retrier` leads to one."""


class DrainLimitReached(AssertionError):
    """A drain stopped after `max_rounds` claims that found work: most likely an
    action or handler that enqueues more work due at once, forever."""


@dataclass(frozen=True, slots=True)
class EnqueuedRun:
    """A run waiting to start, as `enqueued` and `assert_enqueued` return it.

    `args` and `context` are in their stored JSON form (a `datetime` argument is ISO
    text). `due_in` is measured from the retrier's clock when the run was listed: zero
    for a run due now, negative for one overdue (due, but not drained yet).
    `attempts` counts attempts already made: a retry waiting for its backoff has one
    or more.
    """

    id: str
    fn: str
    args: dict[str, Any]
    due_at: datetime
    due_in: timedelta
    attempts: int
    queue: str
    """The pool's name for a workpool item (a workflow's steps run in its pool);
    `""` for a plain retrier run."""
    key: str | None
    priority: int
    on_complete: str | None
    context: Any


# -- finding the retrier ------------------------------------------------------------------


def fake_clock(target: Target) -> FakeClock:
    """The `FakeClock` of `target`'s Retrier; `TypeError` if it runs on another clock.

    >>> clock = fake_clock(pool)           # the clock given as Retrier(..., clock=FakeClock())
    >>> retrier.run_at(clock.now() + timedelta(hours=1), send_email, {"to": "a@b.c"})
    """
    clock = retrier_of(target).clock
    if not isinstance(clock, FakeClock):
        raise TypeError(
            f"this Retrier runs on {type(clock).__name__}, not a FakeClock: build it with "
            f"Retrier(url, clock=FakeClock()) (or use the tiers_clock fixture) to move time "
            f"in a test"
        )
    return clock


def _queue_of(target: Target) -> str | None:
    """The queue a Workpool's items run in: its name. None for any other target."""
    name = getattr(target, "name", None)
    is_pool = not isinstance(target, Retrier) and callable(getattr(target, "enqueue", None))
    return name if is_pool and isinstance(name, str) else None


# -- running what is due --------------------------------------------------------------------


async def drain_async(
    target: Target, *, max_rounds: int = MAX_ROUNDS, concurrency: int | None = None
) -> None:
    """`drain` for code already running in an event loop (an async test)."""
    await _drain_once(retrier_of(target), max_rounds, concurrency)


def drain(target: Target, *, max_rounds: int = MAX_ROUNDS, concurrency: int | None = None) -> None:
    """Run everything due now to completion, in this process, then return.

    A temporary worker without timers claims and runs due runs, records their
    outcomes and calls their on_complete handlers, and claims again until nothing is
    due: runs that become due meanwhile (new runs an action or handler enqueues,
    workflow steps and drivers) run too. A retry whose backoff
    lies ahead, a durable sleep or a `run_after` does not: the clock stands still
    (see `advance` and `run_for`). Given a Workpool or a WorkflowManager, it drains
    the whole Retrier behind it (every pool, and plain runs).

    `concurrency` (default: the Retrier's) is how many runs execute at once; 1 runs
    them one by one in due order. Raises `DrainLimitReached` after `max_rounds`
    claims with work still to claim.

    >>> run_id = retrier.run(send_email, {"to": "a@b.c"})
    >>> drain(retrier)
    >>> retrier.status(run_id) == Completed(Success("sent to a@b.c"))
    True
    """
    _blocking("drain", "drain_async")
    anyio.run(partial(drain_async, target, max_rounds=max_rounds, concurrency=concurrency))


async def advance_async(
    target: Target,
    delta: timedelta | float,
    *,
    max_rounds: int = MAX_ROUNDS,
    concurrency: int | None = None,
) -> None:
    """`advance` for code already running in an event loop (an async test)."""
    retrier = retrier_of(target)
    clock = fake_clock(retrier)
    clock.advance(timedelta(milliseconds=delay_ms(delta, "advance")))
    await _reap(retrier)
    await _drain_once(retrier, max_rounds, concurrency)


def advance(
    target: Target,
    delta: timedelta | float,
    *,
    max_rounds: int = MAX_ROUNDS,
    concurrency: int | None = None,
) -> None:
    """Move the fake clock forward by `delta` (a timedelta or seconds) in one jump,
    recover the leases that expired meanwhile, then `drain`.

    Everything that fell due in between runs at the end of the jump, in due order, as
    after a pause of every worker. To have each run at its own due time (a backoff
    that is measured from the previous attempt, say), use `run_for`.

    >>> retrier.run_after(timedelta(hours=1), send_email, {"to": "a@b.c"})
    >>> advance(retrier, timedelta(hours=1))     # the run is due now, and runs
    """
    _blocking("advance", "advance_async")
    anyio.run(
        partial(advance_async, target, delta, max_rounds=max_rounds, concurrency=concurrency)
    )


async def run_for_async(
    target: Target,
    delta: timedelta | float,
    *,
    step: timedelta | float | None = None,
    max_rounds: int = MAX_ROUNDS,
    concurrency: int | None = None,
) -> None:
    """`run_for` for code already running in an event loop (an async test)."""
    retrier = retrier_of(target)
    clock = fake_clock(retrier)
    end = clock.now_ms() + delay_ms(delta, "run_for")
    step_ms = None if step is None else delay_ms(step, "run_for's step")
    if step_ms == 0:
        raise ValueError("run_for's step must be longer than 0")
    await _reap(retrier)
    look = await _drain_once(retrier, max_rounds, concurrency)
    while (now := clock.now_ms()) < end:
        if step_ms is not None:
            then = min(now + step_ms, end)
        else:
            expiry = await anyio.to_thread.run_sync(_first_lease_expiry, retrier)
            moments = [m for m in (look, expiry) if m is not None and m > now]
            then = min([*moments, end])
        clock.advance(timedelta(milliseconds=then - now))
        await _reap(retrier)
        look = await _drain_once(retrier, max_rounds, concurrency)


def run_for(
    target: Target,
    delta: timedelta | float,
    *,
    step: timedelta | float | None = None,
    max_rounds: int = MAX_ROUNDS,
    concurrency: int | None = None,
) -> None:
    """Let `delta` of fake time pass as a worker would live it: drain now, then move
    the clock to each moment something falls due (a retry's backoff, a `run_at`, a
    workflow's sleep or event timeout, a rate limit freeing up, a lease left by a dead
    worker expiring), recover the leases that expired, and drain there, until `delta`
    has passed.

    With `step`, the clock moves in steps of that size instead (a worker that looks
    every `step`). Each run starts at its due time, never early; the clock ends
    exactly `delta` later.

    >>> run_id = retrier.run(flaky_call)         # fails twice, then succeeds
    >>> run_for(retrier, timedelta(seconds=1))    # attempts at 0, 250 and 750 ms
    >>> retrier.status(run_id) == Completed(Success("ok"))
    True
    """
    _blocking("run_for", "run_for_async")
    anyio.run(
        partial(
            run_for_async,
            target,
            delta,
            step=step,
            max_rounds=max_rounds,
            concurrency=concurrency,
        )
    )


async def _drain_once(retrier: Retrier, max_rounds: int, concurrency: int | None) -> int | None:
    """Drain; return when a worker with timers would look again (epoch ms), or None."""
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    options = {} if concurrency is None else {"concurrency": concurrency}
    # What a worker's timer would do now: fire the cron schedules' due ticks.
    await anyio.to_thread.run_sync(retrier.store.fire_schedules)
    worker = retrier.worker(**options)
    try:
        idle = await worker.run_until_idle(max_rounds=max_rounds)
    finally:
        retrier.forget_worker(worker)
    if not idle:
        raise DrainLimitReached(
            f"drain stopped after {max_rounds} claims that found work: does an action "
            f"or on_complete enqueue more work due at once, without end? "
            f"(raise max_rounds if the work is finite: each claim takes up to the "
            f"worker's concurrency of runs)"
        )
    tick = await anyio.to_thread.run_sync(retrier.store.next_schedule_ms)
    looks = [m for m in (worker.next_look_ms, tick) if m is not None]
    return min(looks, default=None)


def _first_lease_expiry(retrier: Retrier) -> int | None:
    """The first moment a lease still held (by a worker that died, or a test that
    claimed a run itself) counts as expired: a drain holds none once it returns."""
    held = [
        row.lease_until_ms + 1
        for state in LEASED
        for row in retrier.store.list_runs(state=state, limit=_READ_LIMIT)
        if row.lease_until_ms is not None
    ]
    return min(held, default=None)


async def _reap(retrier: Retrier) -> None:
    """What a worker's reaper would do now: hand back the runs of expired leases."""
    while await anyio.to_thread.run_sync(retrier.store.reap) > 0:
        pass


def _blocking(name: str, twin: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{name}() blocks; in async code (an async test), await {twin}()")


# -- performing one action ------------------------------------------------------------


async def perform_async(target: Target, fn: Fn | str, args: dict[str, Any] | None = None) -> Any:
    """`perform` for code already running in an event loop; a sync action runs in a
    thread, as in a worker."""
    reg = retrier_of(target).registry.action(fn)
    kwargs = reg.decode_args(reg.validate_args(args))
    if reg.is_async:
        value = await reg.fn(**kwargs)
    else:
        value = await anyio.to_thread.run_sync(partial(reg.fn, **kwargs))
    return reg.decode_result(reg.encode_result(value))


def perform(target: Target, fn: Fn | str, args: dict[str, Any] | None = None) -> Any:
    """Call one registered action here and now, as a worker would, for unit tests of
    actions: nothing is stored, nothing is retried.

    The arguments are validated and stored-then-loaded exactly as `run` and a worker
    do (`InvalidArguments` if they do not fit the signature), so the action receives
    the same typed values it would in production; the result goes through its JSON
    form and back, so the test sees what `status` would return. Whatever the action
    raises is raised (`NonRetryableError`, `RetryAfter`, ...); a result that cannot be
    stored raises `TypeError` (a worker fails the run with it).

    >>> perform(retrier, send_email, {"to": "a@b.c"})
    'sent to a@b.c'
    """
    reg = retrier_of(target).registry.action(fn)
    kwargs = reg.decode_args(reg.validate_args(args))
    if reg.is_async:
        _blocking("perform", "perform_async")
        value = anyio.run(_call_async, partial(reg.fn, **kwargs))
    else:
        value = reg.fn(**kwargs)
    return reg.decode_result(reg.encode_result(value))


async def _call_async(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


# -- what is enqueued --------------------------------------------------------------------


def enqueued(
    target: Target,
    fn: Fn | str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
) -> list[EnqueuedRun]:
    """The runs waiting to start (due now or later, retries in their backoff included),
    in the order they would start; with `fn`, only that action's (a registered
    function or its name); with `args`, only runs whose arguments include these
    (each compared in its stored JSON form); with `queue`, only that queue's.

    Given a `Workpool`, only its items, unless `queue=` says otherwise. Workflows
    appear as their engine runs: a sleeping or waiting workflow has a pending driver
    run (`tiers.workflow.drive:<pool>`), and steps waiting in the pool are its items.

    >>> pool.enqueue(send_email, {"to": "a@b.c"}, run_after=timedelta(hours=1))
    >>> [(r.fn, r.due_in) for r in enqueued(pool)]
    [('send_email', datetime.timedelta(seconds=3600))]
    """
    retrier = retrier_of(target)
    name = _fn_name(retrier, fn)
    if queue is None:
        queue = _queue_of(target)
    rows = retrier.store.list_runs(state=PENDING, fn=name, queue=queue, limit=_READ_LIMIT)
    rows.sort(key=lambda r: (r.due_ms, -r.priority, r.created_ms, r.id))
    now = retrier.clock.now_ms()
    wanted = None if args is None else _jsonable(dict(args))
    return [_enqueued_run(r, now) for r in rows if _args_match(r.args, wanted)]


def assert_enqueued(
    target: Target,
    fn: Fn | str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
) -> list[EnqueuedRun]:
    """Assert that at least one run matching `fn`, `args` and `queue` (as `enqueued`
    reads them) waits to start; return the matching runs. The `AssertionError` lists
    the runs that do wait, to show how they differ.

    >>> [run] = assert_enqueued(pool, send_email, {"to": "a@b.c"})
    >>> run.due_in
    datetime.timedelta(0)
    """
    queue = _queue_of(target) if queue is None else queue
    found = enqueued(target, fn, args, queue=queue)
    if found:
        return found
    pending = enqueued(target, queue=queue)
    what = _describe(retrier_of(target), fn, args, queue)
    where = "" if queue is None else " in that queue"
    if not pending:
        raise AssertionError(f"expected {what}; nothing is enqueued{where}")
    raise AssertionError(
        f"expected {what}; found none among the {_count(pending)} enqueued{where}:\n"
        f"{_listing(pending)}"
    )


def refute_enqueued(
    target: Target,
    fn: Fn | str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
) -> None:
    """Assert that no run matching `fn`, `args` and `queue` (as `enqueued` reads them)
    waits to start. With no filter: that nothing at all waits.

    >>> refute_enqueued(pool, send_email, {"to": "blocked@b.c"})
    """
    queue = _queue_of(target) if queue is None else queue
    found = enqueued(target, fn, args, queue=queue)
    if not found:
        return
    what = _describe(retrier_of(target), fn, args, queue)
    raise AssertionError(
        f"expected no {what.removeprefix('a ')}; found {_count(found)}:\n{_listing(found)}"
    )


def _fn_name(retrier: Retrier, fn: Fn | str | None) -> str | None:
    if fn is None or isinstance(fn, str):
        return fn
    return retrier.registry.action(fn).name  # UnregisteredFunction if it is not


def _jsonable(value: Any) -> Any:
    try:
        return to_jsonable_python(value)
    except Exception:  # compared as given: it simply matches nothing stored
        return value


def _args_match(stored: Any, wanted: dict[str, Any] | None) -> bool:
    if wanted is None:
        return True
    if not isinstance(stored, dict):
        return False
    return all(k in stored and stored[k] == v for k, v in wanted.items())


def _enqueued_run(row: RunRow, now_ms: int) -> EnqueuedRun:
    return EnqueuedRun(
        id=row.id,
        fn=row.fn,
        args=row.args if isinstance(row.args, dict) else {},
        due_at=ms_to_datetime(row.due_ms),
        due_in=timedelta(milliseconds=row.due_ms - now_ms),
        attempts=row.attempts,
        queue=row.queue,
        key=row.key,
        priority=row.priority,
        on_complete=row.on_complete,
        context=row.context,
    )


def _describe(
    retrier: Retrier, fn: Fn | str | None, args: Mapping[str, Any] | None, queue: str | None
) -> str:
    name = _fn_name(retrier, fn)
    parts = ["a run" if name is None else f"a run of {name!r}"]
    if args is not None:
        parts.append(f"with args including {_jsonable(dict(args))!r}")
    if queue is not None:
        parts.append(f"in queue {queue!r}")
    return " ".join(parts)


def _count(runs: list[EnqueuedRun]) -> str:
    return f"{len(runs)} run" + ("" if len(runs) == 1 else "s")


def _listing(runs: list[EnqueuedRun]) -> str:
    lines = [f"  - {_line(r)}" for r in runs[:_SHOWN]]
    if len(runs) > _SHOWN:
        lines.append(f"  ... and {len(runs) - _SHOWN} more")
    return "\n".join(lines)


def _line(run: EnqueuedRun) -> str:
    if run.due_in > timedelta(0):
        due = f"due in {run.due_in}"
    elif run.due_in == timedelta(0):
        due = "due now"
    else:
        due = f"overdue by {-run.due_in}"
    extras = [due]
    if run.queue:
        extras.append(f"queue {run.queue!r}")
    if run.attempts:
        extras.append(f"{run.attempts} attempt(s) made")
    return f"{run.fn} {run.args!r} ({', '.join(extras)}; id {run.id})"
