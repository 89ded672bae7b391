"""Engine hooks the workflow tier builds on: runs started inline by the worker that
executes them, runs inserted with a known outcome, and the current-worker contextvar."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from retrier import Canceled, Completed, Failed, Retrier, Success
from retrier._worker import Worker, current_worker
from retrier.engine import ANYTHING, Delivery, QueueLimits
from tests.support import drain


def test_insert_running_respects_the_queue_limit(retrier: Retrier) -> None:
    @retrier.action
    def work() -> None: ...

    retrier.store.set_queue(QueueLimits("q", max_parallelism=1))
    first = retrier.prepare(work, {}, queue="q")
    second = retrier.prepare(work, {}, queue="q")
    with retrier.store.dialect.write() as conn:
        claimed = retrier.store.insert_running(first, "me", 5000, conn)
    assert claimed is not None and claimed.fence == 1
    with retrier.store.dialect.write() as conn:
        assert retrier.store.insert_running(second, "me", 5000, conn) is None
    row = retrier.store.get(first.id)
    assert (row.state, row.lease_owner, row.attempts) == ("running", "me", 1)
    assert retrier.store.states([second.id]) == {}, "nothing written when the queue is full"


def test_insert_running_respects_a_keys_own_cap(retrier: Retrier) -> None:
    """A key's cap of its own (no `max_per_key` on the queue) holds for inline starts
    too: the overrides are read with the queue's counts."""

    @retrier.action
    def work() -> None: ...

    retrier.store.set_queue(QueueLimits("q", max_parallelism=10))
    retrier.store.set_key_limit("q", "tenant", 1)
    first, second, other = (
        retrier.prepare(work, {}, queue="q", key=k) for k in ("tenant", "tenant", "other")
    )
    with retrier.store.dialect.write() as conn:
        assert retrier.store.insert_running(first, "me", 5000, conn) is not None
    with retrier.store.dialect.write() as conn:
        assert retrier.store.insert_running(second, "me", 5000, conn) is None, "key full"
        assert retrier.store.insert_running(other, "me", 5000, conn) is not None


def test_an_inline_start_that_waits_for_a_claim_counts_what_the_claim_started(
    retrier: Retrier,
) -> None:
    """The queue's row lock orders a claim and an inline start; the inline start must
    count running runs after it has the lock. (On PostgreSQL a count read in the
    locking statement itself comes from before the wait, and missed the claimed run.)"""

    @retrier.action
    def work() -> None: ...

    store = retrier.store
    store.set_queue(QueueLimits("q", max_parallelism=1))
    store.insert_runs([retrier.prepare(work, {}, queue="q")])
    inline = retrier.prepare(work, {}, queue="q")
    claimed, commit = threading.Event(), threading.Event()
    started: list[Any] = []

    def claim_and_hold() -> None:
        with store.dialect.write_internal() as conn:
            started.extend(store._claims.claim_in(conn, "claimer", 10, 5000, ANYTHING)[0])
            claimed.set()
            assert commit.wait(10)

    def start_inline() -> None:
        with store.dialect.write() as conn:
            started.append(store.insert_running(inline, "inline", 5000, conn))

    claimer = threading.Thread(target=claim_and_hold)
    claimer.start()
    assert claimed.wait(10)
    starter = threading.Thread(target=start_inline)
    starter.start()
    _until_a_writer_waits(retrier)
    commit.set()
    claimer.join(10)
    starter.join(10)
    assert len(started) == 2 and started[1] is None, started
    assert store.queue_counts("q", 0)["running"] == 1


def _until_a_writer_waits(retrier: Retrier) -> None:
    """Return once another connection is blocked on a lock (PostgreSQL), or after a
    moment (SQLite, where the waiter is in its busy handler and invisible)."""
    if retrier.store.dialect.name != "postgresql":
        time.sleep(0.2)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with retrier.engine.connect() as conn:
            waiting = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar()
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("the inline start never waited for the claim's lock")


def test_a_claimed_run_attempted_inline_records_with_the_given_handler(
    retrier: Retrier,
) -> None:
    @retrier.action
    def double(x: int) -> int:
        return 2 * x

    @retrier.on_complete
    def registered(run_id: str, result: Any, context: Any, session: Any) -> None:
        raise AssertionError("the inline handler stands in for this one")

    seen: list[tuple[str, Any]] = []
    workers: list[Worker | None] = []

    @retrier.action
    async def outer() -> int:
        worker = current_worker.get()
        workers.append(worker)
        assert worker is not None
        new = retrier.prepare(double, {"x": 21}, on_complete=registered)
        with retrier.store.dialect.write() as conn:
            claimed = retrier.store.insert_running(new, worker.id, 5000, conn)
        assert claimed is not None

        def inline(f: Delivery, session: Any) -> None:
            seen.append((f.id, f.result))
            session.execute(text("SELECT 1"))

        outcome = await worker.attempt_claimed(claimed, inline)
        recorded = await retrier.store.dialect.call(worker.settle_claimed, [outcome], inline)
        assert claimed.id in recorded.completed and outcome.kind == "success"
        return int(outcome.result)

    run_id = retrier.run(outer)
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success(42))
    assert len(seen) == 1 and seen[0][1] == 42
    assert retrier.status(seen[0][0]) == Completed(Success(42))
    assert workers[0] is not None
    assert current_worker.get() is None
    # Its attempt is stored with the completion (on PostgreSQL, by the same statement).
    [attempt] = retrier.store.attempts(seen[0][0])
    assert (attempt.number, attempt.outcome, attempt.worker) == (1, "success", workers[0].id)
    assert attempt.finished_ms >= attempt.started_ms > 0


def test_insert_finished_delivers_its_on_complete_once(retrier: Retrier) -> None:
    @retrier.action
    def noop() -> None: ...

    calls: list[Any] = []

    @retrier.on_complete
    def done(run_id: str, result: Any, context: Any) -> None:
        calls.append((run_id, result, context))

    new = retrier.prepare(noop, {}, on_complete=done, context={"k": 1})
    with retrier.store.dialect.write() as conn:
        retrier.store.insert_finished(new, "failed", conn, error="boom")
    drain(retrier)
    drain(retrier)
    assert calls == [(new.id, Failed("boom"), {"k": 1})]
    assert retrier.status(new.id) == Completed(Failed("boom"))


def test_an_inline_run_canceled_while_it_ran_is_recorded_canceled(retrier: Retrier) -> None:
    """A success that races a cancel request must not complete the run as a success
    (the one-statement completion of inline runs excludes cancel-requested rows)."""
    ids: list[str] = []

    @retrier.action
    def work() -> int:
        retrier.cancel(ids[0])  # requested while running: best effort, noticed at record
        return 1

    seen: list[str] = []

    @retrier.on_complete
    def registered(run_id: str, result: Any, context: Any, session: Any) -> None:
        raise AssertionError("the inline handler stands in for this one")

    @retrier.action
    async def outer() -> bool:
        worker = current_worker.get()
        assert worker is not None
        new = retrier.prepare(work, {}, on_complete=registered)
        ids.append(new.id)
        with retrier.store.dialect.write() as conn:
            claimed = retrier.store.insert_running(new, worker.id, 5000, conn)
        assert claimed is not None

        def inline(f: Delivery, session: Any) -> None:
            seen.append(f.outcome)

        outcome = await worker.attempt_claimed(claimed, inline)
        recorded = await retrier.store.dialect.call(worker.settle_claimed, [outcome], inline)
        return claimed.id in recorded.completed

    run_id = retrier.run(outer)
    drain(retrier)
    assert retrier.status(run_id) == Completed(Success(True))
    assert seen == ["canceled"]
    assert retrier.status(ids[0]) == Completed(Canceled())


def test_a_batch_of_plain_successes_leaves_stale_and_canceled_runs_to_the_general_record(
    retrier: Retrier,
) -> None:
    """Plain successes (no on_complete) are completed in one batch without reading the
    rows; one whose lease moved on, or whose cancel was requested, must still be found
    and recorded as stale or canceled."""
    from sqlalchemy import update

    from retrier._tables import runs
    from retrier.engine import Outcome

    @retrier.action
    def work(i: int) -> int:
        return i

    ids = [retrier.run(work, {"i": i}) for i in range(4)]
    claimed, _ = retrier.store.claim("me", 10, 5000)
    assert sorted(c.id for c in claimed) == sorted(ids)
    stale, canceled = ids[0], ids[1]
    with retrier.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == stale).values(fence=runs.c.fence + 1))
    retrier.cancel(canceled)
    outcomes = [
        Outcome(c.id, c.fence, "success", c.started_ms, result=7, attempt=c.attempts,
                queue=c.queue, plain=True)
        for c in claimed
    ]
    recorded = retrier.store.record(outcomes, "me", 5000)
    assert sorted(recorded.completed) == sorted([ids[1], ids[2], ids[3]])
    assert recorded.stale == [stale]
    assert retrier.status(ids[2]) == Completed(Success(7))
    assert retrier.status(canceled) == Completed(Canceled())
    assert retrier.store.get(stale).state == "running"
    with retrier.engine.connect() as conn:
        attempts = conn.execute(text("SELECT run_id, outcome FROM tiers_attempts")).all()
    assert sorted(attempts) == sorted(
        [(ids[1], "canceled"), (ids[2], "success"), (ids[3], "success")]
    )


@pytest.mark.anyio
async def test_sqlite_store_calls_wait_for_a_locked_database_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    """On SQLite a store call runs on the event loop while the database is free. When
    another connection holds the write lock, the call must neither fail nor block the
    loop: it retries after async sleeps, then waits on a thread, and completes once
    the lock is released. (PostgreSQL store calls always run on threads.)"""
    retrier = Retrier(f"sqlite:///{tmp_path / 'locked.db'}")
    import sqlite3
    import threading

    import anyio

    @retrier.action
    def work() -> None: ...

    run_id = retrier.run(work)
    path = retrier.engine.url.database
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, as far as we know
    threading.Timer(0.6, holder.rollback).start()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        started = anyio.current_time()
        claimed, _ = await retrier.store.dialect.call(retrier.store.claim, "me", 5, 5000)
        waited = anyio.current_time() - started
        tg.cancel_scope.cancel()
    holder.close()
    retrier.close()
    assert [c.id for c in claimed] == [run_id]
    assert waited >= 0.5, "the claim went through while another writer held the lock"
    assert ticks >= 0.5 * waited / 0.01, f"the loop stalled: {ticks} ticks in {waited:.2f} s"
