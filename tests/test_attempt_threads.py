"""`def` actions run wholly on the worker's attempt threads (`retrier/_attempt_threads`):
no more threads than the worker's concurrency, the worker visible from the action, and
an action that raises past `Exception` is a failed attempt, not a dead thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest

from retrier import Completed, Failed, Retrier, Success
from retrier.engine import Outcome, Worker, current_worker
from tests.support import Calls

MakeRetrier = Callable[..., Retrier]


def test_sync_actions_run_on_at_most_concurrency_threads(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(concurrency=3)
    running = Calls()
    threads = Calls()
    three_running = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    now_running = [0]

    @retrier.action
    def blocking(n: int) -> int:
        worker = current_worker.get()
        assert worker is not None, "the worker is visible from a sync action"
        threads.add(threading.current_thread().name)
        with lock:
            now_running[0] += 1
            running.add(now_running[0])
            if now_running[0] == 3:
                three_running.set()
        release.wait(10)
        with lock:
            now_running[0] -= 1
        return n * 2

    with retrier:
        ids = [retrier.run(blocking, {"n": n}) for n in range(10)]
        assert three_running.wait(10)
        release.set()
        retrier.wait_all(ids, timeout=20)
    assert [retrier.status(i) for i in ids] == [Completed(Success(n * 2)) for n in range(10)]
    assert max(running.items) == 3, "never more runs at once than the concurrency"
    names = set(threads.items)
    assert names and all(name.startswith("tiers-attempt-") for name in names)
    assert len(names) <= 3


def test_system_exit_in_a_sync_action_is_a_failed_attempt(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(max_failures=2, initial_backoff_ms=10)
    calls = Calls()

    @retrier.action
    def exits() -> None:
        calls.add("exits")
        raise SystemExit(3)

    @retrier.action
    def fine() -> str:
        return "fine"

    with retrier:
        bad = retrier.run(exits)
        assert retrier.wait(bad, timeout=20) == Completed(Failed("SystemExit: 3"))
        good = retrier.run(fine)  # the worker and its threads go on
        assert retrier.wait(good, timeout=20) == Completed(Success("fine"))
    assert calls.items == ["exits", "exits"], "retried by the policy, like any failure"


def test_a_sync_action_with_a_time_limit_still_times_out(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(max_failures=1)
    release = threading.Event()

    @retrier.action(timeout=timedelta(milliseconds=200))
    def hangs() -> None:
        release.wait(10)

    try:
        with retrier:
            run_id = retrier.run(hangs)
            status = retrier.wait(run_id, timeout=20)
    finally:
        release.set()
    assert isinstance(status, Completed) and isinstance(status.result, Failed)
    assert "exceeded" in status.result.error


def test_system_exit_in_an_async_action_is_a_failed_attempt(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(max_failures=1)

    @retrier.action
    async def exits() -> None:
        raise SystemExit("bye")

    with retrier:
        run_id = retrier.run(exits)
        assert retrier.wait(run_id, timeout=20) == Completed(Failed("SystemExit: bye"))


def test_a_record_waits_for_the_last_few_attempts_of_its_batch(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the database says a record is worth a short wait (PostgreSQL's), an
    attempt ending just after the rest of its batch is recorded with them, not alone
    (its refill would stay apart from theirs ever after)."""
    retrier = make_retrier(concurrency=32)
    retrier.store.dialect.straggler_wait_s = 0.2  # type: ignore[misc]
    batches: list[list[str]] = []
    record_batch = Worker._record_batch

    async def recorded(self: Worker, batch: list[Outcome], **kw: Any) -> None:
        batches.append([o.run_id for o in batch])
        await record_batch(self, batch, **kw)

    monkeypatch.setattr(Worker, "_record_batch", recorded)

    @retrier.action
    def work(slow: bool) -> None:
        if slow:
            time.sleep(0.03)

    straggler = retrier.run(work, {"slow": True})
    for _ in range(31):
        retrier.run(work, {"slow": False})
    anyio.run(retrier.worker().run_until_idle)
    assert sum(len(b) for b in batches) == 32
    alone = [b for b in batches if b == [straggler]]
    assert not alone, f"the slow attempt was recorded on its own: {batches}"
