"""The threads that run a PostgreSQL dialect's blocking store calls for async code.

Every PostgreSQL statement is a network round trip, which a thread spends without the
GIL; a few threads keep the server busy. anyio's `to_thread.run_sync` is the general
tool, but per call it takes a capacity limiter, a cancel scope, a worker thread's
bookkeeping and a checkpoint that yields to the loop: 58 µs of CPU a call with 50
callers at once, against 16 µs for a queue that a few threads of our own take calls
from (measured: 20,000 no-op calls). A workflow's steps make several calls each.

Semantics kept from anyio's: the function runs in a copy of the caller's context; a
caller already cancelled does not start its call; once started, the caller waits for
the call to end even if cancelled meanwhile (a write is never left half-known).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context,
             Callable[[], Any]]


class CallThreads:
    """At most `limit` threads, started as calls wait for them, that run blocking
    calls for the event loops that `call` them."""

    def __init__(self, limit: int, name: str = "tiers-call") -> None:
        self._limit = limit
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # calls come from any loop's thread
        self._threads = 0
        self._busy = 0  # calls not yet done: a thread starts when every one is busy

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on one of the threads; its value (or its exception) here."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start_thread_if_needed()
        self._jobs.put((loop, future, contextvars.copy_context(), fn))
        with anyio.CancelScope(shield=True):
            value = await future
        return value

    def close(self) -> None:
        """Let the threads end once the calls they run are done (none waits)."""
        with self._lock:
            threads, self._threads = self._threads, 0
        for _ in range(threads):
            self._jobs.put(None)

    def _start_thread_if_needed(self) -> None:
        with self._lock:
            self._busy += 1
            if self._busy <= self._threads or self._threads >= self._limit:
                return  # a thread is free, or the call queues for the next one
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._serve, name=f"{self._name}-{number}", daemon=True).start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, context, fn = job
            try:
                value, failed = context.run(fn), False
            except BaseException as exc:  # handed to the caller, as its own
                value, failed = exc, True
            # Free before the caller hears: its next call then needs no new thread.
            with self._lock:
                self._busy -= 1
            _deliver(loop, future, value, failed=failed)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any,
             *, failed: bool) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, value, failed)
    except RuntimeError:
        pass  # the loop has closed: nobody waits


def _settle(future: asyncio.Future[Any], value: Any, failed: bool) -> None:
    if future.done():
        return
    if failed:
        future.set_exception(value)
    else:
        future.set_result(value)
