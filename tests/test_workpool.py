"""Tier 2 semantics from DESIGN.md, on SQLite and PostgreSQL.

Like tests/test_retrier.py, timing runs on a FakeClock through `Worker.run_until_idle`
(no timers, no sleeps). The cap under real concurrent processes is proven in
tests/test_workpool_processes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from retrier import (
    Canceled,
    Completed,
    Failed,
    FakeClock,
    InvalidArguments,
    InvalidSettings,
    Retrier,
    RunNotFound,
    Success,
    TiersError,
    UnregisteredFunction,
)
from retrier._cli import main as cli
from retrier.engine import Outcome
from tests.support import Calls, drain
from workpool import (
    Finished,
    InvalidBatchItem,
    NotInPool,
    Pending,
    PoolNotFound,
    RetryBehavior,
    Running,
    Workpool,
)

MakeRetrier = Callable[..., Retrier]


def count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar() or 0)


def succeed(retrier: Retrier, claimed: list[Any]) -> None:
    """Record success for runs claimed by hand with `store.claim`."""
    retrier.store.record(
        [Outcome(c.id, c.fence, "success", c.started_ms, result=None) for c in claimed],
        "hand",
        5000,
    )


# -- status ----------------------------------------------------------------------------------


def test_status_moves_through_pending_running_finished(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "p", max_parallelism=2)
    seen = Calls()
    ids: list[str] = []

    @retrier.action
    def flaky() -> str:
        seen.add(pool.status(ids[0]))
        if len(seen.items) < 3:
            raise RuntimeError("not yet")
        return "ok"

    ids.append(pool.enqueue(flaky, retry=True))
    assert pool.status(ids[0]) == Pending(previous_attempts=0)
    drain(retrier)
    assert pool.status(ids[0]) == Pending(previous_attempts=1)
    clock.advance(timedelta(milliseconds=249))
    drain(retrier)
    assert pool.status(ids[0]) == Pending(previous_attempts=1), "backoff not over"
    clock.advance(timedelta(milliseconds=1))
    drain(retrier)
    assert pool.status(ids[0]) == Pending(previous_attempts=2)
    clock.advance(timedelta(milliseconds=500))
    drain(retrier)
    assert seen.items == [Running(0), Running(1), Running(2)]
    assert pool.status(ids[0]) == Finished()
    assert pool.status_batch(ids) == [Finished()]
    assert pool.wait(ids[0], timeout=5) == Completed(Success("ok"))


def test_retry_false_runs_once_and_retry_behavior_sets_attempts(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p", retry_actions_by_default=True,
                    default_retry_behavior=RetryBehavior(max_attempts=3, initial_backoff_ms=0))
    calls = Calls()

    @retrier.action
    def fails(tag: str) -> None:
        calls.add(tag)
        raise RuntimeError(tag)

    once = pool.enqueue(fails, {"tag": "once"}, retry=False)
    default = pool.enqueue(fails, {"tag": "default"})
    two = pool.enqueue(fails, {"tag": "two"},
                       retry=RetryBehavior(max_attempts=2, initial_backoff_ms=0))
    for _ in range(5):
        drain(retrier)
    assert sorted(calls.items) == sorted(["once"] + ["default"] * 3 + ["two"] * 2)
    for work_id in (once, default, two):
        result = pool.wait(work_id, timeout=5).result
        assert isinstance(result, Failed) and "RuntimeError" in result.error


def test_on_complete_runs_once_with_its_context(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p", max_parallelism=3)
    calls = Calls()

    @retrier.action
    async def double(x: int) -> int:
        await anyio.sleep(0.001)
        return 2 * x

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.add((run_id, result, context))

    with retrier:
        ids = pool.enqueue_batch(
            [(double, {"x": i}, {"on_complete": done, "context": {"i": i}}) for i in range(30)]
        )
        retrier.wait_all(ids, timeout=20)
    assert sorted(calls.items, key=lambda c: c[2]["i"]) == [
        (ids[i], Success(2 * i), {"i": i}) for i in range(30)
    ]


# -- the cap -----------------------------------------------------------------------------------


def test_claims_never_exceed_the_cap_and_a_change_applies_at_once(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p", max_parallelism=2)

    @retrier.action
    def noop() -> None: ...

    pool.enqueue_batch([(noop, {})] * 10)
    store = retrier.store
    first, _ = store.claim("w1", 100, 5000)
    again, _ = store.claim("w2", 100, 5000)
    assert (len(first), len(again)) == (2, 0)
    pool.set_max_parallelism(3)  # live: no restart, the next claim sees it
    third, _ = store.claim("w2", 100, 5000)
    assert len(third) == 1
    pool.set_max_parallelism(1)  # lowered below what runs: nothing new until under it
    succeed(retrier, first)
    assert store.claim("w3", 100, 5000)[0] == []
    succeed(retrier, third)
    assert len(store.claim("w3", 100, 5000)[0]) == 1
    assert store.queue_counts("p", 0) == {"running": 1, "pending": 6, "failed": 0}


def test_max_per_worker_caps_what_one_worker_holds_of_a_pool(retrier: Retrier) -> None:
    pool = Workpool(retrier, "shared", max_parallelism=5, max_per_worker=2)

    @retrier.action
    def noop() -> None: ...

    pool.enqueue_batch([(noop, {})] * 10)
    store = retrier.store
    first, _ = store.claim("w1", 100, 5000)
    second, _ = store.claim("w2", 100, 5000)
    assert (len(first), len(second)) == (2, 2)
    assert store.claim("w1", 100, 5000)[0] == [], "w1 holds its two"
    assert len(store.claim("w3", 100, 5000)[0]) == 1, "the pool's cap (5) comes first"
    succeed(retrier, first)
    assert len(store.claim("w1", 100, 5000)[0]) == 2
    # An inline start (a workflow step run by the worker itself) counts the same way.
    inline = [retrier.prepare(noop, {}, queue="shared") for _ in range(2)]
    succeed(retrier, second)
    with store.dialect.write() as conn:
        assert store.insert_running(inline[0], "w2", 5000, conn) is not None
    with store.dialect.write() as conn:
        assert store.insert_running(inline[1], "w1", 5000, conn) is None, "w1 holds two"
    pool.set_max_per_worker(None)  # live, like the cap
    assert len(store.claim("w1", 100, 5000)[0]) == 1


def test_a_claim_says_when_the_next_item_falls_due(make_retrier: MakeRetrier) -> None:
    """A claim that took fewer runs than it asked for returns the due time of the next
    claimable run, and the worker sets its timer for it; without it, a delayed item
    would wait for the next poll."""
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "later", max_parallelism=5)

    @retrier.action
    def noop() -> None: ...

    now = clock.now_ms()
    pool.enqueue(noop, run_after=timedelta(seconds=3))
    pool.enqueue(noop, run_after=timedelta(seconds=1))
    pool.enqueue(noop)
    claimed, wake_at = retrier.store.claim("w", 10, 5000)
    assert len(claimed) == 1 and wake_at == now + 1000
    clock.advance(timedelta(seconds=1))
    claimed, wake_at = retrier.store.claim("w", 10, 5000)
    assert len(claimed) == 1 and wake_at == now + 3000
    clock.advance(timedelta(seconds=2))
    claimed, wake_at = retrier.store.claim("w", 10, 5000)
    assert len(claimed) == 1 and wake_at is None


def test_zero_pauses_the_pool(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    pool = Workpool(retrier, "paused", max_parallelism=0)
    calls = Calls()

    @retrier.action
    def work(i: int) -> None:
        calls.add(i)

    ids = pool.enqueue_batch([(work, {"i": i}) for i in range(3)])
    drain(retrier)
    assert calls.items == []
    assert pool.status_batch(ids) == [Pending(0)] * 3
    # Another process (another Retrier on the database) resumes it.
    other = make_retrier()
    other_pool = Workpool(other, "paused", max_parallelism=0)
    other_pool.set_max_parallelism(5)
    drain(retrier)
    assert sorted(calls.items) == [0, 1, 2]


def test_constructing_a_pool_with_new_settings_updates_them(make_retrier: MakeRetrier) -> None:
    first = Workpool(make_retrier(), "p", max_parallelism=4, max_per_key=2)
    assert first.limits.max_parallelism == 4
    second = Workpool(make_retrier(), "p", max_parallelism=7,
                      rate_limit=(10, timedelta(seconds=2)), max_per_worker=3)
    for pool in (first, second):
        limits = pool.limits
        assert (limits.max_parallelism, limits.rate_limit, limits.rate_period_ms,
                limits.max_per_key, limits.max_per_worker) == (7, 10, 2000, None, 3)
    assert second.max_parallelism == 7


def test_a_retry_waiting_for_its_backoff_holds_no_slot(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "one", max_parallelism=1)
    calls = Calls()

    @retrier.action
    def work(tag: str) -> None:
        calls.add(tag)
        if tag == "flaky" and calls.items.count("flaky") == 1:
            raise RuntimeError("first try fails")

    flaky = pool.enqueue(work, {"tag": "flaky"}, retry=True)
    clock.advance(timedelta(milliseconds=1))
    other = pool.enqueue(work, {"tag": "other"})
    drain(retrier)
    assert calls.items == ["flaky", "other"]
    assert pool.status(flaky) == Pending(1) and pool.status(other) == Finished()
    clock.advance(timedelta(milliseconds=250))
    drain(retrier)
    assert pool.status(flaky) == Finished()


def test_without_aging_items_start_in_due_order_then_priority(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "ordered", max_parallelism=1, priority_aging=None)
    order = Calls()

    @retrier.action
    def work(tag: str) -> None:
        order.add(tag)

    start = datetime.fromtimestamp(clock.now_ms() / 1000, tz=UTC)
    pool.enqueue(work, {"tag": "later"}, run_after=timedelta(seconds=5))
    pool.enqueue_batch(
        [
            (work, {"tag": "low"}, {"priority": -1}),
            (work, {"tag": "normal"}),
            (work, {"tag": "high"}, {"priority": 10}),
            (work, {"tag": "older"}, {"run_at": start - timedelta(seconds=1)}),
        ]
    )
    drain(retrier)
    assert order.items == ["older", "high", "normal", "low"]
    clock.advance(timedelta(seconds=5))
    drain(retrier)
    assert order.items[-1] == "later"


def test_two_pools_sharing_workers_do_not_starve_each_other(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    busy = Workpool(retrier, "busy", max_parallelism=2)
    quiet = Workpool(retrier, "quiet", max_parallelism=2)
    order = Calls()
    # The first four starts meet here, so none of them can finish (and free a slot for a
    # later item) before all four have started: order.items[:4] is the first claimed batch.
    first_batch = threading.Barrier(4, timeout=10)

    @retrier.action
    def work(tag: str) -> None:
        order.add(tag)
        if len(order.items) <= 4:
            first_batch.wait()

    busy.enqueue_batch([(work, {"tag": "busy"})] * 100)
    clock.advance(timedelta(milliseconds=1))  # quiet's items are due after all of busy's
    quiet.enqueue_batch([(work, {"tag": "quiet"})] * 4)
    worker = retrier.worker()
    claimed, _ = retrier.store.claim(worker.id, worker.concurrency, 5000)
    assert sorted(c.queue for c in claimed) == ["busy", "busy", "quiet", "quiet"]
    retrier.forget_worker(worker)
    succeed(retrier, claimed)
    drain(retrier)
    assert order.items.count("quiet") == 2 and order.items.count("busy") == 98
    assert order.items[:4].count("quiet") == 2, order.items[:10]


@pytest.mark.parametrize("bound", ["concurrency", "max_per_worker"])
def test_a_pools_slots_spread_over_workers_as_far_as_their_share_lets_them(
    make_retrier: MakeRetrier, bound: str
) -> None:
    """How a pool's work spreads over processes (for CPU-bound actions): a worker holds
    no more of the pool than its concurrency or the pool's max_per_worker, at its first
    claim and whenever its record refills the slots it freed, so the other worker gets
    the rest of the pool. (Unbounded, the first worker would take all four.)"""
    retrier = make_retrier()
    per_worker = 2 if bound == "max_per_worker" else None
    pool = Workpool(retrier, "spread", max_parallelism=4, max_per_worker=per_worker)
    released: dict[int, anyio.Event] = {}

    @retrier.action
    async def hold(i: int) -> None:
        await released[i].wait()

    def running_per_worker() -> dict[str, list[int]]:
        with retrier.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT lease_owner, id FROM tiers_runs WHERE state = 'running'")
            ).all()
        held: dict[str, list[int]] = {}
        for owner, run_id in rows:
            held.setdefault(owner, []).append(items[run_id])
        return held

    async def two_each() -> dict[str, list[int]]:
        while True:
            held = running_per_worker()
            assert all(len(i) <= 2 for i in held.values()), held
            if sorted(len(i) for i in held.values()) == [2, 2]:
                return held
            await anyio.sleep(0.005)

    items: dict[str, int] = {}

    async def scenario() -> None:
        released.update((i, anyio.Event()) for i in range(10))
        ids = pool.enqueue_batch([(hold, {"i": i}) for i in range(10)])
        items.update((run_id, i) for i, run_id in enumerate(ids))
        concurrency = 2 if bound == "concurrency" else 16
        workers = [retrier.worker(concurrency=concurrency) for _ in range(2)]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for worker in workers:
                    await tg.start(worker.serve)
                held = await two_each()
                # One item of each worker finishes at once; each worker's record
                # refills the slot it freed, and no worker ever holds more than two.
                for _ in range(3):
                    for running in held.values():
                        released[running[0]].set()
                    held = await two_each()
                for event in released.values():
                    event.set()
                for work_id in ids:
                    await pool.wait_async(work_id, timeout=20)
                for worker in workers:
                    worker.stop()
        for worker in workers:
            retrier.forget_worker(worker)

    anyio.run(scenario)


def test_a_steady_stream_of_new_work_does_not_starve_older_work(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    # Minutes, not milliseconds: PostgreSQL's claim adds a lock wait it measured
    # (5 ms or more, which a loaded machine can take to plan a first call) to the
    # clock it is given.
    pool = Workpool(retrier, "stream", max_parallelism=2, priority_aging=timedelta(minutes=2))

    @retrier.action
    def work(tag: str) -> None: ...

    old = pool.enqueue(work, {"tag": "old"}, priority=-100)
    store = retrier.store
    for _round in range(5):
        clock.advance(timedelta(minutes=1))
        pool.enqueue_batch([(work, {"tag": "new"}, {"priority": 100})] * 5)
        claimed, _ = store.claim("w", 100, 5000)
        succeed(retrier, claimed)
        if old in {c.id for c in claimed}:
            break
    else:
        pytest.fail("the old item never started")
    assert _round == 1, "urgent work first, until the old item is due for priority_aging"


def test_rate_limit_counts_starts_in_a_sliding_window(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    pool = Workpool(retrier, "rated", max_parallelism=100, rate_limit=(3, timedelta(seconds=1)))
    calls = Calls()

    @retrier.action
    def work(i: int) -> None:
        calls.add(clock.now_ms())

    pool.enqueue_batch([(work, {"i": i}) for i in range(8)])
    drain(retrier)
    assert len(calls.items) == 3
    clock.advance(timedelta(milliseconds=999))
    drain(retrier)
    assert len(calls.items) == 3
    clock.advance(timedelta(milliseconds=1))
    drain(retrier)
    assert len(calls.items) == 6
    _, retry_at = retrier.store.claim("w", 10, 5000)
    assert retry_at == clock.now_ms() + 1000, "the claim says when the window reopens"
    clock.advance(timedelta(seconds=1))
    drain(retrier)
    assert len(calls.items) == 8


def test_per_key_limit(retrier: Retrier) -> None:
    pool = Workpool(retrier, "keyed", max_parallelism=10, max_per_key=1)

    @retrier.action
    def work(i: int) -> None: ...

    pool.enqueue_batch(
        [(work, {"i": 0}, {"key": "a"}), (work, {"i": 1}, {"key": "a"}),
         (work, {"i": 2}, {"key": "b"}), (work, {"i": 3})]
    )
    first, _ = retrier.store.claim("w", 100, 5000)
    assert sorted(c.args["i"] for c in first) == [0, 2, 3]
    assert retrier.store.claim("w", 100, 5000)[0] == []
    succeed(retrier, first)
    assert [c.args["i"] for c in retrier.store.claim("w", 100, 5000)[0]] == [1]
    # While key "a" is at its limit, items without a key still start.
    pool.enqueue_batch([(work, {"i": 4}, {"key": "a"}), (work, {"i": 5})])
    assert [c.args["i"] for c in retrier.store.claim("w", 100, 5000)[0]] == [5]


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_a_pending_item(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p")
    calls = Calls()

    @retrier.action
    def later() -> None:
        calls.add("ran")

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.add((result, context))

    work_id = pool.enqueue(later, run_after=3600, on_complete=done, context={"k": 1})
    pool.cancel(work_id)
    assert pool.status(work_id) == Finished()
    drain(retrier)
    assert calls.items == [(Canceled(), {"k": 1})]
    assert pool.wait(work_id, timeout=5) == Completed(Canceled())


def test_cancel_a_running_item_lets_it_finish_but_not_retry(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p", retry_actions_by_default=True)
    started = threading.Event()
    release = threading.Event()
    calls = Calls()

    @retrier.action
    def blocking() -> None:
        calls.add("attempt")
        started.set()
        release.wait(10)
        raise RuntimeError("would be retried")

    with retrier:
        work_id = pool.enqueue(blocking)
        assert started.wait(10)
        assert pool.status(work_id) == Running(0)
        pool.cancel(work_id)
        release.set()
        assert pool.wait(work_id, timeout=10) == Completed(Canceled())
    assert calls.items == ["attempt"]
    assert pool.status(work_id) == Finished()


def test_cancel_all(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier()
    pool = Workpool(retrier, "p", max_parallelism=0)
    other = Workpool(retrier, "other", max_parallelism=0)

    @retrier.action
    def work(i: int) -> None: ...

    ids = pool.enqueue_batch([(work, {"i": i}) for i in range(5)])
    kept = other.enqueue(work, {"i": 99})
    assert pool.cancel_all(limit=2) == 2
    assert pool.cancel_all() == 3
    assert pool.cancel_all() == 0
    assert pool.status_batch(ids) == [Finished()] * 5
    assert other.status(kept) == Pending(0)


# -- batches -----------------------------------------------------------------------------------


def test_a_batch_with_one_invalid_item_writes_nothing(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p")

    @retrier.action
    def typed(x: int) -> None: ...

    def unregistered() -> None: ...

    good = (typed, {"x": 1})
    for bad, cause in [
        ((typed, {"x": "nope"}), InvalidArguments),
        ((unregistered, {}), UnregisteredFunction),
        ((typed, {"x": 1}, {"retry": "yes"}), InvalidSettings),
        ((typed, {"x": 1}, {"unknown_option": 1}), InvalidSettings),
        ((typed, {"x": 1}, {"priority": 2**40}), InvalidSettings),
        ((typed,), InvalidSettings),
    ]:
        with pytest.raises(InvalidBatchItem, match="batch item 2") as info:
            pool.enqueue_batch([good, good, bad, good])  # type: ignore[list-item]
        assert isinstance(info.value.__cause__, cause) and info.value.index == 2
    assert count_runs(retrier) == 0


def test_ten_thousand_items_in_one_batch(retrier: Retrier) -> None:
    pool = Workpool(retrier, "big", max_parallelism=10)

    @retrier.action
    def noop(i: int) -> None: ...

    t = time.perf_counter()
    ids = pool.enqueue_batch([(noop, {"i": i}) for i in range(10_000)])
    took = time.perf_counter() - t
    assert len(set(ids)) == 10_000 and count_runs(retrier) == 10_000
    assert took < 5, f"enqueue_batch of 10,000 took {took:.2f} s"
    t = time.perf_counter()
    statuses = pool.status_batch(ids)
    assert statuses == [Pending(0)] * 10_000 and time.perf_counter() - t < 5


def test_enqueue_in_the_callers_transaction(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p")

    @retrier.action
    def work() -> None: ...

    with retrier.session() as s:
        rolled_back = pool.enqueue(work, session=s)
        s.rollback()
    with pytest.raises(RunNotFound):
        pool.status(rolled_back)
    with retrier.session() as s:
        ids = pool.enqueue_batch([(work, {})] * 3, session=s)
        s.commit()
    assert pool.status_batch(ids) == [Pending(0)] * 3


# -- bad input ---------------------------------------------------------------------------------


def test_bad_settings_are_refused(retrier: Retrier) -> None:
    for bad in (
        {"max_parallelism": -1},
        {"max_parallelism": 1.5},
        {"rate_limit": (10, 0)},
        {"rate_limit": (10, timedelta(seconds=-1))},
        {"rate_limit": (0, timedelta(seconds=1))},
        {"rate_limit": (-5, 1)},
        {"rate_limit": 10},
        {"max_per_key": 0},
        {"max_per_worker": 0},
        {"max_per_worker": -2},
        {"max_per_worker": 1.5},
    ):
        with pytest.raises(InvalidSettings):
            Workpool(retrier, "bad", **bad)
    with pytest.raises(InvalidSettings):
        Workpool(retrier, "")
    for bad_behavior in ({"max_attempts": 0}, {"initial_backoff_ms": -1}, {"base": 0}):
        with pytest.raises(InvalidSettings):
            RetryBehavior(**bad_behavior)
    assert retrier.store.get_queue("bad") is None, "nothing half-written"
    pool = Workpool(retrier, "good", max_parallelism=0)
    with pytest.raises(InvalidSettings):
        pool.set_max_parallelism(-1)
    assert pool.limits.max_parallelism == 0


def test_bad_enqueue_options_are_refused(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p")

    @retrier.action
    def work() -> None: ...

    now = datetime.now(UTC)
    for bad in ({"run_at": now, "run_after": 1}, {"run_at": datetime(2030, 1, 1)},
                {"run_after": -1}, {"priority": True}, {"key": ""}, {"retry": 3}):
        with pytest.raises(InvalidSettings):
            pool.enqueue(work, **bad)
    assert count_runs(retrier) == 0


def test_unknown_and_foreign_work_ids(retrier: Retrier) -> None:
    mine = Workpool(retrier, "mine")
    theirs = Workpool(retrier, "theirs")

    @retrier.action
    def work() -> None: ...

    foreign = theirs.enqueue(work)
    plain = retrier.run(work)
    for call in (mine.status, mine.cancel, mine.wait, lambda i: mine.status_batch([i])):
        with pytest.raises(RunNotFound, match="no-such-id"):
            call("no-such-id")
        with pytest.raises(NotInPool, match="theirs") as info:
            call(foreign)
        assert isinstance(info.value, LookupError) and isinstance(info.value, TiersError)
        with pytest.raises(NotInPool, match="retrier"):
            call(plain)
    assert theirs.status(foreign) == Pending(0)


# -- async ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_twins(retrier: Retrier) -> None:
    pool = Workpool(retrier, "p", max_parallelism=2)

    @retrier.action
    async def add(a: int, b: int) -> int:
        return a + b

    async with retrier:
        work_id = await pool.enqueue_async(add, {"a": 1, "b": 2})
        assert await pool.wait_async(work_id, timeout=10) == Completed(Success(3))
        assert await pool.status_async(work_id) == Finished()
        ids = await pool.enqueue_batch_async([(add, {"a": i, "b": i}) for i in range(3)])
        for i, work_id in enumerate(ids):
            assert await pool.wait_async(work_id, timeout=10) == Completed(Success(2 * i))
        assert await pool.status_batch_async(ids) == [Finished()] * 3
        await pool.set_max_parallelism_async(0)
        later = await pool.enqueue_async(add, {"a": 0, "b": 0})
        assert await pool.cancel_all_async() == 1
        assert await pool.status_async(later) == Finished()
        another = await pool.enqueue_async(add, {"a": 0, "b": 0})
        await pool.cancel_async(another)
        assert await pool.wait_async(another, timeout=10) == Completed(Canceled())


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_lists_and_shows_pools(retrier: Retrier, db_url: str) -> None:
    pool = Workpool(
        retrier, "emails", max_parallelism=3, rate_limit=(5, 60), max_per_key=2, max_per_worker=7
    )

    @retrier.action
    def fails() -> None:
        raise RuntimeError("down")

    pool.enqueue_batch([(fails, {})] * 4)
    drain(retrier)
    pool.set_max_parallelism(0)
    pool.enqueue(fails)
    runner = CliRunner()
    listed = runner.invoke(cli, ["--db", db_url, "pools", "list"])
    assert listed.exit_code == 0, listed.output
    assert "emails" in listed.output and "paused" in listed.output
    row = next(line for line in listed.output.splitlines() if "emails" in line)
    assert [c for c in row.replace("│", " ").split() if c.isdigit()] == ["0", "0", "1", "4"]
    shown = runner.invoke(cli, ["--db", db_url, "pools", "show", "emails"])
    assert shown.exit_code == 0, shown.output
    for expected in ("5 per 60 s", "max_per_key", "2", "max_per_worker", "7"):
        assert expected in shown.output
    missing = runner.invoke(cli, ["--db", db_url, "pools", "show", "nope"])
    assert missing.exit_code == 1 and "no pool named 'nope'" in missing.output
    assert issubclass(PoolNotFound, LookupError)
