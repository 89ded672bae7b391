"""Execution timeouts (issue #13, part 2): an attempt's time limit on every tier, and
a workflow's deadline. On SQLite and PostgreSQL.

Retries and deadlines move on a FakeClock; the limit of an attempt is real time (it
is measured by the worker's event loop), so those tests use limits of 0.2 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from retrier import (
    Completed,
    DuplicateRegistration,
    Failed,
    FakeClock,
    InvalidSettings,
    Retrier,
    Success,
)
from tests.support import Calls, drain

MakeRetrier = Callable[..., Retrier]

LIMIT = 0.2  # seconds: an attempt past it fails


def attempts(retrier: Retrier, run_id: str) -> list[tuple[str, str | None]]:
    return [(a.outcome, a.error) for a in retrier.store.attempts(run_id)]


def count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar_one())


# -- the retrier ------------------------------------------------------------------------


def test_an_async_attempt_past_its_limit_is_cancelled_and_retried(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    cancelled = threading.Event()
    calls = Calls()

    @retrier.action(timeout=LIMIT)
    async def slow_then_fast() -> str:
        calls.add("start")
        if len(calls.items) == 1:
            try:
                await anyio.sleep(3600)
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
        return "done"

    run_id = retrier.run(slow_then_fast)
    assert retrier.store.get(run_id).timeout_ms == 200  # the registration's limit
    drain(retrier)
    assert cancelled.is_set(), "the task of the timed-out attempt was cancelled"
    assert attempts(retrier, run_id) == [("failed", "AttemptTimeout: attempt exceeded 200 ms")]
    clock.advance(timedelta(seconds=1))  # past the policy's backoff
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success("done"))


def test_a_run_that_keeps_timing_out_fails_with_the_limit_in_its_error(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, max_failures=2)
    results = Calls()

    @retrier.action
    async def hangs() -> None:
        await anyio.sleep(3600)

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        results.add(result)

    run_id = retrier.run(hangs, timeout=timedelta(milliseconds=200), on_complete=done)
    drain(retrier)
    clock.advance(timedelta(seconds=1))
    drain(retrier)
    error = "AttemptTimeout: attempt exceeded 200 ms"
    assert retrier.status(run_id) == Completed(Failed(error))
    assert attempts(retrier, run_id) == [("failed", error), ("failed", error)]
    assert results.items == [Failed(error)]


def test_a_sync_attempt_past_its_limit_is_abandoned_and_frees_its_slot(
    make_retrier: MakeRetrier,
) -> None:
    retrier = make_retrier(concurrency=1)
    release = threading.Event()
    returned = threading.Event()

    @retrier.action(timeout=LIMIT)
    def blocks() -> str:
        release.wait(30)
        returned.set()
        return "too late"

    @retrier.action
    def quick() -> str:
        return "quick"

    try:
        with retrier:
            stuck = retrier.run(blocks, max_failures=1)
            after = retrier.run(quick)
            # The only slot is freed when the limit passes, while the thread still runs.
            assert retrier.wait(after, timeout=10) == Completed(Success("quick"))
            status = retrier.wait(stuck, timeout=10)
            assert not returned.is_set()
            release.set()
            assert returned.wait(10)
    finally:
        release.set()
    assert isinstance(status.result, Failed)
    assert status.result.error.startswith("AttemptTimeout: attempt exceeded 200 ms; its thread")
    row = retrier.store.get(stuck)
    assert row.outcome == "failed" and row.result is None, "the late result is discarded"


def test_a_run_limit_overrides_the_registered_one(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, max_failures=1)

    @retrier.action(timeout=3600)
    async def waits(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "ok"

    @retrier.action
    async def unlimited() -> None: ...

    short = retrier.run(waits, {"seconds": 5}, timeout=LIMIT)
    later = retrier.run_after(0, waits, {"seconds": 5}, timeout=LIMIT)
    fits = retrier.run(waits, {"seconds": 0})
    free = retrier.run(unlimited)
    drain(retrier)
    for run_id in (short, later):
        assert retrier.status(run_id) == Completed(
            Failed("AttemptTimeout: attempt exceeded 200 ms")
        )
    assert retrier.status(fits) == Completed(Success("ok"))
    assert retrier.store.get(fits).timeout_ms == 3_600_000
    assert retrier.store.get(free).timeout_ms is None


BAD_LIMITS = [0, 0.0, -1, timedelta(0), timedelta(seconds=-5), True, False, "30", [30],
              float("nan"), float("inf"), 10**30, 8 * 86_400, timedelta(days=8), 0.0001]


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
def test_bad_limits_are_refused_before_anything_is_written(
    retrier: Retrier, limit: Any
) -> None:
    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.action(name="other", timeout=limit)(lambda: None)
    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.run(act, timeout=limit)
    with pytest.raises(InvalidSettings, match="timeout"):
        retrier.run_after(1, act, timeout=limit)
    assert count_runs(retrier) == 0
    assert not retrier.registry.has_action("other")


def test_a_limit_in_milliseconds_gets_a_hint(retrier: Retrier) -> None:
    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="seconds, not milliseconds"):
        retrier.run(act, timeout=30_000_000)


def test_registering_again_with_another_limit_is_refused(retrier: Retrier) -> None:
    async def act() -> None: ...

    retrier.action(timeout=5)(act)
    retrier.action(timeout=5)(act)  # the same registration again: fine
    with pytest.raises(DuplicateRegistration, match="another timeout"):
        retrier.action(timeout=6)(act)


# -- the workpool ---------------------------------------------------------------------------


def test_a_pool_item_past_its_limit_frees_its_slot_and_is_retried(
    make_retrier: MakeRetrier,
) -> None:
    from workpool import RetryBehavior, Workpool

    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "slow", max_parallelism=1, default_timeout=LIMIT)
    calls = Calls()

    @retrier.action
    async def hangs_once(n: int) -> int:
        calls.add(n)
        if calls.count(n) == 1:
            await anyio.sleep(3600)
        return n

    first = pool.enqueue(hangs_once, {"n": 1}, retry=RetryBehavior(max_attempts=2))
    second = pool.enqueue(hangs_once, {"n": 2}, retry=False)
    drain(retrier)
    # The only slot went to the first item; its attempt timed out and freed the slot
    # for the second, whose one attempt timed out too.
    error = "AttemptTimeout: attempt exceeded 200 ms"
    assert pool.status(first).previous_attempts == 1  # type: ignore[union-attr]
    assert retrier.status(second) == Completed(Failed(error))
    clock.advance(timedelta(seconds=1))
    drain(retrier)
    assert pool.wait(first, timeout=10) == Completed(Success(1))


def test_pool_limits_follow_item_then_action_then_pool(make_retrier: MakeRetrier) -> None:
    from workpool import Workpool

    retrier = make_retrier()
    pool = Workpool(retrier, "limits", default_timeout=timedelta(minutes=1))

    @retrier.action(timeout=5)
    def own_limit() -> None: ...

    @retrier.action
    def no_limit() -> None: ...

    ids = [
        pool.enqueue(own_limit),
        pool.enqueue(no_limit),
        pool.enqueue(own_limit, timeout=2.5),
        *pool.enqueue_batch([(no_limit, {}, {"timeout": 7}), (no_limit, {})]),
    ]
    stored = [retrier.store.get(i).timeout_ms for i in ids]
    assert stored == [5000, 60_000, 2500, 7000, 60_000]


@pytest.mark.parametrize("limit", [0, -2, True, "1", float("nan"), 10**12], ids=repr)
def test_bad_pool_limits_are_refused(retrier: Retrier, limit: Any) -> None:
    from workpool import InvalidBatchItem, Workpool

    @retrier.action
    def act() -> None: ...

    with pytest.raises(InvalidSettings, match="default_timeout"):
        Workpool(retrier, "bad", default_timeout=limit)
    pool = Workpool(retrier, "good")
    with pytest.raises(InvalidSettings, match="timeout"):
        pool.enqueue(act, timeout=limit)
    with pytest.raises(InvalidBatchItem, match="timeout"):
        pool.enqueue_batch([(act, {}), (act, {}, {"timeout": limit})])
    assert count_runs(retrier) == 0
