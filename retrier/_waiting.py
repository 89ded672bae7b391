"""Waiting for stored state to change: poll the database, and wake early when this
process saw the change happen.

Sync waiters block on a condition; async waiters on an event of their own loop. An
async waiter holds no worker thread while it waits: only its short reads run on one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread

from ._dialects import is_transient

log = logging.getLogger("tiers")

T = TypeVar("T")

# Polls back off from the first to the last pause: a change made by another process
# is seen within the last one.
_FIRST_PAUSE_S = 0.002
_LAST_PAUSE_S = 0.05


def loop_caller() -> Callable[[Callable[[], None]], None]:
    """A thread-safe way to call a function soon on the running event loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's other backend is trio
        import trio  # type: ignore[import-not-found,unused-ignore]

        run_soon: Callable[[Callable[[], None]], None] = (
            trio.lowlevel.current_trio_token().run_sync_soon
        )
        return run_soon

    def call_soon(fn: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop has closed
            pass

    return call_soon


class Changes:
    """A signal that something waiters look for may have happened in this process."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0
        self._async_wakers: set[Callable[[], None]] = set()

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        """Wake every waiter, sync or async; thread-safe, never blocks for long."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()
            wakers = list(self._async_wakers)
        for wake in wakers:
            wake()

    def wait(self, generation: int, timeout: float) -> None:
        """Block until a change after `generation`, or `timeout` seconds."""
        with self._condition:
            if self._generation == generation:
                self._condition.wait(timeout)

    async def wait_async(self, generation: int, at_most: float) -> None:
        """The same (for at most `at_most` seconds), holding no thread."""
        event = anyio.Event()
        call_soon = loop_caller()

        def wake() -> None:
            call_soon(event.set)

        with self._condition:
            if self._generation != generation:
                return
            self._async_wakers.add(wake)
        try:
            with anyio.move_on_after(at_most):
                await event.wait()
        finally:
            with self._condition:
                self._async_wakers.discard(wake)


def poll_until(
    check: Callable[[], T | None],
    changes: Changes,
    timeout: float | None,
    timed_out: Callable[[], Exception],
) -> T:
    """Call `check` until it returns something other than None; raise `timed_out()`
    after `timeout` seconds. A database that is briefly unreachable is waited out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _FIRST_PAUSE_S
    while True:
        generation = changes.generation
        found = _checked(check)
        if found is not None:
            return found
        left = _left(deadline, timed_out)
        changes.wait(generation, min(pause, left))
        pause = min(pause * 2, _LAST_PAUSE_S)


async def poll_until_async(
    check: Callable[[], T | None],
    changes: Changes,
    timeout: float | None,  # noqa: ASYNC109 - the waits it serves take timeout=
    timed_out: Callable[[], Exception],
) -> T:
    """`poll_until` for async code: each check runs briefly on a thread; between
    checks the waiter holds none."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _FIRST_PAUSE_S
    while True:
        generation = changes.generation
        found: T | None = await anyio.to_thread.run_sync(
            partial(_checked, check), abandon_on_cancel=True
        )
        if found is not None:
            return found
        left = _left(deadline, timed_out)
        await changes.wait_async(generation, min(pause, left))
        pause = min(pause * 2, _LAST_PAUSE_S)


def _checked(check: Callable[[], T | None]) -> T | None:
    try:
        return check()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.debug("waiting: the database did not answer (%s); trying again", exc)
        return None


def _left(deadline: float | None, timed_out: Callable[[], Exception]) -> float:
    if deadline is None:
        return _LAST_PAUSE_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out()
    return left
