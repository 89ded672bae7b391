"""One attempt of an action: arguments decoded, the function called (a thread for a
`def`, a task for an `async def`) within the run's time limit, the result encoded, and
whatever happened turned into an `Outcome` for the store to record.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pydantic

from ._checks import format_limit
from ._clock import Clock, ms_after_ns, seconds_until, to_ms
from ._errors import HandBack, NonRetryableError, RetryAfter, UnregisteredFunction, describe
from ._registry import Registered, Registry, ResultNotSerializable
from ._run_types import Claimed, Outcome
from ._stored_json import unreadable

log = logging.getLogger("tiers.worker")

# A failed attempt's traceback is kept up to this many characters (its last ones: the
# frames nearest the error, and the error itself).
TRACEBACK_CHARS = 8_000
# A run claimed ahead of its start waits at most this long (a claim is made at most a
# few milliseconds ahead; a clock that jumped must not hold a run back).
_MAX_AHEAD_S = 0.050


async def attempt(
    registry: Registry,
    c: Claimed,
    *,
    limiter: anyio.CapacityLimiter,
    going_async: Callable[[], None],
    clock: Clock | None = None,
    early_s: float = 0.0,
) -> Outcome:
    """Run the claimed run's action once; never raises (but for cancellation).

    `limiter` bounds the threads of `def` actions; `going_async` is called just before
    an `async def` action starts (a shutdown may then cancel it); `clock` stamps when
    the attempt ended (a retry's backoff counts from then, not from its recording)
    and times a start claimed ahead of its due time, `early_s` before it (see
    `EarlyEnds`)."""
    a = _prepare(registry, c, clock, early_s)
    if isinstance(a, Outcome):
        return a
    try:
        if a.reg.is_async:
            acall = partial(a.reg.fn, **a.kwargs)
            if clock is not None:
                acall = partial(_stamping_end_async, clock, a.ended, acall)
            value = await _call_async(acall, c.timeout_ms, a.ahead_s, going_async)
        else:
            call = partial(a.reg.fn, **a.kwargs)
            if clock is not None:
                # On its thread: the hop back to the loop (late when the loop is busy)
                # must not push the retry's due time back.
                call = partial(_stamping_end, clock, a.ended, call)
            value = await _call_sync(call, c.timeout_ms, a.ahead_s, limiter)
        result = a.reg.encode_result(value)
    except (Exception, SystemExit) as exc:  # an action's sys.exit() must not end the worker
        return a.failed(exc)
    return a.outcome("success", result=result)


def attempt_blocking(
    registry: Registry,
    c: Claimed,
    *,
    clock: Clock,
    cancelled: Callable[[], bool],
    early_s: float = 0.0,
) -> Outcome | None:
    """`attempt` of a `def` action with no time limit, wholly on the calling thread
    (one of `AttemptThreads`): no hop to the event loop and back per run. None if
    `cancelled()` said so while the run waited for a start claimed ahead of time."""
    a = _prepare(registry, c, clock, early_s)
    if isinstance(a, Outcome):
        return a
    if a.ahead_s > 0:
        time.sleep(a.ahead_s)
        if cancelled():
            return None
    try:
        value = _stamping_end(clock, a.ended, partial(a.reg.fn, **a.kwargs))
        result = a.reg.encode_result(value)
    except BaseException as exc:  # SystemExit too: on its own thread, it is a failure
        return a.failed(exc)
    return a.outcome("success", result=result)


def runs_blocking(registry: Registry, c: Claimed) -> bool:
    """Whether `attempt_blocking` can run `c`: a registered `def` action without a
    time limit (past a limit, a thread is abandoned, which needs the loop's timer)."""
    if c.timeout_ms is not None or not registry.has_action(c.fn):
        return False
    return not registry.action(c.fn).is_async


class _Attempt:
    """One attempt under way: the action and its decoded arguments, and how to turn
    what happened into an `Outcome`."""

    __slots__ = ("ahead_s", "c", "clock", "ended", "in_txn", "kwargs", "reg")

    def __init__(
        self, c: Claimed, reg: Registered, kwargs: dict[str, Any], in_txn: bool,
        clock: Clock | None, early_s: float = 0.0,
    ) -> None:
        self.c, self.reg, self.kwargs, self.in_txn, self.clock = c, reg, kwargs, in_txn, clock
        # A claim made just ahead of a due time stamps the run as started then: the
        # attempt waits for it (less what rounding its previous end up added).
        self.ahead_s = 0.0 if clock is None else min(
            seconds_until(clock, c.started_ms) - early_s, _MAX_AHEAD_S
        )
        # When the action returned or raised, stamped where it ran (`ms_after_ns`).
        self.ended: list[tuple[int, int]] = []

    def outcome(self, kind: str, **fields: Any) -> Outcome:
        return _outcome(self.c, kind, self.in_txn, self.clock, self.ended, **fields)

    def failed(self, exc: BaseException) -> Outcome:
        """The outcome of an action that raised `exc` (or whose result is not JSON)."""
        if isinstance(exc, AttemptTimeout):
            return self.outcome("failure", error=describe(exc))
        if isinstance(exc, (NonRetryableError, ResultNotSerializable)):
            return self.outcome("fatal", error=describe(exc), traceback=traceback_of(exc))
        if isinstance(exc, RetryAfter):
            return self.outcome(
                "failure", error=describe(exc), retry_after_ms=to_ms(exc.seconds)
            )
        if isinstance(exc, HandBack):
            return self.outcome(
                "released", error=describe(exc), retry_after_ms=to_ms(exc.seconds)
            )
        # Logged once recorded, when it is known whether the run will be retried.
        return self.outcome("failure", error=describe(exc), traceback=traceback_of(exc))


def _prepare(
    registry: Registry, c: Claimed, clock: Clock | None, early_s: float = 0.0
) -> _Attempt | Outcome:
    """The attempt of `c`, or the outcome that ends it before its action is called."""
    in_txn = handler_in_txn(registry, c.on_complete)
    try:
        reg = registry.action(c.fn)
    except UnregisteredFunction as exc:
        # Not ours to fail (claimed before the registry changed, or inserted running
        # by a higher tier): hand it back, as if never started.
        return _outcome(c, "released", in_txn, clock, [], error=describe(exc))
    corrupt = unreadable("args", c.args, need_object=True) or unreadable("context", c.context)
    if corrupt is not None:
        # Retrying cannot help: fail this run alone; every other run goes on.
        return _outcome(c, "fatal", in_txn, clock, [], error=f"CorruptRun: {corrupt}")
    try:
        kwargs = reg.decode_args(c.args)
    except pydantic.ValidationError as exc:
        return _outcome(
            c, "fatal", in_txn, clock, [],
            error=f"CorruptRun: the stored args do not fit {c.fn!r}: {exc}",
        )
    return _Attempt(c, reg, kwargs, in_txn, clock, early_s)


def _outcome(
    c: Claimed,
    kind: str,
    in_txn: bool,
    clock: Clock | None,
    ended: list[tuple[int, int]],
    **fields: Any,
) -> Outcome:
    ended_ms, early_ns = ended[0] if ended else (None, 0) if clock is None else ms_after_ns(clock)
    return Outcome(
        c.id,
        c.fence,
        kind,
        c.started_ms,
        handler_in_txn=in_txn,
        attempt=c.attempts,
        queue=c.queue,
        plain=c.on_complete is None,
        fn=c.fn,
        ended_ms=ended_ms,
        ended_early_ns=early_ns,
        **fields,
    )


class AttemptTimeout(Exception):
    """An attempt ran past its run's time limit (stored as its error)."""

    def __init__(self, timeout_ms: int, abandoned: bool) -> None:
        detail = (
            "; its thread was abandoned (the function may still be running), its result "
            "will be discarded" if abandoned else ""
        )
        super().__init__(f"attempt exceeded {format_limit(timeout_ms)}{detail}")


async def _call_async(
    call: Callable[[], Awaitable[Any]],
    timeout_ms: int | None,
    ahead_s: float,
    going_async: Callable[[], None],
) -> Any:
    """Await an `async def` action at its stamped start; past `timeout_ms` (counted
    from then) its task is cancelled and `AttemptTimeout` raised."""
    if ahead_s > 0:
        await anyio.sleep(ahead_s)
    going_async()
    if timeout_ms is None:
        return await call()
    with anyio.move_on_after(timeout_ms / 1000):
        return await call()
    raise AttemptTimeout(timeout_ms, abandoned=False)


async def _call_sync(
    call: Callable[[], Any],
    timeout_ms: int | None,
    ahead_s: float,
    limiter: anyio.CapacityLimiter,
) -> Any:
    """Run a `def` action on a thread at its stamped start. Python cannot stop a
    thread: past `timeout_ms` the attempt stops waiting for it (its thread runs on, its
    eventual result is discarded, the worker's slot is free at once) and raises
    `AttemptTimeout`."""
    if ahead_s > 0:  # in the thread: its sleep ends closer to the time than the loop's
        call = partial(_call_at, time.perf_counter() + ahead_s, call)
    if timeout_ms is None:
        return await anyio.to_thread.run_sync(call, limiter=limiter)
    with anyio.move_on_after(timeout_ms / 1000 + ahead_s):
        return await anyio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=True)
    raise AttemptTimeout(timeout_ms, abandoned=True)


def _stamping_end(clock: Clock, ended: list[tuple[int, int]], call: Callable[[], Any]) -> Any:
    """`call()`, noting when it returned or raised in `ended`."""
    try:
        return call()
    finally:
        ended.append(ms_after_ns(clock))


async def _stamping_end_async(
    clock: Clock, ended: list[tuple[int, int]], call: Callable[[], Awaitable[Any]]
) -> Any:
    """`await call()`, noting when it returned or raised in `ended`."""
    try:
        return await call()
    finally:
        ended.append(ms_after_ns(clock))


def _call_at(when: float, call: Callable[[], Any]) -> Any:
    """`call()` at `when` (`time.perf_counter()`), on a worker thread; not at all if
    the attempt was cancelled meanwhile (a cancel request, a shutdown)."""
    time.sleep(max(0.0, when - time.perf_counter()))
    anyio.from_thread.check_cancelled()
    return call()


def handler_in_txn(registry: Registry, name: str | None) -> bool:
    """Whether the run's on_complete takes a session (it then runs in the transaction
    that records the outcome)."""
    if name is None:
        return False
    try:
        return registry.handler(name).takes_session
    except UnregisteredFunction:
        return False


def traceback_of(exc: BaseException) -> str:
    """The traceback of `exc` as stored: its last `TRACEBACK_CHARS` characters, NUL
    written as `\\x00` (PostgreSQL's text refuses it)."""
    text = "".join(traceback.format_exception(exc)).replace("\x00", "\\x00")
    if len(text) <= TRACEBACK_CHARS:
        return text
    return "…(earlier frames cut)\n" + text[-TRACEBACK_CHARS:]


class EarlyEnds:
    """How long before its stamped end each of a worker's recent failed attempts
    really ended: the stamp is rounded up to a whole millisecond, and the retry's due
    time counted from it. A retry the same worker starts then starts that much before
    its stamped start: no earlier than its backoff after the real end, and not up to
    a millisecond later. (Another worker starts it at its stamped start.)"""

    def __init__(self, keep: int = 1024) -> None:
        self._ns: dict[str, int] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def note(self, outcomes: list[Outcome]) -> None:
        """Remember the failures among `outcomes` (before they are recorded)."""
        with self._lock:
            for o in outcomes:
                if o.kind == "failure" and o.ended_early_ns:
                    self._ns[o.run_id] = o.ended_early_ns
            while len(self._ns) > self._keep:  # retries another worker took
                del self._ns[next(iter(self._ns))]

    def take(self, run_id: str) -> float:
        """Seconds the attempt of `run_id` about to start may start before its stamp."""
        if not self._ns:
            return 0.0
        with self._lock:
            return self._ns.pop(run_id, 0) / 1e9
