"""CallThreads: the threads a PostgreSQL dialect runs its blocking store calls on."""

from __future__ import annotations

import contextvars
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from retrier._call_threads import CallThreads

who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_a_call_returns_its_value_or_raises_its_error_on_another_thread() -> None:
    calls = CallThreads(2)

    async def main() -> None:
        here = threading.get_ident()
        assert await calls.call(threading.get_ident) != here

        def fails() -> None:
            raise KeyError("gone")

        with pytest.raises(KeyError, match="gone"):
            await calls.call(fails)

    anyio.run(main)
    calls.close()


def test_a_call_runs_in_a_copy_of_the_callers_context() -> None:
    calls = CallThreads(2)

    def read_and_change() -> str:
        seen = who.get()
        who.set("the thread")
        return seen

    async def main() -> None:
        who.set("the caller")
        assert await calls.call(read_and_change) == "the caller"
        assert who.get() == "the caller"  # the thread's change stays in its copy

    anyio.run(main)
    calls.close()


def test_no_more_than_the_limit_run_at_once_and_the_rest_wait_their_turn() -> None:
    calls = CallThreads(3)
    lock = threading.Lock()
    running = 0
    most = 0

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return i

    async def main() -> list[int]:
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await calls.call(lambda: work(i)))

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
        return results

    assert sorted(anyio.run(main)) == list(range(12))
    assert most == 3
    calls.close()


def test_a_caller_cancelled_before_its_call_does_not_start_it() -> None:
    calls = CallThreads(2)
    started = threading.Event()

    async def main() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await calls.call(started.set)
        assert scope.cancelled_caught

    anyio.run(main)
    time.sleep(0.05)
    assert not started.is_set()
    calls.close()


def test_a_caller_cancelled_during_its_call_waits_for_it_to_end() -> None:
    # A write is never left half-known: the cancelled caller leaves the call only once
    # it has ended, with its value; the cancellation reaches it at its next checkpoint
    # (as with anyio's to_thread.run_sync).
    calls = CallThreads(2)
    entered = threading.Event()
    release = threading.Event()
    ended: list[str] = []

    def slow_write() -> str:
        entered.set()
        release.wait(5)
        ended.append("written")
        return "value"

    async def main() -> None:
        scope = anyio.CancelScope()

        async def caller() -> None:
            with scope:
                ended.append(await calls.call(slow_write))
                await anyio.lowlevel.checkpoint()
                ended.append("not reached: cancelled at the checkpoint")

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.to_thread.run_sync(entered.wait, 5)
            scope.cancel()
            await anyio.sleep(0.05)
            assert ended == []  # the caller is still inside the call
            release.set()
        assert scope.cancelled_caught
        assert ended == ["written", "value"]

    anyio.run(main)
    calls.close()


def test_closing_lets_the_threads_end() -> None:
    calls = CallThreads(2, name="closing-test")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(calls.call, lambda: time.sleep(0.01))

    anyio.run(main)
    assert any(t.name.startswith("closing-test") for t in threading.enumerate())
    calls.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("closing-test") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the call threads did not end"
        time.sleep(0.01)
