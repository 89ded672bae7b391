"""Idempotency keys and debounce on every tier, on SQLite and PostgreSQL.

Timing runs on a FakeClock (debounce periods); concurrent callers are threads with a
Retrier each (their own connections) and real processes.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from retrier import (
    Completed,
    Debounce,
    FakeClock,
    InvalidSettings,
    Retrier,
    Success,
)
from retrier._cli import main as cli
from retrier.engine import to_ms
from retrier.testing import advance, drain
from tests.support import Calls
from workflow import WorkflowContext, WorkflowManager
from workpool import InvalidBatchItem, Workpool

MakeRetrier = Callable[..., Retrier]


def count_runs(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar() or 0)


def echo(n: int) -> int:
    return n


# -- idempotency keys ----------------------------------------------------------------------


def test_run_with_an_idempotency_key_returns_the_stored_run(retrier: Retrier) -> None:
    retrier.action(echo)
    first = retrier.run(echo, {"n": 1}, idempotency_key="order-1")
    assert retrier.run(echo, {"n": 2}, idempotency_key="order-1") == first
    other = retrier.run(echo, {"n": 3}, idempotency_key="order-2")
    assert other != first
    assert retrier.run(echo, {"n": 4}) not in (first, other)  # no key: always a new run
    assert count_runs(retrier) == 3
    drain(retrier)
    assert retrier.status(first) == Completed(Success(1)), "the first call's args ran"
    assert retrier.run(echo, {"n": 5}, idempotency_key="order-1") == first, "also once done"
    retrier.cleanup(first)
    again = retrier.run(echo, {"n": 6}, idempotency_key="order-1")
    assert again != first, "a deleted run frees its key"
    drain(retrier)
    assert retrier.status(again) == Completed(Success(6))


def test_retention_frees_a_key(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock, retention=timedelta(days=1))
    retrier.action(echo)
    pool = Workpool(retrier, "p", max_parallelism=5)
    first = pool.enqueue(echo, {"n": 1}, idempotency_key="k")
    drain(pool)
    clock.advance(timedelta(hours=23))
    assert retrier.store.purge_completed(to_ms(retrier.retention)) == 0
    assert pool.enqueue(echo, {"n": 2}, idempotency_key="k") == first
    clock.advance(timedelta(hours=2))
    assert retrier.store.purge_completed(to_ms(retrier.retention)) == 1
    assert pool.enqueue(echo, {"n": 3}, idempotency_key="k") != first


def test_run_at_and_run_after_take_an_idempotency_key(retrier: Retrier) -> None:
    retrier.action(echo)
    a = retrier.run_after(60, echo, {"n": 1}, idempotency_key="k")
    assert retrier.run(echo, {"n": 1}, idempotency_key="k") == a
    assert retrier.run_at(datetime.now(UTC), echo, {"n": 1}, idempotency_key="k") == a


def test_keys_are_scoped_per_pool_and_key_stays_the_concurrency_key(retrier: Retrier) -> None:
    retrier.action(echo)
    emails = Workpool(retrier, "emails", max_parallelism=2)
    sms = Workpool(retrier, "sms", max_parallelism=2)
    a = emails.enqueue(echo, {"n": 1}, idempotency_key="user-7")
    assert emails.enqueue(echo, {"n": 2}, idempotency_key="user-7") == a
    b = sms.enqueue(echo, {"n": 1}, idempotency_key="user-7")
    plain = retrier.run(echo, {"n": 1}, idempotency_key="user-7")
    assert len({a, b, plain}) == 3, "each pool, and the retrier's own runs, have their keys"
    # `key` groups items for max_per_key: never deduplicates.
    c = emails.enqueue(echo, {"n": 1}, key="tenant-1")
    d = emails.enqueue(echo, {"n": 1}, key="tenant-1")
    assert c != d
    assert count_runs(retrier) == 5


def test_a_batch_resolves_keys_stored_and_repeated(retrier: Retrier) -> None:
    retrier.action(echo)
    pool = Workpool(retrier, "p", max_parallelism=5)
    stored = pool.enqueue(echo, {"n": 0}, idempotency_key="a")
    ids = pool.enqueue_batch(
        [
            (echo, {"n": 1}, {"idempotency_key": "a"}),
            (echo, {"n": 2}, {"idempotency_key": "b"}),
            (echo, {"n": 3}),
            (echo, {"n": 4}, {"idempotency_key": "b"}),
        ]
    )
    assert ids[0] == stored
    assert ids[3] == ids[1] and ids[1] != stored
    assert len(set(ids)) == 3
    assert count_runs(retrier) == 3
    drain(pool)
    assert pool.wait(ids[1], timeout=5) == Completed(Success(2)), "the first of the batch"


def test_a_key_in_the_callers_transaction(retrier: Retrier) -> None:
    retrier.action(echo)
    with retrier.session() as session:
        a = retrier.run(echo, {"n": 1}, idempotency_key="k", session=session)
        assert retrier.run(echo, {"n": 2}, idempotency_key="k", session=session) == a
        session.rollback()
    assert count_runs(retrier) == 0, "rolled back with the caller's transaction"
    with retrier.session() as session:
        b = retrier.run(echo, {"n": 3}, idempotency_key="k", session=session)
        session.commit()
    assert b != a
    assert retrier.run(echo, {"n": 4}, idempotency_key="k") == b


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_a_call_waits_for_a_transaction_holding_its_key(
    make_retrier: MakeRetrier, ending: str
) -> None:
    """Another transaction holds the key uncommitted: the call waits for it to end,
    then gets its run (committed) or stores its own (rolled back)."""
    holder, caller = make_retrier(), make_retrier()
    for r in (holder, caller):
        r.action(echo)
    got: list[str] = []
    with holder.session() as session:
        held = holder.run(echo, {"n": 1}, idempotency_key="k", session=session)
        thread = threading.Thread(
            target=lambda: got.append(caller.run(echo, {"n": 2}, idempotency_key="k"))
        )
        thread.start()
        thread.join(0.3)
        assert thread.is_alive(), "it waits for the holder's transaction"
        getattr(session, ending)()
    thread.join(10)
    assert not thread.is_alive()
    if ending == "commit":
        assert got == [held]
    else:
        assert got and got[0] != held
    assert count_runs(caller) == 1


def test_concurrent_callers_on_threads_get_one_run(make_retrier: MakeRetrier) -> None:
    callers = [make_retrier() for _ in range(4)]
    pools = []
    for r in callers:
        r.action(echo)
        pools.append(Workpool(r, "p", max_parallelism=5))
    ids: list[list[str]] = [[] for _ in callers]
    start = threading.Barrier(len(callers))

    def call(i: int) -> None:
        start.wait()
        keys = [f"k{j}" for j in range(15)]
        random.Random(i).shuffle(keys)
        for key in keys:
            ids[i].append(pools[i].enqueue(echo, {"n": i}, idempotency_key=key))
        ids[i] = [x for _, x in sorted(zip(keys, ids[i], strict=True))]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(got == ids[0] for got in ids), "every caller got the same id for a key"
    assert len(set(ids[0])) == 15
    assert count_runs(callers[0]) == 15


def _call_in_process(url: str, seed: int, keys: list[str], debounce: bool) -> list[str]:
    retrier = Retrier(url)
    try:
        retrier.action(echo)
        pool = Workpool(retrier, "p", max_parallelism=5)
        order = list(keys)
        random.Random(seed).shuffle(order)
        got = {}
        for key in order:
            if debounce:
                got[key] = pool.enqueue(echo, {"n": seed}, debounce=Debounce(key, 3600))
            else:
                got[key] = pool.enqueue(echo, {"n": seed}, idempotency_key=key)
        return [got[k] for k in keys]
    finally:
        retrier.close()


@pytest.mark.parametrize("debounce", [False, True], ids=["idempotency", "debounce"])
def test_concurrent_callers_in_processes_get_one_run(
    make_retrier: MakeRetrier, db_url: str, debounce: bool
) -> None:
    retrier = make_retrier()  # migrates the schema before the processes start
    retrier.action(echo)
    keys = [f"k{j}" for j in range(20)]
    with multiprocessing.get_context("spawn").Pool(4) as procs:
        results = procs.starmap(
            _call_in_process, [(db_url, seed, keys, debounce) for seed in range(4)]
        )
    assert all(got == results[0] for got in results)
    assert len(set(results[0])) == 20
    assert count_runs(retrier) == 20


# -- debounce --------------------------------------------------------------------------------


def test_debounced_calls_collapse_into_one_run_with_the_latest_args(
    make_retrier: MakeRetrier,
) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    seen = Calls()

    @retrier.action
    def reindex(n: int) -> int:
        seen.add(n)
        return n

    pool = Workpool(retrier, "p", max_parallelism=5)
    t0 = clock.now_ms()
    d = Debounce("doc-7", timedelta(seconds=5))
    first = pool.enqueue(reindex, {"n": 1}, debounce=d, context={"c": 1})
    assert retrier.store.get(first).due_ms == t0 + 5000
    advance(pool, 3)
    assert pool.enqueue(reindex, {"n": 2}, debounce=d) == first
    assert retrier.store.get(first).due_ms == t0 + 8000, "period after the last call"
    advance(pool, 4.999)
    assert seen.items == []
    advance(pool, 0.001)
    assert seen.items == [2], "one run, with the latest args"
    nxt = pool.enqueue(reindex, {"n": 3}, debounce=d)
    assert nxt != first, "once it has started, the next call makes a new run"
    other = pool.enqueue(reindex, {"n": 4}, debounce=Debounce("doc-8", 5))
    assert other != nxt
    advance(pool, 5)
    assert sorted(seen.items) == [2, 3, 4]


def test_max_wait_bounds_how_long_calls_can_push_the_start(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    retrier.action(echo)
    t0 = clock.now_ms()
    d = Debounce("k", timedelta(seconds=5), max_wait=timedelta(seconds=12))
    first = retrier.run(echo, {"n": 0}, debounce=d)
    for n in range(1, 5):  # a call every 4 s: each within the period
        advance(retrier, 4)
        if n < 3:
            assert retrier.run(echo, {"n": n}, debounce=d) == first
            assert retrier.store.get(first).due_ms == min(clock.now_ms() + 5000, t0 + 12_000)
    assert retrier.status(first) == Completed(Success(2)), "started 12 s after the first call"
    assert retrier.store.get(first).started_ms == t0 + 12_000


def test_a_debounced_run_that_has_started_is_never_changed(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    retrier.action(echo)
    d = Debounce("k", 1)
    first = retrier.run(echo, {"n": 1}, debounce=d)
    clock.advance(1)
    claimed, _ = retrier.store.claim("hand", 5, 5000)
    assert [c.id for c in claimed] == [first]
    second = retrier.run(echo, {"n": 2}, debounce=d)
    assert second != first
    assert retrier.store.get(first).args == {"n": 1}
    retrier.cancel(second)
    assert retrier.run(echo, {"n": 3}, debounce=d) not in (first, second), "nor a canceled one"


def test_debounce_keys_are_per_function(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())
    retrier.action(echo)

    @retrier.action
    def other(n: int) -> int:
        return n

    d = Debounce("k", 5)
    assert retrier.run(echo, {"n": 1}, debounce=d) != retrier.run(other, {"n": 1}, debounce=d)


def test_debounce_in_the_callers_transaction_and_in_a_batch(make_retrier: MakeRetrier) -> None:
    retrier = make_retrier(clock=FakeClock())
    retrier.action(echo)
    pool = Workpool(retrier, "p", max_parallelism=5)
    d = Debounce("k", 5)
    with retrier.session() as session:
        a = pool.enqueue(echo, {"n": 1}, debounce=d, session=session)
        assert pool.enqueue(echo, {"n": 2}, debounce=d, session=session) == a
        session.commit()
    ids = pool.enqueue_batch([(echo, {"n": 3}, {"debounce": d}), (echo, {"n": 4})])
    assert ids[0] == a
    assert retrier.store.get(a).args == {"n": 3}
    assert count_runs(retrier) == 2


def test_concurrent_debounced_callers_on_threads_get_one_run(make_retrier: MakeRetrier) -> None:
    callers = [make_retrier() for _ in range(4)]
    for r in callers:
        r.action(echo)
    got: list[str] = []
    start = threading.Barrier(len(callers))

    def call(r: Retrier, i: int) -> None:
        start.wait()
        for n in range(10):
            got.append(r.run(echo, {"n": i * 100 + n}, debounce=Debounce("k", 3600)))

    threads = [threading.Thread(target=call, args=(r, i)) for i, r in enumerate(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 40 and len(set(got)) == 1
    assert count_runs(callers[0]) == 1


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Debounce("k", 0), "must be positive"),
        (lambda: Debounce("k", -1), "debounce period"),
        (lambda: Debounce("k", timedelta(0)), "must be positive"),
        (lambda: Debounce("k", 5, max_wait=4), "must not be shorter"),
        (lambda: Debounce("k", float("nan")), "debounce period"),
        (lambda: Debounce("k", True), "debounce period"),  # type: ignore[arg-type]
        (lambda: Debounce("", 5), "debounce key"),
        (lambda: Debounce(" ", 5), "debounce key"),
        (lambda: Debounce("a\x00b", 5), "debounce key"),
        (lambda: Debounce("k" * 201, 5), "debounce key"),
        (lambda: Debounce(7, 5), "debounce key"),  # type: ignore[arg-type]
        (lambda: Debounce("k", 5, max_wait=-1), "max_wait"),
    ],
)
def test_bad_debounce_settings_are_refused(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(InvalidSettings, match=message):
        make()


def test_bad_keys_are_refused_before_anything_is_written(retrier: Retrier) -> None:
    retrier.action(echo)
    pool = Workpool(retrier, "p", max_parallelism=5)
    bad: list[Callable[[], Any]] = [
        lambda: retrier.run(echo, {"n": 1}, idempotency_key=""),
        lambda: retrier.run(echo, {"n": 1}, idempotency_key="x" * 201),
        lambda: retrier.run(echo, {"n": 1}, idempotency_key=7),  # type: ignore[arg-type]
        lambda: retrier.run_after(1, echo, {"n": 1}, idempotency_key="a\x00"),
        lambda: retrier.run(echo, {"n": 1}, debounce="k"),  # type: ignore[arg-type]
        lambda: retrier.run(echo, {"n": 1}, idempotency_key="k", debounce=Debounce("k", 1)),
        lambda: pool.enqueue(echo, {"n": 1}, idempotency_key=" "),
        lambda: pool.enqueue(echo, {"n": 1}, debounce=Debounce("k", 1), run_after=5),
        lambda: pool.enqueue(echo, {"n": 1}, debounce={"key": "k"}),  # type: ignore[arg-type]
    ]
    for call in bad:
        with pytest.raises(InvalidSettings):
            call()
    with pytest.raises(InvalidBatchItem):
        pool.enqueue_batch([(echo, {"n": 1}), (echo, {"n": 2}, {"idempotency_key": ""})])
    assert count_runs(retrier) == 0


# -- workflows ---------------------------------------------------------------------------------


def _workflows(retrier: Retrier, seen: Calls | None = None) -> WorkflowManager:
    """A manager with one workflow, `job(order_id)`, that records what it ran with."""
    record = seen if seen is not None else Calls()

    @retrier.action
    def note(order_id: str) -> str:
        record.add(order_id)
        return order_id

    workflows = WorkflowManager(Workpool(retrier, "steps", max_parallelism=4))

    @workflows.define(name="job")
    async def job(ctx: WorkflowContext, order_id: str) -> str:
        return str(await ctx.step("note", note, {"order_id": order_id}))

    @workflows.define(name="other")
    async def other(ctx: WorkflowContext, order_id: str) -> str:
        return order_id

    return workflows


def count_workflows(retrier: Retrier) -> int:
    with retrier.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tiers_workflows")).scalar() or 0)


def test_workflow_key_is_the_deprecated_name_of_idempotency_key(retrier: Retrier) -> None:
    workflows = _workflows(retrier)
    first = workflows.start("job", {"order_id": "o1"}, idempotency_key="order-o1")
    with pytest.warns(DeprecationWarning, match="idempotency_key"):
        assert workflows.start("job", {"order_id": "o1"}, key="order-o1") == first
    with pytest.raises(InvalidSettings, match="not also key"):
        workflows.start("job", {"order_id": "o1"}, key="a", idempotency_key="a")
    (info,) = workflows.list()
    assert info.idempotency_key == "order-o1"
    with pytest.warns(DeprecationWarning, match="idempotency_key"):
        assert info.key == "order-o1"
    assert count_workflows(retrier) == 1


def test_concurrent_workflow_starts_with_one_key_start_one(make_retrier: MakeRetrier) -> None:
    managers = [_workflows(make_retrier()) for _ in range(4)]
    got: list[str] = []
    start = threading.Barrier(len(managers))

    def call(workflows: WorkflowManager) -> None:
        start.wait()
        for n in range(5):
            got.append(workflows.start("job", {"order_id": f"o{n}"}, idempotency_key=f"k{n}"))

    threads = [threading.Thread(target=call, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 20 and len(set(got)) == 5
    retrier = managers[0].retrier
    assert count_workflows(retrier) == 5
    with retrier.engine.connect() as conn:
        drivers = conn.execute(text("SELECT count(*) FROM tiers_runs")).scalar()
    assert drivers == 5, "one driver run per workflow started"


def test_a_keyed_workflow_start_in_the_callers_transaction(retrier: Retrier) -> None:
    workflows = _workflows(retrier)
    with retrier.session() as session:
        a = workflows.start("job", {"order_id": "o1"}, idempotency_key="k", session=session)
        assert workflows.start("job", {"order_id": "o2"}, idempotency_key="k", session=session) == a
        session.rollback()
    assert count_workflows(retrier) == 0
    b = workflows.start("job", {"order_id": "o3"}, idempotency_key="k")
    assert b != a


def test_debounced_workflow_starts_collapse_into_one(make_retrier: MakeRetrier) -> None:
    clock = FakeClock()
    retrier = make_retrier(clock=clock)
    seen = Calls()
    workflows = _workflows(retrier, seen)
    d = Debounce("customer-9", timedelta(seconds=10), max_wait=timedelta(seconds=15))
    first = workflows.start("job", {"order_id": "o1"}, debounce=d, context={"v": 1})
    advance(retrier, 6)
    assert workflows.start("job", {"order_id": "o2"}, debounce=d) == first
    assert workflows.start("other", {"order_id": "x"}, debounce=d) != first, "per workflow"
    advance(retrier, 6)
    assert workflows.start("job", {"order_id": "o3"}, debounce=d) == first
    advance(retrier, 2.999)
    assert seen.items == []
    advance(retrier, 0.001)  # 15 s after the first call: max_wait
    assert seen.items == ["o3"], "one workflow, with the latest args"
    assert workflows.status(first) == Completed(Success("o3"))
    assert workflows.start("job", {"order_id": "o4"}, debounce=d) != first, "it has begun"
    assert count_workflows(retrier) == 3


def test_bad_workflow_start_keys_write_nothing(retrier: Retrier) -> None:
    workflows = _workflows(retrier)
    bad: list[Callable[[], Any]] = [
        lambda: workflows.start("job", {"order_id": "o"}, idempotency_key=""),
        lambda: workflows.start("job", {"order_id": "o"}, debounce=5),  # type: ignore[arg-type]
        lambda: workflows.start(
            "job", {"order_id": "o"}, idempotency_key="k", debounce=Debounce("k", 1)
        ),
    ]
    for call in bad:
        with pytest.raises(InvalidSettings):
            call()
    assert count_workflows(retrier) == 0


def test_runs_show_names_the_keys(retrier: Retrier, db_url: str) -> None:
    retrier.action(echo)
    keyed = retrier.run(echo, {"n": 1}, idempotency_key="order-1")
    debounced = retrier.run(echo, {"n": 1}, debounce=Debounce("doc-7", 60))
    shown = CliRunner().invoke(cli, ["--db", db_url, "runs", "show", keyed])
    assert shown.exit_code == 0 and "order-1" in shown.output, shown.output
    shown = CliRunner().invoke(cli, ["--db", db_url, "runs", "show", debounced])
    assert shown.exit_code == 0 and "doc-7" in shown.output, shown.output


def test_concurrent_debounced_workflow_starts_make_one(make_retrier: MakeRetrier) -> None:
    managers = [_workflows(make_retrier()) for _ in range(4)]
    got: list[str] = []
    start = threading.Barrier(len(managers))

    def call(workflows: WorkflowManager, i: int) -> None:
        start.wait()
        for n in range(5):
            d = Debounce("k", 3600)
            got.append(workflows.start("job", {"order_id": f"o{i}-{n}"}, debounce=d))

    threads = [threading.Thread(target=call, args=(m, i)) for i, m in enumerate(managers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 20 and len(set(got)) == 1
    retrier = managers[0].retrier
    assert count_workflows(retrier) == 1 and count_runs(retrier) == 1
