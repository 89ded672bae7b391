"""PostgreSQL claims run server-side (`tiers_claim`, retrier/_pg_claim.py); SQLite and
the budget code run the same claim in Python (`Claims.claim_in`). Here both claim the
same runs, step by step, from the same state: they must take the same runs and say
the same time to look again."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from retrier import FakeClock, Retrier
from retrier.engine import Claimed, Outcome, QueueLimits
from tests.support import drain

MakeRetrier = Callable[..., Retrier]


class _LoggedClaims:
    """Claims through `store`, logging what each took (sorted) and its wake-up time,
    and successes recorded for what was claimed: a scenario's log, compared between
    the Python and the server-side claim."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.log: list[Any] = []

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        claimed, wake_at = self.store.claim(worker, limit, 5_000)
        self.log.append((worker, sorted(c.id for c in claimed), wake_at))
        return list(claimed)

    def succeed(self, claimed: list[Claimed], worker: str) -> None:
        outcomes = [
            Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
            for c in claimed
        ]
        self.store.record(outcomes, worker, 5_000)


def scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims and records over pools with every kind of limit; what each claim did."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    @retrier.on_complete(name="flaky_handler")
    def flaky_handler(run_id: str, result: Any, context: Any) -> None:
        raise RuntimeError("fails, so the delivery waits to be tried again")

    for limits in (
        QueueLimits("capped", max_parallelism=3),
        QueueLimits("shared", max_parallelism=10, max_per_worker=2),
        QueueLimits("rated", max_parallelism=50, rate_limit=4, rate_period_ms=1000),
        QueueLimits("keyed", max_parallelism=5, max_per_key=1),
    ):
        store.set_queue(limits)
    new = []
    for i in range(40):
        queue = ["", "capped", "shared", "rated", "keyed"][i % 5]
        new.append(
            retrier.prepare(
                "work",
                {},
                queue=queue,
                key=f"k{i % 3}" if queue == "keyed" else None,
                priority=i % 4,
                due_ms=clock.now_ms() - (i % 7) * 10,
                run_id=f"run-{i:02d}",
                on_complete="flaky_handler" if i % 9 == 0 else None,
            )
        )
    retrier.submit(new)
    log: list[Any] = []

    def claim(worker: str, limit: int) -> list[Claimed]:
        claimed, wake_at = store.claim(worker, limit, 5_000)
        # Runs due at the same time with the same priority may come in either order.
        taken = sorted((c.id, c.state) for c in claimed)
        log.append((worker, [i for i, _ in taken], [state for _, state in taken], wake_at))
        return claimed

    def succeed(claimed: list[Claimed], worker: str) -> None:
        outcomes = [
            Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
            for c in claimed
        ]
        recorded = store.record(outcomes, worker, 5_000)
        delivering = sorted(f.id for f in recorded.to_deliver)
        log.append(("recorded", sorted(recorded.completed), delivering))
        if recorded.to_deliver:
            store.delivered(recorded.to_deliver, {f.id: "fails" for f in recorded.to_deliver})

    first = claim("w1", 7)
    second = claim("w2", 7)
    claim("w3", 30)
    succeed(first, "w1")
    claim("w1", 10)
    succeed(second, "w2")
    clock.advance(timedelta(milliseconds=600))  # the failed deliveries are due again
    claim("w2", 40)
    clock.advance(timedelta(seconds=1))  # the rate window has passed
    claim("w3", 40)
    drain(retrier)
    return log


def priority_scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims over pools that start by priority with aging (one with a key limit too),
    beside an unlimited queue and one in due order; what each claim took, in order."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    for limits in (
        QueueLimits("urgent", max_parallelism=6, priority_aging_ms=1_000),
        QueueLimits("fair", max_parallelism=5, max_per_key=2, priority_aging_ms=500),
        QueueLimits("plain", max_parallelism=4),
    ):
        store.set_queue(limits)
    now = clock.now_ms()
    layout = [  # queue, how many, key, priority, how long due (ms)
        ("urgent", 20, lambda i: None, lambda i: (i * 7) % 5, lambda i: (i % 10) * 50),
        ("fair", 15, lambda i: f"k{i % 3}", lambda i: i % 3, lambda i: (i % 5) * 120),
        ("plain", 8, lambda i: None, lambda i: i % 2, lambda i: i * 10),
        ("", 6, lambda i: None, lambda i: i % 3, lambda i: i * 20),
    ]
    new = [
        retrier.prepare(
            "work",
            {},
            queue=queue,
            key=key(i),
            priority=priority(i),
            due_ms=now - age(i),
            run_id=f"{queue or 'any'}-{i:02d}",
        )
        for queue, count, key, priority, age in layout
        for i in range(count)
    ]
    retrier.submit(new)
    claims = _LoggedClaims(store)
    log, claim, succeed = claims.log, claims.claim, claims.succeed

    first = claim("w1", 5)
    second = claim("w2", 9)
    succeed(first, "w1")
    clock.advance(timedelta(milliseconds=700))
    claim("w3", 4)
    succeed(second, "w2")
    claim("w1", 30)
    drain(retrier)
    return log


def round_robin_scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims over round-robin pools (one with a key limit, one that runs out of visits
    among many keys with nothing due) beside a priority pool; what each claim took."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    for limits in (
        QueueLimits("turns", max_parallelism=7, round_robin=True),
        QueueLimits("capped", max_parallelism=9, max_per_key=2, round_robin=True),
        QueueLimits("sparse", max_parallelism=3, round_robin=True),
        QueueLimits("ranked", max_parallelism=4, priority_aging_ms=1_000),
    ):
        store.set_queue(limits)
    now = clock.now_ms()
    layout = [  # queue, how many, key, how long due (ms; negative: due later)
        ("turns", 30, lambda i: "big" if i < 20 else (f"t{i % 4}" if i % 5 else None),
         lambda i: 400 - i * 10),
        ("capped", 25, lambda i: f"c{i % 3}" if i % 4 else None, lambda i: (i % 6) * 40),
        ("sparse", 40, lambda i: f"s{i:02d}", lambda i: -5_000 if i < 36 else 10),
        ("ranked", 10, lambda i: None, lambda i: i * 30),
    ]
    new = [
        retrier.prepare(
            "work",
            {},
            queue=queue,
            key=key(i),
            priority=i % 3,
            due_ms=now - age(i),
            run_id=f"{queue}-{i:02d}",
        )
        for queue, count, key, age in layout
        for i in range(count)
    ]
    retrier.submit(new)
    log: list[Any] = []

    def claim(worker: str, limit: int) -> list[Claimed]:
        claimed, wake_at = store.claim(worker, limit, 5_000)
        log.append((worker, [c.id for c in claimed], wake_at))
        return claimed

    def succeed(claimed: list[Claimed], worker: str) -> None:
        outcomes = [
            Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
            for c in claimed
        ]
        store.record(outcomes, worker, 5_000)

    first = claim("w1", 6)
    second = claim("w2", 11)
    succeed(first, "w1")
    third = claim("w3", 5)
    succeed(second, "w2")
    succeed(third, "w3")
    clock.advance(timedelta(milliseconds=300))
    claim("w1", 40)
    clock.advance(timedelta(seconds=6))
    claim("w2", 40)
    drain(retrier)
    return log


def key_limits_scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims over pools where some keys have caps of their own (one key paused),
    with and without a default `max_per_key`, in due, priority and round-robin order;
    caps changed between claims."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    for limits in (
        QueueLimits("tenants", max_parallelism=10, max_per_key=3),
        QueueLimits("own", max_parallelism=8, priority_aging_ms=1_000),
        QueueLimits("turns", max_parallelism=9, round_robin=True),
    ):
        store.set_queue(limits)
    for queue, key, cap in (
        ("tenants", "t0", 1), ("tenants", "t1", 0), ("tenants", "t2", 5),
        ("own", "t0", 2), ("turns", "t1", 1), ("turns", "t3", 0),
    ):
        store.set_key_limit(queue, key, cap)
    now = clock.now_ms()
    new = [
        retrier.prepare(
            "work",
            {},
            queue=queue,
            key=f"t{i % 4}" if i % 5 else None,
            priority=i % 3,
            due_ms=now - (i % 7) * 20,
            run_id=f"{queue}-{i:02d}",
        )
        for queue in ("tenants", "own", "turns")
        for i in range(24)
    ]
    retrier.submit(new)
    claims = _LoggedClaims(store)
    log, claim, succeed = claims.log, claims.claim, claims.succeed

    first = claim("w1", 8)
    second = claim("w2", 30)
    succeed(first, "w1")
    store.set_key_limit("tenants", "t1", 2)  # unpaused
    store.set_key_limit("own", "t0", None)  # back to no limit
    store.set_key_limit("turns", "t2", 1)
    third = claim("w3", 12)
    succeed(second, "w2")
    succeed(third, "w3")
    claim("w1", 40)
    drain(retrier)
    return log


def key_rate_scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims over pools with a rate limit per key (with a cap per key, keys taking
    turns, priorities), windows filling and reopening; what each claim took, and
    when it said to look again."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    for limits in (
        QueueLimits("rated", max_parallelism=20, key_rate_limit=2, key_rate_period_ms=1_000,
                    priority_aging_ms=5_000),
        QueueLimits("both", max_parallelism=20, max_per_key=1, key_rate_limit=3,
                    key_rate_period_ms=700),
        QueueLimits("turns", max_parallelism=20, round_robin=True, key_rate_limit=1,
                    key_rate_period_ms=400),
    ):
        store.set_queue(limits)
    store.set_key_limit("both", "t1", 2)
    now = clock.now_ms()
    new = [
        retrier.prepare(
            "work",
            {},
            queue=queue,
            key=f"t{i % 3}" if i % 4 else None,
            priority=i % 2,
            due_ms=now - (i % 5) * 30,
            run_id=f"{queue}-{i:02d}",
        )
        for queue in ("rated", "both", "turns")
        for i in range(18)
    ]
    retrier.submit(new)
    claims = _LoggedClaims(store)
    log, claim, succeed = claims.log, claims.claim, claims.succeed

    for step in range(6):
        taken = claim(f"w{step % 2}", 10 + step)
        succeed(taken, f"w{step % 2}")
        clock.advance(timedelta(milliseconds=250))
    drain(retrier)
    return log


def groups_scenario(retrier: Retrier, clock: FakeClock) -> list[Any]:
    """Claims over two pool groups whose members have guarantees (one member keyed,
    one whose keys take turns, one by priority), beside a pool of no group; claims
    cut short by their limit, items finishing, runs due later, caps changed."""
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    store.set_group("gpu", 8)
    store.set_group("cpu", 4)
    for limits in (
        QueueLimits("train", max_parallelism=6, group_name="gpu", guaranteed=3,
                    priority_aging_ms=1_000),
        QueueLimits("infer", max_parallelism=8, group_name="gpu", guaranteed=2,
                    max_per_key=2),
        QueueLimits("batch", max_parallelism=8, group_name="gpu", guaranteed=0,
                    round_robin=True),
        QueueLimits("etl", max_parallelism=4, group_name="cpu", guaranteed=1),
        QueueLimits("mail", max_parallelism=4, group_name="cpu", guaranteed=3),
        QueueLimits("free", max_parallelism=3),
    ):
        store.set_queue(limits)
    now = clock.now_ms()
    new = [
        retrier.prepare(
            "work",
            {},
            queue=queue,
            key=f"k{i % 3}" if queue in ("infer", "batch") else None,
            priority=i % 3,
            due_ms=now - (i * 37) % 200 + (400 if i % 6 == 5 else 0),
            run_id=f"{queue}-{i:02d}",
        )
        for queue, count in (("train", 14), ("infer", 9), ("batch", 16), ("etl", 10),
                             ("free", 5))
        for i in range(count)
    ]
    retrier.submit(new)
    claims = _LoggedClaims(store)
    log, claim, succeed = claims.log, claims.claim, claims.succeed

    first = claim("w1", 5)  # cut short by its limit
    second = claim("w2", 40)
    succeed(first[:3], "w1")
    retrier.submit([
        retrier.prepare("work", {}, queue="mail", due_ms=clock.now_ms(), run_id=f"mail-{i}")
        for i in range(4)
    ])
    third = claim("w3", 40)
    succeed(second, "w2")
    store.set_group("gpu", 10)
    clock.advance(timedelta(milliseconds=500))  # the later runs are due
    fourth = claim("w1", 7)
    succeed(third + first[3:], "w3")
    claim("w2", 40)
    succeed(fourth, "w1")
    claim("w3", 40)
    drain(retrier)
    return log


@pytest.mark.parametrize(
    "script",
    [scenario, priority_scenario, round_robin_scenario, key_limits_scenario, key_rate_scenario,
     groups_scenario],
)
def test_the_server_claim_takes_what_the_python_claim_takes(
    db_url: str, script: Callable[[Retrier, FakeClock], list[Any]]
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("only PostgreSQL claims server-side")
    logs = []
    for server_side in (True, False):
        with fresh_schema(db_url) as url:
            clock = FakeClock()
            retrier = Retrier(url, clock=clock)
            try:
                retrier.store.dialect.server_claim = server_side  # type: ignore[misc]
                logs.append(script(retrier, clock))
            finally:
                retrier.close()
    assert logs[0] == logs[1]
    claims = [entry for entry in logs[0] if entry[0] != "recorded"]
    assert any(entry[1] for entry in claims), "the scenario claims something"
    if script is scenario:
        assert any("delivering" in entry[2] for entry in claims), "it claims deliveries too"


@contextmanager
def fresh_schema(db_url: str) -> Iterator[str]:
    """Another empty PostgreSQL schema on the same server."""
    import psycopg

    from tests.conftest import PG_BASE, _libpq

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(PG_BASE), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(PG_BASE), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.parametrize("wall_clock", [True, False], ids=["wall-clock", "fake-clock"])
def test_a_claim_that_waited_for_a_lock_stamps_its_runs_on_its_own_clock(
    make_retrier: MakeRetrier, wall_clock: bool
) -> None:
    """A claim that waited for another writer's lock stamps its runs as started after
    that writer committed, on the wall clock (PostgreSQL's claim ignores a wait under
    5 ms); on a fake clock, which a lock wait does not move, at the time it was given."""
    clock = None if wall_clock else FakeClock()
    retrier = make_retrier() if clock is None else make_retrier(clock=clock)
    store = retrier.store

    @retrier.action(name="work")
    def work() -> None: ...

    store.set_queue(QueueLimits("capped", max_parallelism=3))
    retrier.submit([retrier.prepare("work", {}, queue="capped", due_ms=store.clock.now_ms())])
    holding, committed_at = threading.Event(), []

    def hold_the_queue_row() -> None:
        with store.dialect.write() as conn:
            # Locks the queue's row (PostgreSQL) or the database (SQLite).
            conn.execute(
                text("UPDATE tiers_queues SET max_parallelism = 3 WHERE name = 'capped'")
            )
            holding.set()
            time.sleep(0.3)
            committed_at.append(time.time() * 1000)

    holder = threading.Thread(target=hold_the_queue_row)
    holder.start()
    assert holding.wait(10)
    given = store.clock.now_ms()
    claimed, _ = store.claim("w", 5, 5_000)
    holder.join(10)
    assert len(claimed) == 1
    if clock is None:
        assert claimed[0].started_ms >= committed_at[0] - 5, "stamped before the lock"
    else:
        assert claimed[0].started_ms == given == clock.now_ms()


def test_a_claim_does_not_wait_for_a_limited_queue_it_has_nothing_to_claim_from(
    db_url: str,
) -> None:
    """A claim locks the rows of the limited queues that have claimable runs (and of
    their pool groups' members) only: while another claim holds an idle pool's row,
    runs of other queues are claimed without waiting for it."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's writers take the whole database's lock")
    import psycopg

    from tests.conftest import _libpq

    retrier = Retrier(db_url, clock=FakeClock())
    try:
        store = retrier.store

        @retrier.action(name="work")
        def work() -> None: ...

        store.set_queue(QueueLimits("idle_pool", max_parallelism=3))
        store.set_queue(QueueLimits("busy_pool", max_parallelism=3))
        now = store.clock.now_ms()
        retrier.submit([
            retrier.prepare("work", {}, due_ms=now, run_id="plain"),
            retrier.prepare("work", {}, queue="busy_pool", due_ms=now, run_id="pooled"),
        ])
        with psycopg.connect(_libpq(db_url)) as holder:
            holder.execute("SELECT 1 FROM tiers_queues WHERE name = 'idle_pool' FOR UPDATE")
            claimed: list[Any] = []
            claimer = threading.Thread(
                target=lambda: claimed.extend(store.claim("w", 5, 5_000)[0]), daemon=True
            )
            claimer.start()
            claimer.join(5)
            assert not claimer.is_alive(), "the claim waited for the idle pool's lock"
            holder.rollback()
        assert sorted(c.id for c in claimed) == ["plain", "pooled"]
    finally:
        retrier.close()
