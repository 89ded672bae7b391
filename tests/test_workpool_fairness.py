"""Priority and fairness between the items of a pool, on SQLite and PostgreSQL.

Claims are made by hand (`store.claim`) on a FakeClock, so each test says exactly
which item a worker's next claim starts. That both claim implementations (Python and
PostgreSQL's server function) agree on longer mixed sequences is tests/test_claims.py.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from retrier import FakeClock, InvalidSettings, Retrier
from retrier.engine import Outcome
from workpool import Workpool

MakeRetrier = Callable[..., Retrier]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(make_retrier: MakeRetrier, clock: FakeClock) -> Retrier:
    retrier = make_retrier(clock=clock)

    @retrier.action(name="work")
    def work(i: int) -> None: ...

    return retrier


def claim(retrier: Retrier, limit: int = 1) -> list[int]:
    claimed, _ = retrier.store.claim("w", limit, 60_000)
    retrier.store.record(
        [Outcome(c.id, c.fence, "success", c.started_ms, attempt=c.attempts, queue=c.queue)
         for c in claimed],
        "w",
        60_000,
    )
    return [c.args["i"] for c in claimed]


def test_among_due_items_higher_priority_starts_first(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "p", max_parallelism=10)
    for i, priority in enumerate([0, 0, 3, 1, 3]):
        pool.enqueue("work", {"i": i}, priority=priority)
        clock.advance(timedelta(seconds=1))  # each due later than the one before
    assert claim(fake, 3) == [2, 4, 3], "by priority, then due order"
    assert claim(fake, 3) == [0, 1]


def test_an_item_due_longer_than_priority_aging_goes_first(
    fake: Retrier, clock: FakeClock
) -> None:
    """The rule that keeps low priority from starving: an item due for longer than
    `priority_aging` starts before every item due after it, whatever its priority."""
    pool = Workpool(fake, "p", max_parallelism=1, priority_aging=timedelta(seconds=30))
    pool.enqueue("work", {"i": 0}, priority=0)
    clock.advance(timedelta(seconds=1))
    pool.enqueue("work", {"i": 1}, priority=-5)
    for i in range(2, 30):  # a steady stream of urgent work, due after both
        clock.advance(timedelta(seconds=1))
        pool.enqueue("work", {"i": i}, priority=10)
        assert claim(fake) == [i], "urgent work goes first while the low ones are young"
    clock.advance(timedelta(seconds=2))
    pool.enqueue("work", {"i": 40}, priority=10)
    # Both low items are now due for 30 s or more: oldest first, before urgent work.
    assert claim(fake) == [0]
    assert claim(fake) == [1]
    assert claim(fake) == [40]


def test_priority_aging_none_starts_items_in_due_order(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "p", max_parallelism=10, priority_aging=None)
    for i, priority in enumerate([0, 5, 1]):
        pool.enqueue("work", {"i": i}, priority=priority)
        clock.advance(timedelta(seconds=1))
    assert claim(fake, 3) == [0, 1, 2]
    pool.enqueue_batch([("work", {"i": 3}, {"priority": 1}), ("work", {"i": 4}, {"priority": 2})])
    assert claim(fake, 2) == [4, 3], "priority breaks ties between items due together"


def test_priority_holds_with_a_per_key_limit(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "p", max_parallelism=10, max_per_key=1)
    items: list[tuple[Any, ...]] = [
        ("work", {"i": 0}, {"key": "a", "priority": 1}),
        ("work", {"i": 1}, {"key": "a", "priority": 9}),
        ("work", {"i": 2}, {"key": "b", "priority": 5}),
        ("work", {"i": 3}, {"priority": 0}),
    ]
    for item in items:
        pool.enqueue_batch([item])
        clock.advance(timedelta(milliseconds=10))
    claimed, _ = fake.store.claim("w", 10, 60_000)
    assert [c.args["i"] for c in claimed] == [1, 2, 3], "one of key a: its most urgent"


def test_explain_counts_the_items_ahead_in_claim_order(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "p", max_parallelism=10, priority_aging=timedelta(seconds=30))
    old = pool.enqueue("work", {"i": 0}, priority=0)
    clock.advance(timedelta(seconds=40))
    young_low = pool.enqueue("work", {"i": 1}, priority=0)
    clock.advance(timedelta(seconds=1))
    pool.enqueue("work", {"i": 2}, priority=5)
    fake.worker().announce()  # a live worker that can run it, claiming nothing
    assert pool.explain(old).details["ahead"] == 0, "aged: before every younger item"
    assert pool.explain(young_low).details["ahead"] == 2


@pytest.mark.parametrize(
    "bad", [-1, 0, "soon", timedelta(days=31), float("nan"), True]
)
def test_bad_priority_aging_is_refused_before_anything_is_written(
    fake: Retrier, bad: Any
) -> None:
    with pytest.raises(InvalidSettings, match="priority_aging"):
        Workpool(fake, "bad", priority_aging=bad)
    assert fake.store.get_queue("bad") is None


def test_one_keys_backlog_does_not_delay_another_keys_item(
    fake: Retrier, clock: FakeClock
) -> None:
    pool = Workpool(fake, "turns", max_parallelism=2, round_robin_keys=True)
    fifo = Workpool(fake, "fifo", max_parallelism=2)
    for p in (pool, fifo):
        p.enqueue_batch([("work", {"i": i}, {"key": "big"}) for i in range(10_000)])
        clock.advance(timedelta(milliseconds=1))
        p.enqueue("work", {"i": -1}, key="small")
    claimed, _ = fake.store.claim("w", 4, 60_000)
    took = {(c.queue, c.args["i"]) for c in claimed}
    assert len(took) == 4
    assert ("turns", -1) in took, "its turn comes at once"
    assert ("fifo", -1) not in took, "in due order it waits for the 10,000"


def test_keys_take_turns_from_claim_to_claim(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "turns", max_parallelism=1, round_robin_keys=True)
    items: list[tuple[Any, ...]] = []
    for i in range(9):  # a's three items first, then b's, then the keyless ones
        key = ["a", "b", None][i // 3]
        items.append(("work", {"i": i}, {"key": key} if key else {}))
    pool.enqueue_batch(items)
    order = [claim(fake)[0] for _ in range(9)]
    # Items without a key are one group, first in the ring; each key's in due order.
    assert order == [6, 0, 3, 7, 1, 4, 8, 2, 5]


def test_explain_counts_the_items_of_its_key_ahead_where_keys_take_turns(
    fake: Retrier,
) -> None:
    pool = Workpool(fake, "turns", max_parallelism=1, round_robin_keys=True)
    pool.enqueue_batch([("work", {"i": i}, {"key": "big"}) for i in range(50)])
    small = pool.enqueue("work", {"i": 50}, key="small")
    fake.worker().announce()
    assert pool.explain(small).details["ahead"] == 0


def test_turns_respect_the_per_key_limit(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "turns", max_parallelism=10, max_per_key=1, round_robin_keys=True)
    pool.enqueue_batch([("work", {"i": i}, {"key": "ab"[i % 2]}) for i in range(6)])
    claimed, _ = fake.store.claim("w", 10, 60_000)
    assert sorted(c.args["i"] for c in claimed) == [0, 1]


def test_bad_round_robin_keys_is_refused(fake: Retrier) -> None:
    with pytest.raises(InvalidSettings, match="round_robin_keys"):
        Workpool(fake, "bad", round_robin_keys="yes")  # type: ignore[arg-type]
    assert fake.store.get_queue("bad") is None


# -- per-key (per-tenant) caps stored as data ---------------------------------------------


def test_a_key_limit_overrides_max_per_key_for_one_key(fake: Retrier) -> None:
    pool = Workpool(fake, "tenants", max_parallelism=20, max_per_key=2)
    pool.set_key_limit("tenant-42", max_parallelism=5)
    pool.set_key_limit("tenant-7", max_parallelism=0)  # paused
    pool.enqueue_batch(
        [("work", {"i": i}, {"key": ["tenant-42", "tenant-7", "other"][i % 3]})
         for i in range(30)]
    )
    claimed, _ = fake.store.claim("w", 30, 60_000)
    by_key: dict[str, int] = {}
    for c in claimed:
        key = ["tenant-42", "tenant-7", "other"][c.args["i"] % 3]
        by_key[key] = by_key.get(key, 0) + 1
    assert by_key == {"tenant-42": 5, "other": 2}
    assert pool.key_limits() == {"tenant-42": 5, "tenant-7": 0}
    pool.set_key_limit("tenant-7", max_parallelism=None)  # back to max_per_key
    claimed, _ = fake.store.claim("w", 30, 60_000)
    assert len(claimed) == 2 and pool.key_limits() == {"tenant-42": 5}


def test_a_key_limit_alone_limits_only_that_key(fake: Retrier) -> None:
    pool = Workpool(fake, "tenants", max_parallelism=20)
    pool.set_key_limit("noisy", max_parallelism=1)
    pool.enqueue_batch([("work", {"i": i}, {"key": "noisy" if i < 5 else "calm"})
                        for i in range(10)])
    claimed, _ = fake.store.claim("w", 30, 60_000)
    assert sorted(c.args["i"] for c in claimed) == [0, 5, 6, 7, 8, 9]


def test_a_key_limit_is_written_in_the_callers_transaction(fake: Retrier) -> None:
    pool = Workpool(fake, "tenants", max_parallelism=20)
    with fake.session() as s:
        pool.set_key_limit("t", max_parallelism=1, session=s)
        s.rollback()
    assert pool.key_limits() == {}
    with fake.session() as s:
        pool.set_key_limit("t", max_parallelism=1, session=s)
        s.commit()
    assert pool.key_limits() == {"t": 1}


def test_explain_names_a_keys_own_cap(fake: Retrier) -> None:
    from retrier import _explain as reasons

    pool = Workpool(fake, "tenants", max_parallelism=20, max_per_key=4)
    pool.set_key_limit("t", max_parallelism=1)
    pool.set_key_limit("off", max_parallelism=0)
    first = pool.enqueue("work", {"i": 0}, key="t")
    second = pool.enqueue("work", {"i": 1}, key="t")
    paused = pool.enqueue("work", {"i": 2}, key="off")
    fake.worker().announce()
    assert [c.id for c in fake.store.claim("w", 10, 60_000)[0]] == [first]
    why = pool.explain(second)
    assert why.reason == reasons.KEY_LIMIT, why
    assert "its own limit" in why.message and why.details["max_parallelism"] == 1
    assert pool.explain(paused).reason == reasons.KEY_LIMIT
    assert "paused" in pool.explain(paused).message


@pytest.mark.parametrize("bad", [-1, 100_001, 1.5, True, "5"])
def test_bad_key_limits_are_refused_before_anything_is_written(fake: Retrier, bad: Any) -> None:
    pool = Workpool(fake, "tenants")
    with pytest.raises(InvalidSettings, match="max_parallelism"):
        pool.set_key_limit("t", max_parallelism=bad)
    for bad_key in ("", "x" * 201, "a\x00b", 7):
        with pytest.raises(InvalidSettings):
            pool.set_key_limit(bad_key, max_parallelism=1)  # type: ignore[arg-type]
    assert pool.key_limits() == {}


def test_the_cli_sets_shows_and_removes_a_keys_cap(fake: Retrier, db_url: str) -> None:
    from click.testing import CliRunner

    from retrier._cli import main as cli

    pool = Workpool(fake, "tenants", max_parallelism=8, max_per_key=2, round_robin_keys=True,
                    rate_limit_per_key=(3, 2))
    runner = CliRunner()
    done = runner.invoke(cli, ["--db", db_url, "pools", "set-key-limit", "tenants", "t-42", "5"])
    assert done.exit_code == 0, done.output
    assert pool.key_limits() == {"t-42": 5}
    shown = runner.invoke(cli, ["--db", db_url, "pools", "show", "tenants"])
    assert shown.exit_code == 0, shown.output
    for expected in ("key limits", "t-42", "5", "round-robin", "3 per 2 s per key"):
        assert expected in shown.output
    removed = runner.invoke(
        cli, ["--db", db_url, "pools", "set-key-limit", "tenants", "t-42", "--remove"]
    )
    assert removed.exit_code == 0 and pool.key_limits() == {}
    for bad in (["tenants", "t", "-1"], ["nope", "t", "1"], ["tenants", "t"]):
        refused = runner.invoke(cli, ["--db", db_url, "pools", "set-key-limit", *bad])
        assert refused.exit_code != 0, bad
    assert pool.key_limits() == {}


# -- rate limit per key ---------------------------------------------------------------------


def test_each_key_starts_at_most_n_items_per_window(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "rated", max_parallelism=50,
                    rate_limit_per_key=(2, timedelta(seconds=1)))
    pool.enqueue_batch(
        [("work", {"i": i}, {"key": "ab"[i % 2]} if i < 10 else {}) for i in range(12)]
    )
    claimed, wake = fake.store.claim("w", 50, 60_000)
    assert sorted(c.args["i"] for c in claimed) == [0, 1, 2, 3, 10, 11], "2 per key; no key: free"
    assert wake == clock.now_ms() + 1000, "the claim says when a key's window reopens"
    clock.advance(timedelta(milliseconds=999))
    assert fake.store.claim("w", 50, 60_000)[0] == []
    clock.advance(timedelta(milliseconds=1))
    assert sorted(c.args["i"] for c in fake.store.claim("w", 50, 60_000)[0]) == [4, 5, 6, 7]


def test_the_window_slides_over_finished_starts(fake: Retrier, clock: FakeClock) -> None:
    pool = Workpool(fake, "rated", max_parallelism=50, rate_limit_per_key=(3, 10.0))
    pool.enqueue_batch([("work", {"i": i}, {"key": "k"}) for i in range(6)])
    assert claim(fake, 1) == [0]  # started and finished: still in the window
    clock.advance(timedelta(seconds=4))
    assert claim(fake, 5) == [1, 2]
    clock.advance(timedelta(seconds=6))  # the first start leaves the window
    assert claim(fake, 5) == [3]
    clock.advance(timedelta(seconds=4))  # and the next two
    assert claim(fake, 5) == [4, 5]


def test_explain_says_a_keys_rate_window_is_used_up(fake: Retrier, clock: FakeClock) -> None:
    from retrier import _explain as reasons

    pool = Workpool(fake, "rated", max_parallelism=50, rate_limit_per_key=(1, 30.0))
    pool.enqueue_batch([("work", {"i": i}, {"key": "k"}) for i in range(2)])
    waiting = pool.enqueue("work", {"i": 2}, key="k")
    other = pool.enqueue("work", {"i": 3}, key="other")
    fake.worker().announce()
    assert claim(fake, 1) == [0]
    why = pool.explain(waiting)
    assert why.reason == reasons.KEY_RATE_LIMITED, why
    assert why.until is not None and "rate_limit_per_key" in why.message
    assert pool.explain(other).reason == reasons.CLAIMABLE


@pytest.mark.parametrize("bad", [(0, 1), (2, 0), (2, -1), 5, (1.5, 1), (2, timedelta(days=31))])
def test_bad_rate_limit_per_key_is_refused(fake: Retrier, bad: Any) -> None:
    with pytest.raises(InvalidSettings):
        Workpool(fake, "bad", rate_limit_per_key=bad)
    assert fake.store.get_queue("bad") is None
