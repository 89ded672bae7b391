"""Group commit: the store calls an event loop makes in the same moment share one
write transaction.

Calls that arrive in the same pass of the loop wait for the next pass, then share a
transaction (a lone call on a quiet loop runs at once: see `GroupCommit.call`). Each
call's function runs in its caller's context (its trace, for one: the runs it inserts
carry it) and in a savepoint of its own, so a call that raises undoes only its
own writes; the transaction then commits once for all of them: one BEGIN and one
COMMIT (on SQLite at `synchronous=FULL`, one fsync) where each call paid its own. No
call returns before that commit. Under load, 200 workflows that each take their next
step write it together; under a trickle each call runs at once, as alone.

The dialect runs a group (`RunGroup`) or a lone call (`RunAlone`): on the loop if the
database is free now, else, after a short wait, on a thread. A store function sees the
group's connection through `JOINED`: its `read()` and `write()` use it, and a write
becomes a savepoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread
from sqlalchemy import Connection

from ._dialect import ON_LOOP

# The group transaction a store function runs in, if any (see `savepoint`).
JOINED: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "tiers_joined", default=None
)

# How long a group waits, retrying on the loop, for a database another writer holds,
# before it runs on a thread, where waiting does not stall the loop.
_LOOP_PATIENCE_S = 0.25
# How many passes in a row that bring one call at most make a loop quiet again.
_QUIET_PASSES = 16


class GroupBroken(Exception):
    """A savepoint could not be rolled back: the whole group's transaction must go."""


@dataclass(slots=True)
class Ended:
    """How one call of a group ended: its value, or what it raised."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class RunGroup(Protocol):
    def __call__(self, calls: list[Callable[[], Any]], *, wait: bool) -> list[Ended] | None:
        """Run `calls` in one transaction, each through `run_joined`, and commit; None
        (having done nothing) if the database is locked and `wait` is False."""
        ...


class RunAlone(Protocol):
    def __call__(self, call: Callable[[], Any]) -> Ended | None:
        """Run `call` in its own transaction(s), as if no group existed; None (having
        done nothing) if the database is locked."""
        ...


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    context: contextvars.Context  # the caller's, which the function runs in

    def in_context(self) -> Any:
        """Run the function in the caller's context, joined to the group's transaction
        as the group runs it (`JOINED` and `ON_LOOP`, set in the group's context)."""
        return self.context.run(_joined, JOINED.get(), ON_LOOP.get(), self.fn)


def _joined(conn: Connection | None, on_loop: bool, fn: Callable[[], Any]) -> Any:
    joined, looped = JOINED.set(conn), ON_LOOP.set(on_loop)
    try:
        return fn()
    finally:
        ON_LOOP.reset(looped)
        JOINED.reset(joined)


@dataclass(slots=True)
class _Open:
    calls: list[_Call] = field(default_factory=list)
    calls_before: int = 0  # the pass's first call, run at once


class GroupCommit:
    """Collects the calls of each event loop until its next pass, then runs them as
    one group."""

    def __init__(self, run: RunGroup, run_alone: RunAlone) -> None:
        self._run = run
        self._run_alone = run_alone
        self._open: dict[asyncio.AbstractEventLoop, _Open] = {}
        # Loops where a recent pass brought more than one call: theirs all wait for a
        # group, until `_QUIET_PASSES` passes in a row have brought one at most.
        self._busy: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
            weakref.WeakKeyDictionary()
        )

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a group of this loop; its value once the group commits.

        On a quiet loop the first call of a pass runs at once, alone (its own
        transaction, with its reads before the write lock), if the database is free:
        a lone caller waits for nobody. The calls after it in the same pass, and
        every call while passes bring more (until `_QUIET_PASSES` passes in a row
        have brought one at most), wait for the next pass and run there as one
        group.

        Cancellation waits for the group (as a call on a thread would): a caller
        never leaves a write it started half-known. (A call whose task asyncio
        cancels natively before its group runs is dropped, unrun.)"""
        loop = asyncio.get_running_loop()
        group = self._open.get(loop)
        if group is None:
            group = self._open[loop] = _Open()
            loop.call_soon(self._flush, loop, group)
            if loop not in self._busy:
                alone = self._run_alone(fn)
                if alone is not None:
                    group.calls_before = 1
                    return alone.unwrap()
        call = _Call(fn, loop.create_future(), contextvars.copy_context())
        group.calls.append(call)
        with anyio.CancelScope(shield=True):
            return await call.future

    def _flush(self, loop: asyncio.AbstractEventLoop, group: _Open) -> None:
        if self._open.get(loop) is group:
            del self._open[loop]
        if group.calls_before + len(group.calls) > 1:
            self._busy[loop] = _QUIET_PASSES
        elif loop in self._busy:
            self._busy[loop] -= 1
            if self._busy[loop] <= 0:
                del self._busy[loop]
        calls = _pending(group.calls)
        if calls and not self._run_now(calls):
            loop.create_task(self._run_later(calls))

    def _run_now(self, calls: list[_Call]) -> bool:
        ended = self._run([c.in_context for c in calls], wait=False)
        if ended is None:
            return False
        _resolve(calls, ended)
        return True

    async def _run_later(self, calls: list[_Call]) -> None:
        """The database was locked: retry on the loop for a while (other tasks run
        meanwhile), then wait for it on a thread."""
        pause, waited = 0.0001, 0.0
        while waited < _LOOP_PATIENCE_S:
            await anyio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.002)
            calls = _pending(calls)
            if not calls or self._run_now(calls):
                return
        fns = [c.in_context for c in calls]
        try:
            ended = await anyio.to_thread.run_sync(lambda: self._run(fns, wait=True))
        except BaseException as exc:  # pragma: no cover - the run reports its own errors
            ended = [Ended(error=exc)] * len(calls)
        assert ended is not None
        _resolve(calls, ended)


def run_joined(conn: Connection, calls: list[Callable[[], Any]]) -> list[Ended]:
    """Run each call with `conn` as its transaction (see `JOINED`); a call that raises
    has undone its own writes (its savepoint) and does not stop the others."""
    ended: list[Ended] = []
    token = JOINED.set(conn)
    try:
        for fn in calls:
            try:
                ended.append(Ended(value=fn()))
            except GroupBroken:
                raise
            except Exception as exc:
                ended.append(Ended(error=exc))
    finally:
        JOINED.reset(token)
    return ended


def failed_all(ended: list[Ended] | None, count: int, exc: BaseException) -> list[Ended]:
    """What a group's calls return when its transaction did not commit: each call's
    own error, else `exc`."""
    if ended is None:
        return [Ended(error=exc)] * count
    return [e if e.error is not None else Ended(error=exc) for e in ended]


@contextlib.contextmanager
def savepoint(conn: Connection) -> Iterator[Connection]:
    """A write inside a group: undone alone if it raises.

    Plain SAVEPOINT statements on the driver's connection (SQLAlchemy's
    `begin_nested` costs ~55 us a call; these ~1 us): SQLAlchemy does not track
    them, and needs not, as the group's transaction ends only after they do."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    raw.execute("SAVEPOINT tiers_call")
    try:
        yield conn
    except BaseException:
        try:
            raw.execute("ROLLBACK TO tiers_call")
            raw.execute("RELEASE tiers_call")
        except Exception as exc:
            raise GroupBroken(str(exc)) from exc
        raise
    raw.execute("RELEASE tiers_call")


def _pending(calls: list[_Call]) -> list[_Call]:
    return [c for c in calls if not c.future.done()]


def _resolve(calls: list[_Call], ended: list[Ended]) -> None:
    for call, end in zip(calls, ended, strict=True):
        if call.future.done():
            continue
        if end.error is not None:
            call.future.set_exception(end.error)
        else:
            call.future.set_result(end.value)
