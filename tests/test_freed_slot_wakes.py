"""A record that frees a pool's slot without taking it again wakes other workers only
when a run of that pool is waiting for it (`Records.record_in`'s `_waiting_in`):
another worker may be idle beside a full pool, and nothing else would tell it. In a
pool group, a slot one pool frees is the group's too: a run waiting in a sibling pool
is worth the wake-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from retrier import FakeClock, Retrier
from retrier.engine import Outcome
from workpool import PoolGroup, Workpool

MakeRetrier = Callable[..., Retrier]


def _success(claimed: Any) -> Outcome:
    return Outcome(
        claimed.id, claimed.fence, "success", claimed.started_ms, result=None,
        attempt=claimed.attempts, queue=claimed.queue, fn=claimed.fn,
    )


def _record_counting_wakes(
    retrier: Retrier, claimed: Any, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    sent: list[str] = []
    dialect = retrier.store.dialect
    monkeypatch.setattr(dialect, "can_notify", True)
    monkeypatch.setattr(dialect, "notify", lambda _conn, kind, payload="": sent.append(kind))
    # The store's record claims nothing (claim_limit 0): the freed slot stays free.
    retrier.store.record([_success(claimed)], "w1", 60_000)
    return sent


@pytest.mark.parametrize("waiting", [True, False], ids=["an item waits", "nothing waits"])
def test_a_freed_slot_wakes_others_only_for_a_waiting_run(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch, waiting: bool
) -> None:
    retrier = make_retrier(clock=FakeClock())
    pool = Workpool(retrier, "capped", max_parallelism=1)

    @retrier.action(name="work")
    def work(n: int) -> int:
        return n

    pool.enqueue(work, {"n": 1})
    if waiting:
        pool.enqueue(work, {"n": 2})  # held back by the cap
    claimed, _ = retrier.store.claim("w1", 10, 60_000)
    assert len(claimed) == 1

    assert _record_counting_wakes(retrier, claimed[0], monkeypatch) == (
        ["wake"] if waiting else []
    )


@pytest.mark.parametrize("waiting", [True, False], ids=["a sibling waits", "nothing waits"])
def test_a_slot_freed_in_a_pool_group_wakes_others_for_a_sibling_pools_run(
    make_retrier: MakeRetrier, monkeypatch: pytest.MonkeyPatch, waiting: bool
) -> None:
    retrier = make_retrier(clock=FakeClock())
    gpu = PoolGroup(retrier, "gpu", max_parallelism=1)
    train = Workpool(retrier, "train", max_parallelism=1, group=gpu)
    infer = Workpool(retrier, "infer", max_parallelism=1, group=gpu)

    @retrier.action(name="work")
    def work(n: int) -> int:
        return n

    train.enqueue(work, {"n": 1})
    if waiting:
        infer.enqueue(work, {"n": 2})  # one of the two is held back by the group's cap
    claimed, _ = retrier.store.claim("w1", 10, 60_000)
    assert len(claimed) == 1  # either pool's run: the group's one slot

    assert _record_counting_wakes(retrier, claimed[0], monkeypatch) == (
        ["wake"] if waiting else []
    )
